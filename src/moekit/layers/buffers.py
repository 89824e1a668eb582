"""Reused large CPU buffers for the blockwise kernel (a caching allocator in the small).

glibc serves allocations above its mmap threshold (at most 32 MB) with fresh pages, so every step's saved
pre-activations, row buffers and weight-gradient stacks (46 MB each at T=4096, 64 experts x 352 hidden) page-
fault on first touch; a dense FFN's smaller tensors come back from the heap instead. Measured on W2 forward +
backward, 2 threads: 660 ms with fresh buffers, 597 ms with glibc told to keep them (mmap_threshold 256 MB).

A buffer is handed out again only once nothing else holds its storage: its storage's use count is back to
the pool's own reference, so a tensor still saved for backward, or a gradient still held in ``.grad``, is
never reused. CUDA has its own caching allocator, and traced code allocates as usual: both bypass the pool.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

MIN_BYTES = 1 << 20  # smaller tensors come back from the heap anyway
MAX_FREE = 16  # free buffers kept per (device, dtype); more are dropped, smallest first

_lock = threading.Lock()
_pool: dict[tuple, list[Tensor]] = {}
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _free(buf: Tensor) -> bool:
    # the pool's tensor and the temporary storage object below are the only references when it is free
    return _use_count(buf.untyped_storage()._cdata) <= 2


def empty(like: Tensor, *shape: int) -> Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, reusing a free pooled buffer."""
    n = math.prod(shape)
    if (_use_count is None or like.device.type != "cpu" or n * like.element_size() < MIN_BYTES
            or torch.compiler.is_compiling()):
        return like.new_empty(shape)
    key = (like.device, like.dtype)
    with _lock:
        bufs = _pool.setdefault(key, [])
        # best fit, at most 25% larger: a big buffer is not tied up (and counted as saved memory) by a small request
        fits = [b for b in bufs if n <= b.numel() <= n + n // 4 and _free(b)]
        if fits:
            buf = min(fits, key=Tensor.numel)
        else:
            free = sorted((b for b in bufs if _free(b)), key=Tensor.numel)
            drop = {id(b) for b in free[:max(0, len(free) + 1 - MAX_FREE)]}
            bufs[:] = [b for b in bufs if id(b) not in drop]  # by identity: list.remove compares tensors by value
            buf = like.new_empty(n)
            bufs.append(buf)
        return buf[:n].view(shape)


def empty_like(t: Tensor) -> Tensor:
    return empty(t, *t.shape)


def zeros(like: Tensor, *shape: int) -> Tensor:
    return empty(like, *shape).zero_()


def release() -> None:
    """Drop the pool's references (buffers still in use stay alive with their users)."""
    with _lock:
        _pool.clear()
