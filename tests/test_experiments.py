import json
import re

from moekit import experiments


def test_quick_report_numbers_come_from_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    tiny = experiments.Budget(steps=2, seeds=(0, 1), batch_size=2, seq_len=16, eval_batches=1, max_bytes=120_000,
                              expert_counts=(1, 2), capacity_factors=(0.5, None))
    monkeypatch.setattr(experiments, "QUICK", tiny)
    report = experiments.run_all(tmp_path, quick=True, only=["moe_vs_dense", "capacity"])
    text = report.read_text()
    runs = json.loads((tmp_path / "experiments" / "runs.json").read_text())
    assert {r["name"] for r in runs} >= {"moe", "dense", "top1 cf=0.5", "top2 cf=None"}
    # the table's mean +- std is computed from the recorded runs
    moe = [r["val_loss"] for r in runs if r["name"] == "moe"]
    mean = sum(moe) / len(moe)
    row = re.search(r"\| MoE \| ([0-9.]+) ± ([0-9.]+) \|", text)
    assert row and abs(float(row.group(1)) - mean) < 1e-4
    assert "QUICK smoke-test mode" in text and "46.7B" in text
    assert (tmp_path / "experiments" / "moe_vs_dense.png").stat().st_size > 1000
    assert all(r["config"]["moe"] is None or r["config"]["moe"]["num_experts"] >= 1 for r in runs)
