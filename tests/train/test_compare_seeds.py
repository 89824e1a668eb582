"""`moekit compare --seeds N`: one MoE and one dense twin per seed, and a verdict whose interval is the
textbook paired t-interval of the recorded losses."""
import json
import math
import re
import statistics

import pytest

from moekit.cli import main
from moekit.config import ModelConfig, MoEConfig, RouterConfig
from tests.analysis.test_significance import t_quantile_by_integration
from tests.corpus import write_docs


def test_compare_with_three_seeds_prints_the_paired_interval(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    docs = write_docs(tmp_path / "docs", "def g{i}_{j}(x):\n    return x + {j}\n", 120)
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=4, max_seq_len=64,
                      moe=MoEConfig(d_model=32, num_experts=4, expert_hidden=16, router=RouterConfig(top_k=2)))
    (tmp_path / "model.json").write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(docs), "--config", str(tmp_path / "model.json"), "--vocab-size", "300",
                 "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--seeds", "3", "--seed", "5",
                 "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [5, 6, 7]
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"moe", "dense", "moe-seed6", "dense-seed6",
                                                               "moe-seed7", "dense-seed7"}
    d = [a - b for a, b in zip(summary["dense_val_losses"], summary["moe_val_losses"])]
    half = t_quantile_by_integration(2) * statistics.stdev(d) / math.sqrt(3)
    printed = capsys.readouterr().out
    m = re.search(r"([-+]?[0-9.]+) nats \[95% CI ([-+]?[0-9.]+), ([-+]?[0-9.]+)\]", printed)
    mean = statistics.mean(d)
    if mean - half < 0 < mean + half:
        assert "no significant difference" in printed
        assert [float(g) for g in m.groups()] == pytest.approx([mean, mean - half, mean + half], abs=1e-4)
    else:  # "X beats Y by |mean| [CI]": the interval of the winner's advantage
        assert [float(g) for g in m.groups()] == pytest.approx([abs(mean), abs(mean) - half,
                                                                abs(mean) + half], abs=1e-4)
