"""Training throughput: moekit MoE LM vs its dense twin vs HF transformers' Mixtral of the same shape.

Run:  python benchmarks/bench_train.py [--steps 6] [--d 256] [--no-compile] [--no-distributed]

Each model does the same AdamW training step (forward, LM loss (+ router aux loss), backward, step) on
the same random batch, timed round-robin by ``moekit.analysis.timing`` (one step of every case per round);
tokens/s are medians, ratios are medians of per-round ratios.
HF Mixtral is timed with its eager and grouped_mm experts implementations; the best is reported.
The MoE model also runs compiled (``apply_compile``: each block), interleaved with the others, and under
FSDP2 + EP=2 on 2 local gloo processes (each half the batch, half the threads; timed after the
in-process cases, in the same run): both printed as ratios to the eager single-process MoE.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path

import torch

from moekit.analysis.timing import barrier_clock, best, ratio, round_robin
from moekit.config import LossConfig, ModelConfig, MoEConfig, RouterConfig
from moekit.distributed import build_mesh, parallelize
from moekit.distributed.launch import run_local
from moekit.distributed.parallelize import apply_compile
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


def fsdp_ep_worker(rank: int, world_size: int, cfg: ModelConfig, x, y, steps: int, out: str) -> None:
    """The MoE step under FSDP2 + EP over all ranks; each rank trains on its 1/W of the batch."""
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    plan = parallelize(model, build_mesh(ep=world_size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    xb, yb = plan.local_batch(x), plan.local_batch(y)
    times = round_robin({"step": lambda: moekit_step(model, opt, xb, yb)}, reps=steps, warmup=1, clock=barrier_clock)
    if rank == 0:
        Path(out).write_text(json.dumps(times["step"].median))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled MoE")
    ap.add_argument("--no-distributed", action="store_true", help="skip FSDP2 + EP=2 on 2 processes")
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
    if not args.no_compile:
        torch.manual_seed(0)
        m = MoETransformer(cfg)
        apply_compile(m)
        cases["moekit MoE compiled"] = (moekit_step, m, torch.optim.AdamW(m.parameters(), lr=1e-4))
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

    times = round_robin({name: functools.partial(step, model, opt, x, y) for name, (step, model, opt) in cases.items()},
                        reps=args.steps, warmup=1)
    tokens = args.batch * args.seq
    tps = {k: tokens / t.median for k, t in times.items()}
    moe = cases["moekit MoE"][1]
    print(f"\nd={d}, {args.layers} layers, 8 experts x hidden {h}, top-2 (dense twin hidden {2 * h}); "
          f"batch {args.batch} x {args.seq} tokens; {moe.num_params() / 1e6:.1f}M params, "
          f"{moe.num_active_params() / 1e6:.1f}M active; torch threads {torch.get_num_threads()}")
    print("| model | tokens/s | ratio to dense twin |\n|---|---|---|")
    for k, v in tps.items():  # tokens/s ratio = inverse per-round time ratio
        print(f"| {k} | {v:,.0f} ±{times[k].spread / 2:.0%} | {1 / ratio(times, k, 'moekit dense twin').median:.2f}x |")
    hf = [k for k in tps if k.startswith("HF")]
    if hf:
        hf_best = best(times, hf)
        print(f"\nmoekit MoE vs best HF Mixtral ({hf_best}): {ratio(times, hf_best, 'moekit MoE').x()} tokens/s")
    if "moekit MoE compiled" in tps:
        print(f"compiled / eager MoE tokens/s: {ratio(times, 'moekit MoE', 'moekit MoE compiled').x()}")
    if not args.no_distributed:
        threads = torch.get_num_threads()
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "fsdp_ep.json")
            run_local(fsdp_ep_worker, 2, cfg, x, y, args.steps, out, timeout=1800, threads=max(1, threads // 2))
            step_s = json.loads(Path(out).read_text())
        print(f"FSDP2 + EP=2 on 2 gloo processes ({max(1, threads // 2)} threads each): {tokens / step_s:,.0f} "
              f"tokens/s = {tokens / step_s / tps['moekit MoE']:.2f}x one process ({threads} threads)")


if __name__ == "__main__":
    main()
