"""Int8 weight-only quantisation of routed experts (per-output-channel symmetric scales).

For each expert e and output channel o of a weight W_EOI (nn.Linear layout):
    s[e, o] = max_i |W[e, o, i]| / 127,   q = clamp(round(W / s), -127, 127),   W ~ q * s.
Rounding to nearest bounds every element's error by half a step: |W - q s| <= s / 2, i.e. a relative
error of at most 1/254 of the channel's largest magnitude. Symmetric (no zero point) so that
dequantisation is one multiply; -128 is unused to keep the range symmetric. Per-channel scales follow
LLM.int8 / GPTQ practice: one outlier channel does not inflate the step of the others.

Activations stay in floating point (weight-only): experts dequantise the weights of the experts that
receive tokens at each forward, so memory and disk hold 1 byte per weight (+ one float per channel).
The router and the dense parts are left in floating point (they are small and routing is sensitive).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.deploy import ComputedWeightsExperts, moe_layers
from moekit.layers.experts import GroupedExperts

QMAX = 127
WEIGHT_NAMES = ("w_gate_EFD", "w_up_EFD", "w_down_EDF")


def quantize_per_channel(w_EOI: Tensor) -> tuple[Tensor, Tensor]:
    """(q_EOI int8, s_EO float32) with w ~ q * s[..., None]; the math runs in float64 so that
    round() sees the exact ratio w / s (the s/2 bound holds for the stored float32 scale)."""
    s_EO = (w_EOI.detach().double().abs().amax(dim=-1) / QMAX).float()
    s64 = torch.where(s_EO > 0, s_EO, torch.ones_like(s_EO)).double()  # all-zero channel: q = 0, any s
    q_EOI = torch.round(w_EOI.detach().double() / s64[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q_EOI, s_EO


def dequantize(q_EOI: Tensor, s_EO: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q_EOI.to(dtype) * s_EO.to(dtype)[..., None])


class Int8Experts(ComputedWeightsExperts):
    """Experts stored as int8 + per-channel scales (buffers ``q_*`` and ``s_*``); no float weights."""

    def __init__(self, src: GroupedExperts):
        super().__init__(src)
        for name in WEIGHT_NAMES:
            w = getattr(src, name)
            q, s = quantize_per_channel(w) if w is not None else (None, None)
            self.register_buffer("q_" + name, q)
            self.register_buffer("s_" + name, s)

    def weights_for(self, experts: list[int] | None) -> tuple[Tensor | None, Tensor, Tensor]:
        out = []
        for name in WEIGHT_NAMES:
            q, s = getattr(self, "q_" + name), getattr(self, "s_" + name)
            if q is None:
                out.append(None)
                continue
            if experts is not None:
                q, s = q[experts], s[experts]
            out.append(dequantize(q, s, s.dtype))
        return tuple(out)


def quantize_experts(model: nn.Module) -> nn.Module:
    """Replace every MoE layer's routed experts by ``Int8Experts`` in place; returns ``model``."""
    for layer in moe_layers(model).values():
        if isinstance(layer.experts, ComputedWeightsExperts):
            raise ValueError(f"experts are already {type(layer.experts).__name__}; quantise the float model")
        layer.experts = Int8Experts(layer.experts)
    return model
