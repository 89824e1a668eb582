"""Blockwise experts: gather -> FFN -> gate-scale -> scatter-add, one expert's row block at a time.

The grouped path materialises every routed row at once: the gathered inputs x_RD, the hidden
activations and the outputs y_RD for all R = T*k assignments (at T=4096, top-8, h=352 each hidden tensor
is 46 MB, beyond the L3 cache), so the gather, every elementwise op, the combine and their backward passes
stream from DRAM. Here each expert's block (a few hundred rows) is gathered, pushed through its FFN and
added into y_TD while it is still in cache, and the backward pass walks the blocks again from the saved
pre-activations. This is the CPU counterpart of fused gather-GEMM-scatter kernels (MegaBlocks,
ScatterMoE); the FFN of ffn.py (activation, gating, biases), with the gradients of x, the weight and
bias stacks and the gate weights written out by hand.

Only the hidden pre-activations (gate and up, [R, F] each) are saved, not x_RD or y_RD (saving x_RD to skip
the backward's gather measured no faster). Float32 SwiGLU blocks do their elementwise work in cpu_kernels'
one-pass C loops (``fused_swiglu``); other activations, expert dropout and a down bias use aten ops.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from moekit.layers import buffers, cpu_kernels
from moekit.layers.ffn import Activation, FFNWeights, ffn_out, scale_on_hidden


def linear_into(x: Tensor, w_OI: Tensor, b_O: Tensor | None, out: Tensor | None) -> Tensor:
    """x w^T (+ b), written into ``out`` when given (a view into the saved pre-activations)."""
    if out is None:
        return torch.nn.functional.linear(x, w_OI, b_O)
    if not out.is_contiguous():
        out.copy_(torch.nn.functional.linear(x, w_OI, b_O))
    elif b_O is None:
        torch.mm(x, w_OI.t(), out=out)
    else:
        torch.addmm(b_O, x, w_OI.t(), out=out)
    return out


def mm_into(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """a @ b written into ``out`` (a weight-gradient block; column slices are not contiguous)."""
    if out.is_contiguous():
        return torch.mm(a, b, out=out)
    out.copy_(a @ b)
    return out


def sum_rows_into(g_nO: Tensor, out: Tensor | None) -> None:
    if out is not None:
        torch.sum(g_nO, 0, out=out)


# ---------------------------------------------------------------------------- scheduling the expert blocks
# Serial: blocks one after another, each op parallel over torch's intra-op threads. That collapses when
# another process shares the cores: every small op ends in a barrier that waits for a descheduled thread
# (bench_layer's contention case). Pooled: one single-threaded worker per intra-op thread takes the next
# block from a shared queue, so a descheduled worker delays only its own block and the others take the rest.
# The blocks' outputs are written to disjoint rows and summed afterwards in row order, so both schedules give
# the same sums whichever worker ran which block (bit-identical at a fixed thread count).
BLOCK_SCHEDULES = ("serial", "pooled", "auto")
_schedule = "auto"
_pool: tuple[int, ThreadPoolExecutor] | None = None
_in_worker = threading.local()


def set_block_schedule(schedule: str) -> str:
    """How the CPU blockwise kernel runs its expert blocks: "serial", "pooled" or "auto" (pooled when torch
    has more than one thread, there are at least two blocks per worker and the blocks are not small:
    ``POOL_MIN_BLOCK_MACS``). Returns the previous one."""
    global _schedule
    if schedule not in BLOCK_SCHEDULES:
        raise ValueError(f"schedule must be one of {BLOCK_SCHEDULES}, got {schedule!r}")
    previous, _schedule = _schedule, schedule
    return previous


def block_schedule() -> str:
    """The schedule ``set_block_schedule`` last set ("auto" by default)."""
    return _schedule


def nonempty_blocks(bounds: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert with rows, in expert order."""
    return [(e, r0, r1) for e, (r0, r1) in enumerate(zip(bounds[:-1], bounds[1:])) if r1 > r0]


