"""Expert merging: replace groups of experts by one expert each.

Grouping (``group_experts``):
  "frequency":  the G most used experts are group centres; every other expert joins the centre it is
                most similar to (M-SMoE, Li et al. 2023, "Merge, Then Compress").
  "similarity": average-linkage agglomerative clustering on cosine similarity, merging the two most
                similar groups until G remain.
Similarity is the cosine of the flattened expert weights, or of the router rows.

Merging: a group's weights are the routing-frequency-weighted average of its members,
  W_g = sum_{e in g} f_e W_e / sum_{e in g} f_e   (uniform if the group was never used).

Router rewrite, two choices:
  "map" (default): keep the original router and map its choices many-to-one (``GroupRouter``). Every
      token keeps exactly the router's decisions and gate weights; a merged expert receives the sum of
      its members' weights. Since an expert's output is linear in its gate weight, merging identical
      experts is then exact, and in general only the expert weights change. Group logits are
      logsumexp of member logits, so softmax over groups equals the summed member probabilities.
  "average": a standard G-row router whose rows are the frequency-weighted member rows. Portable (an
      ordinary MoE layer), but no linear router reproduces the summed member probabilities
      (logsumexp is not linear), so routing decisions drift; the benchmark shows the cost.

Legend: E experts before, G groups (experts after), T tokens, N assignments, M coalesced assignments.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.deploy import moe_layers, replace_module
from moekit.deploy.prune import combine_expert_dim
from moekit.errors import UsageError
from moekit.layers.moe import MoELayer
from moekit.layers.routing import Router, Routing

GROUPINGS = ("frequency", "similarity")
SIMILARITIES = ("weights", "router")
ROUTER_MODES = ("map", "average")


def expert_vectors(layer: MoELayer, by: str = "weights") -> Tensor:
    """[E, P]: each expert's flattened weights, or its router row."""
    if by == "router":
        return _base_router(layer.router).gate.weight.detach().float()
    if by != "weights":
        raise ValueError(f"by={by!r}: must be one of {list(SIMILARITIES)}")
    ex = layer.experts
    parts = [w for w in (ex.w_gate_EFD, ex.w_up_EFD, ex.w_down_EDF) if w is not None]
    return torch.cat([w.detach().float().flatten(1) for w in parts], dim=1)


def cosine_similarity_EE(v_EP: Tensor) -> Tensor:
    v = F.normalize(v_EP.double(), dim=1)
    return v @ v.t()


def group_experts(num_groups: int, *, counts_E: Tensor, sim_EE: Tensor, strategy: str = "frequency"
                  ) -> list[list[int]]:
    """Partition the E experts into ``num_groups`` groups (see the module docstring). Sorted lists."""
    E = sim_EE.shape[0]
    if not (isinstance(num_groups, int) and 1 <= num_groups <= E):
        raise UsageError(f"num_groups={num_groups!r}: must be an integer in [1, num_experts={E}]")
    if strategy == "frequency":
        centres = torch.argsort(counts_E.double(), descending=True, stable=True)[:num_groups].tolist()
        groups = {c: [c] for c in centres}
        for e in range(E):
            if e not in groups:
                groups[max(centres, key=lambda c: float(sim_EE[e, c]))].append(e)
        return sorted(sorted(g) for g in groups.values())
    if strategy != "similarity":
        raise ValueError(f"strategy={strategy!r}: must be one of {list(GROUPINGS)}")
    groups = [[e] for e in range(E)]
    while len(groups) > num_groups:
        best, pair = -float("inf"), (0, 1)
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                s = float(sim_EE[groups[i]][:, groups[j]].mean())
                if s > best:
                    best, pair = s, (i, j)
        i, j = pair
        groups[i] = sorted(groups[i] + groups.pop(j))
    return sorted(groups)


def merge_matrix(groups: Sequence[Sequence[int]], counts_E: Tensor | None, num_experts: int) -> Tensor:
    """A_GE: row g holds the frequency weights f_e / sum_{e in g} f_e of its members (uniform if unused)."""
    members = sorted(e for g in groups for e in g)
    if members != list(range(num_experts)):
        raise ValueError(f"groups={list(map(list, groups))}: must partition the experts 0..{num_experts - 1}")
    f_E = torch.ones(num_experts, dtype=torch.float64) if counts_E is None else counts_E.double().cpu()
    A_GE = torch.zeros(len(groups), num_experts, dtype=torch.float64)
    for g, idx in enumerate(groups):
        w = f_E[list(idx)]
        A_GE[g, list(idx)] = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(idx))
    return A_GE


