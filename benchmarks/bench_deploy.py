"""Deployment report: every deploy technique applied to the demo-size MoE LM, side by side.

Run:  python benchmarks/bench_deploy.py [--steps 300] [--checkpoint RUN_DIR] [--threads 1]

Trains the "tiny" preset briefly on the default corpus (or loads a `moekit demo` checkpoint), then
prints for the original and each variant: parameters, size on disk (safetensors), resident memory
(parameters + buffers + offload caches), tokens/s (eval forward over the validation batches, timed
round-robin with the original in the same process, median over rounds; the ratio column is vs the original),
validation loss, and loss on a held-out task sub-domain (one package of the corpus, default asyncio).
A decoding table shows where the offload LRU cache pays (batch 1, one token at a time); fine-tuning
recipes and distillation are reported in their own tables.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_model as st_save_model

from moekit.analysis.timing import Timing, ratio, round_robin
from moekit.config import TrainConfig
from moekit.deploy import moe_layers
from moekit.deploy.distill import distill_vs_scratch
from moekit.deploy.extract import extract_task
from moekit.deploy.merge import merge_model
from moekit.deploy.offload import CacheStats, OffloadedExperts, cache_stats, offload_experts, resident_bytes
from moekit.deploy.prune import measure_loads, prune_model
from moekit.deploy.quantize import Int8Experts, quantize_experts
from moekit.models.decoder import MoETransformer
from moekit.models.generate import generate
from moekit.models.presets import get_preset
from moekit.train.checkpoint import WEIGHTS, save_model
from moekit.train.data import TokenStream, build_corpus, read_texts, split_files
from moekit.train.finetune import RECIPES, finetune, get_recipe
from moekit.train.trainer import evaluate, train

FT_RECIPES = ("moe", "moe_full", "moe_experts_only", "dense")


@dataclass
class Data:
    tokenizer: object
    train: TokenStream
    val: TokenStream
    task_train: TokenStream
    task_val: TokenStream
    description: str


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    note: str = ""
    disk: int = 0
    timing: Timing | None = None
    stats: CacheStats = field(default_factory=CacheStats)


# ---------------------------------------------------------------------------- data and model
def task_of(files: list[Path], task: str) -> list[Path]:
    return [f for f in files if task in f.parts]


def load_data(args, tokenizer=None) -> Data:
    """The corpus (default: stdlib source capped at --max-bytes) split by file hash, encoded with
    ``tokenizer`` (a checkpoint's) or a BPE trained on the train split; plus the task sub-domain split
    the same way (its validation files are never trained on)."""
    corpus = build_corpus(args.data, vocab_size=args.vocab_size, max_bytes=args.max_bytes, tokenizer=tokenizer)
    tok, train_data, val_data, desc = corpus.tokenizer, corpus.train, corpus.val, corpus.description
    if tokenizer is not None:
        desc += " (the checkpoint's tokenizer)"
    files = corpus.train_files + corpus.val_files
    task_files = task_of(sorted(files), args.task)
    if len(task_files) < 2:
        raise SystemExit(f"--task {args.task!r}: need >= 2 corpus files with a path component named so, "
                         f"found {len(task_files)}")
    t_train, t_val = split_files(task_files)
    task_train = TokenStream(tok.encode_documents(read_texts(t_train)))
    task_val = TokenStream(tok.encode_documents(read_texts(t_val)))
    desc += (f"\ntask sub-domain '{args.task}': {len(t_train)} train / {len(t_val)} val files "
             f"({', '.join(f.name for f in t_val)}), {len(task_train):,} / {len(task_val):,} tokens")
    return Data(tok, train_data, val_data, task_train, task_val, desc)


def train_or_load(args):
    """(model, data, description of where the model came from)."""
    if args.checkpoint:
        from moekit.train.checkpoint import load_model, resolve_checkpoint, tokenizer_path
        from moekit.train.tokenizer import Tokenizer

        ckpt = resolve_checkpoint(args.checkpoint)
        data = load_data(args, Tokenizer.load(tokenizer_path(args.checkpoint)))
        return load_model(ckpt).eval(), data, f"checkpoint {ckpt}"
    data = load_data(args)
    cfg = get_preset("tiny", vocab_size=data.tokenizer.vocab_size, max_seq_len=max(args.seq_len, 256))
    tcfg = train_config(args, args.steps)
    torch.manual_seed(tcfg.seed)
    model = MoETransformer(cfg)
    t0 = time.perf_counter()
    train(model, data.train, None, tcfg)
    return model.eval(), data, (f"preset tiny trained here: {tcfg.steps} steps x {tcfg.batch_size} x {tcfg.seq_len} "
                                f"tokens, lr {tcfg.lr}, seed {tcfg.seed} ({time.perf_counter() - t0:.0f} s)")


def train_config(args, steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=args.train_batch, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                       warmup_steps=max(1, steps // 20), eval_every=0, eval_batches=args.batches,
                       log_every=max(1, steps))


# ---------------------------------------------------------------------------- measurements
def weight_count(model: torch.nn.Module) -> int:
    """Weights the model holds, wherever they are: parameters, int8 expert buffers, offloaded experts."""
    n = sum(p.numel() for p in model.parameters())
    for layer in moe_layers(model).values():
        ex = layer.experts
        if isinstance(ex, Int8Experts):
            n += sum(b.numel() for name, b in ex.named_buffers() if name.startswith("q_"))
        elif isinstance(ex, OffloadedExperts):
            n += ex.num_experts * (3 if ex.gated else 2) * ex.hidden * ex.d_model
    return n


def disk_bytes(model: torch.nn.Module, folder: str, extra_files: tuple[str, ...] = ()) -> int:
    """Bytes of the model's safetensors file(s): moekit's deploy format, or for an offloaded model its
    resident part plus the experts file it reads from."""
    os.makedirs(folder, exist_ok=True)
    if any(isinstance(m.experts, OffloadedExperts) for m in moe_layers(model).values()):
        st_save_model(model, os.path.join(folder, WEIGHTS))
    else:
        save_model(folder, model)
    return os.path.getsize(os.path.join(folder, WEIGHTS)) + sum(os.path.getsize(f) for f in extra_files)


def reset_cache_stats(model: torch.nn.Module) -> None:
    for layer in moe_layers(model).values():
        if isinstance(layer.experts, OffloadedExperts):
            layer.experts.stats = CacheStats()


@torch.no_grad()
def forward_pass(model, batches) -> None:
    for x, _ in batches:
        model(x)


def time_round_robin(variants: list[Variant], batches, reps: int) -> dict:
    """Eval-forward time of every variant over ``batches`` by the shared harness (round-robin, one warm-up
    round, median); cache stats over all passes. Returns the harness's {name: Timing}."""
    for v in variants:
        v.model.eval()
        reset_cache_stats(v.model)
    times = round_robin({v.name: functools.partial(forward_pass, v.model, batches) for v in variants}, reps=reps)
    for v in variants:
        v.timing, v.stats = times[v.name], cache_stats(v.model)
    return times


def fmt_mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def fmt_delta(d: float) -> str:
    return f"{d if abs(d) >= 5e-5 else 0.0:+7.4f}"  # no "-0.0000" for rounding noise


# ---------------------------------------------------------------------------- report sections
def build_variants(original, data: Data, args, tmp: str) -> list[Variant]:
    E = original.cfg.moe.num_experts
    loads = measure_loads(original, data.train.eval_batches(args.batches, args.batch_size, args.seq_len))
    variants = [Variant("original", original, f"{E} experts/layer, top-{original.cfg.moe.router.top_k}")]

    m = quantize_experts(copy.deepcopy(original))
    ex = next(iter(moe_layers(m).values())).experts
    per_layer = sum(t.numel() for t in ex.weights_for(None) if t is not None) * 4
    variants.append(Variant("int8 experts", m, "routed experts int8 + fp32 per-channel scales; router, attention, "
                                               f"embeddings fp32; a forward dequantises one layer's used experts "
                                               f"at a time (<= {fmt_mb(per_layer)} MB transient)"))

    m, kept = prune_model(copy.deepcopy(original), loads, keep=E // 2)
    variants.append(Variant(f"pruned {E // 2}/{E} (most used)", m,
                            "kept " + "; ".join(f"{k.split('.')[1]}:{v}" for k, v in kept.items())))

    for router in ("map", "average"):
        m, groups = merge_model(copy.deepcopy(original), loads, E // 2, strategy="frequency", router=router)
        note = "groups " + "; ".join(f"{k.split('.')[1]}:{v}" for k, v in groups.items()) if router == "map" else \
            "same groups; a plain router whose rows are frequency-weighted member rows"
        variants.append(Variant(f"merged {E}->{E // 2} ({router} router)", m, note))

    task_batches = data.task_train.eval_batches(args.batches, args.batch_size, args.seq_len)
    for i, min_share in enumerate(args.min_share):
        m, kept, task_loads = extract_task(copy.deepcopy(original), task_batches, min_share)
        shares = {k.split(".")[1]: (v / v.sum()).tolist() for k, v in task_loads.items()}
        note = "kept " + "; ".join(f"{k.split('.')[1]}:{v}" for k, v in kept.items())
        if i == 0:
            note += "; task load shares " + "; ".join(f"{k}:[{' '.join(f'{s:.3f}' for s in v)}]"
                                                      for k, v in shares.items())
        variants.append(Variant(f"task '{args.task}' (share>={min_share:g})", m, note))

    for cache in (args.cache, E):
        path = os.path.join(tmp, f"offload-{cache}", "experts.safetensors")
        m = offload_experts(copy.deepcopy(original), cache, source="disk", path=path)
        v = Variant(f"offload disk, LRU {cache}/layer", m,
                    "experts read per expert from a memory-mapped safetensors file; "
                    + ("cache holds every expert" if cache >= E else f"{cache} experts/layer resident"))
        v.disk = disk_bytes(m, os.path.dirname(path), (path,))
        variants.append(v)
    return variants


def main_table(variants: list[Variant], data: Data, args, tmp: str) -> None:
    val_batches = data.val.eval_batches(args.batches, args.batch_size, args.seq_len)
    task_batches = data.task_val.eval_batches(args.batches, args.batch_size, args.seq_len)
    for i, v in enumerate(variants):
        if not v.disk:
            v.disk = disk_bytes(v.model, os.path.join(tmp, f"variant-{i}"))
    losses = [(evaluate(v.model, val_batches), evaluate(v.model, task_batches)) for v in variants]
    times = time_round_robin(variants, val_batches, args.rounds)
    tokens = sum(x.numel() for x, _ in val_batches)
    base, (base_val, base_task) = variants[0], losses[0]
    hdr = (f"{'variant':34} {'params':>8} {'disk MB':>8} {'res. MB':>8} {'tok/s':>7} {'x orig':>6} "
           f"{'val loss':>8} {'delta':>7} {'task loss':>9} {'delta':>7}")
    print(hdr)
    print("-" * len(hdr))
    for v, (lv, lt) in zip(variants, losses):
        print(f"{v.name:34} {weight_count(v.model) / 1e6:7.2f}M {fmt_mb(v.disk):>8} "
              f"{fmt_mb(resident_bytes(v.model)):>8} {tokens / v.timing.median:7.0f} "
              f"{ratio(times, base.name, v.name).median:6.2f} "
              f"{lv:8.4f} {fmt_delta(lv - base_val)} {lt:9.4f} {fmt_delta(lt - base_task)}")
    print("\nnotes:")
    for v in variants:
        hit = f"; cache hit rate {v.stats.hit_rate:.1%} over the timed passes " \
              f"({v.stats.hits:,} hits / {v.stats.misses:,} misses)" if v.stats.hits + v.stats.misses else ""
        print(f"- {v.name}: {v.note}{hit}")


def decode_table(variants: list[Variant], data: Data, args) -> None:
    """Greedy decoding, batch 1, KV cache: one token per forward, so each layer needs only top-k experts
    per step and consecutive tokens reuse them; this is the regime the LRU cache is for."""
    prompt = data.val.tokens[: args.prompt_len][None]
    outs, stats = {}, {}

    def decode(v):
        def fn():
            reset_cache_stats(v.model)
            outs[v.name] = generate(v.model, prompt, args.new_tokens)
            stats[v.name] = cache_stats(v.model)
        return fn

    times = round_robin({v.name: decode(v) for v in variants}, reps=args.rounds)
    rows = {v.name: (times[v.name].median, outs[v.name], stats[v.name]) for v in variants}
    ref = rows[variants[0].name][1]
    print(f"\ngreedy decoding, batch 1: {args.prompt_len}-token prompt + {args.new_tokens} new tokens, KV cache "
          f"(median of {args.rounds} round-robin rounds after one warm-up)")
    hdr = f"{'variant':34} {'tok/s':>7} {'x orig':>6} {'cache hit rate':>14} {'same tokens as original':>24}"
    print(hdr)
    print("-" * len(hdr))
    base = rows[variants[0].name][0]
    for v in variants:
        dt, out, st = rows[v.name]
        hit = f"{st.hit_rate:.1%}" if st.hits + st.misses else "-"
        same = int((out == ref).all(dim=0).long().cumprod(0).sum()) - args.prompt_len
        print(f"{v.name:34} {args.new_tokens / dt:7.0f} {base / dt:6.2f} {hit:>14} "
              f"{'all' if same == args.new_tokens else f'first {same}':>24}")


def finetune_table(original, data: Data, args) -> None:
    """Each recipe fine-tunes a copy of the original on the task's train files for the same steps."""
    val_batches = data.val.eval_batches(args.batches, args.batch_size, args.seq_len)
    task_batches = data.task_val.eval_batches(args.batches, args.batch_size, args.seq_len)
    before_task, before_val = evaluate(original, task_batches), evaluate(original, val_batches)
    print(f"\nfine-tuning on the '{args.task}' train files, {args.ft_steps} steps per recipe "
          f"(task loss before: {before_task:.4f}, val loss before: {before_val:.4f})")
    hdr = (f"{'recipe':17} {'freeze':8} {'batch':>5} {'lr':>7} {'trainable':>10} {'grad+Adam MB':>12} "
           f"{'task loss':>9} {'delta':>7} {'val loss':>8} {'delta':>7} {'time':>6}")
    print(hdr)
    print("-" * len(hdr))
    for name in FT_RECIPES:
        recipe = get_recipe(name, steps=args.ft_steps, warmup_steps=max(1, args.ft_steps // 10))
        t0 = time.perf_counter()
        tuned, _, rep = finetune(original, data.task_train, None, recipe,
                                 tcfg_overrides={"seq_len": args.seq_len, "seed": args.seed, "eval_every": 0,
                                                 "log_every": args.ft_steps})
        dt = time.perf_counter() - t0
        lt, lv = evaluate(tuned, task_batches), evaluate(tuned, val_batches)
        grad_adam = rep["grad_and_adam_bytes_full"] - rep["grad_and_adam_bytes_saved"]
        print(f"{name:17} {recipe.freeze:8} {recipe.batch_size:5} {recipe.lr:7.0e} "
              f"{rep['trainable_params'] / 1e6:9.2f}M {fmt_mb(grad_adam):>12} {lt:9.4f} {fmt_delta(lt - before_task)} "
              f"{lv:8.4f} {fmt_delta(lv - before_val)} {dt:5.0f}s")
    r = RECIPES["moe"]
    print(f"(recipe moe: freeze routed experts + routers, batch {r.batch_size}, lr {r.lr:g}, expert dropout "
          f"{r.expert_dropout}, dense dropout {r.dropout}, capacity factor {r.capacity_factor}, aux {r.aux_coef}; "
          f"dense: the dense-model recipe applied to the MoE)")


def distill_section(teacher, data: Data, args) -> Variant:
    """KD student (dense twin) and a from-scratch dense twin, same steps and batches; returns the student."""
    tcfg = train_config(args, args.distill_steps)
    r = distill_vs_scratch(teacher, data.train, data.val.eval_batches(args.batches, args.batch_size, args.seq_len),
                           tcfg, alpha=args.alpha, temperature=args.temperature)
    print(f"\ndistillation into the dense twin ({r.student.num_params() / 1e6:.2f}M params): {tcfg.steps} steps x "
          f"{tcfg.batch_size} x {tcfg.seq_len}, alpha {args.alpha}, temperature {args.temperature}")
    hdr = f"{'model':38} {'val loss':>8} {'train time':>10}"
    print(hdr)
    print("-" * len(hdr))
    print(f"{'MoE teacher (the original)':38} {r.loss_teacher:8.4f} {'-':>10}")
    print(f"{'dense twin, KD from the teacher':38} {r.loss_student:8.4f} {r.seconds_student:9.0f}s")
    print(f"{'dense twin from scratch (same steps)':38} {r.loss_scratch:8.4f} {r.seconds_scratch:9.0f}s")
    print(f"gain retained (L_scratch - L_student) / (L_scratch - L_teacher) = {r.gain_retained:.1%}")
    return Variant("KD dense student", r.student,
                   f"dense twin (one FFN of the active width) distilled for {tcfg.steps} steps; see the table above")


# ---------------------------------------------------------------------------- main
def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a run/checkpoint folder (e.g. runs/demo-X/moe) to use "
                                                       "instead of training (tokenizer.json beside it)")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the tiny preset (no --checkpoint)")
    ap.add_argument("--data", nargs="*", default=None, help="text files/folders (default: Python stdlib source)")
    ap.add_argument("--max-bytes", type=int, default=3_000_000, help="corpus cap in bytes")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--task", default="asyncio", help="task sub-domain: corpus files under a folder of this name")
    ap.add_argument("--min-share", type=float, nargs="+", default=[0.1, 0.125],
                    help="extraction thresholds (task load share), one row each")
    ap.add_argument("--cache", type=int, default=2, help="LRU experts/layer of the small offload cache")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=8, help="eval batch size (loads, losses, timing)")
    ap.add_argument("--batches", type=int, default=8, help="eval batches (loads, losses, timing)")
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds after one warm-up (median is reported)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ft-steps", type=int, default=40, help="fine-tuning steps per recipe (0 = skip)")
    ap.add_argument("--distill-steps", type=int, default=None, help="KD and scratch steps (default: steps/2; "
                                                                     "0 = skip)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.distill_steps is None:
        args.distill_steps = max(1, args.steps // 2)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.threads == 1:  # the BPE trainer and batch encoder would otherwise use every core
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            os.environ.setdefault("RAYON_NUM_THREADS", "1")
    t_start = time.perf_counter()
    original, data, source = train_or_load(args)
    if original.cfg.moe is None:
        raise SystemExit("the model is dense; this report needs an MoE model")
    c, m = original.cfg, original.cfg.moe
    print(f"model: {source}\n  {c.n_layers} layers, d={c.d_model}, {m.num_experts} experts of hidden "
          f"{m.expert_hidden}, top-{m.router.top_k}, vocab {c.vocab_size}; {original.num_params() / 1e6:.2f}M params, "
          f"{original.num_active_params() / 1e6:.2f}M active")
    print(f"corpus: {data.description}")
    print(f"eval: {args.batches} batches x {args.batch_size} x {args.seq_len} tokens (val = held-out files; "
          f"loads for prune/merge measured on as many train batches); torch threads {torch.get_num_threads()}\n")

    with tempfile.TemporaryDirectory() as tmp:
        variants = build_variants(original, data, args, tmp)
        if args.ft_steps:
            finetune_table(original, data, args)
        if args.distill_steps:
            variants.append(distill_section(original, data, args))
        print(f"\ndeployment variants (tok/s: eval forward over the val batches, median of {args.rounds} "
              f"round-robin rounds; resident = parameters + buffers + offload caches)")
        main_table(variants, data, args, tmp)
        by_name = {v.name: v for v in variants}
        decode_table([variants[0], variants[1]] + [v for v in variants if v.name.startswith("offload")]
                     + ([by_name["KD dense student"]] if "KD dense student" in by_name else []), data, args)
    print(f"\n({time.perf_counter() - t_start:.0f} s wall time, {torch.get_num_threads()} torch thread(s))")


if __name__ == "__main__":
    main()
