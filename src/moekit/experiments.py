"""`moekit experiments` (`python -m moekit experiments`): does a sparse MoE beat its dense twin (same active
FLOPs per token) on real text, and by how much? Written to a Markdown report with plots; every number in it
comes from runs recorded in ``experiments/runs.json`` beside it.

Regime: a small model (d=64, 2 layers) that sees over a million tokens. Hypothesis (tested by experiments
1 and 2, not assumed): such a model's dense FFN runs out of capacity, so the MoE's extra expert parameters
can pay off; at 128K tokens (the previous report) nothing was capacity-limited. Every configuration runs on several seeds; seed s fixes the initialisation
and the batch order of every model, so configurations are compared per seed (a paired difference with a
95% t-interval, ``moekit.analysis.significance``).

Full mode on an idle 2-core CPU: about 16 minutes (24 runs of 300 steps, 2 single-thread workers; an
estimate from one-thread step times).
Runs are cached by a hash of (model config, train config, data, seed, teacher) in ``runs.json``: an
interrupted report continues where it stopped, and runs shared by several experiments train once. The configs
enter the hash as their fields off the defaults (``config.changed_fields``), so adding a config field whose
default keeps the old behaviour keeps every cached run.
Training runs in ``workers`` processes with ``threads // workers`` threads each: small models train
faster as independent single-thread runs, and stay fast when the machine is shared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from moekit.analysis import plots
from moekit.analysis.significance import PairedDiff, mean_std, paired_diff, verdict
from moekit.analysis.timing import ratio, round_robin
from moekit.config import LossConfig, ModelConfig, MoEConfig, RouterConfig, TrainConfig, changed_fields
from moekit.deploy.distill import distill, gain_retained
from moekit.models.decoder import MoETransformer, lm_loss
from moekit.train.data import build_corpus
from moekit.train.hooks import RouterBiasUpdate
from moekit.train.tokenizer import cache_dir
from moekit.train.trainer import train

KD = {"alpha": 0.5, "temperature": 2.0}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    steps: int
    seeds: tuple[int, ...]
    batch_size: int = 32
    seq_len: int = 128
    evals: int = 12  # validation points per run (the loss curves' resolution)
    eval_batches: int = 8
    lr: float = 3e-3
    vocab_size: int = 512
    max_bytes: int = 12_000_000  # the whole stdlib (~11 MB): ~5M training tokens at vocab 512
    d_model: int = 64
    n_layers: int = 2
    num_experts: int = 8
    expert_hidden: int = 128
    expert_counts: tuple[int, ...] = (2, 4, 8, 16)
    confirm_seeds: tuple[int, ...] = (3, 4, 5)  # fresh seeds for the confirmation experiment
    workers: int = 2

    @property
    def tokens_per_run(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
                           warmup_steps=max(1, self.steps // 20), eval_every=max(1, self.steps // self.evals),
                           eval_batches=self.eval_batches, log_every=max(1, self.steps // 50), seed=seed)


FULL = Budget(steps=300, seeds=(0, 1, 2))
QUICK = Budget(steps=8, seeds=(0, 1), batch_size=2, seq_len=32, evals=2, eval_batches=1, max_bytes=300_000,
               expert_counts=(2, 4, 8), confirm_seeds=(2, 3), workers=1)


def moe_config(b: Budget, vocab: int, *, num_experts: int | None = None, aux_coef: float = 0.01,
               renormalize: bool = True) -> ModelConfig:
    """The experiments' MoE: top-2 of ``num_experts`` SwiGLU experts of hidden ``b.expert_hidden`` in every layer.
    Defaults follow the literature: Switch/OLMoE aux coefficient 0.01, Mixtral's top-2 renormalisation, the
    router initialised N(0, 0.02) like every other weight (OLMoE, transformers' initializer_range)."""
    d = b.d_model
    moe = MoEConfig(d_model=d, num_experts=num_experts or b.num_experts, expert_hidden=b.expert_hidden,
                    router=RouterConfig(top_k=2, renormalize=renormalize), loss=LossConfig(aux_coef=aux_coef))
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=b.n_layers, n_heads=4, max_seq_len=max(256, b.seq_len),
                       moe=moe)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run. ``teacher``: train with the KD loss against this (MoE) run's final weights."""

    name: str
    cfg: ModelConfig
    seed: int
    teacher: RunSpec | None = None

    def key(self, b: Budget) -> str:
        # changed_fields, not asdict: a config field added later at its old-behaviour default keeps the keys
        ident = {"model": changed_fields(self.cfg), "train": changed_fields(b.train_config(self.seed)),
                 "data": [b.vocab_size, b.max_bytes], "teacher": self.teacher.key(b) if self.teacher else None,
                 "kd": KD if self.teacher else None}
        return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- training (worker processes)