def _single_thread_worker() -> None:
    # torch sets a thread's intra-op count on its first query, from the process-wide count that every
    # set_num_threads also writes: query first, or that query later overwrites this thread's 1 with the
    # caller's count
    torch.get_num_threads()
    torch.set_num_threads(1)
    _in_worker.active = True


def _start_workers(pool: ThreadPoolExecutor, workers: int, task: Callable[[], object]) -> list:
    """Run ``task`` once on each of the pool's workers (each waits for the others, so none runs it twice)."""
    met = threading.Barrier(workers + 1)

    def one() -> object:
        out = task()
        met.wait()
        return out

    futures = [pool.submit(one) for _ in range(workers)]
    met.wait()
    return [f.result() for f in futures]


def _new_pool(threads: int) -> ThreadPoolExecutor | None:
    """``threads`` started workers, each running torch ops on one intra-op thread; None (with a warning)
    where torch's thread settings are not per thread, as with a build whose intra-op pool is not OpenMP."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="moekit-block", initializer=_single_thread_worker)
    _start_workers(pool, threads, lambda: None)
    torch.set_num_threads(threads)  # the workers' 1 was also written process-wide, for threads started later
    # Measured without the first query above: each worker ran aten ops on 2 OpenMP threads (2 x 2 on 2 cores;
    # a 64 MB exp took a worker 17 ms, the 2-thread time, not 30 ms) and W2 forward+backward was 7% slower.
    counts = _start_workers(pool, threads, torch.get_num_threads)
    if counts != [1] * threads or torch.get_num_threads() != threads:
        warnings.warn(f"moekit's block workers would run {counts} intra-op threads each and the caller "
                      f"{torch.get_num_threads()} (expected 1 and {threads}): expert blocks run serially")
        torch.set_num_threads(threads)
        pool.shutdown(wait=False)
        return None
    return pool


# "auto" runs blocks smaller than this (mean rows x d_model x hidden, multiply-adds per matmul) serially:
# there a worker's single-threaded small ops lose to torch's two threads per op. Measured fwd+bwd pooled /
# serial, same process, 2 threads: 8 experts, d=64 h=128, 4096 tokens (8.4M, the demo) 1.08-1.24 (the demo
# model's training step 1.09, its eval forward 1.09); d=128 h=256, 2048 tokens (16.8M) 1.18-1.20; d=128
# h=256, 4096 tokens (33.5M) 1.06; 16 experts d=256 h=256 (33.5M) 0.93; d=256 h=512 (67M) 0.99; W1 (738M)
# 0.90. Under a busy process the serial small blocks slowed down 1.17-1.24x as much as the dense FFN (pooled
# 0.76-0.91; bench_layer's target 1.5).
POOL_MIN_BLOCK_MACS = 24 << 20


def block_pool(x: Tensor, blocks: list, hidden: int) -> tuple[int, ThreadPoolExecutor] | None:
    """(workers, pool) when the pooled schedule applies to these blocks (of ``hidden`` units), else None."""
    global _pool
    threads = torch.get_num_threads()
    if (_schedule == "serial" or x.device.type != "cpu" or threads < 2 or len(blocks) < 2
            or getattr(_in_worker, "active", False) or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()):
        return None  # worker threads would not inherit autocast; dynamo cannot trace threads
    rows = blocks[-1][2] - blocks[0][1]
    if _schedule == "auto" and (len(blocks) < 2 * threads  # too few to balance: one big block idles a worker
                                or rows * x.shape[-1] * hidden < POOL_MIN_BLOCK_MACS * len(blocks)):
        return None
    if _pool is None or _pool[0] != threads:
        if _pool is not None:
            _pool[1].shutdown(wait=False)
            _pool = None
        pool = _new_pool(threads)
        if pool is None:
            set_block_schedule("serial")
            return None
        _pool = (threads, pool)
    return _pool


def run_blocks(pool: tuple[int, ThreadPoolExecutor] | None, blocks: list[tuple[int, int, int]],
               block: Callable[[int, int, int], None]) -> None:
    """Run ``block(e, r0, r1)`` for every block: in order on this thread, or on the pool's workers, each
    taking the next block from the queue until it is empty."""
    if pool is None:
        for b in blocks:
            block(*b)
        return
    # largest first: a queue of the largest remaining block balances the workers best (longest processing
    # time first); only here, so the serial and compiled paths keep expert order and data-independent code
    queue = iter(sorted(blocks, key=lambda b: b[1] - b[2]))
    lock = threading.Lock()

    def work() -> None:
        with torch.no_grad():  # grad mode is per thread: the workers' ops must not record a graph
            while True:
                with lock:
                    b = next(queue, None)
                if b is None:
                    return
                block(*b)

    workers, executor = pool
    for f in [executor.submit(work) for _ in range(workers)]:
        f.result()


def fused_swiglu(x_TD: Tensor, scale_R: Tensor, act: Activation, keep_RF: Tensor | None, b_down: Tensor | None
                 ) -> bool:
    """Whether the blocks use cpu_kernels' one-pass SwiGLU: plain SwiGLU in float32 on the CPU, no expert
    dropout mask and no down bias (both change where the gate weight applies); else the aten path."""
    return (act.name == "swiglu" and keep_RF is None and b_down is None and cpu_kernels.usable(x_TD, scale_R)
            and cpu_kernels.library() is not None)


class RowsInto:
    """Adds each block's output rows into out_TD at the rows' tokens. Serial: at once, while the block is in
    cache. Pooled: workers write disjoint rows of a buffer, added in row order at ``finish``, so the sum is
    the same whichever worker computed which block."""

    def __init__(self, out_TD: Tensor, token_R: Tensor, pooled: bool):
        self.out_TD, self.token_R = out_TD, token_R
        self.rows_RD = buffers.empty(out_TD, token_R.shape[0], out_TD.shape[1]) if pooled else None

    def slot(self, r0: int, r1: int) -> Tensor | None:
        """Where a block may compute its output rows in place (pooled: its rows of the buffer, saving a copy),
        else None (a matmul's ``out=None`` allocates)."""
        return None if self.rows_RD is None else self.rows_RD[r0:r1]

    def add(self, r0: int, r1: int, rows_nD: Tensor) -> None:
        if self.rows_RD is None:
            self.out_TD.index_add_(0, self.token_R[r0:r1], rows_nD)
        elif rows_nD.data_ptr() != self.rows_RD[r0:r1].data_ptr():  # not already written in its slot
            self.rows_RD[r0:r1] = rows_nD

    def finish(self) -> None:
        if self.rows_RD is not None:
            self.out_TD.index_add_(0, self.token_R, self.rows_RD)


class BlockwiseFFN(torch.autograd.Function):
    """y_TD[t] = sum over rows r with token_R[r] = t of scale_R[r] * expert_e(r)(x_TD[t]).

    Rows are sorted by expert: expert e owns rows bounds[e]:bounds[e+1] and its first hidden_E[e] units.
    ``keep_RF`` (optional) is the expert-dropout mask already divided by the keep probability.
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, scale_R: Tensor, w_gate: Tensor | None, w_up: Tensor, w_down: Tensor,
                b_gate: Tensor | None, b_up: Tensor | None, b_down: Tensor | None, token_R: Tensor,
                keep_RF: Tensor | None, bounds: list[int], hidden_E: list[int], act: Activation) -> Tensor:
        save = any(ctx.needs_input_grad[:8])
        w = FFNWeights(w_gate, w_up, w_down, b_gate, b_up, b_down)
        R, F_ = token_R.shape[0], w_up.shape[1]
        y_TD = buffers.zeros(x_TD, *x_TD.shape)
        # pre-activations are kept for backward; in inference each block uses a temporary instead
        u_RF = buffers.empty(x_TD, R, F_) if save else None
        g_RF = buffers.empty(x_TD, R, F_) if save and act.gated else None
        blocks = nonempty_blocks(bounds)
        pool = block_pool(x_TD, blocks, max(hidden_E))
        y = RowsInto(y_TD, token_R, pooled=pool is not None)
        fused = fused_swiglu(x_TD, scale_R, act, keep_RF, b_down)

        def block(e: int, r0: int, r1: int) -> None:
            f = hidden_E[e]
            w_e = w.expert(e, f)
            tok = token_R[r0:r1]
            x_nD = x_TD.index_select(0, tok)
            u = linear_into(x_nD, w_e.up, w_e.b_up, u_RF[r0:r1, :f] if save else None)
            g = linear_into(x_nD, w_e.gate, w_e.b_gate, g_RF[r0:r1, :f] if save else None) if act.gated else None
            if fused:  # silu(g) * u (* gate weight) in one pass; the scale where ffn_out puts it
                on_hidden = scale_on_hidden(f, w_e)
                hs = cpu_kernels.swiglu_forward(g, u, scale_R[r0:r1] if on_hidden else None,
                                                x_nD.new_empty(r1 - r0, f))
                y_nD = torch.mm(hs, w_e.down.t(), out=y.slot(r0, r1))
                if not on_hidden:
                    y_nD.mul_(scale_R[r0:r1, None])
            else:
                h = act.hidden(g, u, inplace=True)
                if keep_RF is not None:
                    h.mul_(keep_RF[r0:r1, :f])
                y_nD = ffn_out(h, w_e, scale=scale_R[r0:r1], inplace=True)
            y.add(r0, r1, y_nD)

        run_blocks(pool, blocks, block)
        y.finish()
        if save:
            ctx.save_for_backward(x_TD, scale_R, w_gate, w_up, w_down, b_gate, b_up, b_down, token_R, keep_RF,
                                  g_RF, u_RF)
            ctx.bounds, ctx.hidden_E, ctx.act = bounds, hidden_E, act
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD: Tensor):
        x_TD, scale_R, w_gate, w_up, w_down, b_gate, b_up, b_down, token_R, keep_RF, g_RF, u_RF = ctx.saved_tensors
        w = FFNWeights(w_gate, w_up, w_down, b_gate, b_up, b_down)
        act = ctx.act
        need = ctx.needs_input_grad[:8]
        need_x, need_s = need[0], need[1]
        dx_TD = buffers.zeros(x_TD, *x_TD.shape) if need_x else None
        ds_R = torch.zeros_like(scale_R) if need_s else None
        # weight grads: each expert's block is written whole below; only what no block writes is zeroed
        # (empty experts, units beyond a smaller expert's own size), not every stack up front
        dw = FFNWeights(*(buffers.empty_like(t) if n and t is not None else None
                          for n, t in zip(need[2:], (w_gate, w_up, w_down, b_gate, b_up, b_down))))
        need_hidden = need_x or any(t is not None for t in (dw.gate, dw.up, dw.b_gate, dw.b_up))
        bounds = ctx.bounds
        for e, (r0, r1) in enumerate(zip(bounds[:-1], bounds[1:])):
            f = 0 if r0 == r1 else ctx.hidden_E[e]
            for t in (dw.gate, dw.up, dw.b_gate, dw.b_up):
                if t is not None and f < t.shape[1]:
                    t[e, f:].zero_()
            if dw.down is not None and f < dw.down.shape[2]:
                dw.down[e, :, f:].zero_()
            if dw.b_down is not None and f == 0:
                dw.b_down[e].zero_()
        blocks = nonempty_blocks(bounds)
        pool = block_pool(x_TD, blocks, max(ctx.hidden_E))
        dx = RowsInto(dx_TD, token_R, pooled=pool is not None) if need_x else None
        fused = need_hidden and fused_swiglu(x_TD, scale_R, act, keep_RF, b_down)

        def block(e: int, r0: int, r1: int) -> None:
            f = ctx.hidden_E[e]
            w_e, dw_e = w.expert(e, f), dw.expert(e, f)
            tok = token_R[r0:r1]
            u, s = u_RF[r0:r1, :f], scale_R[r0:r1]
            g = g_RF[r0:r1, :f] if act.gated else None
            dy_nD = dy_TD.index_select(0, tok)
            if fused:  # one pass: the scaled hidden units, ds, du and dg (in place of dh)
                dh, du, hs = dy_nD @ w_e.down, u.new_empty(r1 - r0, f), u.new_empty(r1 - r0, f)
                cpu_kernels.swiglu_backward(g, u, s, dh, dh, du, hs, ds_R[r0:r1] if need_s else None)
                if dw_e.down is not None:
                    mm_into(dy_nD.t(), hs, dw_e.down)
                dg = dh
            else:
                # the hidden units before the gate scale: act.hidden(g, u), keeping act(g) for hidden_backward
                a = act.fn(g) if act.gated else None
                hu = act.gated_product(a, u) if act.gated else act.fn(u)
                if keep_RF is not None:
                    hu.mul_(keep_RF[r0:r1, :f])
                if dw_e.down is not None:
                    mm_into(dy_nD.t(), hu * s[:, None], dw_e.down)
                if dw_e.b_down is not None:
                    torch.mv(dy_nD.t(), s, out=dw_e.b_down)
                if not (need_s or need_hidden):
                    return
                dh = dy_nD @ w_e.down
                if need_s:
                    torch.sum(dh * hu, 1, out=ds_R[r0:r1])
                    if w_e.b_down is not None:
                        ds_R[r0:r1].add_(dy_nD @ w_e.b_down)
                if not need_hidden:
                    return
                dh.mul_(s[:, None])
                if keep_RF is not None:
                    dh.mul_(keep_RF[r0:r1, :f])
                dg, du = act.hidden_backward(dh, g, u, a)
            x_nD = x_TD.index_select(0, tok) if (dw_e.up is not None or dw_e.gate is not None) else None
            if dw_e.up is not None:
                mm_into(du.t(), x_nD, dw_e.up)
            sum_rows_into(du, dw_e.b_up)
            if act.gated:
                if dw_e.gate is not None:
                    mm_into(dg.t(), x_nD, dw_e.gate)
                sum_rows_into(dg, dw_e.b_gate)
            if need_x:
                dx_nD = torch.mm(du, w_e.up, out=dx.slot(r0, r1))
                if act.gated:
                    dx_nD.addmm_(dg, w_e.gate)
                dx.add(r0, r1, dx_nD)

        run_blocks(pool, blocks, block)
        if dx is not None:
            dx.finish()
        return (dx_TD, ds_R, dw.gate, dw.up, dw.down, dw.b_gate, dw.b_up, dw.b_down) + (None,) * 5


@torch.compiler.disable
def blockwise_ffn(x_TD: Tensor, w: FFNWeights, scale_R: Tensor, token_R: Tensor, counts_E: Tensor,
                  hidden_E: list[int], act: Activation, keep_RF: Tensor | None = None) -> Tensor:
    """The routed-expert output y_TD (gate-weighted sum over each token's rows), expert block by block.

    Eager inside compiled code (one graph break; it walks blocks by host offsets anyway): traced, dynamo
    compiled the block closure once per expert index until its recompile limit (8), then warned and ran it
    eagerly regardless, without the block pool and the fused kernels."""
    bounds = [0] + torch.cumsum(counts_E, 0).tolist()
    return BlockwiseFFN.apply(x_TD, scale_R, w.gate, w.up, w.down, w.b_gate, w.b_up, w.b_down, token_R, keep_RF,
                              bounds, hidden_E, act)
