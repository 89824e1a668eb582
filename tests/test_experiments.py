import json
import math
import re
import statistics

import pytest

from moekit import experiments
from tests.analysis.test_significance import t_quantile_by_integration

TINY = experiments.Budget(steps=3, seeds=(0, 1, 2), batch_size=2, seq_len=16, evals=3, eval_batches=1,
                          max_bytes=60_000, expert_counts=(2, 4), workers=1)


def paired_reference(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Textbook paired t-interval of a - b, with the t quantile from the integrated density."""
    d = [x - y for x, y in zip(a, b)]
    half = t_quantile_by_integration(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return statistics.mean(d), statistics.mean(d) - half, statistics.mean(d) + half


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEKIT_CACHE", str(out / "cache"))
    mp.setattr(experiments, "QUICK", TINY)
    path = experiments.run_all(out / "report", quick=True, only=["moe_vs_dense", "distill"])
    yield out, path.read_text(), json.loads((out / "report" / "experiments" / "runs.json").read_text())
    mp.undo()


def by_name(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        out.setdefault(r["name"], []).append(r)
    return out


def test_report_goes_to_out_with_three_seeds_per_configuration(report):
    out, text, runs = report
    assert (out / "report" / "experiments.md").is_file()
    assert (out / "report" / "experiments" / "moe_vs_dense_flops.png").stat().st_size > 1000
    runs_by = by_name(runs)
    assert set(runs_by) == {"MoE E=8", "dense twin", "KD student (dense twin)"}
    assert all([r["seed"] for r in rows] == [0, 1, 2] for rows in runs_by.values())
    # each student learnt from the MoE of its own seed
    teacher_of = {r["key"]: r["seed"] for r in runs_by["MoE E=8"]}
    assert [teacher_of[r["teacher"]] for r in runs_by["KD student (dense twin)"]] == [0, 1, 2]
    # the dense twin has the MoE's active FLOPs, and fewer parameters
    moe, dense = runs_by["MoE E=8"][0], runs_by["dense twin"][0]
    assert dense["flops_per_step"] == pytest.approx(moe["flops_per_step"], rel=0.02)
    assert dense["params"] < moe["params"]


def test_table_and_interval_are_recomputed_from_runs_json(report):
    _, text, runs = report
    runs_by = by_name(runs)
    moe = [r["val_loss"] for r in runs_by["MoE E=8"]]
    dense = [r["val_loss"] for r in runs_by["dense twin"]]
    row = re.search(r"\| MoE \| ([0-9.]+) ± ([0-9.]+) \|", text)
    assert float(row.group(1)) == pytest.approx(statistics.mean(moe), abs=1e-4)
    assert float(row.group(2)) == pytest.approx(statistics.stdev(moe), abs=1e-4)
    m = re.search(r"dense minus MoE \(positive = MoE better\): ([-+][0-9.]+) \[95% CI ([-+][0-9.]+), ([-+][0-9.]+)\]",
                  text)
    mean, lo, hi = paired_reference(dense, moe)
    assert [float(g) for g in m.groups()] == pytest.approx([mean, lo, hi], abs=2e-4)
    if lo < 0 < hi:
        assert "no significant difference between the MoE and the dense twin" in text
    else:
        assert "no significant difference between the MoE and the dense twin" not in text


def test_speedup_counts_the_seeds_that_reached_the_target(report):
    _, text, runs = report
    runs_by = by_name(runs)
    reached = 0
    for m, d in zip(runs_by["MoE E=8"], runs_by["dense twin"]):
        reached += any(loss <= d["val_loss"] for _, loss in m["val_curve"])
    assert f"reaches the dense twin's final loss in {reached} of 3 seeds" in text


def test_gain_retained_per_seed_from_the_recorded_losses(report):
    _, text, runs = report
    runs_by = by_name(runs)
    for t, sc, st in zip(runs_by["MoE E=8"], runs_by["dense twin"], runs_by["KD student (dense twin)"]):
        gain = sc["val_loss"] - t["val_loss"]
        cell = "n/a (no MoE gain)" if gain <= 0 else f"{(sc['val_loss'] - st['val_loss']) / gain:.0%}"
        assert (f"| {t['seed']} | {sc['val_loss']:.4f} | {st['val_loss']:.4f} | {t['val_loss']:.4f} | {cell} |"
                in text)


def test_a_second_invocation_trains_nothing_and_writes_the_same_numbers(report, monkeypatch):
    out, text, _ = report
    monkeypatch.setenv("MOEKIT_CACHE", str(out / "cache"))
    monkeypatch.setattr(experiments, "QUICK", TINY)
    monkeypatch.setattr(experiments, "train_run", lambda *a, **k: pytest.fail("a cached run was retrained"))
    again = experiments.run_all(out / "report", quick=True, only=["moe_vs_dense", "distill"]).read_text()
    table = re.compile(r"^\| (MoE|dense twin|\d) \|.*$", re.M)
    # the step-time column is re-measured; everything else is the same
    strip = re.compile(r"\| [0-9.]+ ms ±\d+% \|")
    rows = [[strip.sub("", m.group(0)) for m in table.finditer(t)] for t in (text, again)]
    assert rows[0] == rows[1] and len(rows[0]) == 2 + 3  # MoE, dense, 3 distillation seeds


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [[10, 5.0], [20, 4.0], [30, 3.0]]
    assert experiments.steps_to_reach(curve, 3.5) == pytest.approx(25.0)
    assert experiments.steps_to_reach(curve, 6.0) == 10.0
    assert experiments.steps_to_reach(curve, 2.0) is None


def test_demo_quotes_the_spread_the_report_measured(tmp_path):
    vocab = 512
    plan = experiments.plan_moe_vs_dense(experiments.FULL, vocab)
    moe, dense = [3.0, 3.1, 3.05], [3.1, 3.21, 3.14]
    rows = [{"key": s.key(experiments.FULL), "config": s.cfg.to_dict(), "val_loss": v}
            for ss, vs in ((plan["MoE"], moe), (plan["dense"], dense)) for s, v in zip(ss, vs)]
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(rows))
    got = experiments.reported_diff(path)
    mean, lo, hi = paired_reference(dense, moe)
    assert (got.mean, got.lo, got.hi) == pytest.approx((mean, lo, hi), rel=1e-4)
    line = experiments.demo_verdict([3.0], [3.08], got)
    sd = statistics.stdev([d - m for d, m in zip(dense, moe)])
    assert "+0.0800 nats" in line and "over 3 seeds" in line and f"{sd:.4f} nats" in line
    assert "no interval" in experiments.demo_verdict([3.0], [3.08], None)
    assert experiments.demo_verdict(moe, dense, None).startswith("Verdict: the MoE beats the dense twin")


def test_seed_groups_pairs_seeds_and_leaves_out_unfinished_optional_labels(tmp_path):
    r = experiments.Runner(TINY, tmp_path)
    specs = {label: [experiments.RunSpec(label, experiments.moe_config(TINY, 300, num_experts=E), s)
                     for s in TINY.seeds] for label, E in (("A", 2), ("B", 4), ("C", 8))}
    finished = {"A": (0, 1, 2), "B": (0, 2), "C": (0,)}
    for label, seeds in finished.items():
        for s in seeds:
            spec = specs[label][s]
            r.rows[spec.key(TINY)] = {"key": spec.key(TINY), "seed": s, "label": label}
    g, seeds = experiments.seed_groups(r, specs)  # every label required: only seed 0 has all three
    assert seeds == [0] and [x["label"] for x in g["C"]] == ["C"]
    g, seeds = experiments.seed_groups(r, specs, required=("A", "B"))  # C is unfinished: left out
    assert set(g) == {"A", "B"} and seeds == [0, 2]
    assert [x["seed"] for x in g["A"]] == [x["seed"] for x in g["B"]] == [0, 2]


def test_confirmation_runs_fresh_seeds_and_reports_the_paired_interval(tmp_path):
    """The confirmation experiment trains seeds the setup experiment never saw, and its verdict is the
    textbook paired t-interval of dense minus MoE over those seeds."""
    vocab = 512
    plan = experiments.plan_confirm(experiments.FULL, vocab)
    seeds = [s.seed for s in plan["dense"]]
    assert not set(seeds) & set(experiments.FULL.seeds) and all([s.seed for s in v] == seeds for v in plan.values())
    assert plan["MoE aux 0.001"][0].cfg.moe.loss.aux_coef == 0.001
    assert plan["MoE aux 0.01"][0].key(experiments.FULL) == experiments.RunSpec(
        "MoE", experiments.moe_config(experiments.FULL, vocab), seeds[0]).key(experiments.FULL)
    r = experiments.Runner(experiments.FULL, tmp_path)
    losses = {"dense": [3.10, 3.20, 3.15], "MoE aux 0.01": [3.12, 3.18, 3.16], "MoE aux 0.001": [3.00, 3.11, 3.02]}
    for label, vs in losses.items():
        for spec, v in zip(plan[label], vs):
            r.rows[spec.key(experiments.FULL)] = {"key": spec.key(experiments.FULL), "seed": spec.seed, "val_loss": v,
                                                  "val_curve": [[150, v + 0.2], [300, v]]}
    first = experiments.plan_moe_vs_dense(experiments.FULL, vocab)  # experiment 1: the base MoE on seeds 0-2
    first_losses = {"dense": [3.30, 3.25, 3.28], "MoE": [3.27, 3.24, 3.22]}
    for label, vs in first_losses.items():
        for spec, v in zip(first[label], vs):
            r.rows[spec.key(experiments.FULL)] = {"key": spec.key(experiments.FULL), "seed": spec.seed, "val_loss": v,
                                                  "val_curve": [[150, v + 0.2], [300, v]]}
    g, got_seeds = experiments.seed_groups(r, plan)
    lines = []
    experiments.report_confirm(r, plan, g, got_seeds, lines)
    text = "\n".join(lines)
    mean, lo, hi = paired_reference(losses["dense"], losses["MoE aux 0.001"])
    assert f"{mean:+.4f} [95% CI {lo:+.4f}, {hi:+.4f}]" in text
    assert "MoE aux 0.001: the MoE aux 0.001 beats the dense twin" in text
    assert "MoE aux 0.01: no significant difference" in text
    mean, lo, hi = paired_reference(losses["MoE aux 0.01"], losses["MoE aux 0.001"])
    assert f"aux 0.001 beats aux 0.01 by {mean:.4f} nats [95% CI {lo:.4f}, {hi:.4f}] (n=3 seeds)" in text
    # the base MoE pooled over experiment 1's seeds and the fresh ones: one paired interval over six seeds
    mean, lo, hi = paired_reference(first_losses["dense"] + losses["dense"], first_losses["MoE"] + losses["MoE aux 0.01"])
    assert lo < 0 < hi and f"{mean:+.4f} nats [95% CI {lo:+.4f}, {hi:+.4f}] crosses 0 (n=6 seeds)" in text
    assert "ends lower in 4 of 6 seeds" in text  # 3 of experiment 1's, 1 of the fresh ones


def test_committed_report_holds_every_planned_full_run_under_its_current_key():
    """docs/experiments/runs.json is the cache `moekit experiments` and the demo read by run key: every run of
    the full plan is found there (else the 45-minute report retrains and the demo quotes nothing), and each
    stored config is the planned one."""
    from moekit.config import ModelConfig

    rows = {r["key"]: r for r in json.loads(experiments.committed_runs().read_text())}
    vocab = experiments._vocab_of(rows)
    specs = [s for _, plan, _ in experiments.EXPERIMENTS.values()
             for group in plan(experiments.FULL, vocab).values() for s in group]
    for s in specs:
        row = rows.get(s.key(experiments.FULL))
        assert row is not None, f"{s.name} seed {s.seed} not in runs.json under its key"
        assert (row["name"], row["seed"]) == (s.name, s.seed)
        assert ModelConfig.from_dict(row["config"]) == s.cfg
        assert row["teacher"] == (s.teacher.key(experiments.FULL) if s.teacher else None)
    assert experiments.reported_diff().n >= 3
