"""HF MoE models vs the same models patched with moekit (``moekit.patch``): forward and forward+backward
time, as ratios to the unpatched HF model in the same run. HF runs with its fastest experts implementation.

Run:  python benchmarks/bench_patch.py [--reps 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import moekit

SHAPES = {
    "mixtral": dict(hidden_size=512, intermediate_size=1408, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(hidden_size=512, intermediate_size=352, num_experts=64, num_experts_per_tok=8),
    "qwen2_moe": dict(hidden_size=512, moe_intermediate_size=352, shared_expert_intermediate_size=352,
                      intermediate_size=1408, num_experts=64, num_experts_per_tok=8),
}


def timed(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, args.tokens))
    print(f"{args.layers} layers, {args.tokens} tokens, torch threads {torch.get_num_threads()}")
    print("| model | HF experts impl | HF fwd ms | patched fwd | HF fwd+bwd ms | patched fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for mt, shape in SHAPES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = transformers.AutoConfig.for_model(mt, num_hidden_layers=args.layers, num_attention_heads=8,
                                                    num_key_value_heads=8, vocab_size=1000,
                                                    max_position_embeddings=args.tokens, **shape)
        best = None
        for impl in ("eager", "grouped_mm"):
            cfg._experts_implementation = impl
            hf = transformers.AutoModelForCausalLM.from_config(cfg)
            with torch.no_grad():
                f = timed(lambda: hf(ids), args.reps)
            fb = timed(lambda: hf(ids).logits.float().mean().backward(), args.reps)
            if best is None or fb < best[2]:
                best = (impl, f, fb, hf)
        impl, f, fb, hf = best
        patched = moekit.patch(copy.deepcopy(hf))
        with torch.no_grad():
            pf = timed(lambda: patched(ids), args.reps)
        pfb = timed(lambda: patched(ids).logits.float().mean().backward(), args.reps)
        print(f"| {mt} | {impl} | {f * 1e3:.0f} | {pf / f:.2f}x | {fb * 1e3:.0f} | {pfb / fb:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
