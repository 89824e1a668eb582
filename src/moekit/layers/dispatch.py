"""Dispatchers: how token rows move to the experts' row blocks and back. Plain objects, no parameters.

The dispatcher protocol (the contract every dispatcher implements; ``MoELayer`` relies on nothing else)
---------------------------------------------------------------------------------------------------------
``run(x_TD, routing, experts) -> y_TD``
    The one entry point ``MoELayer`` calls. y_TD[t] = sum over the kept assignments (t, e, w) of
    ``w * expert_e(x_TD[t])``; 0 for a token without assignments (dropped by capacity: the residual
    carries it). Differentiable w.r.t. x_TD, ``routing.weight_N`` and the expert parameters.
    y_TD is in the experts' compute dtype (autocast's, else x's). The default is the composition
    ``x_RD, counts_E, handle = dispatch(...)``; ``combine(experts(x_RD, counts_E, uniform_rows=...), handle)``.
    Host syncs are allowed only where a NOTE says why (the padded buffer's shape). Override
    ``run`` only when the dispatcher must drive the experts itself:
      - the overlapped all-to-all runs the experts chunk by chunk while the next chunk travels;
      - ``LocalDispatcher`` hands gather, experts and combine to ``experts.gathered`` in one call, so that
        a backend fusing the three (blockwise) can do them per expert block; a backend that does not fuse
        inherits the composition gather -> rows -> weighted scatter-add (``gather_rows``/``scatter_rows``).
``dispatch(x_TD, routing) -> (x_RD, counts_E, handle)``
    x_RD: the rows the experts held by this process compute, in contiguous per-expert blocks (block e
    has ``counts_E[e]`` rows, blocks in expert order; counts_E is a long tensor with one entry per local
    expert). ``handle``: whatever ``combine`` needs; opaque to everyone else.
``combine(y_RD, handle) -> y_TD``
    y_RD: the experts' outputs, row-aligned with x_RD and not yet gate-weighted. Returns the gate-weighted
    sum of each token's rows, [T, D].
``uniform_rows`` (class attribute)
    True when every expert block has the same row count (the padded layout): the experts' "auto"
    backend then uses one batched matmul.

The experts side of the contract (``GroupedExperts``, experts.py): ``experts(x_RD, counts_E,
uniform_rows=...) -> y_RD`` and ``experts.gathered(x_TD, token_R, weight_R, counts_E) -> y_TD``.
Dispatchers are registered by name (``register_dispatcher``) and chosen by ``MoEConfig.dispatcher``;
``MoELayer.dispatcher`` may be replaced by any object implementing the protocol (expert parallelism
plugs in ``moekit.distributed.ep_dispatch.AllToAllDispatcher``).

LocalDispatcher: stable sort of the assignments by expert, gather (R = N rows: dropless by construction),
  combine with ``index_add``.
PaddedDispatcher: the GShard layout: one-hot dispatch/combine tensors [T, E, C] and einsums into a fixed
  [E, C, D] buffer (C = the capacity the capacity filter used, or the largest expert load when dropless).
  Kept for comparison and for fixed-shape compilers; memory grows as T*E*C.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.capacity import position_in_expert_N
from moekit.layers.routing import Routing


def gather_rows(x_TD: Tensor, token_R: Tensor) -> Tensor:
    # index_select, not x_TD[token_R]: its backward is index_add (fast), not an accumulating index_put
    return x_TD.index_select(0, token_R)


def scatter_rows(y_RD: Tensor, token_R: Tensor, num_tokens: int, weight_R: Tensor | None = None) -> Tensor:
    """y_TD[t] = sum over rows r with token_R[r] = t of weight_R[r] * y_RD[r] (no weights: already scaled)."""
    if weight_R is not None:
        y_RD = y_RD * weight_R.to(y_RD.dtype)[:, None]
    return y_RD.new_zeros(num_tokens, y_RD.shape[-1]).index_add(0, token_R, y_RD)


class Dispatcher:
    """Base of the dispatcher protocol (see the module docstring): subclasses implement ``dispatch`` and
    ``combine``; ``run`` composes them around the experts."""

    uniform_rows = False

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, Any]:
        raise NotImplementedError

    def combine(self, y_RD: Tensor, handle: Any) -> Tensor:
        raise NotImplementedError

    def run(self, x_TD: Tensor, routing: Routing, experts: nn.Module) -> Tensor:
        x_RD, counts_E, handle = self.dispatch(x_TD, routing)
        return self.combine(experts(x_RD, counts_E, uniform_rows=self.uniform_rows), handle)


@dataclass
class LocalHandle:
    num_tokens: int
    token_R: Tensor  # source token of each routed row (rows sorted by expert)
    weight_R: Tensor  # its gate weight


class LocalDispatcher(Dispatcher):
    def plan(self, routing: Routing) -> tuple[Tensor, LocalHandle]:
        """The sort without the gather: counts_E and each routed row's token and gate weight, by expert."""
        order_R = torch.argsort(routing.expert_N, stable=True)
        counts_E = routing.counts_E()
        return counts_E, LocalHandle(routing.num_tokens, routing.token_N[order_R], routing.weight_N[order_R])

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, LocalHandle]:
        counts_E, h = self.plan(routing)
        return gather_rows(x_TD, h.token_R), counts_E, h

    def combine(self, y_RD: Tensor, handle: LocalHandle) -> Tensor:
        return scatter_rows(y_RD, handle.token_R, handle.num_tokens, handle.weight_R)

    def run(self, x_TD: Tensor, routing: Routing, experts: nn.Module) -> Tensor:
        counts_E, h = self.plan(routing)
        return experts.gathered(x_TD, h.token_R, h.weight_R, counts_E)


