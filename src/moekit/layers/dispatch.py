"""Dispatchers: move token rows to expert row blocks and back. Plain classes, no parameters.

dispatch(x_TD, routing) -> (x_RD, counts_E, meta);  combine(y_RD, meta) -> y_TD (gate-weighted sum).

LocalDispatcher: stable sort of the assignments by expert, gather rows (R = N, dropless by
  construction), combine with ``index_add_``. ``plan`` is the sort alone, for experts that gather and
  combine block by block themselves (GroupedExperts.forward_blockwise, the CPU default).
PaddedDispatcher: the GShard layout: one-hot dispatch/combine tensors [T, E, C] and einsums into a
  fixed [E, C, D] buffer (C = capacity, or the largest expert load when dropless). Kept for comparison
  and for fixed-shape compilers; memory grows as T*E*C.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.layers.capacity import position_in_expert_N
from moekit.layers.routing import Routing


@dataclass
class DispatchMeta:
    num_tokens: int
    token_R: Tensor | None = None  # LocalDispatcher: source token of each routed row
    weight_R: Tensor | None = None
    combine_TEC: Tensor | None = None  # PaddedDispatcher
    uniform_rows: bool = False  # every expert block has the same row count (bmm-able)


class LocalDispatcher:
    def plan(self, num_tokens: int, routing: Routing) -> tuple[Tensor, DispatchMeta]:
        """The sort without the gather: counts_E and each routed row's token and gate weight, by expert
        (what GroupedExperts.forward_blockwise takes)."""
        order_R = torch.argsort(routing.expert_N, stable=True)
        counts_E = torch.bincount(routing.expert_N, minlength=routing.num_experts)
        meta = DispatchMeta(num_tokens=num_tokens, token_R=routing.token_N[order_R],
                            weight_R=routing.weight_N[order_R])
        return counts_E, meta

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, DispatchMeta]:
        counts_E, meta = self.plan(x_TD.shape[0], routing)
        # index_select, not x_TD[token_R]: its backward is index_add (fast), not an accumulating index_put
        return x_TD.index_select(0, meta.token_R), counts_E, meta

    def combine(self, y_RD: Tensor, meta: DispatchMeta, weighted: bool = True) -> Tensor:
        """Sum each token's rows, scaled by their gate weights (``weighted=False``: already scaled)."""
        y_TD = y_RD.new_zeros(meta.num_tokens, y_RD.shape[-1])
        if weighted:
            y_RD = y_RD * meta.weight_R.to(y_RD.dtype)[:, None]
        return y_TD.index_add(0, meta.token_R, y_RD)


class PaddedDispatcher:
    def __init__(self, capacity: int | None = None):
        self.capacity = capacity

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, DispatchMeta]:
        T, E = routing.num_tokens, routing.num_experts
        counts_E = torch.bincount(routing.expert_N, minlength=E)
        C = self.capacity if self.capacity is not None else max(int(counts_E.max()) if counts_E.numel() else 0, 1)
        if int(counts_E.max()) > C:
            raise ValueError(f"PaddedDispatcher capacity={C} is below the largest expert load "
                             f"{int(counts_E.max())}; apply the capacity filter first")
        order_N = torch.arange(routing.num_assignments, device=x_TD.device)
        pos_N = position_in_expert_N(routing.expert_N, order_N, E)
        dispatch_TEC = x_TD.new_zeros(T, E, C)
        dispatch_TEC[routing.token_N, routing.expert_N, pos_N] = 1.0
        combine_TEC = x_TD.new_zeros(T, E, C)
        combine_TEC[routing.token_N, routing.expert_N, pos_N] = routing.weight_N.to(x_TD.dtype)
        x_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD)
        meta = DispatchMeta(num_tokens=T, combine_TEC=combine_TEC, uniform_rows=True)
        return x_ECD.reshape(E * C, -1), torch.full_like(counts_E, C), meta

    def combine(self, y_RD: Tensor, meta: DispatchMeta) -> Tensor:
        T, E, C = meta.combine_TEC.shape
        return torch.einsum("tec,ecd->td", meta.combine_TEC, y_RD.view(E, C, -1))


def build_dispatcher(kind: str, capacity: int | None = None):
    return PaddedDispatcher(capacity) if kind == "padded" else LocalDispatcher()
