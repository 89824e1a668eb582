"""MoE layer speed against the best dense FFN of equal active FLOPs, against HF transformers' MoE blocks, and
against a measured matmul ceiling; plus how each slows down when another process is busy on the same cores.

Run:  python benchmarks/bench_layer.py [--reps 7] [--runs 3] [--tokens 4096] [--threads N] [--no-compile]
                                      [--no-contention]

W1: T=4096, d=512, 8 experts h=1408, top-2            (Mixtral-shaped)   dense twin h = 2*1408
W2: T=4096, d=512, 64 experts h=352, top-8, 1 shared  (Qwen2-MoE-shaped) dense twin h = 8*352 + 352

Dense baselines, all with the dense twin's hidden size H (the MoE's active width):
- plain: nn.Linear SwiGLU under autograd (aten ops: F.silu(gate) * up);
- row-chunked: the same module applied to 512-row chunks (smaller intermediates, cache-friendlier);
- moekit MLP: moekit's dense FFN (its SwiGLU one fused pass forward and backward on the CPU);
- fused 1-expert: moekit's own blockwise kernel with one expert of hidden H and every token on it;
- compiled: torch.compile of the plain module, when compilation works on this machine.
Every MoE ratio is to the BEST dense (lowest fwd+bwd median); the ratio to plain is printed beside it.
All cases of a workload are timed round-robin by ``moekit.analysis.timing`` (warm-up, median, spread =
half the max-min range over the rounds, in %); ratios are per-round ratios, so load drift cancels.
Matmul ceiling: the best GFLOP/s over several matmul shapes at the same thread count; the layer's
achieved GFLOP/s counts active FLOPs only (forward 3 matmuls, backward 6: 18*T*D*H).
Contention: a busy process (matmuls on as many threads as torch uses here) runs while plain dense and
moekit's blockwise kernel (both block schedules: serial and pooled, see layers/blockwise.py) are timed
again; slowdown = busy / idle median; target: moekit's slowdown <= 1.5x dense's.
Targets (fwd+bwd): moekit auto <= 1.10x the best dense, >= 1.3x faster than HF's best, >= 60% of the
ceiling. ``--runs N`` repeats the timing of those cases N times (the first run is the full table) and
prints each target's median and range over the runs, then the README's table rows.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys

import torch
from torch import nn

from moekit.analysis.timing import best, ratio, round_robin
from moekit.config import LossConfig, MoEConfig, RouterConfig
from moekit.layers import blockwise
from moekit.layers.experts import MLP
from moekit.layers.moe import MoELayer

WORKLOADS = {
    "W1": dict(d=512, E=8, h=1408, k=2, shared=0),
    "W2": dict(d=512, E=64, h=352, k=8, shared=1),
}
DENSE = ("dense plain", "dense row-chunked", "dense moekit MLP", "dense fused 1-expert", "dense compiled")
# label -> (MoEConfig.dispatcher, MoEConfig.experts, blockwise schedule or None for the default)
MOEKIT_CASES = {"auto": ("local", "auto", None), "blockwise serial": ("local", "blockwise", "serial"),
                "blockwise pooled": ("local", "blockwise", "pooled"), "grouped": ("local", "grouped_mm", None),
                "loop": ("local", "loop", None), "padded": ("padded", "auto", None)}
DEFAULT_SCHEDULE = blockwise.block_schedule()  # the library's, for cases that name none


def fwd_and_fwdbwd(module: nn.Module, x: torch.Tensor, out=lambda o: o, schedule: str | None = None
                   ) -> dict[str, callable]:
    """The two closures timed for a module: forward only (no grad) and forward + backward; ``schedule``:
    the blockwise block schedule the closure runs with (the library default when None)."""
    dy = torch.randn_like(x)

    def fwd():
        blockwise.set_block_schedule(schedule or DEFAULT_SCHEDULE)
        with torch.no_grad():
            module(x)

    def fwdbwd():
        blockwise.set_block_schedule(schedule or DEFAULT_SCHEDULE)
        xi = x.detach().requires_grad_(True)
        (out(module(xi)) * dy).sum().backward()
        module.zero_grad(set_to_none=True)

    return {"fwd": fwd, "fwd+bwd": fwdbwd}


def saved_for_backward_mb(module: nn.Module, x: torch.Tensor, out=lambda o: o) -> float:
    """MB of activations autograd keeps for the backward pass (every tensor saved by a forward, counted once
    per storage; parameters and the input itself excluded): the layer's training memory beyond weights."""
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    xi = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out(module(xi))
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()} | {xi.untyped_storage().data_ptr()}
    return sum(n for ptr, n in saved.items() if ptr not in skip) / 2**20


