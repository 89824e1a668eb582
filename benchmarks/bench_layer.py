"""MoE layer speed vs a dense SwiGLU of equal active FLOPs and vs HF transformers' MoE blocks.

Run:  python benchmarks/bench_layer.py [--reps 5] [--tokens 4096]

W1: T=4096, d=512, 8 experts h=1408, top-2            (Mixtral-shaped)   dense twin h = 2*1408
W2: T=4096, d=512, 64 experts h=352, top-8, 1 shared  (Qwen2-MoE-shaped) dense twin h = 8*352 + 352
Every number is a ratio to the dense SwiGLU timed in the same process (lower is better). The HF blocks
are timed with each available experts implementation ("eager", "batched_mm", "grouped_mm"); the best
is reported. Routing is dropless for all. "saved MB": activations autograd keeps for the backward pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from moekit.config import LossConfig, MoEConfig, RouterConfig
from moekit.layers.experts import MLP
from moekit.layers.moe import MoELayer

# label -> (MoEConfig.dispatcher, MoEConfig.experts)
MOEKIT_CASES = {"auto": ("local", "auto"), "blockwise": ("local", "blockwise"), "grouped": ("local", "grouped_mm"),
                "loop": ("local", "loop"), "padded": ("padded", "auto")}


def fwd_and_fwdbwd(module: nn.Module, x: torch.Tensor, out=lambda o: o) -> dict[str, callable]:
    """The two closures timed for a module: forward only (no grad) and forward + backward."""
    dy = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            module(x)

    def fwdbwd():
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


def interleaved_medians(cases: dict[str, dict[str, callable]], reps: int) -> dict[str, dict[str, float]]:
    """Median seconds per closure, timing all cases round-robin so machine-load drift hits them alike."""
    times = {name: {k: [] for k in fns} for name, fns in cases.items()}
    for name, fns in cases.items():  # warm-up (first-call allocations, thread pools)
        for fn in fns.values():
            fn()
    for _ in range(reps):
        for name, fns in cases.items():
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name][k].append(time.perf_counter() - t0)
    return {name: {k: statistics.median(v) for k, v in ts.items()} for name, ts in times.items()}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workloads = {
        "W1": dict(d=512, E=8, h=1408, k=2, shared=0),
        "W2": dict(d=512, E=64, h=352, k=8, shared=1),
    }
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, T={args.tokens}, reps={args.reps}")
    print("time ratio to dense SwiGLU with equal active FLOPs (lower is better)")
    print(f"{'workload':8} {'implementation':28} {'fwd':>7} {'fwd+bwd':>8} {'saved MB':>9}")
    for name, w in workloads.items():
        x = torch.randn(args.tokens, w["d"])
        dense = MLP(w["d"], w["k"] * w["h"] + w["shared"] * w["h"])
        cases = {"dense SwiGLU (baseline)": fwd_and_fwdbwd(dense, x)}
        saved_mb = {"dense SwiGLU (baseline)": saved_for_backward_mb(dense, x)}
        for disp, (dispatcher, experts) in MOEKIT_CASES.items():
            cfg = MoEConfig(d_model=w["d"], num_experts=w["E"], expert_hidden=w["h"], num_shared_experts=w["shared"],
                            shared_gate=bool(w["shared"]), dispatcher=dispatcher, experts=experts,
                            router=RouterConfig(top_k=w["k"]), loss=LossConfig(aux_coef=0.01))
            layer = MoELayer(cfg)
            cases["moekit " + disp] = fwd_and_fwdbwd(layer, x, out=lambda o: o.y)
            saved_mb["moekit " + disp] = saved_for_backward_mb(layer, x, out=lambda o: o.y)
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
                print(f"{name:8} {'HF ' + impl:28} unavailable: {why}")
                continue
            cases["HF " + impl] = fwd_and_fwdbwd(block, x[None], out=hf_output)
            saved_mb["HF " + impl] = saved_for_backward_mb(block, x[None], out=hf_output)
            hf_names.append("HF " + impl)
        med = interleaved_medians(cases, args.reps)
        base = med["dense SwiGLU (baseline)"]
        for case, m in med.items():
            extra = f"   [{m['fwd'] * 1e3:.0f} ms / {m['fwd+bwd'] * 1e3:.0f} ms]" if case.startswith("dense") else ""
            print(f"{name:8} {case:28} {m['fwd'] / base['fwd']:7.2f} {m['fwd+bwd'] / base['fwd+bwd']:8.2f} "
                  f"{saved_mb[case]:9.0f}{extra}")
        if hf_names:
            best = min(hf_names, key=lambda n: med[n]["fwd+bwd"])
            print(f"{name:8} {'HF best (' + best[3:] + ')':28} {med[best]['fwd'] / base['fwd']:7.2f} "
                  f"{med[best]['fwd+bwd'] / base['fwd+bwd']:8.2f} {saved_mb[best]:9.0f}")
        # achieved GFLOP/s on the active FFN FLOPs (3 matmuls forward, 6 backward: 18*T*D*H) next to one plain
        # T x D x H matmul timed here, the ceiling a layer made of matmuls can approach
        H = w["k"] * w["h"] + w["shared"] * w["h"]
        a, b = torch.randn(args.tokens, w["d"]), torch.randn(w["d"], H)
        mm_s = interleaved_medians({"mm": {"mm": lambda: a @ b}}, args.reps)["mm"]["mm"]
        flops = 18 * args.tokens * w["d"] * H
        print(f"{name:8} GFLOP/s fwd+bwd on active FLOPs: dense {flops / base['fwd+bwd'] / 1e9:.0f}, moekit auto "
              f"{flops / med['moekit auto']['fwd+bwd'] / 1e9:.0f}; one {args.tokens}x{w['d']}x{H} matmul "
              f"{2 * args.tokens * w['d'] * H / mm_s / 1e9:.0f}")
        print(flush=True)

if __name__ == "__main__":
    main()
