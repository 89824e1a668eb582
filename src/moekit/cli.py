"""`moekit <command>`: argparse -> config -> call. The only module that prints.

Each command is a function decorated with ``@command``: it receives the parsed arguments.
Heavy imports (torch above all) happen inside the commands, so `moekit --help` stays fast.

Errors: a ``MoekitError`` (bad input, a damaged file) is printed as one line ``moekit CMD: error: ...``
with exit code 2; anything else is a bug in moekit and keeps its full traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Callable

from moekit.errors import MoekitError, UsageError

# the calc breakdown rows every model has (0 or not); other parts are printed only where a family has them
CORE_BREAKDOWN = ("embeddings", "lm_head", "attention", "norms", "dense_ffn", "routed_experts", "shared_experts",
                  "router")

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable, str]] = {}


def command(name: str, help: str, args: Callable[[argparse.ArgumentParser], None] = lambda p: None,
            examples: str = ""):
    """Register ``fn(ns)`` as ``moekit NAME``; ``args(parser)`` declares its arguments; ``examples`` are
    shown at the end of ``moekit NAME --help``."""

    def register(fn: Callable) -> Callable:
        _COMMANDS[name] = (help, args, fn, examples)
        return fn

    return register


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _add_verify_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the model folder's files against its manifest checksums (faster)")


_MODEL_HELP = ("a run folder, a model folder moekit wrote, or an HF model folder of a patchable family (config.json + "
               "safetensors, as save_pretrained writes them); tokenizer.json in it or beside it")


def _load_model(ns, path=None):
    """The model of a folder moekit wrote (checksums checked unless --no-verify) or of an HF model folder."""
    from moekit.train.checkpoint import load_model

    return load_model(ns.checkpoint if path is None else path, verify=not ns.no_verify)


# ----------------------------------------------------------------------------- commands
# (one block per command; keep each block self-contained)


# ---- analysis: calc
def _calc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="an HF config.json (or its folder), a shipped config name (e.g. mixtral-8x7b), "
                                  "or a moekit preset (tiny, mixtral-like, ...)")
    p.add_argument("--context", type=int, default=4096, help="context length for attention FLOPs and KV cache")
    p.add_argument("--batch", type=int, default=1, help="batch size for the KV-cache total")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (experts split over EP GPUs)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas of each EP group (EP x DP GPUs)")
    p.add_argument("--zero1", action="store_true", help="shard optimizer states over the replicas (ZeRO-1)")
    p.add_argument("--int4-group", type=int, default=128, help="weights per bf16 scale in the int4 estimate")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _fmt_n(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


@command("calc", "exact parameters, active parameters, FLOPs and memory of an MoE model from its config",
         _calc_args, examples="""  moekit calc mixtral-8x7b
  moekit calc path/to/hf_model/config.json --context 32768 --batch 8
  moekit calc deepseek-v3 --ep 8 --dp 4 --zero1
  moekit calc tiny --json""")
def _calc(ns) -> int:
    from moekit.analysis import flops, memory, params
    from moekit.models.presets import PRESETS, get_preset

    if ns.config in PRESETS:
        spec = params.spec_from_moekit(get_preset(ns.config), ns.config)
    else:
        cfg, name = params.load_config(ns.config)
        spec = params.spec_from_hf(cfg, name)
    count = params.count_params(spec)
    fl = flops.flops_report(spec, ns.context)
    mem = memory.memory_report(spec, ns.batch, ns.context, ns.ep, ns.dp, ns.zero1, ns.int4_group)
    if ns.json:
        _print_json({"model": spec.name, "family": spec.family, "params": count.to_dict(), "flops": fl,
                     "memory": mem})
        return 0
    kind = "encoder-decoder" if spec.is_encoder_decoder else "decoder"
    print(f"{spec.name} ({spec.family}, {kind}): {spec.n_layers} layers, d={spec.d}, "
          f"{len(spec.moe_layers)} MoE layers x {spec.num_experts} experts, top-{spec.top_k}")
    rows = [("total parameters", count.total, ""),
            ("active per token", count.active, "with embedding table + LM head"),
            ("active, head only", count.active_with_head, "without the embedding lookup (DeepSeek, gpt-oss)"),
            ("active non-embedding", count.active_non_embedding, "without both (Kaplan et al.)")]
    rows += [(f"+ {k} (apart)", v, f"total with it {_fmt_n(count.total + v)}") for k, v in count.separate.items()]
    for label, v, why in rows:
        print(f"  {label:22} {v:>18,}  {_fmt_n(v):>7}  {why}".rstrip())
    if spec.num_experts:
        # "8 x 7B": E copies of the dense model that has one expert per MoE layer
        one_expert = count.total - count.breakdown["routed_experts"] * (spec.num_experts - 1) // spec.num_experts
        naive = spec.num_experts * one_expert
        print(f"  {'naive E x dense':22} {naive:>18,}  {_fmt_n(naive):>7}  experts share attention and embeddings: "
              f"the real total is {count.total / naive:.0%} of it")
    print("  breakdown:")
    for k, v in count.breakdown.items():
        if v or k in CORE_BREAKDOWN:  # family-specific parts (hyper-connections, rope tables, ...) only when present
            print(f"    {k:20} {v:>18,}  {v / count.total:6.1%}")
    for k, v in count.buffers.items():
        print(f"    {k}: {v:,} (a buffer, not a parameter)")
    for note in count.notes:
        print(f"  note: {note}")
    print(f"  FLOPs/token @ context {ns.context}: forward {_fmt_n(fl['forward_flops_per_token'])} "
          f"({_fmt_n(2 * fl['matmul_params_per_token'])} weights + {_fmt_n(fl['attention_flops_per_token'])} "
          f"attention), training {_fmt_n(fl['train_flops_per_token'])} (3 x forward)")
    print("  weights: " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in mem["weights"].items())
          + f" (int4: + bf16 scale per {ns.int4_group})")
    print(f"  KV cache (bf16): {_fmt_bytes(mem['kv_cache_bytes_per_token_bf16'])}/token, "
          f"{_fmt_bytes(mem['kv_cache_bytes_bf16'])} for batch {ns.batch} x context {ns.context}")
    t = mem["training_per_gpu"]
    print(f"  training per GPU (EP={ns.ep} x DP={ns.dp}{', ZeRO-1' if ns.zero1 else ''}): "
          f"{_fmt_n(t['params_per_gpu'])} params, weights+grads {_fmt_bytes(t['weights_and_grads'])}, "
          f"master+Adam {_fmt_bytes(t['optimizer_states'])}, total {_fmt_bytes(t['total'])} (+ activations)")
    return 0


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")


# ---- analysis: inspect
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=_MODEL_HELP)
    _add_data_args(p, vocab=False)  # the data is encoded with the checkpoint's own tokenizer
    p.add_argument("--batches", type=int, default=8, help="validation batches to route")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (at most the model's max_seq_len)")
    p.add_argument("--out", default=None, help="report folder (default: <checkpoint run folder>/inspect)")
    _add_verify_arg(p)
    _add_device_arg(p)


@command("inspect", "routing analytics of a trained model on data: per-layer load, entropy, co-activation, "
                    "capacity sweep, top tokens per expert; writes PNG plots and report.md", _inspect_args,
         examples="""  moekit inspect runs/a
  moekit inspect runs/a --data my_texts/ --batches 16 --out runs/a/inspect-my-texts""")
def _inspect(ns) -> int:
    from pathlib import Path

    from moekit.analysis.report import inspect_model
    from moekit.train.checkpoint import load_tokenizer, resolve_checkpoint
    from moekit.train.data import build_corpus

    from moekit.device import resolve_device

    ckpt = resolve_checkpoint(ns.checkpoint)
    model = _load_model(ns, ckpt).to(resolve_device(ns.device))
    # the data is encoded with the tokenizer the model was trained with (token ids mean nothing otherwise)
    corpus = build_corpus(ns.data, max_bytes=ns.max_bytes, tokenizer=load_tokenizer(ns.checkpoint))
    _check_checkpoint_seq_len(ns, model, corpus)
    out = Path(ns.out) if ns.out else ckpt.parent / "inspect"
    report = inspect_model(model, corpus, out, batches=ns.batches, batch_size=ns.batch_size, seq_len=ns.seq_len)
    print(report.read_text())
    print(f"report: {report}")
    return 0


# ---- interop: convert / upcycle
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="an HF model folder (config.json + safetensors) or a moekit checkpoint/run folder")
    p.add_argument("dst", help="output folder")
    p.add_argument("--to", choices=["moekit", "hf"], required=True, help="output format")
    p.add_argument("--model-type", default=None, help="HF family for --to hf (mixtral, qwen2_moe, qwen3_moe, olmoe, "
                                                      "deepseek_v2, deepseek_v3, gpt_oss, llama4_text, llama, qwen2); "
                                                      "default: the one it was loaded from")
    p.add_argument("--max-shard-bytes", type=int, default=None, help="shard the HF safetensors above this size in bytes (default: one file)")
    _add_verify_arg(p)


@command("convert", "convert between Hugging Face checkpoints and moekit checkpoints (identical logits)",
         _convert_args, examples="""  moekit convert path/to/hf_mixtral runs/mixtral --to moekit
  moekit convert runs/a runs/a-hf --to hf --model-type mixtral""")
def _convert(ns) -> int:
    from pathlib import Path

    from moekit.interop.hf import load_hf, save_hf
    from moekit.train.checkpoint import read_state, save_checkpoint

    if ns.to == "moekit":
        model = load_hf(ns.src)
        _copy_tokenizer(Path(ns.src), Path(ns.dst))
        path = save_checkpoint(ns.dst, 0, model, model.cfg, {"source": str(ns.src), "hf_model_type":
                                                              model.hf_model_type})
    else:
        model = _load_model(ns, ns.src)
        model_type = ns.model_type or read_state(ns.src).get("hf_model_type")
        path = save_hf(model, ns.dst, model_type, max_shard_bytes=ns.max_shard_bytes)
    print(f"wrote {path} ({model.num_params():,} parameters, {model.num_active_params():,} active)")
    return 0


def _upcycle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a dense HF Llama/Qwen2 folder or a dense moekit checkpoint")
    p.add_argument("dst", help="output folder")
    p.add_argument("--num-experts", type=int, default=8, help="experts per MoE layer, each a copy of the dense FFN")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--moe-layers", choices=["all", "every_other"], default="all", help="which FFNs become MoE layers")
    p.add_argument("--router-std", type=float, default=0.02, help="std of the new routers' random init")
    p.add_argument("--expert-noise", type=float, default=0.0, help="relative Gaussian noise on expert copies")
    p.add_argument("--to", choices=["moekit", "hf"], default="moekit",
                   help="hf writes a Mixtral checkpoint (Llama sources only)")
    _add_verify_arg(p)


def _copy_tokenizer(src, dst) -> None:
    """Put the source model's tokenizer.json (moekit's, or an HF folder's) into run folder ``dst``, so that
    generate / inspect / finetune can encode text for the written model; none is copied if there is none."""
    import shutil

    from moekit.errors import CheckpointError
    from moekit.train.checkpoint import is_hf_folder, tokenizer_path

    try:
        tok = src / "tokenizer.json" if is_hf_folder(src) else tokenizer_path(src)
    except CheckpointError:
        return
    if tok.is_file():
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tok, dst / "tokenizer.json")


@command("upcycle", "sparse upcycling: turn a dense checkpoint into an MoE whose experts start as the dense FFN",
         _upcycle_args, examples="""  moekit upcycle runs/dense runs/upcycled --num-experts 8 --top-k 2
  moekit upcycle path/to/hf_llama path/to/hf_mixtral --to hf --moe-layers every_other""")
def _upcycle(ns) -> int:
    from pathlib import Path

    from moekit.interop.hf import load_hf, save_hf
    from moekit.interop.upcycle import upcycle
    from moekit.train.checkpoint import is_hf_folder, save_checkpoint

    src = Path(ns.src)
    dense = load_hf(src) if is_hf_folder(src) else _load_model(ns, src)
    moe = upcycle(dense, ns.num_experts, ns.top_k, moe_layers=ns.moe_layers, router_std=ns.router_std,
                  expert_noise=ns.expert_noise)
    if ns.to == "hf":
        if moe.cfg.moe.activation != "swiglu":
            raise UsageError(f"--to hf writes a Mixtral checkpoint, whose experts are SwiGLU; the FFNs of "
                             f"{src} are {moe.cfg.moe.activation}: leave out --to hf for a moekit folder")
        path = save_hf(moe, ns.dst, "mixtral")
    else:
        _copy_tokenizer(src, Path(ns.dst))
        path = save_checkpoint(ns.dst, 0, moe, moe.cfg, {"upcycled_from": str(src)})
    print(f"upcycled {dense.num_params():,} dense parameters into {moe.num_params():,} "
          f"({moe.num_active_params():,} active, {ns.num_experts} experts, top-{ns.top_k}): {path}")
    return 0


# ---- experiments
def _experiments_args(p: argparse.ArgumentParser) -> None:
    # the experiment names are checked in the command: importing moekit.experiments here would import torch
    # for every `moekit --help`
    p.add_argument("--quick", action="store_true", help="tiny budgets (CI smoke test, < 5 minutes)")
    p.add_argument("--out", default="runs/experiments",
                   help="folder for experiments.md and experiments/*.png (the committed report is docs/)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only these experiments (default: all)")


@command("experiments", "reproduce the seeds' claims at small scale; writes experiments.md with plots",
         _experiments_args, examples="""  moekit experiments --quick                 # smoke test into runs/experiments
  moekit experiments --only moe_vs_dense capacity
  moekit experiments --out docs               # regenerate the committed report""")
