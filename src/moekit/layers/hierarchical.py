"""Hierarchical MoE (Shazeer et al. 2017, sec. B): a top-level router over G groups, each group itself an
MoE layer over E/G experts. The top level is an ordinary assignment list whose "experts" are MoE layers,
so it reuses the Router and the gate-weighted combine; each group routes only the rows it received."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig, RouterConfig
from moekit.layers.losses import switch_aux_loss
from moekit.layers.moe import MoELayer
from moekit.layers.output import MoEAux, MoEOutput, flatten_tokens
from moekit.layers.routing import build_router


class HierarchicalMoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        G = cfg.hierarchical_groups
        # top level: softmax top-k over groups (k = min(top_k, G)); inner: the configured router over E/G
        top_router = RouterConfig(kind="softmax_topk", top_k=min(cfg.router.top_k, G))
        self.router = build_router(dataclasses.replace(cfg, num_experts=G, router=top_router,
                                                       hierarchical_groups=0))
        inner = dataclasses.replace(cfg, num_experts=cfg.num_experts // G, hierarchical_groups=0,
                                    num_shared_experts=0, router=dataclasses.replace(
                                        cfg.router, top_k=min(cfg.router.top_k, cfg.num_experts // G),
                                        n_groups=1, topk_groups=1))
        self.groups = nn.ModuleList(MoELayer(inner) for _ in range(G))
        self.causal_safe = all(g.router.causal_safe for g in self.groups)

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

    def forward(self, x: Tensor, **kw) -> MoEOutput:
        x_TD = flatten_tokens(x, self.cfg.d_model)
        top = self.router(x_TD)
        y_TD = torch.zeros_like(x_TD)
        counts, dropped, inner_losses = [], [], []
        losses: dict[str, Tensor] = {}
        for g, layer in enumerate(self.groups):
            sel = top.expert_N == g
            tok = top.token_N[sel]
            out = layer(x_TD.index_select(0, tok))
            y_TD = y_TD.index_add(0, tok, out.y * top.weight_N[sel].to(out.y.dtype)[:, None])
            counts.append(out.aux.counts_E)
            dropped.append(out.aux.dropped_fraction)
            inner_losses.append(out.aux.loss)
            for k, v in out.aux.losses.items():
                losses[k] = losses.get(k, 0.0) + v / len(self.groups)
        # the top level is balanced with the same Switch loss as a flat layer
        top_aux = switch_aux_loss(top.probs_TE, top.expert_N, top.token_N)
        losses["aux_top"] = top_aux.detach()
        total = sum(inner_losses, self.cfg.loss.aux_coef * top_aux)
        counts_E = torch.cat(counts)
        aux = MoEAux(logits_TE=top.logits_TE, counts_E=counts_E, dropped_fraction=torch.stack(dropped).mean(),
                     experts_per_token=top.logits_TE.new_tensor(
                         float(counts_E.sum()) / max(top.num_tokens, 1)), losses=losses, loss=total,
                     probs_TE=top.probs_TE.detach())
        return MoEOutput(y_TD.view(x.shape), aux)
