"""HF MoE models vs the same models patched with moekit (``moekit.patch``): forward and forward+backward
time, as ratios to the unpatched HF model with its fastest experts implementation, all timed round-robin in
the same run (``moekit.analysis.timing``: warm-up, median ±half the range over rounds).

Run:  python benchmarks/bench_patch.py [--reps 5]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

import moekit
from moekit.analysis.timing import best, ratio, round_robin

SHAPES = {
    "mixtral": dict(hidden_size=512, intermediate_size=1408, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(hidden_size=512, intermediate_size=352, num_experts=64, num_experts_per_tok=8),
    "qwen2_moe": dict(hidden_size=512, moe_intermediate_size=352, shared_expert_intermediate_size=352,
                      intermediate_size=1408, num_experts=64, num_experts_per_tok=8),
}


def closures(model, ids) -> dict:
    def fwd():
        with torch.no_grad():
            model(ids)

    def fwdbwd():
        model(ids).logits.float().mean().backward()
        model.zero_grad(set_to_none=True)

    return {"fwd": fwd, "fwd+bwd": fwdbwd}


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, args.tokens))
    print(f"{args.layers} layers, {args.tokens} tokens, torch threads {torch.get_num_threads()}")
    print("| model | HF experts impl | HF fwd | patched fwd / HF | HF fwd+bwd | patched fwd+bwd / HF |")
    print("|---|---|---|---|---|---|")
    for mt, shape in SHAPES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = transformers.AutoConfig.for_model(mt, num_hidden_layers=args.layers, num_attention_heads=8,
                                                    num_key_value_heads=8, vocab_size=1000,
                                                    max_position_embeddings=args.tokens, **shape)
        models = {}
        for impl in ("eager", "grouped_mm"):
            c = copy.deepcopy(cfg)  # each model keeps its config: one object per implementation
            c._experts_implementation = impl
            models["HF " + impl] = transformers.AutoModelForCausalLM.from_config(c)
        models["patched"] = moekit.patch(copy.deepcopy(models["HF eager"]))
        cases = {n: closures(m, ids) for n, m in models.items()}
        times = {k: round_robin({n: c[k] for n, c in cases.items()}, reps=args.reps, warmup=args.warmup)
                 for k in ("fwd", "fwd+bwd")}
        hf = best(times["fwd+bwd"], ["HF eager", "HF grouped_mm"])
        print(f"| {mt} | {hf[3:]} | {times['fwd'][hf].ms()} | {ratio(times['fwd'], 'patched', hf).x()} | "
              f"{times['fwd+bwd'][hf].ms()} | {ratio(times['fwd+bwd'], 'patched', hf).x()} |", flush=True)


if __name__ == "__main__":
    main()
