"""Blockwise experts: gather -> FFN -> gate-scale -> scatter-add, one expert's row block at a time.

The grouped path materialises every routed row at once: the gathered inputs x_RD, the hidden
activations and the outputs y_RD for all R = T*k assignments (at T=4096, top-8, h=352 each hidden tensor
is 46 MB, beyond the L3 cache), so the gather, every elementwise op, the combine and their backward passes
stream from DRAM. Here each expert's block (a few hundred rows) is gathered, pushed through its FFN and
added into y_TD while it is still in cache, and the backward pass walks the blocks again from the saved
pre-activations. This is the CPU counterpart of fused gather-GEMM-scatter kernels (MegaBlocks,
ScatterMoE); same function as the grouped path, with the gradients of x, the three weight stacks and the
gate weights written out by hand.

Only the hidden pre-activations (gate and up, [R, F] each) are saved, not x_RD or y_RD.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def mm_into(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """a @ b written into ``out`` (a view into a saved buffer); column slices are not contiguous."""
    if out.is_contiguous():
        return torch.mm(a, b, out=out)
    out.copy_(a @ b)
    return out


class BlockwiseFFN(torch.autograd.Function):
    """y_TD[t] = sum over rows r with token_R[r] = t of scale_R[r] * expert_e(r)(x_TD[t]).

    Rows are sorted by expert: expert e owns rows bounds[e]:bounds[e+1] and its first hidden_E[e] units.
    ``keep_RF`` (optional) is the expert-dropout mask already divided by the keep probability. ``act`` and
    ``act_backward(grad_out, pre_activation) -> grad_in`` are the activation and its derivative; ``gated``:
    hidden = act(gate x) * (up x), else act(up x).
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, w_gate_EFD: Tensor | None, w_up_EFD: Tensor, w_down_EDF: Tensor,
                scale_R: Tensor, token_R: Tensor, keep_RF: Tensor | None, bounds: list[int], hidden_E: list[int],
                act: Callable, act_backward: Callable, gated: bool) -> Tensor:
        save = any(ctx.needs_input_grad[:5])
        R, F_ = token_R.shape[0], w_up_EFD.shape[1]
        y_TD = torch.zeros_like(x_TD)
        # pre-activations are kept for backward; in inference each block uses a temporary instead
        u_RF = x_TD.new_empty(R, F_) if save else None
        g_RF = x_TD.new_empty(R, F_) if save and gated else None
        for e, (r0, r1) in enumerate(zip(bounds[:-1], bounds[1:])):
            if r0 == r1:
                continue
            f = hidden_E[e]
            tok = token_R[r0:r1]
            x_nD = x_TD.index_select(0, tok)
            u = x_nD @ w_up_EFD[e, :f].t() if not save else mm_into(x_nD, w_up_EFD[e, :f].t(), u_RF[r0:r1, :f])
            if gated:
                g = x_nD @ w_gate_EFD[e, :f].t() if not save else mm_into(x_nD, w_gate_EFD[e, :f].t(),
                                                                          g_RF[r0:r1, :f])
                h = act(g).mul_(u)
            else:
                h = act(u)
            h.mul_(scale_R[r0:r1, None])
            if keep_RF is not None:
                h.mul_(keep_RF[r0:r1, :f])
            y_TD.index_add_(0, tok, h @ w_down_EDF[e, :, :f].t())
        if save:
            ctx.save_for_backward(x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, scale_R, token_R, keep_RF, g_RF, u_RF)
            ctx.bounds, ctx.hidden_E, ctx.act, ctx.act_backward, ctx.gated = bounds, hidden_E, act, act_backward, gated
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD: Tensor):
        x_TD, w_gate, w_up, w_down, scale_R, token_R, keep_RF, g_RF, u_RF = ctx.saved_tensors
        act, act_backward, gated = ctx.act, ctx.act_backward, ctx.gated
        need_x, need_wg, need_wu, need_wd, need_s = ctx.needs_input_grad[:5]
        dx_TD = torch.zeros_like(x_TD) if need_x else None
        # weight grads: each expert's block is written whole below; only what no block writes is zeroed
        # (empty experts, units beyond a smaller expert's own size), not 3 x E x F x D floats up front
        dwg = torch.empty_like(w_gate) if need_wg else None
        dwu = torch.empty_like(w_up) if need_wu else None
        dwd = torch.empty_like(w_down) if need_wd else None
        ds_R = torch.zeros_like(scale_R) if need_s else None
        need_hidden = need_x or need_wg or need_wu  # anything upstream of the down projection
        for e, (r0, r1) in enumerate(zip(ctx.bounds[:-1], ctx.bounds[1:])):
            f = 0 if r0 == r1 else ctx.hidden_E[e]
            for dw in (dwg, dwu):
                if dw is not None and f < dw.shape[1]:
                    dw[e, f:].zero_()
            if dwd is not None and f < dwd.shape[2]:
                dwd[e, :, f:].zero_()
            if r0 == r1:
                continue
            tok = token_R[r0:r1]
            u, s = u_RF[r0:r1, :f], scale_R[r0:r1, None]
            dy_nD = dy_TD.index_select(0, tok)
            if gated:
                g = g_RF[r0:r1, :f]
                a = act(g)
                hu = a * u  # hidden before the gate scale
            else:
                hu = act(u)
            if keep_RF is not None:
                hu.mul_(keep_RF[r0:r1, :f])
            if need_wd:
                mm_into(dy_nD.t(), hu * s, dwd[e, :, :f])
            if not (need_s or need_hidden):
                continue
            dh = dy_nD @ w_down[e, :, :f]
            if need_s:
                torch.sum(dh * hu, 1, out=ds_R[r0:r1])
            if not need_hidden:
                continue
            dh.mul_(s)
            if keep_RF is not None:
                dh.mul_(keep_RF[r0:r1, :f])
            if gated:
                du = dh * a
                dg = act_backward(dh.mul_(u), g)
            else:
                du = act_backward(dh, u)
            x_nD = x_TD.index_select(0, tok) if (need_wg or need_wu) else None
            if need_wu:
                mm_into(du.t(), x_nD, dwu[e, :f])
            if gated and need_wg:
                mm_into(dg.t(), x_nD, dwg[e, :f])
            if need_x:
                dx_nD = du @ w_up[e, :f]
                if gated:
                    dx_nD.addmm_(dg, w_gate[e, :f])
                dx_TD.index_add_(0, tok, dx_nD)
        return dx_TD, dwg, dwu, dwd, ds_R, None, None, None, None, None, None, None


def blockwise_ffn(x_TD: Tensor, w_gate_EFD: Tensor | None, w_up_EFD: Tensor, w_down_EDF: Tensor, scale_R: Tensor,
                  token_R: Tensor, counts_E: Tensor, hidden_E: list[int], act: Callable, act_backward: Callable,
                  keep_RF: Tensor | None = None) -> Tensor:
    """The routed-expert output y_TD (gate-weighted sum over each token's rows), expert block by block.
    Gated (act(gate x) * up x) when ``w_gate_EFD`` is given."""
    bounds = [0] + torch.cumsum(counts_E, 0).tolist()
    return BlockwiseFFN.apply(x_TD, w_gate_EFD, w_up_EFD, w_down_EDF, scale_R, token_R, keep_RF, bounds,
                              hidden_E, act, act_backward, w_gate_EFD is not None)
