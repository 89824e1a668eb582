"""`moekit experiments` / `python -m moekit.experiments`: the seeds' claims, reproduced at small scale on
real text, written to a Markdown report with plots. Every number in the report comes from this run;
seeds and configs are recorded beside it; results that disagree with the literature are said to.

Full mode (default) takes 5-8 minutes on an idle 2-core CPU (~18 when sharing it with other jobs);
``--quick`` is a smoke-sized run for CI.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
import time
from pathlib import Path

import torch

from moekit.analysis import plots
from moekit.config import CapacityConfig, LossConfig, ModelConfig, MoEConfig, RouterConfig, TrainConfig
from moekit.deploy.distill import gain_retained, kd_loss_fn
from moekit.models.decoder import MoETransformer, lm_loss
from moekit.train.data import TokenStream, build_corpus, stdlib_dir
from moekit.train.hooks import RouterBiasUpdate
from moekit.train.trainer import evaluate, train


@dataclasses.dataclass
class Budget:
    steps: int
    seeds: tuple[int, ...]
    batch_size: int = 8
    seq_len: int = 128
    eval_batches: int = 8
    max_bytes: int = 4_000_000
    expert_counts: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    capacity_factors: tuple = (0.5, 1.0, 1.25, 2.0, None)


# Full: ~40 runs of 250 steps x 512 tokens at ~0.03 s/step on 2 idle cores (runs shared by experiments train once).
FULL = Budget(steps=250, seeds=(0, 1), seq_len=64)
QUICK = Budget(steps=6, seeds=(0, 1), batch_size=2, seq_len=32, eval_batches=1, max_bytes=300_000,
               expert_counts=(1, 2, 4), capacity_factors=(0.5, None))


def base_config(vocab: int, num_experts: int = 8, top_k: int = 2, **moe_kw) -> ModelConfig:
    d = 96
    moe = MoEConfig(d_model=d, num_experts=num_experts, expert_hidden=128,
                    router=moe_kw.pop("router", RouterConfig(top_k=top_k)),
                    loss=moe_kw.pop("loss", LossConfig(aux_coef=0.01)), **moe_kw)
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=3, n_heads=4, max_seq_len=256, moe=moe)


class Runner:
    def __init__(self, budget: Budget, out: Path):
        self.b, self.out = budget, out
        self.corpus = build_corpus(vocab_size=2048, max_bytes=budget.max_bytes)
        self.vocab = self.corpus.tokenizer.vocab_size
        self.runs: list[dict] = []
        self._cache: dict[tuple[str, int], dict] = {}

    def tcfg(self, **kw) -> TrainConfig:
        b = self.b
        return TrainConfig(**{"steps": b.steps, "batch_size": b.batch_size, "seq_len": b.seq_len, "lr": 3e-3,
                              "warmup_steps": max(1, b.steps // 20), "eval_every": max(1, b.steps // 10),
                              "eval_batches": b.eval_batches, "log_every": max(1, b.steps // 30), **kw})

    def timing_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.corpus.val.eval_batches(1, self.b.batch_size, self.b.seq_len)[0]

    def cached(self, name: str, cfg: ModelConfig, seed: int) -> dict:
        """A default-data run, shared by experiments asking for the same config and seed (e.g. the base MoE is
        experiment 1's model, the 8-expert point, the dropless top-2 point, the Switch-aux point and the teacher)."""
        key = (json.dumps(cfg.to_dict(), sort_keys=True), seed)
        if key not in self._cache:
            self._cache[key] = self.run(name, cfg, seed)
        self._cache[key].setdefault("used_as", []).append(name)
        return self._cache[key]

    def run(self, name: str, cfg: ModelConfig, seed: int, *, data: TokenStream | None = None,
            val: TokenStream | None = None, model: MoETransformer | None = None, **train_kw) -> dict:
        torch.manual_seed(seed)
        model = model if model is not None else MoETransformer(cfg)
        tc = self.tcfg(seed=seed, **train_kw.pop("tcfg", {}))
        t0 = time.perf_counter()
        records = train(model, data or self.corpus.train, val or self.corpus.val, tc, hooks=[RouterBiasUpdate()],
                        **train_kw)
        seconds = time.perf_counter() - t0
        tr = [r for r in records if r["split"] == "train"]
        va = [r for r in records if r["split"] == "val"]
        row = {"name": name, "seed": seed, "val_loss": va[-1]["val_loss"], "val_curve": [(r["step"], r["val_loss"])
                                                                                         for r in va],
               "flops_per_step": va[-1]["flops"] / va[-1]["step"], "imbalance": statistics.mean(
                   r["imbalance"] for r in tr[-max(1, len(tr) // 5):]), "dropped": statistics.mean(
                   r["dropped"] for r in tr), "step_s": seconds / tc.steps, "params": model.num_params(),
               "active": model.num_active_params(),
               "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "imbalance_curve": [(r["step"], r["imbalance"]) for r in tr], "records": records,
               "config": cfg.to_dict(), "train_config": vars(tc)}
        self.runs.append(row)
        row["model"] = model
        return row


def step_times(models: dict[str, torch.nn.Module], batch: tuple[torch.Tensor, torch.Tensor],
               rounds: int = 5) -> dict[str, float]:
    """Seconds per forward+backward on one batch, min over round-robin rounds: the runs' own wall times are
    measured minutes apart on a shared machine, so only same-process, interleaved timings compare configs."""
    x, y = batch
    best = dict.fromkeys(models, math.inf)
    for _ in range(rounds):
        for label, model in models.items():
            model.train()
            t0 = time.perf_counter()
            lm_loss(model(x).logits, y).backward()
            best[label] = min(best[label], time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    return best


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step where the (linearly interpolated) validation curve reaches ``target``."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None:
                return float(step)
            (s0, l0) = prev
            return s0 + (l0 - target) / (l0 - loss) * (step - s0)
        prev = (step, loss)
    return None


def exp_moe_vs_dense(r: Runner, lines: list[str]) -> None:
    cfg = base_config(r.vocab)
    moe = [r.cached("moe", cfg, s) for s in r.b.seeds]
    dense = [r.cached("dense", cfg.dense_twin(), s) for s in r.b.seeds]
    hits = [steps_to_reach(m["val_curve"], d["val_loss"]) for m, d in zip(moe, dense)]
    speedups = [d["val_curve"][-1][0] / h if h else float("nan") for h, d in zip(hits, dense)]
    plots.loss_curves({f"MoE seed {m['seed']}": m["records"] for m in moe} |
                      {f"dense seed {d['seed']}": d["records"] for d in dense}, r.out / "moe_vs_dense.png")
    sp = [s for s in speedups if not math.isnan(s)]
    gap = statistics.mean(d["val_loss"] for d in dense) - statistics.mean(m["val_loss"] for m in moe)
    flop_ratio = moe[0]["flops_per_step"] / dense[0]["flops_per_step"]
    t = step_times({"moe": moe[0]["model"], "dense": dense[0]["model"]}, r.timing_batch())
    verdict = (f"{statistics.mean(sp):.2f}x fewer steps (and {statistics.mean(sp) / flop_ratio:.2f}x fewer FLOPs)"
               if len(sp) == len(speedups) else "not reached in every seed")
    lines += ["## 1. MoE vs dense at matched active compute", "",
              f"MoE: 8 experts x hidden 128, top-2 ({moe[0]['params']:,} params, {moe[0]['active']:,} active); "
              f"dense twin: FFN hidden 256 ({dense[0]['params']:,} params). FLOPs per step MoE/dense: "
              f"{flop_ratio:.3f}; same batches and seeds.", "",
              "| model | final val loss | fwd+bwd time (s) | steps to dense final loss | FLOPs to dense final loss |",
              "|---|---|---|---|---|",
              f"| MoE | {mean_std([m['val_loss'] for m in moe])} | {t['moe']:.4f} | "
              f"{_opt_mean(hits)} | {_opt_mean([h and h * moe[0]['flops_per_step'] for h in hits], '.3g')} |",
              f"| dense | {mean_std([d['val_loss'] for d in dense])} | "
              f"{t['dense']:.4f} | {r.b.steps} | "
              f"{r.b.steps * dense[0]['flops_per_step']:.3g} |", "",
              f"Speed-up to the dense model's final loss: {verdict} (per seed: "
              f"{', '.join('not reached' if math.isnan(s) else f'{s:.2f}x' for s in speedups)}); dense minus MoE "
              f"final loss: {gap:+.4f} nats (positive = MoE better). Switch Transformers reports ~7x at scale "
              "(hundreds of experts, billions of tokens). "
              + ("**This disagrees at our scale: the MoE ends worse than its dense twin.** With "
                 f"~{r.b.steps * r.b.batch_size * r.b.seq_len / 1e3:.0f}K training tokens each expert sees about a "
                 "quarter of them, the router is still learning, and the balancing "
                 "loss competes with the LM loss (experiment 4 measures what balancing costs)."
                 if gap <= 0 else
                 "At this scale the speed-up is far smaller: a few hundred steps leave most of the MoE's extra "
                 "parameters undertrained, and 8 small experts add little capacity to a 3-layer model."
                 if not sp or statistics.mean(sp) < 3 else "We see a comparable speed-up even at this scale."),
              "", "![](experiments/moe_vs_dense.png)", ""]


def _opt_mean(xs: list[float | None], fmt: str = ".0f") -> str:
    got = [x for x in xs if x]
    return "not reached" if len(got) < len(xs) else format(statistics.mean(got), fmt)


def exp_num_experts(r: Runner, lines: list[str]) -> None:
    res = {}
    for E in r.b.expert_counts:
        k = 1 if E == 1 else 2
        res[E] = [r.cached(f"E={E}", base_config(r.vocab, num_experts=E, top_k=k), s)["val_loss"]
                  for s in r.b.seeds]
    means = {E: statistics.mean(v) for E, v in res.items()}
    plots.xy_lines({"val loss": (list(means), list(means.values()))}, r.out / "num_experts.png",
                   "experts (top-2; 1 expert = top-1 dense FFN)", "val loss", "number of experts", logx=True)
    Es = list(means)
    steps = ", ".join(f"{a}->{b}: {means[a] - means[b]:+.4f}" for a, b in itertools.pairwise(Es))
    best = min(means, key=means.get)
    monotone = all(means[a] >= means[b] for a, b in itertools.pairwise(Es))
    lines += ["## 2. Number of experts (top-2, expert hidden 128)", "",
              "| experts | val loss |", "|---|---|", *[f"| {E} | {mean_std(v)} |" for E, v in res.items()], "",
              f"Loss improvement per doubling (positive = better): {steps}. Lowest loss at {best} experts. "
              "The literature (Switch, Clark et al. 2022) reports steady, diminishing gains per doubling. "
              + ("We see the same monotone trend." if monotone else
                 "Here the trend is not monotone: with a fixed small step budget each of many experts sees few "
                 "tokens, and seed noise is of the same order as the differences, so gains flatten or reverse "
                 "earlier than at scale."), "", "![](experiments/num_experts.png)", ""]


def exp_routing_capacity(r: Runner, lines: list[str]) -> None:
    rows = []
    for k in (1, 2):
        for cf in r.b.capacity_factors:
            cap = CapacityConfig(capacity_factor=cf, eval_capacity_factor=cf)
            runs = [r.cached(f"top{k} cf={cf}", base_config(r.vocab, top_k=k, capacity=cap), s) for s in r.b.seeds]
            rows.append([k, cf, [x["val_loss"] for x in runs], statistics.mean(x["dropped"] for x in runs),
                         runs[0]["model"]])
    times = step_times({(k, cf): m for k, cf, *_, m in rows}, r.timing_batch())
    for row in rows:
        row[4] = times[(row[0], row[1])]
    series = {f"top-{k}": ([str(cf or "dropless") for kk, cf, *_ in rows if kk == k],
                           [statistics.mean(v) for kk, cf, v, *_ in rows if kk == k]) for k in (1, 2)}
    plots.xy_lines(series, r.out / "capacity.png", "capacity factor", "val loss", "top-k and capacity")
    loss = {(k, cf): statistics.mean(v) for k, cf, v, *_ in rows}
    lo, hi = r.b.capacity_factors[0], None
    drop_hurts = all(loss[(k, lo)] > loss[(k, hi)] for k in (1, 2))
    top2_wins = loss[(2, None)] < loss[(1, None)]
    lines += ["## 3. Top-1 vs top-2 and capacity factor", "",
              "| routing | capacity factor | val loss | dropped fraction | fwd+bwd time (s) |", "|---|---|---|---|---|",
              *[f"| top-{k} | {cf or 'dropless'} | {mean_std(v)} | {d:.3f} | {t:.4f} |" for k, cf, v, d, t in rows], "",
              "Times: one forward+backward on a fixed batch, seed-0 models timed round-robin in one process "
              "(min of 5 rounds).", "",
              "Literature (Switch, GShard): a small capacity factor drops many tokens and hurts; factors >= 1.25 "
              "approach dropless; top-2 beats top-1 at equal experts but costs more compute per token. Here: "
              f"capacity {lo} vs dropless {'hurts' if drop_hurts else 'does not hurt consistently'} "
              f"(top-1 {loss[(1, lo)] - loss[(1, hi)]:+.4f}, top-2 {loss[(2, lo)] - loss[(2, hi)]:+.4f} nats); "
              f"dropless top-2 {'beats' if top2_wins else 'does not beat'} dropless top-1 "
              f"({loss[(2, None)] - loss[(1, None)]:+.4f} nats). "
              + ("Both agree with the literature." if drop_hurts and top2_wins else
                 f"**{'The capacity result' if not drop_hurts else 'The top-k result'}"
                 f"{' and the top-k result' if not (drop_hurts or top2_wins) else ''} disagree"
                 f"{'s' if drop_hurts or top2_wins else ''} with the literature at our scale** (dropped tokens "
                 "still pass through the residual stream, and the differences are near seed noise)."),
              "", "![](experiments/capacity.png)", ""]


def exp_balancing(r: Runner, lines: list[str]) -> None:
    variants = {
        "no balancing loss": {"loss": LossConfig(aux_coef=0.0)},
        "Switch aux loss 0.01": {"loss": LossConfig(aux_coef=0.01)},
        "z-loss only 1e-3": {"loss": LossConfig(aux_coef=0.0, z_coef=1e-3)},
        "DeepSeek aux-free bias": {"loss": LossConfig(aux_coef=0.0), "router": RouterConfig(
            kind="deepseek", top_k=2, score_func="sigmoid", bias_update_rate=1e-3)},
    }
    rows, curves = [], {}
    for name, kw in variants.items():
        runs = [r.cached(name, base_config(r.vocab, **dict(kw)), s) for s in r.b.seeds]
        rows.append((name, [x["val_loss"] for x in runs], statistics.mean(x["imbalance"] for x in runs)))
        curves[name] = tuple(map(list, zip(*runs[0]["imbalance_curve"])))
    plots.xy_lines(curves, r.out / "balancing.png", "step", "load imbalance max/mean (seed 0)", "load balancing")
    imb = {n: i for n, _, i in rows}
    loss = {n: statistics.mean(v) for n, v, _ in rows}
    cost_aux = loss["Switch aux loss 0.01"] - loss["no balancing loss"]
    cost_bias = loss["DeepSeek aux-free bias"] - loss["no balancing loss"]
    free = imb["no balancing loss"]
    balanced = [n for n in ("Switch aux loss 0.01", "DeepSeek aux-free bias") if imb[n] < free]
    lines += ["## 4. Load balancing (8 experts, top-2)", "",
              "| method | val loss | load imbalance max/mean (last 20% of training) |",
              "|---|---|---|", *[f"| {n} | {mean_std(v)} | {i:.2f} |" for n, v, i in rows], "",
              "Literature (Switch, DeepSeek-V3): without balancing, load drifts to a few experts; the aux loss and "
              "the aux-free bias both restore balance, the bias without a gradient term competing with the LM loss; "
              "z-loss stabilises logits but does not balance. Here: "
              + (f"{' and '.join(balanced)} reduce imbalance below the unbalanced {free:.2f}, as expected."
                 if len(balanced) == 2 else
                 f"only {' and '.join(balanced) or 'neither'} reduce imbalance below the unbalanced {free:.2f} - this disagrees "
                 "with the literature (at a few hundred steps the bias has moved little; its step is 1e-3).")
              + f" Loss cost of balancing vs none: aux loss {cost_aux:+.4f}, aux-free bias {cost_bias:+.4f} nats; "
              + ("the bias costs less, as DeepSeek-V3 reports." if cost_bias < cost_aux else
                 "**the bias does not cost less than the aux loss here, unlike DeepSeek-V3's report.**"),
              "", "![](experiments/balancing.png)", ""]


def heldout_domain_files() -> list[Path]:
    """English prose absent from the pre-training corpus (which is stdlib ``.py`` only, idlelib and tests skipped):
    IDLE's release notes and READMEs, the licence, the email package's docs and test messages."""
    root = stdlib_dir()
    found = [*sorted((root / "idlelib").glob("*.txt")), root / "LICENSE.txt", *sorted((root / "email").glob("*.rst")),
             *sorted((root / "test" / "test_email" / "data").glob("*.txt"))]
    return [f for f in found if f.is_file()]


def exp_finetune(r: Runner, lines: list[str]) -> None:
    from moekit.train.finetune import apply_freeze

    files = heldout_domain_files()
    if len(files) < 2:
        lines += ["## 5. Fine-tuning", "", "Skipped: this Python ships no IDLE/email text files to use as a "
                  "held-out domain.", ""]
        return
    tok = r.corpus.tokenizer
    ids = tok.encode_documents([f.read_text(errors="replace") for f in files])
    cut = int(ids.numel() * 0.9)
    ft_train, ft_val = TokenStream(ids[:cut]), TokenStream(ids[cut:])
    pre = r.cached("pretrain", base_config(r.vocab), r.b.seeds[0])
    state = {k: v.clone() for k, v in pre["model"].state_dict().items()}
    before = evaluate(pre["model"], ft_val.eval_batches(r.b.eval_batches, r.b.batch_size, r.b.seq_len))
    rows, curves = [], {}
    for policy in ("none", "moe", "non_moe"):
        res = []
        for s in r.b.seeds:
            model = MoETransformer(pre["model"].cfg)
            model.load_state_dict(state)
            apply_freeze(model, policy)
            res.append(r.run(f"finetune freeze={policy}", model.cfg, s, data=ft_train, val=ft_val, model=model,
                             tcfg={"steps": max(2, r.b.steps // 3), "lr": 1e-3}))
        rows.append((policy, [x["val_loss"] for x in res], res[0]["trainable"]))
        curves[f"freeze={policy}"] = res[0]["records"]
    plots.loss_curves(curves, r.out / "finetune.png")
    loss = {p: statistics.mean(v) for p, v, _ in rows}
    trainable = {p: t for p, _, t in rows}
    expert_share = trainable["non_moe"] / trainable["none"]
    cost_moe, cost_experts = loss["moe"] - loss["none"], loss["non_moe"] - loss["none"]
    lines += ["## 5. Fine-tuning on a held-out domain", "",
              f"Pre-trained on stdlib `.py` modules (seed {r.b.seeds[0]}), fine-tuned for {max(2, r.b.steps // 3)} "
              f"steps (lr 1e-3) on English prose the pre-training never saw: {len(files)} files "
              f"({ids.numel():,} tokens; IDLE's NEWS/README/HISTORY, LICENSE.txt, the email package's docs and "
              f"test messages; last 10% held out). Held-out loss before fine-tuning: {before:.4f}.", "",
              "| trained | freeze | val loss after fine-tuning | trainable params |", "|---|---|---|---|",
              *[f"| {_FT_LABEL[p]} | {p} | {mean_std(v)} | {t:,} |" for p, v, t in rows], "",
              "ST-MoE (Zoph et al. 2022) found that updating only the non-MoE parameters (freeze=moe) fine-tunes "
              "about as well as updating everything, while updating only the experts (freeze=non_moe) does worse. "
              + f"Here, against updating everything: non-MoE only {cost_moe:+.4f} nats, experts + routers only "
              f"{cost_experts:+.4f} nats. "
              + ("Updating only the experts is the worst option, as in ST-MoE. " if cost_experts > cost_moe else
                 "**Unlike ST-MoE, updating only the experts is not the worst option here.** ")
              + ("Freezing the experts is about as good as full fine-tuning, as in ST-MoE." if cost_moe <= 0.02 else
                 "**Unlike ST-MoE, freezing the experts costs clearly more than full fine-tuning:** our model is "
                 "tiny and the domain shift (code -> English prose) is large, so the "
                 f"{expert_share:.0%} of parameters in the experts are needed to adapt."), "", "![](experiments/finetune.png)", ""]


_FT_LABEL = {"none": "everything", "moe": "non-MoE only", "non_moe": "experts + routers only"}


def exp_distill(r: Runner, lines: list[str]) -> None:
    cfg = base_config(r.vocab)
    teacher_row = r.cached("teacher (MoE)", cfg, r.b.seeds[0])
    teacher, teacher_loss = teacher_row["model"].eval(), teacher_row["val_loss"]
    kd = kd_loss_fn(teacher, alpha=0.5, temperature=2.0)

    rows, curves = [], {"MoE teacher": teacher_row["records"]}
    for s in r.b.seeds:
        scratch = r.cached("dense from scratch", cfg.dense_twin(), s)
        student = r.run("dense student (KD)", cfg.dense_twin(), s, loss_fn=kd)
        rows.append((scratch["val_loss"], student["val_loss"], teacher_loss,
                     gain_retained(scratch["val_loss"], student["val_loss"], teacher_loss)))
        curves |= {f"dense seed {s}": scratch["records"], f"KD student seed {s}": student["records"]}
    plots.loss_curves(curves, r.out / "distill.png")
    g = [x[3] for x in rows if not math.isnan(x[3])]
    lines += ["## 6. Distillation MoE -> dense", "",
              f"Teacher: the 8-expert MoE of experiment 1 (seed {r.b.seeds[0]}); students: its dense twin trained "
              "with 0.5 x CE + 0.5 x KL(teacher || student) at temperature 2 (`moekit.deploy.distill.kd_loss`).", "",
              "| seed | dense from scratch | KD student | MoE teacher | gain retained |",
              "|---|---|---|---|---|", *[f"| {s} | {a:.4f} | {b:.4f} | {c:.4f} | {_pct(g)} |" for s, (a, b, c, g)
                                         in zip(r.b.seeds, rows)], "",
              "gain retained = (L_scratch - L_student) / (L_scratch - L_MoE). Switch Transformers keeps ~30% of the "
              "MoE's gain. " + (f"Here: {statistics.mean(g):.0%} on average"
                                + (" - in line with it." if 0.1 <= statistics.mean(g) <= 0.6 else
                                   " - different from it; with a gap of a few hundredths of a nat between teacher "
                                   "and dense model the ratio is dominated by seed noise.")
                                if g else "Here the MoE did not beat the dense model, so there is no gain to retain."),
              "", "![](experiments/distill.png)", ""]


def _pct(x: float) -> str:
    return "n/a (the MoE did not beat the dense model)" if math.isnan(x) else f"{x:.0%}"


def exp_params(lines: list[str]) -> None:
    from moekit.analysis.memory import weight_bytes
    from moekit.analysis.params import count_params, load_config, spec_from_hf

    c = count_params(spec_from_hf(load_config("mixtral-8x7b")[0], "mixtral-8x7b"))
    dense_7b = c.total - c.breakdown["routed_experts"] + c.breakdown["routed_experts"] // 8
    lines += ["## 7. Parameter accounting: Mixtral-8x7B", "", "| quantity | value |", "|---|---|",
              f"| naive \"8 x 7B\" | {8 * dense_7b / 1e9:.1f}B |", f"| real total | {c.total / 1e9:.1f}B |",
              f"| active per token | {c.active / 1e9:.1f}B |",
              f"| fp16/bf16 weights | {weight_bytes(c.total)['bf16'] / 1e9:.1f} GB |", "",
              "Experts share attention, embeddings and norms, so the total is 46.7B, not \"8 x 7B\" = 56B (or 57.9B "
              "for eight full copies of the 7.2B dense model); a token uses 2 of 8 "
              "expert FFNs per layer: 12.9B active. (Counts are exact: tests compare them with transformers' own "
              "Mixtral on the meta device.)", ""]


def config_appendix(runs: list[dict]) -> list[str]:
    """One row per distinct run name: the config fields the experiments vary, the seeds and each seed's loss."""
    by_name: dict[str, list[dict]] = {}
    for row in runs:
        by_name.setdefault(row["name"], []).append(row)
    out = ["## Configs and seeds of every run", "",
           "Shared: 3 layers, d_model 96, 4 heads, expert hidden 128 (the dense twin's FFN hidden = top-k x 128 = "
           "256), AdamW (weight decay 0.1, clip 1.0), warmup + cosine to 10% of lr, BPE vocab 2048. "
           "Full configs: `experiments/runs.json`.", "",
           "| run | also used as | experts | top-k | router | capacity | aux / z coef | steps | lr | seeds | "
           "val loss per seed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in by_name.items():
        moe, tc = rows[0]["config"]["moe"], rows[0]["train_config"]
        also = sorted({u for r in rows for u in r.get("used_as", []) if u != name})
        moe_cols = ("dense", "-", "-", "-", "-") if moe is None else (
            moe["num_experts"], moe["router"]["top_k"], moe["router"]["kind"],
            moe["capacity"]["capacity_factor"] or "dropless", f"{moe['loss']['aux_coef']} / {moe['loss']['z_coef']}")
        out.append(" | ".join(["", name, ", ".join(also) or "-", *map(str, moe_cols), str(tc["steps"]), str(tc["lr"]),
                               ", ".join(str(r["seed"]) for r in rows),
                               ", ".join(f"{r['val_loss']:.4f}" for r in rows), ""]).strip())
    return [*out, ""]


EXPERIMENTS = {"moe_vs_dense": exp_moe_vs_dense, "num_experts": exp_num_experts, "capacity": exp_routing_capacity,
               "balancing": exp_balancing, "finetune": exp_finetune, "distill": exp_distill}


def run_all(out_dir: str | Path = "docs", quick: bool = False, only: list[str] | None = None) -> Path:
    out_dir = Path(out_dir)
    plots_dir = out_dir / "experiments"
    plots_dir.mkdir(parents=True, exist_ok=True)
    budget = QUICK if quick else FULL
    runner = Runner(budget, plots_dir)
    t0 = time.perf_counter()
    lines = ["# moekit experiments: the seeds' claims at small scale", "",
             f"Generated by `moekit experiments{' --quick' if quick else ''}` "
             f"({'QUICK smoke-test mode: tiny budgets, the numbers are not meaningful' if quick else 'full mode'}). "
             f"Corpus: {runner.corpus.description}. Seeds {list(budget.seeds)}; {budget.steps} steps of "
             f"{budget.batch_size}x{budget.seq_len} tokens per run; model: 3 layers, d=96, MoE FFN in every layer. "
             f"Every run's config and metrics are in `experiments/runs.json`.", ""]
    for name, fn in EXPERIMENTS.items():
        if only is None or name in only:
            fn(runner, lines)
    exp_params(lines)
    lines += config_appendix(runner.runs)
    lines += [f"Total time: {(time.perf_counter() - t0) / 60:.1f} min, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads.", ""]
    (plots_dir / "runs.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "model"}
                                                     for r in runner.runs], indent=1))
    report = out_dir / "experiments.md"
    report.write_text("\n".join(lines))
    return report