def map_routing(r: Routing, group_of_E: Tensor, num_groups: int) -> Routing:
    """Re-point assignments to groups; a token sent to several members of one group gets one assignment
    with the summed weight (and the best rank). Logits become per-group logsumexp, probs per-group sums."""
    G = num_groups
    key_N = r.token_N * G + group_of_E[r.expert_N]
    key_M, inv_N = torch.unique(key_N, sorted=True, return_inverse=True)  # token-major, like the routers
    weight_M = r.weight_N.new_zeros(key_M.numel()).index_add_(0, inv_N, r.weight_N)
    rank_M = torch.full_like(key_M, r.num_experts).scatter_reduce_(0, inv_N, r.rank_N, "amin")
    onehot_EG = F.one_hot(group_of_E, G).to(r.probs_TE.dtype)
    m_T1 = r.logits_TE.amax(dim=-1, keepdim=True)
    logits_TG = torch.log((r.logits_TE - m_T1).exp() @ onehot_EG) + m_T1
    extra = {k: v @ onehot_EG for k, v in r.extra.items() if v.shape == r.logits_TE.shape}
    return Routing(key_M // G, key_M % G, weight_M, rank_M, logits_TG, r.probs_TE @ onehot_EG,
                   r.num_tokens, G, r.top_k, extra)


class GroupRouter(nn.Module):
    """The original router over E experts, its choices mapped to G merged experts (``map_routing``)."""

    def __init__(self, router: Router, group_of_E: Tensor, num_groups: int, inner_cfg: MoEConfig):
        super().__init__()
        self.inner = router
        self.inner_cfg = inner_cfg  # the original layer config the inner router was built from (saving)
        self.register_buffer("group_of_E", group_of_E.long().clone())
        self.num_experts = num_groups
        self.top_k = router.top_k

    @property
    def gate(self) -> nn.Linear:
        return self.inner.gate

    def forward(self, x_TD: Tensor, **ctx) -> Routing:
        return map_routing(self.inner(x_TD, **ctx), self.group_of_E, self.num_experts)


def _base_router(router: nn.Module) -> Router:
    return router.inner if isinstance(router, GroupRouter) else router


def merge_layer(layer: MoELayer, groups: Sequence[Sequence[int]], counts_E: Tensor | None = None,
                router: str = "map") -> MoELayer:
    """A new layer with one expert per group: frequency-weighted member averages; router per ``router``."""
    if router not in ROUTER_MODES:
        raise ValueError(f"router={router!r}: must be one of {list(ROUTER_MODES)}")
    if isinstance(layer.router, GroupRouter):
        raise UsageError("layer is already merged; merge the original model again with fewer groups")
    E = layer.cfg.num_experts
    A_GE = merge_matrix(groups, counts_E, E)
    if len(groups) == E:
        return copy.deepcopy(layer)
    new = combine_expert_dim(layer, A_GE, include_router=(router == "average"))
    if router == "map":
        group_of_E = torch.empty(E, dtype=torch.long)
        for g, idx in enumerate(groups):
            group_of_E[list(idx)] = g
        device = next(layer.parameters()).device
        new.router = GroupRouter(copy.deepcopy(layer.router), group_of_E, len(groups), layer.cfg).to(device)
    return new


def merge_model(model: nn.Module, loads: dict[str, Tensor], num_groups: int, *, strategy: str = "frequency",
                similarity: str = "router", router: str = "map") -> tuple[nn.Module, dict[str, list[list[int]]]]:
    """Merge every MoE layer down to ``num_groups`` experts; edits ``model`` in place.
    ``loads``: measured counts per layer (``prune.measure_loads``). Returns the model and the groups."""
    all_groups: dict[str, list[list[int]]] = {}
    for name, layer in moe_layers(model).items():
        if name not in loads:
            raise ValueError(f"loads has no entry for MoE layer {name!r}; measure_loads(model, ...) first")
        sim_EE = cosine_similarity_EE(expert_vectors(layer, similarity))
        groups = group_experts(num_groups, counts_E=loads[name], sim_EE=sim_EE, strategy=strategy)
        all_groups[name] = groups
        model = replace_module(model, name, merge_layer(layer, groups, loads[name], router))
    return model, all_groups
