"""What every MoE layer returns (sparse, Soft MoE, hierarchical), and the input checks they share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class MoEAux:
    logits_TE: Tensor  # float32 router logits
    counts_E: Tensor  # assignments per expert after capacity
    dropped_fraction: Tensor  # 0-d: share of the router's assignments removed by capacity
    experts_per_token: Tensor  # 0-d: mean kept assignments per token
    losses: dict[str, Tensor] = field(default_factory=dict)  # unweighted loss terms
    loss: Tensor | None = None  # coefficient-weighted sum, to add to the task loss
    probs_TE: Tensor | None = None  # router scores (softmax or sigmoid) for statistics; None = softmax(logits)


@dataclass
class MoEOutput:
    y: Tensor
    aux: MoEAux


def flatten_tokens(x: Tensor, d_model: int, name: str = "x") -> Tensor:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got "
                        f"{x.dtype if torch.is_tensor(x) else type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != d_model:
        raise ValueError(f"{name} must have shape [..., d_model={d_model}], got {tuple(x.shape)}")
    return x.reshape(-1, d_model)


def token_ids_T(ids: Tensor | None, lead_shape: tuple[int, ...], name: str) -> Tensor | None:
    """Broadcast per-sequence ids [B] (or per-token [B, S]) to one id per token [T]."""
    if ids is None:
        return None
    if ids.dim() == 1 and len(lead_shape) >= 1 and ids.shape[0] == lead_shape[0]:
        ids = ids.view(-1, *([1] * (len(lead_shape) - 1))).expand(lead_shape)
    if tuple(ids.shape) != tuple(lead_shape):
        raise ValueError(f"{name} must have shape [B] or {list(lead_shape)}, got {list(ids.shape)}")
    return ids.reshape(-1)


def seq_len_of(lead_shape: tuple[int, ...]) -> int | None:
    """Tokens per sequence of an input [..., S, D]; None for a flat [T, D] batch."""
    return lead_shape[-1] if len(lead_shape) >= 2 else None