class PlainSwiGLU(nn.Module):
    """The FFN as a user writes it: three nn.Linear and aten's silu under autograd."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w_gate, self.w_up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.w_down(nn.functional.silu(self.w_gate(x)) * self.w_up(x))


class RowChunked(nn.Module):
    """The same FFN applied to row chunks: intermediates of chunk x H instead of T x H."""

    def __init__(self, ffn: nn.Module, rows: int = 512):
        super().__init__()
        self.ffn, self.rows = ffn, rows

    def forward(self, x):
        return torch.cat([self.ffn(c) for c in x.split(self.rows)])


def moe_layer(w: dict, dispatcher: str, experts: str) -> MoELayer:
    cfg = MoEConfig(d_model=w["d"], num_experts=w["E"], expert_hidden=w["h"], num_shared_experts=w["shared"],
                    shared_gate=bool(w["shared"]), dispatcher=dispatcher, experts=experts,
                    router=RouterConfig(top_k=w["k"]), loss=LossConfig(aux_coef=0.01))
    return MoELayer(cfg)


def dense_cases(w: dict, x: torch.Tensor, compile_: bool = True) -> dict[str, nn.Module]:
    """The dense baselines (see the module docstring) with hidden H = the MoE's active width."""
    H = w["k"] * w["h"] + w["shared"] * w["h"]
    plain = PlainSwiGLU(w["d"], H)
    fused = MoELayer(MoEConfig(d_model=w["d"], num_experts=1, expert_hidden=H, experts="blockwise",
                               router=RouterConfig(top_k=1), loss=LossConfig(aux_coef=0.0)))
    cases = {"dense plain": (plain, lambda o: o),
             "dense row-chunked": (RowChunked(PlainSwiGLU(w["d"], H)), lambda o: o),
             "dense moekit MLP": (MLP(w["d"], H), lambda o: o), "dense fused 1-expert": (fused, lambda o: o.y)}
    if not compile_:
        return cases
    try:
        compiled = torch.compile(PlainSwiGLU(w["d"], H))
        compiled(x.detach().requires_grad_(True)).sum().backward()  # compile now: fails here if it cannot
        cases["dense compiled"] = (compiled, lambda o: o)
    except Exception as e:  # no C++ compiler, unsupported platform: report and go on without it
        print(f"  (torch.compile unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]})")
    return cases


def hf_block(workload: dict, impl: str) -> nn.Module | None:
    try:
        if workload["shared"]:
            from transformers import Qwen2MoeConfig
            from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block
            cfg = Qwen2MoeConfig(hidden_size=workload["d"], moe_intermediate_size=workload["h"],
                                 shared_expert_intermediate_size=workload["h"], num_experts=workload["E"],
                                 num_experts_per_tok=workload["k"], norm_topk_prob=True)
        else:
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
            cfg = MixtralConfig(hidden_size=workload["d"], intermediate_size=workload["h"],
                                num_local_experts=workload["E"], num_experts_per_tok=workload["k"])
    except ImportError:
        return None
    cfg._experts_implementation = impl
    block = Block(cfg)
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    return block


def hf_output(o):
    return o[0] if isinstance(o, tuple) else o


