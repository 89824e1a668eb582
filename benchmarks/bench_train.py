"""Training throughput: moekit MoE LM vs its dense twin vs HF transformers' Mixtral of the same shape.

Run:  python benchmarks/bench_train.py [--steps 6] [--d 256]

Each model does the same AdamW training step (forward, LM loss (+ router aux loss), backward, step) on
the same random batch; tokens/s are medians over interleaved steps, printed as ratios to the dense twin.
HF Mixtral is timed with its eager and grouped_mm experts implementations; the best is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit.config import LossConfig, ModelConfig, MoEConfig, RouterConfig
from moekit.models.decoder import MoETransformer, lm_loss


def moekit_step(model, opt, x, y):
    out = model(x)
    (lm_loss(out.logits, y) + out.aux_loss).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def hf_step(model, opt, x, y):
    out = model(input_ids=x, labels=None, output_router_logits=True)
    loss = lm_loss(out.logits, y) + 0.01 * out.aux_loss if out.aux_loss is not None else lm_loss(out.logits, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    V, d, h = 4096, args.d, 2 * args.d
    cfg = ModelConfig(vocab_size=V, d_model=d, n_layers=args.layers, n_heads=d // 64, n_kv_heads=max(1, d // 128),
                      max_seq_len=args.seq,
                      moe=MoEConfig(d_model=d, num_experts=8, expert_hidden=h, router=RouterConfig(top_k=2),
                                    loss=LossConfig(aux_coef=0.01)))
    x = torch.randint(0, V, (args.batch, args.seq))
    y = torch.randint(0, V, (args.batch, args.seq))
    cases = {}
    for name, c in (("moekit MoE", cfg), ("moekit dense twin", cfg.dense_twin())):
        m = MoETransformer(c)
        cases[name] = (moekit_step, m, torch.optim.AdamW(m.parameters(), lr=1e-4))
    try:
        import transformers

        # HF's "batched_mm" gathers a copy of the expert weights per routed token (T*k*3*d*h floats: ~6 GB
        # per layer here, more in backward), so it is left out; it is meant for tiny decode batches.
        for impl in ("eager", "grouped_mm"):
            hcfg = transformers.MixtralConfig(vocab_size=V, hidden_size=d, intermediate_size=h,
                                              num_hidden_layers=args.layers, num_attention_heads=d // 64,
                                              num_key_value_heads=max(1, d // 128), num_local_experts=8,
                                              num_experts_per_tok=2, max_position_embeddings=args.seq,
                                              router_aux_loss_coef=0.01)
            hcfg._experts_implementation = impl
            hcfg._attn_implementation = "sdpa"
            hm = transformers.MixtralForCausalLM(hcfg)
            try:
                hf_step(hm, torch.optim.AdamW(hm.parameters(), lr=1e-4), x[:1, :16], y[:1, :16])
            except Exception as e:
                print(f"HF Mixtral {impl}: unavailable ({type(e).__name__})")
                continue
            cases[f"HF Mixtral ({impl})"] = (hf_step, hm, torch.optim.AdamW(hm.parameters(), lr=1e-4))
    except ImportError:
        print("transformers not installed: HF rows skipped")

    times = {k: [] for k in cases}
    for step, model, opt in cases.values():  # warm-up
        step(model, opt, x, y)
    for _ in range(args.steps):
        for name, (step, model, opt) in cases.items():
            t0 = time.perf_counter()
            step(model, opt, x, y)
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    base = tps["moekit dense twin"]
    moe = cases["moekit MoE"][1]
    print(f"\nd={d}, {args.layers} layers, 8 experts x hidden {h}, top-2 (dense twin hidden {2 * h}); "
          f"batch {args.batch} x {args.seq} tokens; {moe.num_params() / 1e6:.1f}M params, "
          f"{moe.num_active_params() / 1e6:.1f}M active; torch threads {torch.get_num_threads()}")
    print("| model | tokens/s | ratio to dense twin |\n|---|---|---|")
    for k, v in tps.items():
        print(f"| {k} | {v:,.0f} | {v / base:.2f}x |")
    hf = [v for k, v in tps.items() if k.startswith("HF")]
    if hf:
        print(f"\nmoekit MoE vs best HF Mixtral: {tps['moekit MoE'] / max(hf):.2f}x")


if __name__ == "__main__":
    main()
