import json
import re
import statistics

from moekit import experiments


def test_quick_report_numbers_come_from_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    tiny = experiments.Budget(steps=2, seeds=(0, 1), batch_size=2, seq_len=16, eval_batches=1, max_bytes=40_000,
                              expert_counts=(1, 2), capacity_factors=(0.5, None))
    monkeypatch.setattr(experiments, "QUICK", tiny)
    report = experiments.run_all(tmp_path, quick=True, only=["moe_vs_dense", "capacity"])
    text = report.read_text()
    runs = json.loads((tmp_path / "experiments" / "runs.json").read_text())
    by_name = {}
    for r in runs:
        by_name.setdefault(r["name"], []).append(r)
    # the dropless top-2 point is the same config as experiment 1's MoE: trained once, reused
    assert set(by_name) == {"moe", "dense", "top1 cf=0.5", "top1 cf=None", "top2 cf=0.5"}
    assert all("top2 cf=None" in r["used_as"] for r in by_name["moe"])
    assert all(len(rows) == 2 and {r["seed"] for r in rows} == {0, 1} for rows in by_name.values())
    # the tables' mean +- std and dropped fractions are computed from the recorded runs
    moe = [r["val_loss"] for r in by_name["moe"]]
    row = re.search(r"\| MoE \| ([0-9.]+) ± ([0-9.]+) \|", text)
    assert row and abs(float(row.group(1)) - statistics.mean(moe)) < 1e-4
    assert abs(float(row.group(2)) - statistics.stdev(moe)) < 1e-4
    cap = re.search(r"\| top-1 \| 0.5 \| ([0-9.]+) ± [0-9.]+ \| ([0-9.]+) \|", text)
    top1 = by_name["top1 cf=0.5"]
    assert abs(float(cap.group(1)) - statistics.mean(r["val_loss"] for r in top1)) < 1e-4
    assert abs(float(cap.group(2)) - statistics.mean(r["dropped"] for r in top1)) < 1e-3
    assert float(cap.group(2)) > 0.2  # capacity factor 0.5 must drop tokens; dropless never does
    assert all(r["dropped"] == 0 for r in by_name["top1 cf=None"])
    # configs and per-seed losses sit in the appendix
    assert re.search(r"\| top1 cf=0.5 \| - \| 8 \| 1 \| \w+ \| 0.5 \|", text)
    assert ", ".join(f"{r['val_loss']:.4f}" for r in top1) in text
    assert "QUICK smoke-test mode" in text and "46.7B" in text
    assert (tmp_path / "experiments" / "moe_vs_dense.png").stat().st_size > 1000
    assert (tmp_path / "experiments" / "capacity.png").stat().st_size > 1000
