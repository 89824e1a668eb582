"""AllToAllDispatcher: expert parallelism is just another dispatcher (the protocol of layers/dispatch.py).

The E experts are sharded over the W ranks of an expert-parallel (EP) group: rank r owns the global
experts [r*L, (r+1)*L), L = E / W. Each rank routes its own tokens, then

  1. sorts its assignments by global expert (so rows for rank j are contiguous: experts are contiguous),
  2. exchanges per-(rank, local expert) counts with one small all-to-all, so every rank knows its uneven
     receive sizes (GShard pads to a fixed capacity instead; we send exactly the routed rows),
  3. sends the token rows with ``all_to_all_single`` and regroups the received rows (ordered by source
     rank, then local expert) into contiguous per-local-expert blocks for the grouped matmul,
  4. after the experts, undoes the regrouping, sends the results back and does the gate-weighted
     ``index_add`` into y_TD exactly like LocalDispatcher.

Gradient scale: the experts' weight gradient on the owner sums the tokens of all W ranks of the group;
data parallelism wants the mean over ranks, so the gradient reaching the experts' output is divided by W
and the one leaving their input multiplied back (``scale_grad``): only the expert weights see 1/W.

Capacity filtering happens before dispatch on each rank's own tokens, so EP keeps the per-rank
("local group", GShard) capacity semantics: an EP layer equals the single-process layer applied to each
rank's tokens separately.

Comm/compute overlap (FasterMoE, He et al. 2022, "smart scheduling"): with ``num_chunks`` > 1,
``run`` drives the experts itself (the protocol's override point): it splits the tokens into contiguous
chunks and starts the asynchronous exchange of chunk c+1 before computing the experts on chunk c; the
results travel back asynchronously too. Backward is
pipelined the same way: the gradients of chunk c+1 travel while the experts' backward runs on chunk c.

Legend: T tokens, D model dim, E global experts, L local experts, W EP ranks, C chunks, R routed rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.distributed.all_to_all import CommStats, all_to_all, exchange, exchange_counts
from moekit.layers.dispatch import Dispatcher, scatter_rows
from moekit.layers.routing import Routing


@dataclass
class EPChunk:
    send_splits: list[int]  # rows this rank sends to each EP rank
    recv_splits: list[int]  # rows it receives from each EP rank
    order_R: Tensor  # received-row index of each local-expert-major row: x_RD = x_recv[order_R]
    counts_L: Tensor  # rows per local expert after the exchange


@dataclass
class EPMeta:
    """The dispatch handle: ``token_R`` / ``weight_R`` describe the rows as sent (sorted by chunk, then
    global expert)."""

    num_tokens: int
    token_R: Tensor
    weight_R: Tensor
    chunks: list[EPChunk]


class AllToAllDispatcher(Dispatcher):
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

    def schedule(self, routing: Routing, num_chunks: int) -> EPMeta:
        """Sort the assignments by (chunk, global expert) and exchange the per-chunk counts once."""
        E, W, L, C = self.num_experts, self.ep_size, self.num_local, num_chunks
        T = routing.num_tokens
        chunk_N = routing.token_N * C // max(T, 1)  # contiguous token ranges of (nearly) equal size
        key_N = chunk_N * E + routing.expert_N
        order_N = torch.argsort(key_N, stable=True)
        counts_CWL = torch.bincount(key_N, minlength=C * E).view(C, W, L)
        recv_WCL = exchange_counts(counts_CWL.transpose(0, 1).reshape(W, C * L), self.group).view(W, C, L)
        # NOTE: host sync because all_to_all_single takes its split sizes as Python ints (after the counts
        # exchange, every rank knows how many rows it sends and receives)
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
        return EPMeta(T, routing.token_N[order_N], routing.weight_N[order_N], chunks)

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, EPMeta]:
        """-> rows for this rank's L local experts in contiguous blocks, their counts_L, meta."""
        meta = self.schedule(routing, 1)
        chunk = meta.chunks[0]
        x_recv_RD = all_to_all(x_TD.index_select(0, meta.token_R), chunk.recv_splits, chunk.send_splits,
                               self.group, self.stats)
        return scale_grad(x_recv_RD.index_select(0, chunk.order_R), float(self.ep_size)), chunk.counts_L, meta

    def combine(self, y_RD: Tensor, meta: EPMeta) -> Tensor:
        chunk = meta.chunks[0]
        y_RD = scale_grad(y_RD, 1.0 / self.ep_size)
        y_recv_RD = torch.empty_like(y_RD).index_copy(0, chunk.order_R, y_RD)
        y_sent_RD = all_to_all(y_recv_RD, chunk.send_splits, chunk.recv_splits, self.group, self.stats)
        return scatter_rows(y_sent_RD, meta.token_R, meta.num_tokens, meta.weight_R)

    def run(self, x_TD: Tensor, routing: Routing, experts: nn.Module) -> Tensor:
        """One chunk: the protocol's composition dispatch -> experts -> combine. More: chunked, so that the
        exchanges overlap expert compute (forward and backward)."""
        if self.num_chunks == 1:
            return super().run(x_TD, routing, experts)
        meta = self.schedule(routing, self.num_chunks)
        x_sent_RD = x_TD.index_select(0, meta.token_R)
        params = [p for p in experts.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (x_sent_RD.requires_grad or params):
            y_sent_RD = _PipelinedExperts.apply(self, experts, meta, x_sent_RD, *params)
        else:
            y_sent_RD = torch.cat(self.run_chunks(x_sent_RD, meta, lambda c, x: experts_on_chunk(
                experts, meta.chunks[c], x)))
        return scatter_rows(y_sent_RD, meta.token_R, meta.num_tokens, meta.weight_R)

    def run_chunks(self, x_sent_RD: Tensor, meta: EPMeta, compute) -> list[Tensor]:
        """For every chunk c: send its rows to their owners, ``compute(c, received rows)``, send the result
        back. The exchange of chunk c+1 is in flight while chunk c computes; results travel back
        asynchronously. Returns the returned rows per chunk (aligned with the rows sent)."""
        chunks = meta.chunks
        x_sent = x_sent_RD.split([sum(ch.send_splits) for ch in chunks])
        arrivals: list[list] = [[] for _ in chunks]
        returns: list = []

        def start(c: int) -> Tensor:
            return exchange(x_sent[c], chunks[c].recv_splits, chunks[c].send_splits, self.group, arrivals[c],
                            self.stats)

        received = [start(0)]
        back = []
        for c, chunk in enumerate(chunks):
            if c + 1 < len(chunks):
                received.append(start(c + 1))
            for work in arrivals[c]:
                work.wait()
            back.append(exchange(compute(c, received[c]), chunk.send_splits, chunk.recv_splits, self.group,
                                 returns, self.stats))
        for work in returns:
            work.wait()
        return back


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity forward; multiplies the gradient by ``factor`` in backward."""
    return _ScaleGrad.apply(x, factor) if factor != 1.0 else x


def experts_on_chunk(experts: nn.Module, chunk: EPChunk, x_recv_RD: Tensor) -> Tensor:
    """Local experts on the rows received for one chunk (regrouped by local expert and back)."""
    y_RD = experts(x_recv_RD.index_select(0, chunk.order_R), chunk.counts_L)
    return torch.empty_like(y_RD).index_copy(0, chunk.order_R, y_RD)


class _PipelinedExperts(torch.autograd.Function):
    """The chunked exchange + expert compute as one autograd node, so that backward is pipelined too:
    the gradients of chunk c+1 travel to the expert owners while the experts' backward runs on chunk c.
    Each chunk's expert compute is a small graph recorded in forward and back-propagated from inside this
    node's backward (re-entrant, like reentrant activation checkpointing); expert parameter gradients
    accumulate there, so the parameters are inputs only to keep this node in the graph."""

    @staticmethod
    def forward(ctx, dispatcher: AllToAllDispatcher, experts: nn.Module, meta: EPMeta, x_sent_RD: Tensor,
                *params):
        ctx.dispatcher, ctx.meta, ctx.graphs = dispatcher, meta, []

        def compute(c: int, x_recv_RD: Tensor) -> Tensor:
            with torch.enable_grad():
                x_in = x_recv_RD.requires_grad_()
                y = experts_on_chunk(experts, meta.chunks[c], x_in)
            ctx.graphs.append((x_in, y))
            return y.detach()

        return torch.cat(dispatcher.run_chunks(x_sent_RD, meta, compute))

    @staticmethod
    def backward(ctx, grad_y_sent_RD: Tensor):
        def compute(c: int, grad_y_RD: Tensor) -> Tensor:
            x_in, y = ctx.graphs[c]
            W = ctx.dispatcher.ep_size  # the weight-gradient mean over ranks, as scale_grad does unpipelined
            torch.autograd.backward(y, grad_y_RD / W)
            return x_in.grad * W if x_in.grad is not None else torch.zeros_like(x_in)

        # gradients flow the same way as the forward rows: to the expert owners and back
        grad_x_sent_RD = torch.cat(ctx.dispatcher.run_chunks(grad_y_sent_RD, ctx.meta, compute))
        ctx.graphs = None
        return (None, None, None, grad_x_sent_RD) + (None,) * (len(ctx.needs_input_grad) - 4)