def matmul_ceiling(T: int, D: int, H: int, reps: int) -> tuple[float, str]:
    """Best GFLOP/s over matmul shapes the layer's work resembles, timed round-robin at this thread count."""
    shapes = {f"{m}x{k}x{n}": (m, k, n) for m, k, n in
              [(T, D, H), (T, H, D), (H, T, D), (T // 4, D, H), (1024, 1024, 1024), (2048, 2048, 2048)]}
    mats = {name: (torch.randn(m, k), torch.randn(k, n)) for name, (m, k, n) in shapes.items()}
    times = round_robin({name: (lambda a=a, b=b: a @ b) for name, (a, b) in mats.items()}, reps=reps)
    gflops = {name: 2 * m * k * n / times[name].median / 1e9 for name, (m, k, n) in shapes.items()}
    top = max(gflops, key=gflops.get)
    return gflops[top], top


@contextlib.contextmanager
def busy_process(threads: int):
    """Another process doing matmuls on ``threads`` threads until the block ends (the contention case)."""
    code = (f"import torch; torch.set_num_threads({threads}); a = torch.randn(1024, 1024)\n"
            "while True: a @ a")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def run_workload(name: str, w: dict, args) -> None:
    x = torch.randn(args.tokens, w["d"])
    modules = dense_cases(w, x, args.compile)
    schedules = {}
    for label, (dispatcher, experts, schedule) in MOEKIT_CASES.items():
        modules["moekit " + label] = (moe_layer(w, dispatcher, experts), lambda o: o.y)
        schedules["moekit " + label] = schedule
    hf_names = []
    for impl in ("eager", "batched_mm", "grouped_mm"):
        block = hf_block(w, impl)
        if block is None:
            break
        try:
            block(x[None])
        except Exception as e:  # an implementation HF cannot run on this device/dtype
            why = ("out of memory (it copies the expert weights per routed token)" if "alloc" in str(e)
                   else f"{type(e).__name__}: {str(e)[:60]}")
            print(f"{name:4} {'HF ' + impl:22} unavailable: {why}")
            continue
        modules["HF " + impl] = (block, hf_output)
        hf_names.append("HF " + impl)
    xs = {n: (x[None] if n.startswith("HF") else x) for n in modules}
    closures = {n: fwd_and_fwdbwd(m, xs[n], out, schedules.get(n)) for n, (m, out) in modules.items()}
    saved = {n: saved_for_backward_mb(m, xs[n], out) for n, (m, out) in modules.items()}
    times = {kind: round_robin({n: c[kind] for n, c in closures.items()}, reps=args.reps, warmup=args.warmup)
             for kind in ("fwd", "fwd+bwd")}
    dense = [n for n in DENSE if n in modules]
    base = best(times["fwd+bwd"], dense)
    print(f"{name}: best dense = {base} ({times['fwd+bwd'][base].ms()} fwd+bwd); ratios = median of per-round "
          "ratios ±half their range")
    print(f"{'':4} {'implementation':22} {'fwd / best':>12} {'fwd+bwd / best':>15} {'fwd+bwd / plain':>16} "
          f"{'fwd+bwd ms':>14} {'saved MB':>9}")
    for n in modules:
        print(f"{name:4} {n:22} {ratio(times['fwd'], n, base).x():>12} {ratio(times['fwd+bwd'], n, base).x():>15} "
              f"{ratio(times['fwd+bwd'], n, 'dense plain').x():>16} {times['fwd+bwd'][n].ms():>14} {saved[n]:9.0f}")
    if hf_names:
        hf = best(times["fwd+bwd"], hf_names)
        print(f"{name:4} moekit auto vs HF best ({hf[3:]}): {ratio(times['fwd+bwd'], hf, 'moekit auto').x()} faster "
              "(fwd+bwd)")
    H = w["k"] * w["h"] + w["shared"] * w["h"]
    ceiling, shape = matmul_ceiling(args.tokens, w["d"], H, args.reps)
    flops = 18 * args.tokens * w["d"] * H
    achieved = {n: flops / times["fwd+bwd"][n].median / 1e9 for n in ("moekit auto", base)}
    print(f"{name:4} matmul ceiling {ceiling:.0f} GFLOP/s (best shape {shape}); fwd+bwd on active FLOPs: moekit auto "
          f"{achieved['moekit auto']:.0f} GFLOP/s = {achieved['moekit auto'] / ceiling:.0%} of the ceiling, "
          f"{base} {achieved[base]:.0f} GFLOP/s = {achieved[base] / ceiling:.0%}")
    summary = {"best dense": base, "auto/best": [ratio(times["fwd+bwd"], "moekit auto", base).median],
               "HF/auto": [ratio(times["fwd+bwd"], hf, "moekit auto").median] if hf_names else [],
               "ceiling": [achieved["moekit auto"] / ceiling]}
    if args.contention:
        cases = ("dense plain", "moekit blockwise serial", "moekit blockwise pooled")
        group = {n: closures[n]["fwd+bwd"] for n in cases}
        idle = round_robin(group, reps=args.reps, warmup=args.warmup)
        with busy_process(torch.get_num_threads()):
            loaded = round_robin(group, reps=args.reps, warmup=args.warmup)
        slow = {n: loaded[n].median / idle[n].median for n in cases}
        summary["contention"] = {n: slow[n] / slow["dense plain"] for n in cases[1:]}
        print(f"{name:4} contention (a busy {torch.get_num_threads()}-thread process on the same cores): slowdown "
              f"dense plain {slow['dense plain']:.2f}x, " + ", ".join(
                  f"{n[7:]} {slow[n]:.2f}x -> /dense {slow[n] / slow['dense plain']:.2f}" for n in cases[1:])
              + " (target <= 1.5)")
    # further runs: the target ratios only (the cases they need), for their spread over runs
    targets = [n for n in dense] + ["moekit auto"] + ([hf] if hf_names else [])
    for run in range(1, args.runs):
        t = round_robin({n: closures[n]["fwd+bwd"] for n in targets}, reps=args.reps, warmup=args.warmup)
        b = best(t, dense)
        summary["auto/best"].append(ratio(t, "moekit auto", b).median)
        if hf_names:
            summary["HF/auto"].append(ratio(t, hf, "moekit auto").median)
        summary["ceiling"].append(flops / t["moekit auto"].median / 1e9 / ceiling)
        print(f"{name:4} run {run + 1}: best = {b}; moekit auto / best dense {summary['auto/best'][-1]:.2f}x"
              + (f", HF best / moekit auto {summary['HF/auto'][-1]:.2f}x" if hf_names else "")
              + f", {summary['ceiling'][-1]:.0%} of the ceiling", flush=True)
    print(flush=True)
    return summary


def over_runs(values: list[float], fmt: str) -> str:
    """Median [min-max] over runs."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def readme_rows(summaries: dict[str, dict], runs: int) -> None:
    """The README's performance table, from this run's numbers (median [min-max] over ``runs`` runs)."""
    print(f"README table (fwd+bwd, median [min-max] over {runs} run(s)):")
    print("| workload | best dense | moekit auto / best dense (target <= 1.10) | HF best / moekit auto "
          "(target >= 1.3) | moekit auto, share of matmul ceiling (target >= 60%) | contention slowdown "
          "vs dense, serial / pooled (target <= 1.5) |")
    print("|---|---|---|---|---|---|")
    for name, s in summaries.items():
        cont = s.get("contention")
        cont_s = " / ".join(f"{v:.2f}" for v in cont.values()) if cont else "not run"
        print(f"| {name} | {s['best dense'][6:]} | {over_runs(s['auto/best'], '.2f')}x | "
              f"{over_runs(s['HF/auto'], '.2f') + 'x' if s['HF/auto'] else 'n/a'} | "
              f"{over_runs(s['ceiling'], '.0%')} | {cont_s} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1, help="repeat the target ratios' timing this many times")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--only", nargs="+", choices=sorted(WORKLOADS), default=sorted(WORKLOADS))
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the torch.compile dense baseline (compiling takes minutes)")
    ap.add_argument("--no-contention", dest="contention", action="store_false",
                    help="skip the run with a competing busy process")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, T={args.tokens}, reps={args.reps}, "
          f"warm-up rounds={args.warmup}")
    summaries = {name: run_workload(name, WORKLOADS[name], args) for name in args.only}
    readme_rows(summaries, args.runs)


if __name__ == "__main__":
    main()
