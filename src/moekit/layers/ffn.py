"""The feed-forward network every expert computes, defined once.

    gated (SwiGLU, GeGLU; Shazeer 2020):  y = W_down (act(W_gate x + b_gate) * up(W_up x + b_up)) + b_down
    plain (GELU, ReLU, ReLU², SiLU):             y = W_down act(W_up x + b_up) + b_down

``up`` is the identity except for gpt-oss's clamped SwiGLU: act(g) = min(g, 7) sigmoid(1.702 min(g, 7)),
up(u) = clamp(u, -7, 7) + 1; and for the clamped SwiGLU of GLM-5-Next / DeepSeek-V4 / HY-V4 (swiglu_limit10):
act(g) = silu(min(g, 10)), up(u) = clamp(u, -10, 10).

Weights are in nn.Linear layout (out, in); biases are optional (``MoEConfig.bias``; gpt-oss has them).
Every experts backend (experts.py), the hand-written blockwise forward and backward (blockwise.py), the
dense ``MLP`` and the shared experts use these functions; they differ only in how a projection is
computed (``linear``: one matmul, a grouped matmul over expert row blocks, a batched matmul).

Legend: n rows, I in features, O out features, D model dim, F hidden units, E experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers import cpu_kernels


@dataclass(frozen=True)
class Activation:
    """An activation with its derivative as aten's backward kernel: grad_in = grad(grad_out, pre_activation)."""

    name: str
    fn: Callable[[Tensor], Tensor]
    grad: Callable[[Tensor, Tensor], Tensor]
    gated: bool
    up: Callable[[Tensor], Tensor] | None = None  # gated: transform of the up pre-activation (None = identity)
    up_grad: Callable[[Tensor, Tensor], Tensor] | None = None  # its backward: (grad_out, u) -> grad_u

    def hidden(self, g: Tensor | None, u: Tensor, inplace: bool = False) -> Tensor:
        """The hidden units from the pre-activations: act(g) * up(u) (gated) or act(u) (``g`` is None).
        ``inplace``: multiply into act(g)'s fresh buffer (outside autograd: the blockwise kernels)."""
        if not self.gated:
            return self.fn(u)
        return self.gated_product(self.fn(g), u, inplace)

    def gated_product(self, a: Tensor, u: Tensor, inplace: bool = False) -> Tensor:
        """act(g) * up(u) from a = act(g); ``inplace`` writes into ``a``."""
        v = u if self.up is None else self.up(u)
        return a.mul_(v) if inplace else a * v

    def hidden_backward(self, dh: Tensor, g: Tensor | None, u: Tensor, a: Tensor | None = None
                        ) -> tuple[Tensor | None, Tensor]:
        """(dg, du) from dh, the gradient of ``hidden(g, u)``; ``a`` = fn(g) if already computed.
        Overwrites ``dh`` (the blockwise backward calls it once per block and keeps nothing)."""
        if not self.gated:
            return None, self.grad(dh, u)
        a = self.fn(g) if a is None else a
        du = dh * a
        if self.up_grad is not None:
            du = self.up_grad(du, u)
        return self.grad(dh.mul_(u if self.up is None else self.up(u)), g), du


OSS_ALPHA, OSS_LIMIT = 1.702, 7.0  # gpt-oss (OpenAI 2025): sigmoid sharpness and clamp of its SwiGLU


def _oss_act(g: Tensor) -> Tensor:
    g = g.clamp(max=OSS_LIMIT)
    return g * torch.sigmoid(OSS_ALPHA * g)


def _oss_act_grad(dy: Tensor, g: Tensor) -> Tensor:
    """d/dg of g sigmoid(alpha g) below the clamp, 0 above it (torch.clamp passes the gradient at the limit)."""
    s = torch.sigmoid(OSS_ALPHA * g)
    return torch.where(g <= OSS_LIMIT, dy * s * (1 + OSS_ALPHA * g * (1 - s)), torch.zeros_like(dy))


def _oss_up_grad(dy: Tensor, u: Tensor) -> Tensor:
    return torch.where(u.abs() <= OSS_LIMIT, dy, torch.zeros_like(dy))


SWIGLU_LIMIT = 10.0  # GLM-5-Next, DeepSeek-V4, HY-V4: SwiGLU with gate and up clamped at +-10 (no alpha, no +1)


def _limited_silu(g: Tensor) -> Tensor:
    return F.silu(g.clamp(max=SWIGLU_LIMIT))


def _limited_silu_grad(dy: Tensor, g: Tensor) -> Tensor:
    return torch.where(g <= SWIGLU_LIMIT, torch.ops.aten.silu_backward(dy, g), torch.zeros_like(dy))


def _limited_up_grad(dy: Tensor, u: Tensor) -> Tensor:
    return torch.where(u.abs() <= SWIGLU_LIMIT, dy, torch.zeros_like(dy))