class PaddedDispatcher(Dispatcher):
    uniform_rows = True

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, Tensor]:
        T, E = routing.num_tokens, routing.num_experts
        counts_E = torch.bincount(routing.expert_N, minlength=E)
        # NOTE: host sync: the padded buffer's shape is the largest load unless the capacity fixes it
        largest = int(counts_E.max()) if counts_E.numel() else 0
        C = routing.capacity if routing.capacity is not None else max(largest, 1)
        if largest > C:
            raise ValueError(f"PaddedDispatcher: capacity={C} is below the largest expert load {largest}; "
                             "apply the capacity filter first")
        order_N = torch.arange(routing.num_assignments, device=x_TD.device)
        pos_N = position_in_expert_N(routing.expert_N, order_N, E)
        dispatch_TEC = x_TD.new_zeros(T, E, C)
        dispatch_TEC[routing.token_N, routing.expert_N, pos_N] = 1.0
        combine_TEC = x_TD.new_zeros(T, E, C)
        combine_TEC[routing.token_N, routing.expert_N, pos_N] = routing.weight_N.to(x_TD.dtype)
        x_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD)
        return x_ECD.reshape(E * C, -1), torch.full_like(counts_E, C), combine_TEC

    def combine(self, y_RD: Tensor, combine_TEC: Tensor) -> Tensor:
        _, E, C = combine_TEC.shape
        return torch.einsum("tec,ecd->td", combine_TEC, y_RD.view(E, C, -1))


# name -> factory(MoEConfig) -> Dispatcher; MoEConfig.dispatcher names one
DISPATCHERS: dict[str, Callable[..., Dispatcher]] = {}


def register_dispatcher(name: str, factory: Callable[..., Dispatcher]) -> None:
    """Make ``MoEConfig(dispatcher=name)`` build ``factory(cfg)`` (a class taking no arguments works too
    when wrapped: ``lambda cfg: MyDispatcher()``)."""
    DISPATCHERS[name] = factory


register_dispatcher("local", lambda cfg: LocalDispatcher())
register_dispatcher("padded", lambda cfg: PaddedDispatcher())
