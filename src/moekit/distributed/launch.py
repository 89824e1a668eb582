"""Run a function on W local processes joined by a gloo (CPU) process group: tests, benchmarks and quick
experiments without torchrun. Bounded in time: a worker failure or a hang ends all workers."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    # collectives raise instead of hanging forever if a peer dies
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
        # no rank tears its process group down while a peer may still be talking to it
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable, world_size: int, *args, timeout: float = 120.0, threads: int = 1) -> None:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned processes (fn must be importable by name),
    each with ``threads`` intra-op threads. Re-raises the first worker exception; TimeoutError after
    ``timeout`` seconds (all workers are killed)."""
    ctx = mp.start_processes(_entry, args=(world_size, free_port(), threads, fn, args), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world_size} processes did not finish "
                                   f"in {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
