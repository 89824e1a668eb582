"""Slow, readable references for the MoE layer: float64, one token at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_ffn64(experts, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """Expert e of a GroupedExperts applied to one token, in float64 (biases when the experts have them)."""

    def proj(name: str, bias: str, v: torch.Tensor) -> torch.Tensor:
        b = getattr(experts, bias, None)
        out = getattr(experts, name)[e].double() @ v
        return out if b is None else out + b[e].double()

    up = proj("w_up_EFD", "b_up_EF", x_D)
    if experts.activation == "clamped_swiglu":  # gpt-oss: alpha 1.702, limit 7, up + 1
        g = proj("w_gate_EFD", "b_gate_EF", x_D).clamp(max=7.0)
        h = g * torch.sigmoid(1.702 * g) * (up.clamp(-7.0, 7.0) + 1)
    elif experts.activation == "swiglu_limit10":  # GLM-5-Next: silu(min(g, 10)) * clamp(u, -10, 10)
        h = F.silu(proj("w_gate_EFD", "b_gate_EF", x_D).clamp(max=10.0)) * up.clamp(-10.0, 10.0)
    elif experts.gated:
        act = F.silu if experts.activation == "swiglu" else F.gelu
        h = act(proj("w_gate_EFD", "b_gate_EF", x_D)) * up
    else:
        h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "relu2": lambda u: F.relu(u) ** 2}[experts.activation](up)
    return proj("w_down_EDF", "b_down_ED", h)


def mlp64(mlp, x_TD: torch.Tensor) -> torch.Tensor:
    """A dense MLP (gated or plain, biases if it has them) applied row by row in float64."""

    def proj(lin, v):
        out = lin.weight.double() @ v
        return out if lin.bias is None else out + lin.bias.double()

    act = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu, "silu": F.silu,
           "relu2": lambda u: F.relu(u) ** 2}[mlp.act.name]
    rows = []
    for x_D in x_TD.double():
        up = proj(mlp.w_up, x_D)
        h = act(proj(mlp.w_gate, x_D)) * up if mlp.w_gate is not None else act(up)
        rows.append(proj(mlp.w_down, h))
    return torch.stack(rows) if rows else x_TD.double().new_zeros(0, mlp.w_down.weight.shape[0])


def combine_loop64(x_TD, experts, token_N, expert_N, weight_N) -> torch.Tensor:
    """y[t] = sum over assignments (t, e, w) of w * expert_e(x[t]), as a Python loop in float64."""
    x64, w64 = x_TD.double(), weight_N.double()  # differentiable in x, the expert weights and weight_N
    y = torch.zeros_like(x64)
    for n, (t, e) in enumerate(zip(token_N.tolist(), expert_N.tolist())):
        y[t] = y[t] + w64[n] * expert_ffn64(experts, e, x64[t])
    return y


def softmax_topk_routing64(x_TD, gate_w_ED, k: int, renormalize: bool):
    """Mixtral routing from its equations, token by token in float64: p = softmax(x W^T); top-k; renorm."""
    token, expert, weight = [], [], []
    for t in range(x_TD.shape[0]):
        p = torch.softmax(gate_w_ED.double() @ x_TD[t].double(), dim=-1)
        top = sorted(range(p.numel()), key=lambda i: (-p[i].item(), i))[:k]
        s = sum(p[i].item() for i in top) if renormalize else 1.0
        for i in top:
            token.append(t)
            expert.append(i)
            weight.append(p[i].item() / s)
    return torch.tensor(token), torch.tensor(expert), torch.tensor(weight, dtype=torch.float64)
