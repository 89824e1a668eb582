"""The README's Families table says what the code does: a "yes" under patch, convert or calc (convert: or
"load", a family read but exported as another) for a model_type exactly when that model_type has a patch entry, a convert family or a calc spec, and every model_type the
code supports has a row (the cells' own tests are named in the README above the table)."""

import re
from pathlib import Path

from moekit.analysis.params import HF_SPECS
from moekit.interop.families import FAMILIES
from moekit.interop.patch_families import PATCH_FAMILIES

README = Path(__file__).resolve().parents[2] / "README.md"


def table_rows() -> dict[str, tuple[str, str, str]]:
    text = README.read_text().split("### Families", 1)[1]
    rows = {}
    for line in text.splitlines():
        if rows and not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 4 or cells[0].startswith(("family", "---")):
            continue
        for mt in re.sub(r"\([^)]*\)", "", cells[0]).split(","):
            rows[mt.strip(" `")] = tuple(cells[1:])
    return rows


def test_every_yes_is_an_entry_and_every_entry_a_yes():
    rows = table_rows()
    # kimi_k2 has no calc spec of its own: the config reader reads it through its architectures as deepseek_v3
    calc = set(HF_SPECS) | {"kimi_k2"}
    for column, entries in enumerate((PATCH_FAMILIES, FAMILIES, calc)):
        said = {mt for mt, cells in rows.items() if cells[column].startswith(("yes", "load"))}
        assert said == set(entries), ("patch", "convert", "calc")[column]


def test_every_supported_model_type_has_a_row():
    rows = table_rows()
    assert set(PATCH_FAMILIES) | set(FAMILIES) | set(HF_SPECS) <= set(rows)
