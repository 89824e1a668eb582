"""All-to-all with uneven splits: ``all_to_all`` (differentiable, blocking) and ``exchange`` (outside
autograd, blocking or asynchronous; the pipelined dispatcher builds its own backward from it).

Rank r sends rows ``x[sum(in_splits[:j]) : sum(in_splits[:j+1])]`` to rank j and receives
``out_splits[j]`` rows from rank j. The backward of an all-to-all is the reverse all-to-all (splits
swapped): the gradient of every received row goes back to the rank that sent it.

``exchange(..., pending=list)`` starts the exchange with ``async_op=True`` and appends a ``Pending``
handle to ``pending``; the returned buffer must not be read before ``handle.wait()``.
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


@dataclass
class Pending:
    """An asynchronous exchange in flight; holds its buffers so that none is freed before it completes."""

    work: object
    buffers: tuple

    def wait(self) -> None:
        self.work.wait()
        self.buffers = ()


def exchange_counts(send_counts: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Every rank sends ``send_counts[j]`` (a row of per-expert counts, [W, ...]) to rank j;
    returns the rows received, [W, ...]: row j came from rank j. Counts travel before tokens so that
    every rank can size its receive buffer (the uneven split sizes)."""
    send_counts = send_counts.contiguous()  # empty_like keeps a view's strides; the collective writes densely
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    return recv_counts


def exchange(x_RD: Tensor, out_splits: list[int], in_splits: list[int],
             group: dist.ProcessGroup | None = None, pending: list | None = None,
             stats: CommStats | None = None) -> Tensor:
    """``all_to_all_single`` over dim 0 with uneven splits, outside autograd; asynchronous when ``pending``
    is a list (a ``Pending`` is appended; the result must not be read before its ``wait()``)."""
    out_RD = x_RD.new_empty(sum(out_splits), *x_RD.shape[1:])
    x_RD = x_RD.contiguous()
    work = dist.all_to_all_single(out_RD, x_RD, list(out_splits), list(in_splits), group=group,
                                  async_op=pending is not None)
    if pending is not None:
        pending.append(Pending(work, (x_RD, out_RD)))
    if stats is not None:
        rows_to_others = sum(in_splits) - in_splits[dist.get_rank(group)]
        stats.record(rows_to_others, math.prod(x_RD.shape[1:]) * x_RD.element_size())
    return out_RD


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD: Tensor, out_splits: list[int], in_splits: list[int], group, stats):
        ctx.splits, ctx.group, ctx.stats = (out_splits, in_splits), group, stats
        return exchange(x_RD, out_splits, in_splits, group, stats=stats)

    @staticmethod
    def backward(ctx, grad_out_RD: Tensor):
        out_splits, in_splits = ctx.splits
        grad_in_RD = exchange(grad_out_RD, in_splits, out_splits, ctx.group, stats=ctx.stats)
        return grad_in_RD, None, None, None, None


def all_to_all(x_RD: Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup | None = None, stats: CommStats | None = None) -> Tensor:
    """Differentiable blocking ``all_to_all_single`` over dim 0 with uneven splits; its backward is the
    reverse exchange."""
    return _AllToAll.apply(x_RD, list(out_splits), list(in_splits), group, stats)
