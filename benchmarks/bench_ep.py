"""Expert parallelism on local gloo processes: step time and all-to-all bytes for EP=1/2/4, and the
speed-up of the pipelined (FasterMoE-style, chunked async) exchange.

Run:  python benchmarks/bench_ep.py [--tokens 2048] [--reps 10] [--chunks 4]

Workload: one MoE layer, d=128, 8 experts h=256 SwiGLU, top-2 softmax routing, dropless, float32; a fixed
global batch of T tokens split evenly over the W = EP ranks (pure EP, no expert replicas); one intra-op
thread per process; FSDP2 over the ranks for everything, experts split over ``ep`` (parallelize). A step
is forward + backward (FSDP's gradient reduce-scatter included). Times are medians over ``reps``
steps, barrier to barrier (rank 0's clock); EP sizes run one after another, the chunked/unchunked
variants of one EP size round-robin in the same processes. Bytes are the token rows all ranks send to
other ranks per step (dispatch + combine, forward and backward), counted by the dispatcher; the small
count exchange and FSDP's gathers and reduce-scatters are not included. ``expected`` is 4 * T*k*(W-1)/W * d * 4 B
for uniformly spread routing.

On a 2-core CPU with gloo over loopback, W processes share 2 cores: these numbers measure the overhead of
the exchange and of oversubscription (W=4 on 2 cores), not scaling across devices.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from moekit.analysis.timing import barrier_clock, round_robin
from moekit.config import LossConfig, MoEConfig, RouterConfig
from moekit.distributed import AllToAllDispatcher, build_mesh, parallelize
from moekit.distributed.launch import run_local
from moekit.layers.moe import MoELayer

D, E, F, K = 128, 8, 256, 2


def worker(rank: int, world_size: int, tokens: int, reps: int, chunk_options: list[int], out: str) -> None:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=D, num_experts=E, expert_hidden=F, router=RouterConfig(top_k=K),
                               loss=LossConfig(aux_coef=0.01)))
    parallelize(layer, build_mesh(ep=world_size))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens // world_size, D, generator=gen)
    dy = torch.randn(tokens // world_size, D, generator=gen)

    def fwd():
        with torch.no_grad():
            layer(x)

    def step():
        xi = x.detach().requires_grad_(True)
        out = layer(xi)
        ((out.y * dy).sum() + out.aux.loss).backward()
        layer.zero_grad(set_to_none=True)

    expert_parallel = isinstance(layer.dispatcher, AllToAllDispatcher)  # world size 1: the local dispatcher

    def use_chunks(c: int) -> None:
        if expert_parallel:
            layer.dispatcher.num_chunks = c

    def case(c: int, fn):
        return lambda: (use_chunks(c), fn())

    # the shared harness, its clock read barrier to barrier (rank 0's clock); one warm-up round
    timed = round_robin({(c, kind): case(c, fn) for c in chunk_options for kind, fn in (("fwd", fwd), ("step", step))},
                        reps=reps, warmup=1, clock=barrier_clock)

    use_chunks(1)
    sent = 0
    if expert_parallel:
        before = layer.dispatcher.stats.bytes_sent
        step()
        sent = layer.dispatcher.stats.bytes_sent - before
    sent_all = torch.tensor([sent], dtype=torch.float64)
    dist.all_reduce(sent_all)
    if rank == 0:
        med = {c: {k: timed[(c, k)].median for k in ("fwd", "step")} for c in chunk_options}
        Path(out).write_text(json.dumps({"times": med, "bytes": sent_all.item()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="global batch in tokens (split over ranks)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--chunks", type=int, default=4, help="chunks of the pipelined exchange")
    ap.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ep in args.ep:
            out = str(Path(tmp) / f"ep{ep}.json")
            options = [1] if ep == 1 else [1, args.chunks]
            run_local(worker, ep, args.tokens, args.reps, options, out, timeout=600)
            results[ep] = json.loads(Path(out).read_text())

    T = args.tokens
    base = results[args.ep[0]]["times"]["1"]["step"]
    print(f"MoE layer d={D}, {E} experts h={F}, top-{K}, {T} tokens per step split over the ranks, "
          f"float32, 1 thread/process, gloo on {os.cpu_count()} local cores")
    print(f"{'EP':>3} {'tokens/rank':>11} {'fwd ms':>8} {'step ms':>8} {'vs EP=' + str(args.ep[0]):>8} "
          f"{'a2a MB/step':>12} {'expected':>9}")
    for ep, r in results.items():
        t = r["times"]["1"]
        expected = 4 * T * K * (ep - 1) / ep * D * 4
        print(f"{ep:>3} {T // ep:>11} {t['fwd'] * 1e3:>8.1f} {t['step'] * 1e3:>8.1f} "
              f"{t['step'] / base:>8.2f} {r['bytes'] / 1e6:>12.2f} {expected / 1e6:>9.2f}")
    print(f"overlap: exchange pipelined in {args.chunks} chunks vs 1 "
          f"(speed-up = time(1) / time({args.chunks}); forward and backward pipelined)")
    for ep, r in results.items():
        if str(args.chunks) in r["times"]:
            t1, tc = r["times"]["1"], r["times"][str(args.chunks)]
            print(f"  EP={ep}: fwd x{t1['fwd'] / tc['fwd']:.2f} ({tc['fwd'] * 1e3:.1f} ms), "
                  f"step x{t1['step'] / tc['step']:.2f} ({tc['step'] * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
