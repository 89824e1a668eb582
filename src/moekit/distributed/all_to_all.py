"""All-to-all with uneven splits: ``all_to_all`` (the functional collective with autograd) and ``exchange``
(outside autograd, blocking or asynchronous; the pipelined dispatcher builds its own backward from it).

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
from torch.distributed._functional_collectives import all_to_all_single_autograd


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


def all_to_all(x_RD: Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup | None = None, stats: CommStats | None = None) -> Tensor:
    """Differentiable ``all_to_all_single`` over dim 0 with uneven splits: the functional collective with
    autograd (its backward is the reverse exchange; traceable by torch.compile). ``stats`` counts the
    bytes of both directions (the backward's when the gradient arrives)."""
    x_RD = x_RD.contiguous()
    group = group if group is not None else dist.group.WORLD
    y_RD = all_to_all_single_autograd(x_RD, list(out_splits), list(in_splits), group)
    if stats is not None:
        row_bytes = math.prod(x_RD.shape[1:]) * x_RD.element_size()
        rank = dist.get_rank(group)
        stats.record(sum(in_splits) - in_splits[rank], row_bytes)
        if y_RD.requires_grad:
            y_RD.register_hook(lambda g: stats.record(sum(out_splits) - out_splits[rank], row_bytes))
    return y_RD
