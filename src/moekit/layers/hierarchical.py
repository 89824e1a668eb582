"""Hierarchical MoE (Shazeer et al. 2017, sec. B): a top-level router over G groups, each group itself an
MoE layer over E/G experts. The top level is an ordinary assignment list whose "experts" are MoE layers:
its router is any registered router (``MoEConfig.top_router``; default softmax top-k over the groups) and
it reuses the gate-weighted combine; each group routes only the rows it received.

The top router sees the tokens in their sequences (``seq_len``: a sequence-level top router, the
sequence-level aux loss); a group sees a subset of the tokens, each with its own task id and mask, and no
sequence structure (a sequence-level router inside the groups is refused by its own check).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.layers.dispatch import scatter_rows
from moekit.layers.losses import router_losses
from moekit.layers.moe import MoELayer
from moekit.layers.output import MoEAux, MoEOutput, flatten_tokens, seq_len_of, token_ids_T
from moekit.layers.routing import build_router


def subset(ids_T: Tensor | None, tok: Tensor) -> Tensor | None:
    return None if ids_T is None else ids_T.index_select(0, tok)


class HierarchicalMoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        top, inner = cfg.group_configs()
        self.router = build_router(top)
        self.groups = nn.ModuleList(MoELayer(inner) for _ in range(cfg.hierarchical_groups))
        self.causal_safe = self.router.causal_safe and all(g.router.causal_safe for g in self.groups)

    def active_params(self) -> int:
        """Top router + the active parameters of top_k of the G groups."""
        k_top = self.router.top_k
        group = self.groups[0].active_params()
        return sum(p.numel() for p in self.router.parameters()) + k_top * group

    def update_bias(self, counts_E: Tensor) -> None:
        """Aux-loss-free balancing inside each group: ``counts_E`` is the layer's concatenated per-group
        loads (``MoEAux.counts_E``); every group's router with a selection bias steps on its own slice."""
        for layer, counts_e in zip(self.groups, counts_E.chunk(len(self.groups))):
            update = getattr(layer.router, "update_bias", None)
            if update is not None:
                update(counts_e)

    def forward(self, x: Tensor, *, task_ids: Tensor | None = None, mask: Tensor | None = None) -> MoEOutput:
        x_TD = flatten_tokens(x, self.cfg.d_model)
        lead = tuple(x.shape[:-1])
        task_T, mask_T = token_ids_T(task_ids, lead, "task_ids"), token_ids_T(mask, lead, "mask")
        top = self.router(x_TD, seq_len=seq_len_of(lead), task_ids_T=task_T)
        outs, rows = [], []
        for g, layer in enumerate(self.groups):
            tok = top.token_N[top.expert_N == g]
            outs.append(layer(x_TD.index_select(0, tok), task_ids=subset(task_T, tok), mask=subset(mask_T, tok)))
            rows.append(tok)
        order_R = torch.argsort(top.expert_N, stable=True)  # the rows grouped as above: by group, in order
        y_RD = torch.cat([o.y for o in outs])
        y_TD = scatter_rows(y_RD, torch.cat(rows), x_TD.shape[0], top.weight_N[order_R])
        # the top level is balanced with the same losses as a flat layer (its terms suffixed "_top")
        top_terms, top_total = router_losses(top, self.cfg.loss, seq_len_of(lead), mask_T)
        losses: dict[str, Tensor] = {}
        for o in outs:
            for k, v in o.aux.losses.items():
                losses[k] = losses.get(k, 0.0) + v / len(self.groups)
        losses.update({f"{k}_top": v.detach() for k, v in top_terms.items()})
        counts_E = torch.cat([o.aux.counts_E for o in outs])
        aux = MoEAux(logits_TE=top.logits_TE, counts_E=counts_E,
                     dropped_fraction=torch.stack([o.aux.dropped_fraction for o in outs]).mean(),
                     experts_per_token=top.logits_TE.new_tensor(float(counts_E.sum()) / max(top.num_tokens, 1)),
                     losses=losses, loss=sum((o.aux.loss for o in outs), top_total), probs_TE=top.probs_TE.detach())
        return MoEOutput(y_TD.view(x.shape), aux)
