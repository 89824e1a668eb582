"""Expert capacity: a pure filter on the assignment list.

capacity C = max(min_capacity, ceil(T * K / E * capacity_factor)): the balanced share of the T*K
assignments per expert, times the factor (Switch uses K=1: ceil(T / E * factor); GShard K=2).
Assignments beyond C for an expert are dropped (their token gets 0 from that expert; the residual
carries it) or re-routed to the token's next-best expert that still has room.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from moekit.layers.routing import Routing


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int = 1) -> int:
    """C = max(min_capacity, ceil(T * K / E * capacity_factor))."""
    return max(min_capacity, math.ceil(num_tokens * top_k / num_experts * capacity_factor))


def priority_order_N(routing: Routing, drop_policy: str) -> Tensor:
    """Assignment indices, most entitled first.

    "position": all first choices before second choices, earlier tokens first (GShard, Switch).
    "priority": higher gate weight first (Batch Prioritized Routing, Riquelme et al. 2021).
    """
    T = max(routing.num_tokens, 1)
    key_N = routing.rank_N * T + routing.token_N  # unique per assignment
    order_N = torch.argsort(key_N, stable=True)
    if drop_policy == "priority":
        order_N = order_N[torch.argsort(-routing.weight_N[order_N], stable=True)]
    return order_N


def position_in_expert_N(expert_N: Tensor, order_N: Tensor, num_experts: int) -> Tensor:
    """For each assignment, how many assignments to the same expert come before it in ``order_N``."""
    expert_ord = expert_N[order_N]
    by_expert = torch.argsort(expert_ord, stable=True)
    counts_E = torch.bincount(expert_ord, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    pos_sorted = torch.arange(expert_N.numel(), device=expert_N.device) - starts_E[expert_ord[by_expert]]
    pos_N = torch.empty_like(expert_N)
    pos_N[order_N[by_expert]] = pos_sorted
    return pos_N


def apply_capacity(routing: Routing, capacity: int, drop_policy: str = "position",
                   overflow: str = "drop") -> Routing:
    """Keep at most ``capacity`` assignments per expert; drop or re-route the rest."""
    order_N = priority_order_N(routing, drop_policy)
    keep_N = position_in_expert_N(routing.expert_N, order_N, routing.num_experts) < capacity
    if overflow == "drop" or bool(keep_N.all()):
        return routing.select(keep_N)
    return _reroute_overflow(routing, keep_N, order_N, capacity)


def _reroute_overflow(routing: Routing, keep_N: Tensor, order_N: Tensor, capacity: int) -> Routing:
    """Send each overflowing assignment to its token's next-best expert (by ``probs_TE``) that the token
    does not already use and that has room; priority order decides who gets the room first. The new
    weight is the router's score for the new expert, scaled like the original (renormalisation kept)."""
    T, E = routing.num_tokens, routing.num_experts
    probs_TE = routing.probs_TE
    used_TE = torch.zeros(T, E, dtype=torch.bool, device=probs_TE.device)
    used_TE[routing.token_N, routing.expert_N] = True
    room_E = capacity - torch.bincount(routing.expert_N[keep_N], minlength=E)
    candidates_TE = probs_TE.argsort(dim=-1, descending=True, stable=True)

    # pending overflow assignments, in priority order
    pending = order_N[~keep_N[order_N]]
    new_expert_N = routing.expert_N.clone()
    for j in range(E):
        if pending.numel() == 0 or int(room_E.max()) <= 0:
            break
        cand = candidates_TE[routing.token_N[pending], j]
        eligible = ~used_TE[routing.token_N[pending], cand] & (room_E[cand] > 0)
        idx = pending[eligible]
        cand = cand[eligible]
        pos = position_in_expert_N(cand, torch.arange(cand.numel(), device=cand.device), E)
        accept = pos < room_E[cand]
        acc_idx, acc_exp = idx[accept], cand[accept]
        new_expert_N[acc_idx] = acc_exp
        keep_N[acc_idx] = True
        used_TE[routing.token_N[acc_idx], acc_exp] = True
        room_E -= torch.bincount(acc_exp, minlength=E)
        pending = pending[~keep_N[pending]]

    old_score_N = probs_TE[routing.token_N, routing.expert_N].clamp_min(1e-20)
    new_weight_N = probs_TE[routing.token_N, new_expert_N] * (routing.weight_N / old_score_N)
    moved_N = new_expert_N != routing.expert_N
    weight_N = torch.where(moved_N, new_weight_N, routing.weight_N)
    rerouted = replace(routing, expert_N=new_expert_N, weight_N=weight_N)
    return rerouted.select(keep_N)


def capacity_filter(routing: Routing, cfg, training: bool) -> Routing:
    """Apply the train or eval capacity factor of CapacityConfig ``cfg``; None means dropless (list
    unchanged). The result records the capacity it applied (``Routing.capacity``)."""
    factor = cfg.capacity_factor if training else cfg.eval_capacity_factor
    if factor is None:
        return routing
    cap = expert_capacity(routing.num_tokens, routing.num_experts, routing.top_k, factor, cfg.min_capacity)
    return replace(apply_capacity(routing, cap, cfg.drop_policy, cfg.overflow), capacity=cap)