def _experiments(ns) -> int:
    from moekit.experiments import EXPERIMENTS, run_all

    unknown = sorted(set(ns.only or ()) - set(EXPERIMENTS))
    if unknown:
        raise UsageError(f"--only {' '.join(unknown)}: unknown experiment; choose from {', '.join(EXPERIMENTS)}")
    report = run_all(ns.out, ns.quick, ns.only)
    print(report.read_text())
    print(f"report: {report}")
    return 0


# ---- training: demo / train / compare / generate
def _add_data_args(p: argparse.ArgumentParser, vocab: bool = True) -> None:
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="text files or folders (default: the Python standard library's source files)")
    p.add_argument("--max-bytes", type=int, default=8_000_000, help="cap on corpus size in bytes")
    if vocab:
        p.add_argument("--vocab-size", type=int, default=2048, help="byte-level BPE vocabulary size")


def _add_train_args(p: argparse.ArgumentParser, steps: int) -> None:
    _add_data_args(p)
    p.add_argument("--preset", default="tiny", help="model preset (tiny, mixtral-like, deepseek-like, switch-like)")
    p.add_argument("--config", default=None, help="a ModelConfig JSON file (overrides --preset)")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step (per micro-batch "
                                                              "when accumulating)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (warmup, then cosine decay)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: 5%% of --steps)")
    p.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default: --steps/6)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (router stays float32); fast on recent "
                                                       "GPUs, slower than float32 on most CPUs")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the batch order")
    p.add_argument("--out", default=None, help="run folder (default: runs/<command>-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device_arg(p)


def _train_config(ns):
    from moekit.config import TrainConfig

    return TrainConfig(steps=ns.steps, batch_size=ns.batch_size, seq_len=ns.seq_len, grad_accum=ns.grad_accum,
                       lr=ns.lr, warmup_steps=ns.warmup_steps if ns.warmup_steps is not None else max(1, ns.steps // 20),
                       eval_every=ns.eval_every if ns.eval_every is not None else max(1, ns.steps // 6),
                       bf16=ns.bf16, seed=ns.seed, log_every=max(1, min(10, ns.steps // 20)))


def _model_config(ns, vocab_size: int):
    """The model of --config or --preset, its context checked against --seq-len (before any data is read)."""
    from pathlib import Path

    from moekit.config import ModelConfig
    from moekit.models.presets import get_preset

    if ns.config:
        path = Path(ns.config)
        if not path.is_file():
            raise UsageError(f"--config {ns.config!r} does not exist (expected a ModelConfig JSON file)")
        try:
            fields = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"--config {ns.config!r} is not valid JSON: {e}") from None
        if isinstance(fields, dict):  # the vocabulary is the tokenizer's, whatever the file says
            fields = dict(fields, vocab_size=vocab_size)
        cfg, source = ModelConfig.from_dict(fields), f"--config {ns.config}"
    else:
        cfg, source = get_preset(ns.preset, vocab_size=vocab_size), f"preset {ns.preset}"
    if ns.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {ns.seq_len}: longer than the model's context ({source}: max_seq_len="
                         f"{cfg.max_seq_len}); use a shorter --seq-len or a --config with a larger max_seq_len")
    return cfg


def _check_memory(ns, vocab_size: int) -> None:
    """Refuse a batch whose logits alone cannot fit in RAM (e.g. --seq-len 100000 from a large-context config)
    instead of swapping for minutes: float32 logits, their log-softmax and its gradient, B x S x V each."""
    import os

    need = 3 * 4 * ns.batch_size * ns.seq_len * vocab_size
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return
    if need > ram:
        raise UsageError(f"--batch-size {ns.batch_size} x --seq-len {ns.seq_len} x vocab {vocab_size}: the logits "
                         f"alone need ~{need / 1e9:.0f} GB, more than this machine's {ram / 1e9:.0f} GB of RAM; "
                         f"lower --batch-size or --seq-len")


def _warn_bf16_on_cpu(ns, device) -> None:
    """bf16 autocast pays off on GPUs and on CPUs with bf16 matrix units; elsewhere it costs time."""
    if ns.bf16 and str(device).startswith("cpu"):
        # 2-vCPU AMD EPYC without bf16 units: 5.7x in issue 19's measurement, 10.9x in ours (tiny preset, batch
        # 16 x 128, one torch thread, fp32 and bf16 steps interleaved in one process on a busy machine)
        print("warning: --bf16 on a CPU: a training step of the tiny preset took 6-11x the float32 time on the "
              "CPU we measured (no bf16 matrix units); drop --bf16 unless your CPU has AMX or AVX512-BF16",
              file=sys.stderr)


def _run_dir(ns, command: str):
    import time
    from pathlib import Path

    return Path(ns.out) if ns.out else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


# what a folder written by train/compare/demo holds (compare and demo: one run per subfolder)
_RUN_MARKERS = ("latest", "tokenizer.json", "metrics.jsonl", "summary.json", "ckpt-*", "*/latest", "*/tokenizer.json")


def _check_run_dir(out, resume: bool, overwrite: bool) -> None:
    """One run per folder: a second run would mix its metrics into the first's and replace its tokenizer."""
    has_checkpoint = (out / "latest").is_file() or any(out.glob("ckpt-*"))
    if resume:
        if not has_checkpoint:
            raise UsageError(f"--resume: {out} holds no checkpoint to continue; start the run again "
                             f"{'with --overwrite' if out.is_dir() and any(out.iterdir()) else 'without --resume'}")
        return
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not any(any(out.glob(m)) for m in _RUN_MARKERS):
        raise UsageError(f"--out {out}: the folder is not empty and holds no moekit run; choose a new folder")
    if not overwrite:
        raise UsageError(f"--out {out} already holds a run: continue it with --resume, or replace it with "
                         f"--overwrite" if has_checkpoint else
                         f"--out {out} holds a run stopped before its first checkpoint: replace it with --overwrite")


def _check_resume_config(ckpt, cfg) -> None:
    """--resume with another --preset/--config would fail later with a tensor size mismatch: say what differs."""
    import dataclasses

    from moekit.train.checkpoint import read_config

    saved = read_config(ckpt)
    diff = [f"{f.name} {getattr(saved, f.name)!r} there, {getattr(cfg, f.name)!r} now"
            for f in dataclasses.fields(cfg) if getattr(saved, f.name) != getattr(cfg, f.name)]
    if diff:
        raise UsageError(f"--resume: {ckpt} was trained with another model ({'; '.join(diff)}); resume with "
                         f"the same --preset/--config/--data, or start a new run in another --out")


@contextlib.contextmanager
def _new_run_folder(out, overwrite: bool):
    """Create the run folder (emptied first with --overwrite); if the command fails before any checkpoint
    is written, remove it again: no stray folders holding only a tokenizer."""
    import shutil

    if overwrite and out.exists():
        shutil.rmtree(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if created and not any(any(out.glob(m)) for m in ("latest", "*/latest")):
            shutil.rmtree(out, ignore_errors=True)
        raise


class _StopOnSignal:
    """First SIGINT/SIGTERM: ask the training loop to stop after the current step (it saves a checkpoint).
    Second: the signal's default action, so the process ends at once, even inside a long kernel."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:  # the trainer's should_stop
        return self.requested

    def _handle(self, signum, frame) -> None:
        self.requested = True
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              f"(press Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        self._previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. main() called from a worker thread): no handlers
            pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _resume_command(ns, out) -> str:
    """The command line that continues this run: the same arguments, with --out, --resume, no --overwrite."""
    import shlex

    argv = [a for a in ns.argv if not (a.startswith("--ov") and "--overwrite".startswith(a))]
    argv += [] if ns.out else ["--out", str(out)]
    argv += [] if ns.resume else ["--resume"]
    return "moekit " + shlex.join(argv)


def _print_comparison(summary: dict, verdict: str) -> None:
    rows = summary["rows"]
    print()
    hdr = f"{'model':12} {'params':>9} {'active':>9} {'train GFLOP/tok':>15} {'val loss':>9} {'val ppl':>8} " \
          f"{'tokens/s':>9} {'time':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['label']:12} {r['params_total'] / 1e6:8.2f}M {r['params_active'] / 1e6:8.2f}M "
              f"{r['train_flops_per_token'] / 1e9:15.4f} {r['val_loss']:9.4f} {r['val_ppl']:8.2f} "
              f"{r['tokens_per_s']:9.0f} {r['seconds']:6.0f}s")
    moe, dense = rows[0], rows[1]
    print(f"\nMoE training FLOPs/token = {moe['train_flops_per_token'] / dense['train_flops_per_token']:.3f}x dense; "
          f"MoE tokens/s = {moe['tokens_per_s'] / dense['tokens_per_s']:.2f}x dense (first seed)")
    print(verdict)
    print("plots: " + ", ".join(summary["plots"]))


def _compare(ns, command: str) -> int:
    import dataclasses

    from moekit.experiments import demo_verdict
    from moekit.train.compare import compare_moe_dense
    from moekit.train.data import build_corpus
    from moekit.train.trainer import TrainingInterrupted

    if ns.seeds < 1:
        raise UsageError(f"--seeds={ns.seeds}: must be >= 1")
    out = _run_dir(ns, command)
    _check_run_dir(out, resume=False, overwrite=ns.overwrite)
    cfg = _model_config(ns, ns.vocab_size)  # a bad config fails before the corpus is tokenised
    _check_memory(ns, cfg.vocab_size)
    from moekit.device import resolve_device

    device = resolve_device(ns.device)
    _warn_bf16_on_cpu(ns, device)
    corpus = build_corpus(ns.data, vocab_size=ns.vocab_size, max_bytes=ns.max_bytes, progress=not ns.no_progress)
    corpus.check_seq_len(ns.seq_len)
    print(f"corpus: {corpus.description}", flush=True)
    cfg = dataclasses.replace(cfg, vocab_size=corpus.tokenizer.vocab_size)
    try:
        with _new_run_folder(out, ns.overwrite), _StopOnSignal() as stop:
            s = compare_moe_dense(cfg, corpus, _train_config(ns), out, progress=not ns.no_progress,
                                  should_stop=stop, seeds=range(ns.seed, ns.seed + ns.seeds), device=device)
    except TrainingInterrupted as e:
        print(f"moekit {command}: interrupted at step {e.step}; the models trained so far are in {out} "
              f"(a comparison cannot be resumed: run it again)", file=sys.stderr)
        return 130
    _print_comparison(s, demo_verdict(s["moe_val_losses"], s["dense_val_losses"], None))
    print(f"run folder: {out}")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=1, help="seeds to train, each an MoE and its dense twin; >= 2 gives "
                                                        "the verdict a 95%% interval")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the experiments report's, so "
                                                           "its measured seed spread applies)")
    p.add_argument("--out", default=None, help="run folder (default: runs/demo-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device_arg(p)


@command("demo", "train a small MoE LM and its dense twin (same active FLOPs) on the Python stdlib source, in the "
                 "configuration of docs/experiments.md's experiment 1; print the verdict with its uncertainty and "
                 "write plots", _demo_args, examples="""  moekit demo
  moekit demo --seeds 3
  moekit demo --steps 100 --out runs/demo-short""")
def _demo(ns) -> int:
    from moekit.device import resolve_device
    from moekit.experiments import demo_setup, demo_verdict, reported_diff
    from moekit.train.compare import compare_moe_dense
    from moekit.train.trainer import TrainingInterrupted

    if ns.seeds < 1 or (ns.steps is not None and ns.steps < 1):
        raise UsageError(f"--seeds={ns.seeds} --steps={ns.steps}: both must be >= 1")
    out = _run_dir(ns, "demo")
    _check_run_dir(out, resume=False, overwrite=ns.overwrite)
    corpus, cfg, tcfg = demo_setup(ns.steps)
    print(f"corpus: {corpus.description}", flush=True)
    try:
        with _new_run_folder(out, ns.overwrite), _StopOnSignal() as stop:
            s = compare_moe_dense(cfg, corpus, tcfg, out, progress=not ns.no_progress, should_stop=stop,
                                  seeds=range(ns.seeds), device=resolve_device(ns.device))
    except TrainingInterrupted as e:
        print(f"moekit demo: interrupted at step {e.step}; the models trained so far are in {out} "
              f"(a comparison cannot be resumed: run it again)", file=sys.stderr)
        return 130
    _print_comparison(s, demo_verdict(s["moe_val_losses"], s["dense_val_losses"],
                                      reported_diff() if ns.steps is None else None))
    print(f"run folder: {out}")
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    _add_train_args(p, steps=600)
    p.add_argument("--seeds", type=int, default=1, help="seeds --seed, --seed+1, ...; >= 2 gives the verdict a 95%% "
                                                        "interval")


@command("compare", "train an MoE model and its dense twin (same active FLOPs) on the same data", _compare_args,
         examples="""  moekit compare --preset switch-like --data my_texts/
  moekit compare --config model.json --steps 2000 --seeds 3 --out runs/cmp""")
def _compare_cmd(ns) -> int:
    return _compare(ns, "compare")


def _train_args(p: argparse.ArgumentParser) -> None:
    _add_train_args(p, steps=600)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest intact checkpoint")
    _add_verify_arg(p)
    p.add_argument("--save-every", type=int, default=100,
                   help="checkpoint every N steps (the newest 2 are kept), at the end and when interrupted; "
                        "0 = only at the end and when interrupted")
    p.add_argument("--dense", action="store_true", help="train the dense twin of the config instead")
    p.add_argument("--expert-parallel", type=int, default=0, metavar="N",
                   help="under torchrun: split each MoE layer's experts over N ranks (data parallel over "
                        "world/N groups); the batch size is the global batch; 0 = a single process")
    p.add_argument("--dp-replicate", type=int, default=1, metavar="R",
                   help="under torchrun: R full replicas (HSDP); each FSDP-shards over world/R ranks")
    p.add_argument("--async-save", action="store_true", help="under torchrun: write sharded checkpoints in "
                                                              "the background while training goes on")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in backward instead of keeping them")


@command("train", "train one model (preset or config JSON) with checkpoints and metrics", _train_args,
         examples="""  moekit train --preset tiny --steps 2000 --out runs/a
  moekit train --preset tiny --steps 2000 --out runs/a --resume     # continue after Ctrl-C or a crash
  moekit train --config model.json --data my_texts/ --seed 1 --out runs/b
  torchrun --nproc-per-node 2 -m moekit train --expert-parallel 2 --out runs/ep""")
def _train_cmd(ns) -> int:
    import dataclasses

    import torch

    from moekit.models.decoder import MoETransformer
    from moekit.train.data import build_corpus
    from moekit.train.hooks import MetricsWriter, RouterBiasUpdate
    from moekit.train.trainer import train

    if ns.resume and not ns.out:
        raise UsageError("--resume needs --out (the run folder to continue)")
    if ns.resume and ns.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: continue the run or replace it")
    import os

    from moekit.device import resolve_device
    from moekit.distributed import build_mesh, init_distributed, parallelize, rank_zero_first
    from moekit.distributed.parallelize import apply_activation_checkpointing, apply_compile
    from moekit.train.trainer import TrainingInterrupted

    distributed = ns.expert_parallel > 0 or int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = init_distributed(ns.device) if distributed else resolve_device(ns.device)
    is_main = not distributed or torch.distributed.get_rank() == 0  # only rank 0 prints and writes
    say = print if is_main else (lambda *a, **k: None)
    out = _run_dir(ns, "train")
    _check_run_dir(out, ns.resume, ns.overwrite)  # every rank, before rank 0 creates anything
    cfg = _model_config(ns, ns.vocab_size)  # a bad config fails before the corpus is tokenised
    _check_memory(ns, cfg.vocab_size)
    if is_main:
        _warn_bf16_on_cpu(ns, device)
    with rank_zero_first():  # rank 0 fills the tokenizer/token cache, then the other ranks read it
        corpus = build_corpus(ns.data, vocab_size=ns.vocab_size, max_bytes=ns.max_bytes,
                              progress=not ns.no_progress and is_main)
    corpus.check_seq_len(ns.seq_len)
    cfg = dataclasses.replace(cfg, vocab_size=corpus.tokenizer.vocab_size)
    cfg = cfg.dense_twin() if ns.dense else cfg
    tcfg = dataclasses.replace(_train_config(ns), save_every=ns.save_every)
    say(f"corpus: {corpus.description}", flush=True)
    resume = False
    if ns.resume:  # the newest checkpoint whose files match their checksums; say which ones were skipped
        from moekit.train.checkpoint import newest_intact

        resume, damaged = newest_intact(out, verify=not ns.no_verify)
        for path, why in damaged:
            say(f"checkpoint {path} is damaged: {why}")
        say(f"resuming from {resume}" + (" (the newest intact checkpoint)" if damaged else ""))
        _check_resume_config(resume, cfg)

    torch.manual_seed(ns.seed)
    model = MoETransformer(cfg)
    say(f"model: {model.num_params() / 1e6:.2f}M params, {model.num_active_params() / 1e6:.2f}M active; "
        f"run folder: {out}")
    model.to(device)  # before sharding: collectives use tensors on the backend's device
    if ns.activation_checkpointing:
        apply_activation_checkpointing(model)
    if ns.compile:
        apply_compile(model)
    plan = None
    if distributed:
        plan = parallelize(model, build_mesh(max(ns.expert_parallel, 1), ns.dp_replicate, device.type))
    folder = _new_run_folder(out, ns.overwrite) if is_main else contextlib.nullcontext()
    try:
        with folder, _StopOnSignal() as stop:
            if is_main and not ns.resume:  # `moekit generate` needs it beside the checkpoints
                corpus.tokenizer.save(out / "tokenizer.json")
            records = train(model, corpus.train, corpus.val, tcfg, out_dir=out, resume=resume,
                            progress=not ns.no_progress and is_main, device=device, parallel=plan,
                            hooks=([MetricsWriter(out)] if is_main else []) + [RouterBiasUpdate()],
                            should_stop=stop, async_save=ns.async_save)
    except TrainingInterrupted as e:
        if is_main:
            print(f"moekit train: interrupted after step {e.step} of {tcfg.steps}; checkpoint saved: "
                  f"{e.checkpoint}\ncontinue with: {_resume_command(ns, out)}", file=sys.stderr)
        return 130
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    vals = [r for r in records if r["split"] == "val"]
    if vals:
        say(f"step {vals[-1]['step']}: val loss {vals[-1]['val_loss']:.4f} (ppl {vals[-1]['val_ppl']:.2f})")
    return 0


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run folder or checkpoint folder (with tokenizer.json in the run folder)")
    p.add_argument("--prompt", default="def ", help="text to continue ('' starts a new document)")
    p.add_argument("--max-new-tokens", type=int, default=80, help="tokens to sample (capped by the model's context)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: keep the smallest set of tokens "
                                                             "with this much probability")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    _add_verify_arg(p)
    _add_device_arg(p)


@command("generate", "sample text from a trained checkpoint (KV cache; greedy with --temperature 0)",
         _generate_args, examples="""  moekit generate runs/a
  moekit generate runs/a --prompt "def fib(" --temperature 0 --max-new-tokens 40""")
def _generate_cmd(ns) -> int:
    import torch

    from moekit.models.generate import generate
    from moekit.train.checkpoint import load_tokenizer

    from moekit.device import resolve_device

    device = resolve_device(ns.device)
    model = _load_model(ns).to(device)
    tok = load_tokenizer(ns.checkpoint)
    # an empty prompt starts a fresh document: training saw the separator before every document
    ids = torch.tensor([tok.encode(ns.prompt) or [tok.eos_id]], device=device)
    if ns.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens={ns.max_new_tokens}: must be >= 1")
    if ids.shape[1] >= model.cfg.max_seq_len:
        raise UsageError(f"--prompt is {ids.shape[1]} tokens; the model's max_seq_len is {model.cfg.max_seq_len}")
    n = min(ns.max_new_tokens, model.cfg.max_seq_len - ids.shape[1])
    # a patched HF model keeps transformers' attention, which has no moekit KV cache: each step recomputes
    out = generate(model, ids, n, temperature=ns.temperature, top_p=ns.top_p, use_cache=hasattr(model, "new_cache"),
                   generator=torch.Generator(device).manual_seed(ns.seed))
    print(tok.decode(out[0].tolist()))
    return 0


# ---- fine-tuning and deployment: finetune / distill / merge / prune / extract
def _deploy_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=_MODEL_HELP)
    _add_data_args(p, vocab=False)  # the data is encoded with the checkpoint's own tokenizer
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (at most the model's max_seq_len)")
    p.add_argument("--batches", type=int, default=8, help="validation batches (and batches to measure loads on)")
    _add_verify_arg(p)


def _deploy_inputs(ns, device="cpu"):
    """(model, tokenizer path, train, val) with the data encoded by the checkpoint's own tokenizer."""
    from moekit.train.checkpoint import load_tokenizer, tokenizer_path
    from moekit.train.data import build_corpus

    model = _load_model(ns).to(device)
    tok_path = tokenizer_path(ns.checkpoint)
    corpus = build_corpus(ns.data, max_bytes=ns.max_bytes, tokenizer=load_tokenizer(ns.checkpoint))
    _check_checkpoint_seq_len(ns, model, corpus)
    return model, tok_path, corpus.train, corpus.val


def _check_checkpoint_seq_len(ns, model, corpus) -> None:
    if ns.seq_len > model.cfg.max_seq_len:
        raise UsageError(f"--seq-len {ns.seq_len}: longer than the checkpoint's context (max_seq_len="
                         f"{model.cfg.max_seq_len}); use a shorter --seq-len")
    corpus.check_seq_len(ns.seq_len)


def _run_folder(path: str, tok_path):
    """The output run folder, created, with the source checkpoint's tokenizer copied in (generate/inspect need it)."""
    import shutil
    from pathlib import Path

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(tok_path, out / "tokenizer.json")
    return out


def _batches(stream, ns):
    return stream.eval_batches(ns.batches, ns.batch_size, ns.seq_len)


def _val_loss(model, val, ns) -> float:
    from moekit.train.trainer import evaluate

    return evaluate(model, _batches(val, ns))


def _finetune_args(p: argparse.ArgumentParser) -> None:
    # recipe and freeze names are checked by get_recipe: importing moekit.train.finetune here would import
    # torch for every `moekit --help`
    _deploy_data_args(p)
    p.add_argument("--recipe", default="moe",
                   help="a recipe of moekit.train.finetune.RECIPES (moe: freeze experts+routers, half batch, 3x LR, "
                        "expert dropout 0.4)")
    p.add_argument("--freeze", default=None,
                   help="override the recipe's freeze policy: none, moe (freeze experts+routers), experts (freeze "
                        "experts), non_moe (freeze all but experts+routers)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    p.add_argument("--recipe-batch-size", type=int, default=None, help="training batch (default: the recipe's)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="token dropping while fine-tuning (default: the recipe's)")
    p.add_argument("--aux-coef", type=float, default=None,
                   help="load-balancing loss coefficient, 0 = off (default: the recipe's)")
    p.add_argument("--out", required=True, help="run folder for the fine-tuned checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device_arg(p)


@command("finetune", "fine-tune a checkpoint on new data with an MoE recipe (freeze policy, expert dropout, "
                     "aux loss, token dropping); reports trainable parameters and memory saved", _finetune_args,
         examples="""  moekit finetune runs/a --recipe moe --data my_texts/ --out runs/ft
  moekit finetune runs/a --freeze experts --steps 200 --lr 1e-3 --out runs/ft2""")
def _finetune_cmd(ns) -> int:
    from moekit.train.finetune import finetune, get_recipe
    from moekit.train.hooks import MetricsWriter

    from moekit.device import resolve_device

    device = resolve_device(ns.device)
    model, tok_path, train, val = _deploy_inputs(ns, device)
    recipe = get_recipe(ns.recipe, freeze=ns.freeze, steps=ns.steps, lr=ns.lr, batch_size=ns.recipe_batch_size,
                        capacity_factor=ns.capacity_factor, aux_coef=ns.aux_coef)
    out = _run_folder(ns.out, tok_path)
    before = _val_loss(model, val, ns)
    tuned, _, report = finetune(model, train, val, recipe, out_dir=out, hooks=[MetricsWriter(out)],
                                progress=not ns.no_progress, device=device,
                                tcfg_overrides={"seq_len": ns.seq_len, "eval_batches": ns.batches,
                                                "eval_every": max(1, recipe.steps // 4)})
    print(f"recipe: {recipe}")
    print(f"trainable params: {report['trainable_params']:,} of {report['total_params']:,} "
          f"({report['trainable_params'] / report['total_params']:.1%}); by group: " +
          ", ".join(f"{g} {v['trainable']:,}/{v['trainable'] + v['frozen']:,}" for g, v in report["by_group"].items()))
    print(f"grad + Adam memory: {report['grad_and_adam_bytes_full'] - report['grad_and_adam_bytes_saved']:,} B "
          f"(saved {report['grad_and_adam_bytes_saved']:,} B of {report['grad_and_adam_bytes_full']:,} B by freezing)")
    print(f"val loss: {before:.4f} -> {_val_loss(tuned, val, ns):.4f}; run folder: {out}")
    return 0


def _distill_args(p: argparse.ArgumentParser) -> None:
    _deploy_data_args(p)
    p.add_argument("--steps", type=int, default=300, help="student training steps")
    p.add_argument("--lr", type=float, default=3e-3, help="student peak learning rate")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the soft-target (KL) term")
    p.add_argument("--temperature", type=float, default=2.0, help="softening temperature of both distributions")
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch dense baseline")
    p.add_argument("--seed", type=int, default=0, help="seed of the student's initialisation and batches")
    p.add_argument("--out", required=True, help="run folder for the student")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device_arg(p)


@command("distill", "distil an MoE checkpoint into its dense twin (Hinton KD) and report how much of the MoE's "
                    "gain over a from-scratch dense model the student keeps", _distill_args,
         examples="""  moekit distill runs/a --out runs/kd
  moekit distill runs/a --data my_texts/ --steps 600 --alpha 0.7 --no-scratch --out runs/kd2""")
def _distill_cmd(ns) -> int:
    from moekit.config import TrainConfig
    from moekit.deploy.distill import distill_vs_scratch

    from moekit.device import resolve_device

    device = resolve_device(ns.device)
    teacher, tok_path, train_data, val = _deploy_inputs(ns, device)
    if teacher.cfg.moe is None:
        raise UsageError(f"checkpoint {ns.checkpoint!r} is a dense model; distill needs an MoE teacher")
    tcfg = TrainConfig(steps=ns.steps, batch_size=ns.batch_size, seq_len=ns.seq_len, lr=ns.lr, seed=ns.seed,
                       warmup_steps=max(1, ns.steps // 20), eval_every=0, eval_batches=ns.batches)
    out = _run_folder(ns.out, tok_path)
    for label in ("student",) + (() if ns.no_scratch else ("scratch",)):  # run folders: generate needs the tokenizer
        _run_folder(out / label, tok_path)
    r = distill_vs_scratch(teacher, train_data, _batches(val, ns), tcfg, alpha=ns.alpha, temperature=ns.temperature,
                           scratch=not ns.no_scratch, out_dir=out, progress=not ns.no_progress, device=device)
    print(f"MoE teacher val loss {r.loss_teacher:.4f}; KD student (dense twin, {r.student.num_params() / 1e6:.2f}M "
          f"params) {r.loss_student:.4f}")
    if r.scratch is not None:
        print(f"dense from scratch {r.loss_scratch:.4f}; gain retained (L_scratch - L_student) / (L_scratch - L_moe) = "
              f"{r.gain_retained:.1%}")
    print(f"run folder: {out}")
    return 0


def _print_deploy_result(before, after, model, out, extra: dict, written: str) -> None:
    from moekit.deploy import tensor_bytes

    print(f"params: {before['params']:,} -> {sum(p.numel() for p in model.parameters()):,}; "
          f"bytes: {before['bytes']:,} -> {tensor_bytes(model):,}")
    print(f"val loss: {before['loss']:.4f} -> {after:.4f}")
    for k, v in extra.items():
        print(f"{k}: {v}")
    print(f"saved: {out}, {written}")


def _add_dst_arg(p: argparse.ArgumentParser) -> None:
    # optional for argparse only: `CKPT --data a b DST` puts DST into --data, _take_dst gets it back
    p.add_argument("dst", nargs="?", help="output folder (required; may also come after --data's paths)")


def _take_dst(ns) -> None:
    """The output folder swallowed by --data (nargs='+') is the last of its paths: a DST is always required."""
    if ns.dst is None:
        if not ns.data or len(ns.data) < 2:
            raise UsageError("missing DST, the output folder: moekit "
                             f"{ns.command} CHECKPOINT DST [--data PATH ...]")
        ns.dst = ns.data.pop()


def _deploy_transform(ns, transform) -> int:
    """Shared by merge / prune / extract: load, measure loads, transform, report, save."""
    from moekit.deploy import tensor_bytes
    from moekit.train.checkpoint import save_deployed

    _take_dst(ns)
    model, tok_path, train, val = _deploy_inputs(ns)
    if model.cfg.moe is None:
        raise UsageError(f"checkpoint {ns.checkpoint!r} is a dense model; it has no experts to {ns.command}")
    before = {"params": model.num_params(), "bytes": tensor_bytes(model), "loss": _val_loss(model, val, ns)}
    model, extra = transform(model, train, val)
    written = save_deployed(ns.dst, model, state={"command": ns.command, **extra}, tokenizer=tok_path)
    _print_deploy_result(before, _val_loss(model, val, ns), model, ns.dst, extra, written)
    return 0


def _merge_args(p: argparse.ArgumentParser) -> None:
    _deploy_data_args(p)
    _add_dst_arg(p)
    p.add_argument("--num-experts", type=int, required=True, help="experts per layer after merging")
    p.add_argument("--strategy", choices=["frequency", "similarity"], default="frequency",
                   help="how experts are grouped: around the most used ones, or by similarity")
    p.add_argument("--similarity", choices=["router", "weights"], default="router",
                   help="with --strategy similarity: compare router rows or expert weights")
    p.add_argument("--router", choices=["map", "average"], default="map",
                   help="map: keep the router, map its choices to merged experts (routing preserved); "
                        "average: frequency-weighted router rows (a plain smaller router)")


@command("merge", "merge experts (routing-frequency-weighted averages of groups) and save the smaller model",
         _merge_args, examples="""  moekit merge runs/a runs/m --num-experts 4
  moekit merge runs/a runs/m2 --num-experts 4 --strategy similarity --data my_texts/""")
def _merge_cmd(ns) -> int:
    from moekit.deploy.merge import merge_model
    from moekit.deploy.prune import measure_loads

    if ns.num_experts < 1:
        raise UsageError(f"--num-experts={ns.num_experts}: must be >= 1 (experts per layer after merging)")

    def transform(model, train, val):
        loads = measure_loads(model, _batches(train, ns))
        model, groups = merge_model(model, loads, ns.num_experts, strategy=ns.strategy, similarity=ns.similarity,
                                    router=ns.router)
        return model, {"groups": groups}

    return _deploy_transform(ns, transform)


def _prune_args(p: argparse.ArgumentParser) -> None:
    _deploy_data_args(p)
    _add_dst_arg(p)
    p.add_argument("--keep", type=int, default=None, help="experts to keep per layer (the most loaded)")
    p.add_argument("--min-share", type=float, default=None, help="keep experts with load share >= this")


@command("prune", "drop each layer's least-used experts (load measured on data), slice the router, save",
         _prune_args, examples="""  moekit prune runs/a runs/p --keep 4
  moekit prune runs/a runs/p2 --min-share 0.1 --data my_texts/""")
def _prune_cmd(ns) -> int:
    from moekit.deploy.prune import measure_loads, prune_model

    if (ns.keep is None) == (ns.min_share is None):
        raise UsageError("give exactly one of --keep N (experts per layer) or --min-share S (load share)")

    def transform(model, train, val):
        loads = measure_loads(model, _batches(train, ns))
        model, kept = prune_model(model, loads, keep=ns.keep, min_share=ns.min_share)
        return model, {"kept": kept}

    return _deploy_transform(ns, transform)


def _extract_args(p: argparse.ArgumentParser) -> None:
    _deploy_data_args(p)
    _add_dst_arg(p)
    p.add_argument("--min-share", type=float, default=0.05,
                   help="keep experts whose load share on the task data is >= this")


@command("extract", "task sub-network: keep only the experts a task's data uses (load share >= threshold), save",
         _extract_args, examples="""  moekit extract runs/a runs/t --data task_texts/
  moekit extract runs/a --data task_texts/ more_texts/ runs/t     # DST may also follow --data's paths""")
def _extract_cmd(ns) -> int:
    from moekit.deploy.extract import extract_task

    def transform(model, train, val):
        model, kept, _ = extract_task(model, _batches(train, ns), ns.min_share)
        return model, {"kept": kept}

    return _deploy_transform(ns, transform)


# ----------------------------------------------------------------------------- entry point
class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends each option's default, unless it has none (None/False)
    or its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or "default" in help_ \
                or not action.option_strings:
            return help_
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{help_} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts transformers toolkit",
                                     epilog="run `moekit COMMAND --help` for a command's options and examples",
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_args, _fn, examples) in _COMMANDS.items():
        add_args(sub.add_parser(name, help=help_, description=help_, formatter_class=_HelpFormatter,
                                epilog=f"examples:\n{examples}" if examples else None))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra and getattr(ns, "dst", "") is None and len(extra) == 1 and not extra[0].startswith("-"):
        ns.dst = extra[0]  # `CKPT --keep 2 DST`: argparse fills an optional positional only at its first chance
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if ns.command is None:
        parser.print_help()
        return 0
    ns.argv = argv  # to print the exact command that resumes an interrupted run
    try:
        rc = _COMMANDS[ns.command][2](ns)
    except MoekitError as e:  # names the argument, field or file: one line, no traceback
        print(f"moekit {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, tokenising): nothing to save
        print(f"\nmoekit {ns.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
