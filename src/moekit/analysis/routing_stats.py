"""Routing analytics: record what every router of a model does on real data, and summarise it.

``RoutingRecorder`` hooks each ``Router`` module (forward hooks, no model changes) and keeps the
``Routing`` it returned per layer. The summaries are pure functions of those assignment lists:
load histogram and imbalance, router entropy, expert co-activation, top tokens per expert, and the
dropped fraction a capacity factor would cause.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.errors import UsageError
from moekit.layers.capacity import apply_capacity, expert_capacity
from moekit.layers.routing import Router, Routing


@dataclass
class LayerRecord:
    """Concatenated routing of one MoE layer over all recorded batches."""

    name: str
    num_experts: int
    top_k: int
    token_N: list[Tensor] = field(default_factory=list)  # global token index (across batches)
    expert_N: list[Tensor] = field(default_factory=list)
    weight_N: list[Tensor] = field(default_factory=list)
    probs_TE: list[Tensor] = field(default_factory=list)
    routings: list[Routing] = field(default_factory=list)  # per batch, for capacity sweeps
    num_tokens: int = 0

    def cat(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (torch.cat(self.token_N), torch.cat(self.expert_N), torch.cat(self.weight_N),
                torch.cat(self.probs_TE))


class RoutingRecorder:
    """Context manager: ``with RoutingRecorder(model) as rec: model(batch)``; then ``rec.layers``."""

    def __init__(self, model: nn.Module, keep_routings: bool = True):
        self.model = model
        self.keep_routings = keep_routings
        self.layers: dict[str, LayerRecord] = {}
        self._handles: list = []

    def __enter__(self) -> RoutingRecorder:
        for name, mod in self.model.named_modules():
            if isinstance(mod, Router):
                self._handles.append(mod.register_forward_hook(self._hook(name)))
        if not self._handles:
            raise UsageError("model has no MoE routers to record (no moekit Router modules found)")
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: Router, args, routing: Routing) -> None:
            rec = self.layers.setdefault(name, LayerRecord(name, routing.num_experts, routing.top_k))
            rec.token_N.append(routing.token_N.detach().cpu() + rec.num_tokens)
            rec.expert_N.append(routing.expert_N.detach().cpu())
            rec.weight_N.append(routing.weight_N.detach().float().cpu())
            rec.probs_TE.append(routing.probs_TE.detach().float().cpu())
            if self.keep_routings:
                rec.routings.append(routing)
            rec.num_tokens += routing.num_tokens

        return hook


def load_E(expert_N: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert."""
    return torch.bincount(expert_N, minlength=num_experts)


def imbalance(counts_E: Tensor) -> float:
    """max / mean load: 1.0 is perfectly balanced, E means one expert takes everything."""
    counts = counts_E.float()
    return float(counts.max() / counts.mean().clamp_min(1e-12))


def router_entropy(probs_TE: Tensor) -> float:
    """Mean per-token entropy (nats) of the router distribution; log(E) is uniform, 0 is one-hot.
    Sigmoid scores (DeepSeek-V3) are normalised per token first."""
    p = probs_TE.double() / probs_TE.double().sum(-1, keepdim=True).clamp_min(1e-30)
    return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())


def load_entropy(counts_E: Tensor) -> float:
    """Entropy (nats) of the load distribution over experts; log(E) means perfectly balanced."""
    p = counts_E.double() / counts_E.double().sum().clamp_min(1)
    return float(-(p * p.clamp_min(1e-30).log()).sum()) + 0.0  # + 0.0: all load on one expert is 0, not -0


def coactivation_EE(token_N: Tensor, expert_N: Tensor, num_tokens: int, num_experts: int) -> Tensor:
    """C[i, j] = number of tokens routed to both expert i and expert j (diagonal: tokens on i)."""
    hit_TE = torch.zeros(num_tokens, num_experts)
    hit_TE[token_N, expert_N] = 1.0
    return hit_TE.t() @ hit_TE


def top_tokens_per_expert(token_ids_T: Tensor, token_N: Tensor, expert_N: Tensor, num_experts: int,
                          n: int = 10) -> list[list[tuple[int, int]]]:
    """For each expert, the n vocabulary ids it receives most often, as (token_id, count)."""
    ids_N = token_ids_T.reshape(-1)[token_N]
    out = []
    for e in range(num_experts):
        ids, counts = torch.unique(ids_N[expert_N == e], return_counts=True)
        order = counts.argsort(descending=True, stable=True)[:n]
        out.append([(int(ids[i]), int(counts[i])) for i in order])
    return out


def dropped_fraction_sweep(routings: list[Routing], factors: list[float], drop_policy: str = "position",
                           overflow: str = "drop") -> dict[float, float]:
    """Share of the router's (dropless) assignments that capacity ``factor`` would remove, per factor."""
    out = {}
    for f in factors:
        total = dropped = 0
        for r in routings:
            cap = expert_capacity(r.num_tokens, r.num_experts, r.top_k, f)
            kept = apply_capacity(r, cap, drop_policy, overflow)
            total += r.num_assignments
            dropped += r.num_assignments - kept.num_assignments
        out[f] = dropped / max(total, 1)
    return out


def summarize_layer(rec: LayerRecord) -> dict:
    """The per-layer numbers of the report."""
    token_N, expert_N, _, probs_TE = rec.cat()
    counts = load_E(expert_N, rec.num_experts)
    return {
        "layer": rec.name,
        "tokens": rec.num_tokens,
        "experts_per_token": expert_N.numel() / max(rec.num_tokens, 1),
        "load": counts.tolist(),
        "imbalance_max_over_mean": imbalance(counts),
        "load_entropy_nats": load_entropy(counts),
        "max_load_entropy_nats": math.log(rec.num_experts),
        "router_entropy_nats": router_entropy(probs_TE),
    }
