"""Router statistics of one MoE layer forward, from its ``MoEAux`` record: the same numbers for every router.

The formulas are shared with ``moekit.analysis.routing_stats`` (which aggregates recorded routings over
many batches); this is the per-step view a training loop can log.
"""

from __future__ import annotations

import math

from moekit.analysis.routing_stats import imbalance, load_entropy, router_entropy


def routing_stats(aux) -> dict[str, float | list[float]]:
    """Summary of one ``MoEAux``:

    load            share of the kept assignments per expert (sums to 1; all 0 when nothing was routed)
    imbalance       max / mean load (1 = balanced, E = everything on one expert; 0 when nothing was routed)
    load_entropy    entropy (nats) of ``load``; ``max_entropy`` = log(E) when perfectly balanced
    router_entropy  mean per-token entropy (nats) of the router scores (``aux.probs_TE``, sigmoid scores
                    normalised per token; softmax of ``aux.logits_TE`` when absent: for Soft MoE that is each
                    token's combine mass per expert; for the hierarchical MoE the top level over groups)
    dropped_fraction, experts_per_token   as recorded by the layer (capacity drops; dynamic routers)
    """
    counts_E = aux.counts_E.detach()
    probs_TE = aux.probs_TE if aux.probs_TE is not None else aux.logits_TE.softmax(-1)
    total = float(counts_E.sum())
    return {
        "load": (counts_E.double() / max(total, 1.0)).tolist(),
        "imbalance": imbalance(counts_E) if total > 0 else 0.0,
        "load_entropy": load_entropy(counts_E),
        "max_entropy": math.log(counts_E.numel()),
        "router_entropy": router_entropy(probs_TE.detach()) if probs_TE.shape[0] else 0.0,
        "dropped_fraction": float(aux.dropped_fraction),
        "experts_per_token": float(aux.experts_per_token),
    }
