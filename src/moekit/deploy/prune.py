"""Expert pruning: drop each MoE layer's least-used experts, by load measured on data.

Removing experts slices them out of the stacked expert weights and out of every router tensor indexed
by expert (gate rows, noise rows, biases). The router then takes its softmax over the survivors only,
which renormalises the remaining probabilities: p'_i = p_i / sum_{j kept} p_j. With a router that
renormalises its top-k weights (Mixtral: w_i = p_i / sum_{j in topk} p_j) the softmax denominator
cancels, so every token whose top-k experts all survive gets exactly the same experts and weights:
outputs on data that only uses the kept experts are unchanged. Routers without top-k renormalisation
(Switch) see larger gates p'_i >= p_i after pruning.

Legend: E experts before, G experts after (kept experts or merged groups).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.deploy import ComputedWeightsExperts, moe_layers, replace_module
from moekit.errors import UsageError
from moekit.layers.experts import GroupedExperts
from moekit.layers.moe import MoELayer


@torch.no_grad()
def measure_loads(model: nn.Module, batches: Iterable, forward: Callable | None = None) -> dict[str, Tensor]:
    """Assignments per expert (after capacity) of every MoE layer, summed over ``batches``, in eval mode.

    ``forward(model, batch)`` runs one batch (default ``model(inputs)``).
    """
    layers = moe_layers(model)
    counts = {name: torch.zeros(layer.cfg.num_experts, dtype=torch.float64) for name, layer in layers.items()}

    def hook(name):
        def record(_module, _inputs, out):
            counts[name] += out.aux.counts_E.detach().to("cpu", torch.float64)
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            else:  # an (inputs, targets) pair from TokenStream, or inputs alone
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts


def select_experts(counts_E: Tensor, *, keep: int | None = None, min_share: float | None = None) -> list[int]:
    """Experts to keep: the ``keep`` most loaded, or every expert with load share >= ``min_share``
    (share = counts_e / sum counts). Always at least the most loaded one. Sorted indices."""
    if (keep is None) == (min_share is None):
        raise UsageError("select_experts: give exactly one of keep= (number of experts) or min_share= (load share)")
    E = counts_E.numel()
    order = torch.argsort(counts_E.double(), descending=True, stable=True)
    if keep is not None:
        if not (isinstance(keep, int) and 1 <= keep <= E):
            raise UsageError(f"keep={keep!r}: must be an integer in [1, num_experts={E}]")
        chosen = order[:keep]
    else:
        if not (0.0 <= min_share <= 1.0):
            raise UsageError(f"min_share={min_share!r}: must be a load share in [0, 1]")
        share_E = counts_E.double() / counts_E.double().sum().clamp_min(1e-30)
        chosen = order[: max(1, int((share_E >= min_share).sum()))]
    return sorted(chosen.tolist())


def resized_config(cfg: MoEConfig, num_experts: int) -> MoEConfig:
    """The layer config with ``num_experts`` experts (top_k capped at it)."""
    router = dataclasses.replace(cfg.router, top_k=min(cfg.router.top_k, num_experts))
    return dataclasses.replace(cfg, num_experts=num_experts, router=router)


def combine_expert_dim(layer: MoELayer, A_GE: Tensor, *, include_router: bool = True) -> MoELayer:
    """A new layer with G experts whose every per-expert tensor is ``A_GE @ old`` along the expert dim.

    A one-hot row selects an expert (pruning); a row of weights summing to 1 averages experts
    (merging). Mixed in float64 and cast back, so selecting, or averaging identical experts, is exact.
    The per-expert dim of a tensor is the one whose size changes from E to G between the layers.
    """
    if not isinstance(layer.experts, GroupedExperts) or isinstance(layer.experts, ComputedWeightsExperts):
        raise ValueError(f"layer.experts must be plain GroupedExperts (got {type(layer.experts).__name__}); "
                         "prune/merge before quantising or offloading")
    G, E = A_GE.shape
    if E != layer.cfg.num_experts or not 1 <= G < E:
        raise ValueError(f"A_GE must have shape [G, E={layer.cfg.num_experts}] with 1 <= G < E, "
                         f"got {tuple(A_GE.shape)}")
    if len(set(layer.cfg.hidden_sizes)) > 1:
        raise UsageError(f"MoEConfig.expert_hidden_sizes={layer.cfg.expert_hidden_sizes}: pruning/merging "
                         "heterogeneous experts is not supported")
    ref = next(layer.parameters())
    new = MoELayer(resized_config(layer.cfg, G)).to(device=ref.device, dtype=ref.dtype)
    old_sd, new_sd = layer.state_dict(), new.state_dict()
    for key, target in new_sd.items():
        v = old_sd[key]
        if not include_router and key.startswith("router."):
            continue
        if v.shape != target.shape:
            dims = [d for d in range(v.dim()) if v.shape[d] == E and target.shape[d] == G]
            if len(dims) != 1:
                raise ValueError(f"cannot find the expert dim of {key}: {tuple(v.shape)} -> {tuple(target.shape)}")
            v = _apply_along(A_GE, v, dims[0])
        new_sd[key] = v
    new.load_state_dict(new_sd)
    new.experts.backend = layer.experts.backend
    new.train(layer.training)
    return new


def _apply_along(A_GE: Tensor, v: Tensor, dim: int) -> Tensor:
    if not v.is_floating_point():  # e.g. integer statistics: take the heaviest member's value
        return v.index_select(dim, A_GE.argmax(dim=1).to(v.device))
    v_E = v.movedim(dim, 0)
    out = A_GE.to(v.device, torch.float64) @ v_E.reshape(v_E.shape[0], -1).double()
    return out.reshape(A_GE.shape[0], *v_E.shape[1:]).to(v.dtype).movedim(0, dim)


def prune_layer(layer: MoELayer, keep: Sequence[int]) -> MoELayer:
    """A new layer holding only experts ``keep`` (router rows sliced; softmax over survivors)."""
    E = layer.cfg.num_experts
    keep = sorted(set(int(e) for e in keep))
    if not keep or keep[0] < 0 or keep[-1] >= E:
        raise ValueError(f"keep={keep}: must be a non-empty list of expert indices in [0, {E})")
    if len(keep) == E:
        return copy.deepcopy(layer)
    A_GE = torch.zeros(len(keep), E, dtype=torch.float64)
    A_GE[torch.arange(len(keep)), torch.tensor(keep)] = 1.0
    return combine_expert_dim(layer, A_GE)


def prune_model(model: nn.Module, loads: dict[str, Tensor], *, keep: int | None = None,
                min_share: float | None = None) -> tuple[nn.Module, dict[str, list[int]]]:
    """Prune every MoE layer by its measured load (see ``select_experts``); edits ``model`` in place.
    Returns the model and the kept expert indices per layer."""
    kept: dict[str, list[int]] = {}
    for name, layer in moe_layers(model).items():
        if name not in loads:
            raise ValueError(f"loads has no entry for MoE layer {name!r}; measure_loads(model, ...) first")
        kept[name] = select_experts(loads[name], keep=keep, min_share=min_share)
        model = replace_module(model, name, prune_layer(layer, kept[name]))
    return model, kept