ACTIVATIONS = {
    "swiglu": Activation("swiglu", F.silu, torch.ops.aten.silu_backward, True),
    "geglu": Activation("geglu", F.gelu, lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="none"), True),
    "gelu": Activation("gelu", F.gelu, lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="none"), False),
    "relu": Activation("relu", F.relu, lambda g, x: torch.ops.aten.threshold_backward(g, x, 0.0), False),
    "silu": Activation("silu", F.silu, torch.ops.aten.silu_backward, False),
    "swiglu_limit10": Activation("swiglu_limit10", _limited_silu, _limited_silu_grad, True,
                                 up=lambda u: u.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT), up_grad=_limited_up_grad),
    # squared ReLU (So et al. 2021, Primer), plain: Nemotron-H's experts
    "relu2": Activation("relu2", lambda x: F.relu(x).square(), lambda g, x: g * 2 * F.relu(x), False),
    "clamped_swiglu": Activation("clamped_swiglu", _oss_act, _oss_act_grad, True,
                                 up=lambda u: u.clamp(-OSS_LIMIT, OSS_LIMIT) + 1, up_grad=_oss_up_grad),
}


@dataclass(slots=True)
class FFNWeights:
    """The tensors of one FFN (2-D weights, 1-D biases) or of E stacked experts (3-D / 2-D): w_gate_(E)FD
    (None unless gated), w_up_(E)FD, w_down_(E)DF, and biases b_gate_(E)F, b_up_(E)F, b_down_(E)D or None.
    (The blockwise backward also holds gradient stacks in one, None where no gradient is needed.)"""

    gate: Tensor | None
    up: Tensor
    down: Tensor
    b_gate: Tensor | None = None
    b_up: Tensor | None = None
    b_down: Tensor | None = None

    def map(self, f: Callable[[Tensor], Tensor]) -> FFNWeights:
        """The same weights with ``f`` applied to every tensor present."""
        return FFNWeights(*(None if t is None else f(t) for t in (self.gate, self.up, self.down, self.b_gate,
                                                                  self.b_up, self.b_down)))

    def expert(self, e: int, f: int | None = None) -> FFNWeights:
        """Expert e of a stack, restricted to its first ``f`` hidden units (all when None)."""
        u = slice(None, f)
        g, up, down, bg, bu, bd = self.gate, self.up, self.down, self.b_gate, self.b_up, self.b_down
        return FFNWeights(None if g is None else g[e, u], None if up is None else up[e, u],
                          None if down is None else down[e, :, u], None if bg is None else bg[e, u],
                          None if bu is None else bu[e, u], None if bd is None else bd[e])

    def unbind(self) -> list[FFNWeights]:
        """The E experts of a stack; unbind (not w[e]): its backward stacks the E gradients once instead of
        summing E full-size zero-filled copies."""
        E = self.up.shape[0]
        parts = [[None] * E if t is None else t.unbind(0)
                 for t in (self.gate, self.up, self.down, self.b_gate, self.b_up, self.b_down)]
        return [FFNWeights(*ts) for ts in zip(*parts)]


Linear = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]  # (x, w, b) -> x w^T + b, per expert block


def scale_on_hidden(width: int, w: FFNWeights) -> bool:
    """Whether per-row factors go on the hidden units (``width`` of them) rather than on the output: when they are
    narrower than the output and there is no down bias (see ``ffn_out``; the fused paths follow the same rule)."""
    return width < w.down.shape[-2] and w.b_down is None


def ffn_out(h: Tensor, w: FFNWeights, linear: Linear = F.linear, scale: Tensor | None = None,
            inplace: bool = False) -> Tensor:
    """The down projection, times the per-row factors ``scale`` (gate weights) when given.

    Narrow hidden rows (F < D, fine-grained experts) are scaled before the projection instead of the
    wider outputs: it is linear, so the function is the same and less data moves (W2 shapes,
    forward+backward 1.30x -> 1.24x dense). A bias is scaled with the output, so that path is bias-free.
    ``inplace``: scale ``h`` or the output in place (outside autograd: the blockwise kernels)."""
    if scale is None:
        return linear(h, w.down, w.b_down)
    s = (scale if scale.dtype == h.dtype else scale.to(h.dtype))[..., None]  # no cast op per expert block
    if scale_on_hidden(h.shape[-1], w):
        return linear(h.mul_(s) if inplace else h * s, w.down, None)
    y = linear(h, w.down, w.b_down)
    return y.mul_(s) if inplace else y * s


def ffn(x: Tensor, w: FFNWeights, act: Activation, linear: Linear = F.linear, scale: Tensor | None = None,
        dropout: Callable[[Tensor], Tensor] | None = None, fused: bool = True) -> Tensor:
    """The FFN on rows x [..., I]; ``dropout`` acts on the hidden units (ST-MoE expert dropout).
    ``fused``: SwiGLU's silu(g) * u * scale in cpu_kernels' one-pass autograd op where it applies (float32 on
    the CPU, no dropout, no down bias); the loop backend, the readable reference, passes False."""
    u = linear(x, w.up, w.b_up)
    g = linear(x, w.gate, w.b_gate) if act.gated else None
    if fused and act.name == "swiglu" and w.b_down is None and inactive(dropout):
        on_hidden = scale is not None and scale_on_hidden(u.shape[-1], w)
        hs = cpu_kernels.swiglu_hidden(g, u, scale.to(u.dtype) if on_hidden else None)
        if hs is not None:  # the scale is in hs, or ffn_out puts it on the output
            return ffn_out(hs, w, linear, None if on_hidden else scale)
    h = act.hidden(g, u)
    return ffn_out(h if dropout is None else dropout(h), w, linear, scale)


def inactive(dropout: Callable[[Tensor], Tensor] | None) -> bool:
    return (dropout is None or isinstance(dropout, nn.Identity)
            or (isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training)))
