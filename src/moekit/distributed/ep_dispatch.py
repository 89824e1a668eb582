"""AllToAllDispatcher: expert parallelism is just another dispatcher.

The E experts are sharded over the W ranks of an expert-parallel (EP) group: rank r owns the global
experts [r*L, (r+1)*L), L = E / W. Each rank routes its own tokens, then

  1. sorts its assignments by global expert (so rows for rank j are contiguous: experts are contiguous),
  2. exchanges per-(rank, local expert) counts with one small all-to-all, so every rank knows its uneven
     receive sizes (GShard pads to a fixed capacity instead; we send exactly the routed rows),
  3. sends the token rows with ``all_to_all_single`` and regroups the received rows (ordered by source
     rank, then local expert) into contiguous per-local-expert blocks for the grouped matmul,
  4. after the experts, undoes the regrouping, sends the results back and does the gate-weighted
     ``index_add`` into y_TD exactly like LocalDispatcher.

Capacity filtering happens before dispatch on each rank's own tokens, so EP keeps the per-rank
("local group", GShard) capacity semantics: an EP layer equals the single-process layer applied to each
rank's tokens separately.

Comm/compute overlap (FasterMoE, He et al. 2022, "smart scheduling"): with ``num_chunks`` > 1,
``pipeline`` splits the tokens into contiguous chunks and starts the asynchronous exchange of chunk c+1
before computing the experts on chunk c; the results travel back asynchronously too. Backward runs the
reverse exchanges synchronously (no overlap there).

Legend: T tokens, D model dim, E global experts, L local experts, W EP ranks, C chunks, R routed rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.distributed.all_to_all import CommStats, all_to_all, exchange_counts
from moekit.layers.dispatch import DispatchMeta, LocalDispatcher
from moekit.layers.routing import Routing


@dataclass
class EPChunk:
    send_splits: list[int]  # rows this rank sends to each EP rank
    recv_splits: list[int]  # rows it receives from each EP rank
    order_R: Tensor  # received-row index of each local-expert-major row: x_RD = x_recv[order_R]
    counts_L: Tensor  # rows per local expert after the exchange


@dataclass
class EPMeta(DispatchMeta):
    """``token_R`` / ``weight_R`` describe the rows as sent (sorted by chunk, then global expert)."""

    chunks: list[EPChunk] = field(default_factory=list)


class AllToAllDispatcher:
    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None, num_chunks: int = 1):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        if num_experts % self.ep_size != 0:
            raise ValueError(f"num_experts={num_experts} must be divisible by the expert-parallel size "
                             f"{self.ep_size}")
        if not isinstance(num_chunks, int) or num_chunks < 1:
            raise ValueError(f"num_chunks={num_chunks!r}: must be a positive integer")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size
        self.num_chunks = num_chunks
        self.stats = CommStats()

    @property
    def pipelined(self) -> bool:
        """True when MoELayer should call ``pipeline`` (the dispatcher then drives the experts)."""
        return self.num_chunks > 1

    def schedule(self, routing: Routing, num_chunks: int) -> EPMeta:
        """Sort the assignments by (chunk, global expert) and exchange the per-chunk counts once."""
        E, W, L, C = self.num_experts, self.ep_size, self.num_local, num_chunks
        T = routing.num_tokens
        chunk_N = routing.token_N * C // max(T, 1)  # contiguous token ranges of (nearly) equal size
        key_N = chunk_N * E + routing.expert_N
        order_N = torch.argsort(key_N, stable=True)
        counts_CWL = torch.bincount(key_N, minlength=C * E).view(C, W, L)
        recv_WCL = exchange_counts(counts_CWL.transpose(0, 1).reshape(W, C * L), self.group).view(W, C, L)
        send_CW = counts_CWL.sum(-1).tolist()
        recv_CW = recv_WCL.sum(-1).t().tolist()
        local_WL = torch.arange(L, device=key_N.device).repeat(W)
        chunks = []
        for c in range(C):
            recv_WL = recv_WCL[:, c]
            # received rows come ordered by (source rank, local expert); regroup them by local expert
            local_expert_R = torch.repeat_interleave(local_WL, recv_WL.reshape(-1))
            chunks.append(EPChunk(send_CW[c], recv_CW[c], torch.argsort(local_expert_R, stable=True),
                                  recv_WL.sum(0)))
        return EPMeta(num_tokens=T, token_R=routing.token_N[order_N], weight_R=routing.weight_N[order_N],
                      chunks=chunks)

    def send(self, x_sent_RD: Tensor, chunk: EPChunk, pending: list | None = None) -> Tensor:
        return all_to_all(x_sent_RD, chunk.recv_splits, chunk.send_splits, self.group, pending, self.stats)

    def send_back(self, y_RD: Tensor, chunk: EPChunk, pending: list | None = None) -> Tensor:
        y_recv_RD = torch.empty_like(y_RD).index_copy(0, chunk.order_R, y_RD)
        return all_to_all(y_recv_RD, chunk.send_splits, chunk.recv_splits, self.group, pending, self.stats)

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, EPMeta]:
        """-> rows for this rank's L local experts in contiguous blocks, their counts_L, meta."""
        meta = self.schedule(routing, 1)
        chunk = meta.chunks[0]
        x_recv_RD = self.send(x_TD.index_select(0, meta.token_R), chunk)
        return x_recv_RD.index_select(0, chunk.order_R), chunk.counts_L, meta

    def combine(self, y_RD: Tensor, meta: EPMeta) -> Tensor:
        return LocalDispatcher().combine(self.send_back(y_RD, meta.chunks[0]), meta)

    def pipeline(self, x_TD: Tensor, routing: Routing, experts: nn.Module) -> Tensor:
        """dispatch -> experts -> combine with the exchange of chunk c+1 overlapping expert compute on c."""
        meta = self.schedule(routing, self.num_chunks)
        x_sent = x_TD.index_select(0, meta.token_R).split([sum(ch.send_splits) for ch in meta.chunks])
        arrivals: list[list] = [[] for _ in meta.chunks]
        returns: list = []
        x_recv = [self.send(x_sent[0], meta.chunks[0], arrivals[0])]
        y_back = []
        for c, chunk in enumerate(meta.chunks):
            if c + 1 < len(meta.chunks):
                x_recv.append(self.send(x_sent[c + 1], meta.chunks[c + 1], arrivals[c + 1]))
            for work in arrivals[c]:
                work.wait()
            y_RD = experts(x_recv[c].index_select(0, chunk.order_R), chunk.counts_L)
            y_back.append(self.send_back(y_RD, chunk, returns))
        for work in returns:
            work.wait()
        return LocalDispatcher().combine(torch.cat(y_back), meta)
