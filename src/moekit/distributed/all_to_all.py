"""Differentiable all-to-all with uneven splits, blocking or asynchronous.

Rank r sends rows ``x[sum(in_splits[:j]) : sum(in_splits[:j+1])]`` to rank j and receives
``out_splits[j]`` rows from rank j. The backward of an all-to-all is the reverse all-to-all (splits
swapped): the gradient of every received row goes back to the rank that sent it.

``all_to_all(..., pending=list)`` starts the exchange with ``async_op=True`` and appends the work handle
to ``pending``; the returned buffer must not be read before ``handle.wait()``. Autograd only touches
the buffer after the forward has finished, so no extra synchronisation is needed for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class CommStats:
    """Payload bytes this rank sent to *other* ranks (rows kept on the rank itself are free), forward
    and backward, and the number of all-to-all calls."""

    bytes_sent: int = 0
    calls: int = 0

    def record(self, rows_sent: int, row_bytes: int) -> None:
        self.bytes_sent += rows_sent * row_bytes
        self.calls += 1


def exchange_counts(send_counts: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Every rank sends ``send_counts[j]`` (a row of per-expert counts, [W, ...]) to rank j;
    returns the rows received, [W, ...]: row j came from rank j. Counts travel before tokens so that
    every rank can size its receive buffer (the uneven split sizes)."""
    send_counts = send_counts.contiguous()  # empty_like keeps a view's strides; the collective writes densely
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    return recv_counts


def _record(stats: CommStats | None, x: Tensor, in_splits: list[int], group) -> None:
    if stats is not None:
        rows_to_others = sum(in_splits) - in_splits[dist.get_rank(group)]
        stats.record(rows_to_others, math.prod(x.shape[1:]) * x.element_size())


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD: Tensor, out_splits: list[int], in_splits: list[int], group, pending, stats):
        ctx.splits, ctx.group, ctx.stats = (out_splits, in_splits), group, stats
        out_RD = x_RD.new_empty(sum(out_splits), *x_RD.shape[1:])
        work = dist.all_to_all_single(out_RD, x_RD.contiguous(), out_splits, in_splits, group=group,
                                      async_op=pending is not None)
        if pending is not None:
            pending.append(work)
        _record(stats, x_RD, in_splits, group)
        return out_RD

    @staticmethod
    def backward(ctx, grad_out_RD: Tensor):
        out_splits, in_splits = ctx.splits
        grad_in_RD = grad_out_RD.new_empty(sum(in_splits), *grad_out_RD.shape[1:])
        dist.all_to_all_single(grad_in_RD, grad_out_RD.contiguous(), in_splits, out_splits, group=ctx.group)
        _record(ctx.stats, grad_out_RD, out_splits, ctx.group)
        return grad_in_RD, None, None, None, None, None


def all_to_all(x_RD: Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup | None = None, pending: list | None = None,
               stats: CommStats | None = None) -> Tensor:
    """Differentiable ``all_to_all_single`` over dim 0 with uneven splits (see module doc)."""
    return _AllToAll.apply(x_RD, list(out_splits), list(in_splits), group, pending, stats)