_CORPUS: dict = {}


def _corpus(b: Budget):
    key = (b.vocab_size, b.max_bytes)
    if key not in _CORPUS:
        _CORPUS[key] = build_corpus(vocab_size=b.vocab_size, max_bytes=b.max_bytes)
    return _CORPUS[key]


def weights_path(b: Budget, spec: RunSpec) -> Path:
    return cache_dir() / "experiments" / f"{spec.key(b)}.pt"


def train_run(spec: RunSpec, b: Budget, threads: int = 0) -> dict:
    """Train one run from scratch and summarise it; the final weights go to ``weights_path`` (teachers and the
    step-time measurement load them)."""
    if threads:
        torch.set_num_threads(threads)
    corpus = _corpus(b)
    tc = b.train_config(spec.seed)
    t0 = time.perf_counter()
    if spec.teacher is None:
        torch.manual_seed(spec.seed)
        model = MoETransformer(spec.cfg)
        records = train(model, corpus.train, corpus.val, tc, hooks=[RouterBiasUpdate()])
    else:  # the student is the teacher's dense twin (spec.cfg), seeded like every run
        teacher = MoETransformer(spec.teacher.cfg)
        teacher.load_state_dict(torch.load(weights_path(b, spec.teacher), weights_only=True))
        model, records = distill(teacher, corpus.train, corpus.val, tc, hooks=[RouterBiasUpdate()], **KD)
    seconds = time.perf_counter() - t0
    path = weights_path(b, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    tr = [r for r in records if r["split"] == "train"]
    va = [r for r in records if r["split"] == "val"]
    return {"key": spec.key(b), "name": spec.name, "seed": spec.seed,
            "teacher": spec.teacher.key(b) if spec.teacher else None, "val_loss": va[-1]["val_loss"],
            "val_curve": [[r["step"], r["val_loss"]] for r in va],
            "train_curve": [[r["step"], r["loss"]] for r in tr],
            "imbalance_curve": [[r["step"], r["imbalance"]] for r in tr],
            "imbalance": statistics.mean(r["imbalance"] for r in tr[-max(1, len(tr) // 5):]),
            "flops_per_step": va[-1]["flops"] / va[-1]["step"], "tokens_per_step": tc.batch_size * tc.seq_len,
            "params": model.num_params(), "active": model.num_active_params(), "seconds": seconds,
            "threads": torch.get_num_threads(), "config": spec.cfg.to_dict(), "train_config": vars(tc)}


class Runner:
    """Trains the runs the experiments ask for (cached in ``runs.json``) and hands back their summaries."""

    def __init__(self, b: Budget, out: Path, log: Callable[[str], None] = lambda s: None):
        self.b, self.out, self.log = b, out, log
        self.path = out / "runs.json"
        old = json.loads(self.path.read_text()) if self.path.is_file() else []
        self.rows: dict[str, dict] = {r["key"]: r for r in old if "key" in r}
        self.used: dict[str, None] = {}  # keys the report reads, in order (runs.json keeps only these)
        self.trained = 0

    def missing(self, specs: list[RunSpec]) -> list[RunSpec]:
        """Specs to train, in order, without duplicates. A student whose teacher's weights are gone (cache
        cleared) gets its teacher retrained first."""
        out: dict[str, RunSpec] = {}
        for s in specs:
            k = s.key(self.b)
            if k in self.rows:
                continue
            t = s.teacher
            if t is not None and not weights_path(self.b, t).is_file():
                self.rows.pop(t.key(self.b), None)
                out.setdefault(t.key(self.b), t)
            out.setdefault(k, s)
        return list(out.values())

    def train(self, specs: list[RunSpec]) -> None:
        """Train every spec not cached yet, in the given order (a KD student waits for its teacher), on
        ``workers`` processes; each finished run is saved at once."""
        queue = self.missing(specs)
        total = len(queue)
        if self.b.workers <= 1:
            for s in queue:
                self._record(train_run(s, self.b), total)
            return
        threads = max(1, torch.get_num_threads() // self.b.workers)
        running: dict = {}
        with ProcessPoolExecutor(self.b.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            while queue or running:
                ready = [s for s in queue if s.teacher is None or s.teacher.key(self.b) in self.rows]
                for s in ready[:self.b.workers - len(running)]:
                    queue.remove(s)
                    running[pool.submit(train_run, s, self.b, threads)] = s
                if not running:
                    raise RuntimeError("a KD student's teacher is neither cached nor scheduled")
                finished = next(as_completed(running))
                del running[finished]
                self._record(finished.result(), total)

    def _record(self, row: dict, total: int) -> None:
        self.rows[row["key"]] = row
        self.trained += 1
        self.log(f"[{self.trained}/{total}] {row['name']} seed {row['seed']}: val loss "
                 f"{row['val_loss']:.4f} ({row['seconds']:.0f} s, {row['threads']} thread(s))")
        self.save(all_rows=True)

    def get(self, spec: RunSpec) -> dict | None:
        k = spec.key(self.b)
        if k in self.rows:
            self.used[k] = None
        return self.rows.get(k)

    def save(self, all_rows: bool = False) -> None:
        """Atomic write; during training every cached row is kept (an interrupted report loses nothing)."""
        rows = list(self.rows.values()) if all_rows else [self.rows[k] for k in self.used]
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------- measurements from curves
def steps_to_reach(curve: list[list[float]], target: float) -> float | None:
    """First step where the validation curve reaches ``target``, linearly interpolated between evaluations
    (step 0 is not evaluated: a curve at or below target at its first point returns that point's step)."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None:
                return float(step)
            s0, l0 = prev
            return s0 + (l0 - target) / (l0 - loss) * (step - s0)
        prev = (step, loss)
    return None


def seed_groups(r: Runner, specs: dict[str, list[RunSpec]], required: tuple[str, ...] | None = None
                ) -> tuple[dict[str, list[dict]], list[int]]:
    """Rows per label for the seeds every kept label has finished (paired comparisons need the same seeds).
    Labels outside ``required`` (default: all are required) are left out unless every seed has finished."""
    planned = planned_seeds(specs)
    rows = {label: [r.get(s) for s in ss] for label, ss in specs.items()}
    rows = {label: v for label, v in rows.items()
            if required is None or label in required or all(x is not None for x in v)}
    keep = [i for i in range(len(planned)) if all(v[i] is not None for v in rows.values())]
    return {label: [v[i] for i in keep] for label, v in rows.items()}, [planned[i] for i in keep]


def planned_seeds(specs: dict[str, list[RunSpec]]) -> list[int]:
    """The seeds an experiment's plan runs (every label runs the same ones)."""
    return [s.seed for s in next(iter(specs.values()))]


def seeds_note(specs: dict[str, list[RunSpec]], seeds: list[int]) -> str:
    planned = planned_seeds(specs)
    if len(seeds) == len(planned):
        return ""
    return (f"**Incomplete: {len(seeds)} of {len(planned)} seeds finished ({seeds}); the rest were not run "
            "in this report's time budget. Rerunning `moekit experiments` continues from the cache.** ")


def losses(rows: list[dict]) -> list[float]:
    return [x["val_loss"] for x in rows]


def curve_series(rows_by_label: dict[str, list[dict]], x: str) -> dict[str, list[tuple[list, list]]]:
    """label -> per-seed (xs, val losses); x = 'step' or 'flops'."""
    out = {}
    for label, rows in rows_by_label.items():
        out[label] = [([s * (row["flops_per_step"] if x == "flops" else 1) for s, _ in row["val_curve"]],
                       [v for _, v in row["val_curve"]]) for row in rows]
    return out


# ---------------------------------------------------------------------------- experiments
# Each experiment is (title, plan, report): plan(budget, vocab) -> {label: [RunSpec per seed]}; report(runner, specs,
# rows per label, seeds, lines) gets the rows of the seeds every label has finished and appends Markdown.

def plan_moe_vs_dense(b: Budget, vocab: int) -> dict[str, list[RunSpec]]:
    cfg = moe_config(b, vocab)
    return {"MoE": [RunSpec(f"MoE E={b.num_experts}", cfg, s) for s in b.seeds],
            "dense": [RunSpec("dense twin", cfg.dense_twin(), s) for s in b.seeds]}


def step_time_ratio(r: Runner, specs: dict[str, list[RunSpec]], batch) -> dict:
    """Forward+backward seconds on one training batch, MoE and dense timed round-robin in this process with
    the first seed's trained weights (the runs' own wall times were measured in parallel workers on a shared
    machine and do not compare)."""
    x, y = batch
    models = {}
    for label, ss in specs.items():
        m = MoETransformer(ss[0].cfg)
        path = weights_path(r.b, ss[0])
        if path.is_file():
            m.load_state_dict(torch.load(path, weights_only=True))
        models[label] = m.train()

    def step(m):
        return lambda: (lm_loss(m(x).logits, y).backward(), m.zero_grad(set_to_none=True))

    times = round_robin({label: step(m) for label, m in models.items()}, reps=7, warmup=2)
    return {"times": times, "ratio": ratio(times, "MoE", "dense")}


def report_moe_vs_dense(r: Runner, specs: dict[str, list[RunSpec]], g: dict[str, list[dict]], seeds: list[int],
                        lines: list[str]) -> None:
    moe, dense = g["MoE"], g["dense"]
    b = r.b
    flop_ratio = moe[0]["flops_per_step"] / dense[0]["flops_per_step"]
    diff = paired_diff(losses(dense), losses(moe))  # positive: the MoE is better
    hits = [steps_to_reach(m["val_curve"], d["val_loss"]) for m, d in zip(moe, dense)]
    reached = [(d["val_curve"][-1][0] / h) for h, d in zip(hits, dense) if h is not None]
    t = step_time_ratio(r, specs, r.corpus.train.batch(0, b.batch_size, b.seq_len))
    for x, name in (("step", "moe_vs_dense.png"), ("flops", "moe_vs_dense_flops.png")):
        plots.seed_bands(curve_series({"MoE": moe, "dense twin": dense}, x), r.out / name,
                         "training FLOPs" if x == "flops" else "step", "validation loss",
                         f"MoE (E={b.num_experts}, top-2) vs dense twin, {len(seeds)} seeds (mean, min-max band)")
    per_seed = ", ".join(f"seed {s}: " + ("not reached" if h is None else f"{d['val_curve'][-1][0] / h:.2f}x")
                         for s, h, d in zip(seeds, hits, dense))
    speed = (f"The MoE reaches the dense twin's final loss in {len(reached)} of {len(seeds)} seeds"
             + (f"; in those, {mean_std(reached, '.2f')}x fewer steps (= "
                f"{mean_std([s / flop_ratio for s in reached], '.2f')}x fewer training FLOPs)" if reached else "")
             + f" ({per_seed}).")
    lines += [seeds_note(specs, seeds) +
              f"MoE: {b.num_experts} experts x hidden {b.expert_hidden}, top-2, in each of {b.n_layers} layers "
              f"(d={b.d_model}; {moe[0]['params']:,} params, {moe[0]['active']:,} active per token). Dense twin: "
              f"one FFN of hidden {2 * b.expert_hidden} ({dense[0]['params']:,} params). Training FLOPs per step "
              f"MoE/dense: {flop_ratio:.3f}. Both: {b.steps} steps of {b.batch_size}x{b.seq_len} tokens "
              f"({b.tokens_per_run / 1e6:.1f}M tokens), same seeds, same batches.", "",
              "| model | final val loss (mean ± std over seeds) | per seed | fwd+bwd time per step |",
              "|---|---|---|---|",
              f"| MoE | {mean_std(losses(moe))} | {', '.join(f'{v:.4f}' for v in losses(moe))} | "
              f"{t['times']['MoE'].ms()} |",
              f"| dense twin | {mean_std(losses(dense))} | {', '.join(f'{v:.4f}' for v in losses(dense))} | "
              f"{t['times']['dense'].ms()} |", "",
              f"Paired difference, dense minus MoE (positive = MoE better): {diff}. "
              f"**Verdict: {verdict(diff, 'the MoE', 'the dense twin')}.** {speed}", "",
              f"Wall clock: one MoE training step takes {t['ratio'].x()} the dense twin's (median of per-round "
              f"ratios, round-robin in one process, {torch.get_num_threads()} thread(s)), so in wall-clock time on this "
              "CPU a step advantage shrinks by that factor.", "",
              "![](experiments/moe_vs_dense.png) ![](experiments/moe_vs_dense_flops.png)", ""]


def plan_num_experts(b: Budget, vocab: int) -> dict[str, list[RunSpec]]:
    return {f"E={E}": [RunSpec(f"MoE E={E}", moe_config(b, vocab, num_experts=E), s) for s in b.seeds]
            for E in b.expert_counts} | {"dense": plan_moe_vs_dense(b, vocab)["dense"]}


def report_num_experts(r: Runner, specs: dict[str, list[RunSpec]], g: dict[str, list[dict]], seeds: list[int],
                       lines: list[str]) -> None:
    Es = [E for E in r.b.expert_counts if f"E={E}" in g]  # counts whose seeds have not all finished are left out
    base = f"E={Es[0]}"
    rows = []
    for E in Es:
        d = paired_diff(losses(g[base]), losses(g[f"E={E}"]))
        rows.append(f"| {E} | {g[f'E={E}'][0]['params']:,} | {mean_std(losses(g[f'E={E}']))} | "
                    + ("-" if E == Es[0] else str(d)) + " |")
    steps = []
    for a, c in zip(Es, Es[1:]):
        d = paired_diff(losses(g[f"E={a}"]), losses(g[f"E={c}"]))
        steps.append(f"E={a} -> {c}: {d}" + ("" if d.significant else " (no significant difference)"))
    means = [statistics.mean(losses(g[f"E={E}"])) for E in Es]
    plots.xy_lines({"MoE top-2": (list(Es), means)}, r.out / "num_experts.png", "experts (top-2, hidden "
                   f"{r.b.expert_hidden} each)", "final val loss (mean over seeds)", "number of experts", logx=True)
    twin = paired_diff(losses(g["dense"]), losses(g[base]))
    lines += [seeds_note(specs, seeds) +
              f"Every model routes each token to 2 experts of hidden {r.b.expert_hidden}: the same active FLOPs as "
              f"the dense twin (hidden {2 * r.b.expert_hidden}). E={Es[0]} top-2 is the dense-twin equivalent "
              "(both experts always active, mixed by the router's weights; the dense twin's FFN parameters plus "
              "a 2-way router); more experts add parameters, not compute.", "",
              f"| experts | params | final val loss | paired difference vs E={Es[0]} (positive = better) |",
              "|---|---|---|---|", *rows, "",
              (f"Between neighbouring expert counts (positive = more experts better): {'; '.join(steps)}. "
               if steps else "")
              + f"E={Es[0]} vs the dense twin (dense minus E={Es[0]}): {twin}."
              + ("" if len(Es) == len(r.b.expert_counts) else
                 f" **Not run yet: E={', '.join(str(E) for E in r.b.expert_counts if E not in Es)}.**"), "",
              "![](experiments/num_experts.png)", ""]


def plan_setup(b: Budget, vocab: int) -> dict[str, list[RunSpec]]:
    variants = {"aux 0.01, renormalised (base)": {}, "aux 0.001": {"aux_coef": 0.001},
                "no renormalisation": {"renormalize": False}}
    return {label: [RunSpec(f"MoE {label}" if kw else f"MoE E={b.num_experts}", moe_config(b, vocab, **kw), s)
                    for s in b.seeds] for label, kw in variants.items()}


def report_setup(r: Runner, specs: dict[str, list[RunSpec]], g: dict[str, list[dict]], seeds: list[int],
                 lines: list[str]) -> None:
    base = "aux 0.01, renormalised (base)"
    rows = []
    for label, rs in g.items():
        d = paired_diff(losses(rs), losses(g[base]))
        rows.append(f"| {label} | {mean_std(losses(rs))} | {mean_std([x['imbalance'] for x in rs], '.2f')} | "
                    + ("-" if label == base else str(d)) + " |")
    lines += [seeds_note(specs, seeds) +
              "Before blaming scale, the MoE's own setup: the load-balancing coefficient (Switch Transformer and "
              "OLMoE use 0.01; transformers' Mixtral and Qwen-MoE configs default to 0.001) and renormalising the "
              "top-2 weights to sum 1 (Mixtral and DeepSeek-V3 do; OLMoE and Qwen-MoE do not). Router initialised "
              "N(0, 0.02) like every weight (OLMoE, transformers' initializer_range 0.02); same learning rate as "
              "the dense twin.", "",
              "| variant | final val loss | load imbalance max/mean (last 20% of training) | "
              "paired difference vs base (positive = variant worse) |", "|---|---|---|---|", *rows, "",
              *(f"- {label}: {verdict(paired_diff(losses(rs), losses(g[base])), 'the base setup', label)}."
                for label, rs in g.items() if label != base), ""]


def plan_confirm(b: Budget, vocab: int) -> dict[str, list[RunSpec]]:
    """Fresh seeds for the setup experiment 3 found better (aux 0.001) and for the base MoE, each against the
    dense twin: a comparison chosen after seeing results must be confirmed on seeds that did not choose it."""
    base, better = moe_config(b, vocab), moe_config(b, vocab, aux_coef=0.001)
    return {"dense": [RunSpec("dense twin", base.dense_twin(), s) for s in b.confirm_seeds],
            "MoE aux 0.01": [RunSpec(f"MoE E={b.num_experts}", base, s) for s in b.confirm_seeds],
            "MoE aux 0.001": [RunSpec("MoE aux 0.001", better, s) for s in b.confirm_seeds]}


def report_confirm(r: Runner, specs: dict[str, list[RunSpec]], g: dict[str, list[dict]], seeds: list[int],
                   lines: list[str]) -> None:
    dense = g["dense"]
    rows, verdicts = [], []
    for label in ("MoE aux 0.01", "MoE aux 0.001"):
        moe = g[label]
        diff = paired_diff(losses(dense), losses(moe))
        hits = [steps_to_reach(m["val_curve"], d["val_loss"]) for m, d in zip(moe, dense)]
        reached = [d["val_curve"][-1][0] / h for h, d in zip(hits, dense) if h is not None]
        rows.append(f"| {label} | {mean_std(losses(moe))} | {diff} | {len(reached)} of {len(seeds)}"
                    + (f", {mean_std(reached, '.2f')}x fewer steps" if reached else "") + " |")
        verdicts.append(f"- {label}: {verdict(diff, 'the ' + label, 'the dense twin')}.")
    setups = paired_diff(losses(g["MoE aux 0.01"]), losses(g["MoE aux 0.001"]))  # positive: aux 0.001 better
    verdicts.append(f"- aux 0.001 against aux 0.01 on these seeds (aux 0.01 minus aux 0.001): "
                    f"{verdict(setups, 'aux 0.001', 'aux 0.01')}.")
    # the base setup was fixed before any run: experiment 1's seeds and these together are one larger sample
    first, _ = seed_groups(r, plan_moe_vs_dense(r.b, specs["dense"][0].cfg.vocab_size))
    pooled = ""
    if first["MoE"]:
        moe_all, dense_all = first["MoE"] + g["MoE aux 0.01"], first["dense"] + dense
        diff = paired_diff(losses(dense_all), losses(moe_all))
        hits = [steps_to_reach(m["val_curve"], d["val_loss"]) for m, d in zip(moe_all, dense_all)]
        reached = [d["val_curve"][-1][0] / h for h, d in zip(hits, dense_all) if h is not None]
        wins = sum(d > m for d, m in zip(losses(dense_all), losses(moe_all)))
        pooled = (f"**Base MoE (aux 0.01, the setup fixed before any run) over all {diff.n} seeds, experiment 1's and "
                  f"these: {verdict(diff, 'the MoE', 'the dense twin')}.** The MoE ends lower in {wins} of {diff.n} "
                  f"seeds and reaches the dense twin's final loss in {len(reached)} of {diff.n}"
                  + (f", in {mean_std(reached, '.2f')}x fewer steps." if reached else ".") + "")
    lines += [seeds_note(specs, seeds) +
              f"The setup experiment chose aux 0.001 after seeing seeds {list(r.b.seeds)}, so its win over the dense twin on "
              f"those seeds is not evidence. Here both MoE setups and the dense twin train on fresh seeds "
              f"{seeds} (same model, steps and data as experiment 1).", "",
              "| model | final val loss | dense minus MoE (positive = MoE better) | seeds reaching the dense "
              "final loss |", "|---|---|---|---|",
              f"| dense twin | {mean_std(losses(dense))} | - | - |", *rows, "", *verdicts, "", pooled, ""]


def plan_distill(b: Budget, vocab: int) -> dict[str, list[RunSpec]]:
    main = plan_moe_vs_dense(b, vocab)
    return {"teacher": main["MoE"], "scratch": main["dense"],
            "student": [RunSpec("KD student (dense twin)", t.cfg.dense_twin(), t.seed, teacher=t)
                        for t in main["MoE"]]}


def report_distill(r: Runner, specs: dict[str, list[RunSpec]], g: dict[str, list[dict]], seeds: list[int],
                   lines: list[str]) -> None:
    t, sc, st = losses(g["teacher"]), losses(g["scratch"]), losses(g["student"])
    gains = [gain_retained(a, c, m) for a, c, m in zip(sc, st, t)]
    kd = paired_diff(sc, st)  # positive: the student beats the from-scratch dense model
    plots.seed_bands(curve_series({"MoE teacher": g["teacher"], "dense from scratch": g["scratch"],
                                   "KD student": g["student"]}, "step"), r.out / "distill.png", "step",
                     "validation loss", "distillation into the dense twin (mean, min-max band over seeds)")
    ok = [x for x in gains if not math.isnan(x)]
    lines += [seeds_note(specs, seeds) +
              "Each seed's MoE of experiment 1 teaches a dense twin trained with the same seed, steps and batches: "
              f"{KD['alpha']} x KL(teacher || student) at temperature {KD['temperature']} + {1 - KD['alpha']} x CE "
              "(`moekit.deploy.distill.kd_loss`).", "",
              "| seed | dense from scratch | KD student | MoE teacher | gain retained |", "|---|---|---|---|---|",
              *[f"| {s} | {a:.4f} | {c:.4f} | {m:.4f} | {'n/a (no MoE gain)' if math.isnan(x) else f'{x:.0%}'} |"
                for s, a, c, m, x in zip(seeds, sc, st, t, gains)], "",
              "gain retained = (L_scratch - L_student) / (L_scratch - L_MoE) per seed"
              + (f"; mean ± std over the {len(ok)} seeds where the MoE beat the dense twin: "
                 f"{mean_std([100 * x for x in ok], '.0f')}%." if ok else "; the MoE beat the dense twin in no seed.")
              + f" Student vs from-scratch dense (scratch minus student, positive = KD helps): {kd}. "
              f"**{verdict(kd, 'the KD student', 'the from-scratch dense twin')}.** Switch Transformers "
              "(Fedus et al. 2021) keeps ~30% of the sparse model's gain.", "", "![](experiments/distill.png)", ""]


def exp_params(number: int, lines: list[str]) -> None:
    from moekit.analysis.memory import weight_bytes
    from moekit.analysis.params import count_params, load_config, spec_from_hf

    c = count_params(spec_from_hf(load_config("mixtral-8x7b")[0], "mixtral-8x7b"))
    experts = c.breakdown["routed_experts"]
    dense_7b = c.total - experts + experts // 8
    lines += [f"## {number}. Parameter accounting: Mixtral-8x7B", "", "| quantity | value |", "|---|---|",
              f"| naive \"8 x 7B\" (8 x the model with one expert) | {8 * dense_7b / 1e9:.1f}B |",
              f"| real total | {c.total / 1e9:.1f}B |", f"| active per token | {c.active / 1e9:.1f}B |",
              f"| bf16 weights | {weight_bytes(c.total)['bf16'] / 1e9:.1f} GB |", "",
              "Experts share attention, embeddings and norms, so the total is well under 8 x 7B; a token uses 2 of "
              "8 expert FFNs per layer. (Counts are exact: tests compare them with transformers' own Mixtral on the "
              "meta device.)", ""]


# ---------------------------------------------------------------------------- `moekit demo`
def demo_setup(steps: int | None = None) -> tuple:
    """`moekit demo` trains experiment 1's configuration (the report's MoE vs dense twin):
    (corpus, MoE config, train config for seed 0); ``steps`` shortens it (the report's spread then no longer
    applies)."""
    corpus = _corpus(FULL)
    b = FULL if steps is None else dataclasses.replace(FULL, steps=steps)
    return corpus, moe_config(b, corpus.tokenizer.vocab_size), b.train_config(0)


def committed_runs() -> Path:
    """The committed report's runs (present in a source checkout, not in a wheel)."""
    return Path(__file__).resolve().parents[2] / "docs" / "experiments" / "runs.json"


def reported_diff(path: Path | None = None) -> PairedDiff | None:
    """The demo configuration's paired difference (dense minus MoE) as measured in the committed report, over
    experiment 1's seeds and the confirmation's fresh ones, or None when the report is absent or was made with
    another configuration."""
    path = path or committed_runs()
    if not path.is_file():
        return None
    rows = {r.get("key"): r for r in json.loads(path.read_text())}
    vocab = _vocab_of(rows)
    if vocab is None:
        return None
    first, fresh = plan_moe_vs_dense(FULL, vocab), plan_confirm(FULL, vocab)  # the demo's setup on every seed run
    pairs = [(rows[d.key(FULL)]["val_loss"], rows[m.key(FULL)]["val_loss"])
             for m, d in zip(first["MoE"] + fresh["MoE aux 0.01"], first["dense"] + fresh["dense"])
             if m.key(FULL) in rows and d.key(FULL) in rows]
    return paired_diff([d for d, _ in pairs], [m for _, m in pairs]) if len(pairs) >= 2 else None


def _vocab_of(rows: dict) -> int | None:
    return next((r["config"]["vocab_size"] for r in rows.values() if r and "config" in r), None)


def demo_verdict(moe: list[float], dense: list[float], reported: PairedDiff | None) -> str:
    """The demo's last line: with >= 2 seeds the paired interval; with one seed the spread the report measured."""
    if len(moe) >= 2:
        return "Verdict: " + verdict(paired_diff(dense, moe), "the MoE", "the dense twin") + "."
    diff = dense[0] - moe[0]
    line = f"Verdict (1 seed): dense minus MoE = {diff:+.4f} nats."
    if reported is None or reported.n < 2:
        return line + " One seed has no interval: run with --seeds 3 for one."
    return (line + f" The report measured {reported.interval()} over {reported.n} seeds, a seed-to-seed std of the "
            f"difference of {reported.sd:.4f} nats; --seeds 3 gives this run its own interval.")


EXPERIMENTS = {"moe_vs_dense": ("MoE vs its dense twin at matched active compute", plan_moe_vs_dense,
                                report_moe_vs_dense),
               "num_experts": ("Number of experts at matched active compute", plan_num_experts, report_num_experts),
               "setup": ("The MoE's training setup against the literature", plan_setup, report_setup),
               "confirm": ("Confirmation on fresh seeds", plan_confirm, report_confirm),
               "distill": ("Distillation MoE -> dense twin", plan_distill, report_distill)}
REQUIRED = {"num_experts": ("E=2", "dense")}  # other expert counts are reported once all their seeds finished
TRAIN_ORDER = ("moe_vs_dense", "distill", "num_experts", "setup", "confirm")  # most important first: time may run out


def run_all(out_dir: str | Path = "docs", quick: bool = False, only: list[str] | None = None, *,
            train_missing: bool = True, log: Callable[[str], None] = lambda s: None) -> Path:
    """Train what is missing (in EXPERIMENTS order, so the main comparison finishes first) and write
    ``out_dir/experiments.md`` + ``out_dir/experiments/`` (plots, runs.json). ``train_missing=False`` writes
    the report from the cached runs only."""
    out_dir = Path(out_dir)
    b = QUICK if quick else FULL
    runner = Runner(b, out_dir / "experiments", log)
    runner.corpus = _corpus(b)
    vocab = runner.corpus.tokenizer.vocab_size
    chosen = {n: e for n, e in EXPERIMENTS.items() if only is None or n in only}
    plans = {n: plan(b, vocab) for n, (_, plan, _) in chosen.items()}
    t0 = time.perf_counter()
    if train_missing:
        runner.train([s for n in TRAIN_ORDER if n in plans for ss in plans[n].values() for s in ss])
    train_min = (time.perf_counter() - t0) / 60
    lines = ["# moekit experiments: does a sparse MoE beat its dense twin?", "",
             f"Generated by `moekit experiments{' --quick' if quick else ''}` "
             f"({'QUICK smoke-test mode: tiny budgets, the numbers are not meaningful' if quick else 'full mode'}). "
             f"Corpus: {runner.corpus.description}. Model: {b.n_layers} layers, d={b.d_model}, 4 heads, an MoE "
             f"FFN in every layer; {b.steps} steps of {b.batch_size}x{b.seq_len} tokens "
             f"({b.tokens_per_run / 1e6:.1f}M tokens) per run, lr {b.lr}, warmup + cosine; seeds {list(b.seeds)} "
             "(a seed fixes initialisation and batch order, so configurations are compared per seed). Intervals are "
             "95% Student-t intervals of the per-seed paired difference; a difference whose interval crosses 0 is "
             "reported as no significant difference. Every run's config and curves are in "
             "`experiments/runs.json`.", ""]
    for i, (name, (title, _, report)) in enumerate(chosen.items(), 1):
        lines += [f"## {i}. {title}", ""]
        g, seeds = seed_groups(runner, plans[name], REQUIRED.get(name))
        if seeds:
            report(runner, plans[name], g, seeds, lines)
        else:
            lines += ["Not run yet: no seed has finished every run this experiment needs.", ""]
    exp_params(len(chosen) + 1, lines)
    lines += [f"Training time of this invocation: {train_min:.1f} min ({len(runner.used)} runs in the report; "
              f"cached runs are not retrained), torch {torch.__version__}, {b.workers} worker process(es) x "
              f"{max(1, torch.get_num_threads() // b.workers)} thread(s).", ""]
    runner.save()
    report_path = out_dir / "experiments.md"
    report_path.write_text("\n".join(lines))
    return report_path

