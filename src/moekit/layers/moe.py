"""MoELayer: router -> capacity -> dispatcher -> experts -> combine (+ shared experts).

A drop-in replacement for a transformer FFN: input [..., D] -> output of the same shape, plus an
``MoEAux`` record. Tokens dropped by capacity get 0 from the routed experts (the residual
connection around the layer carries them), and are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.layers import losses
from moekit.layers.capacity import capacity_filter, expert_capacity
from moekit.layers.dispatch import LocalDispatcher, PaddedDispatcher
from moekit.layers.experts import MLP, GroupedExperts
from moekit.layers.routing import Routing, build_router


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


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg)
        backend = cfg.dispatcher if cfg.dispatcher in ("loop", "grouped", "blockwise") else "auto"
        self.experts = GroupedExperts(cfg.num_experts, cfg.d_model, max(cfg.hidden_sizes), cfg.activation,
                                      cfg.expert_dropout, backend=backend, hidden_sizes=cfg.hidden_sizes)
        self.shared = None
        self.shared_gate = None
        # a plugged-in dispatcher overrides cfg.dispatcher (moekit.distributed.parallelize sets the
        # expert-parallel one; self.experts then holds only this rank's experts)
        self.dispatcher = None
        if cfg.num_shared_experts > 0:
            # n shared experts of width h are one MLP of width n*h (DeepSeekMoE, Dai et al. 2024)
            self.shared = MLP(cfg.d_model, cfg.num_shared_experts * cfg.shared_hidden_size, cfg.activation)
            if cfg.shared_gate:
                self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False)

    @property
    def causal_safe(self) -> bool:
        return self.router.causal_safe

    def active_params(self) -> int:
        """Parameters one token touches: everything but the (E - top_k) routed experts it skips."""
        # the experts held here may be this rank's shard under expert parallelism: count what is local
        total = sum(p.numel() for p in self.parameters())
        local_experts = self.experts.num_experts
        per_expert = sum(p.numel() for p in self.experts.parameters()) / local_experts
        return total - round(per_expert * (local_experts - self.cfg.router.top_k))

    def forward(self, x: Tensor, *, task_ids: Tensor | None = None, mask: Tensor | None = None) -> MoEOutput:
        """x: [..., D]; task_ids: [B] or [...] ints (task routing); mask: [...] 1 = real token (losses)."""
        x_TD = flatten_tokens(x, self.cfg.d_model)
        lead = tuple(x.shape[:-1])
        seq_len = lead[-1] if len(lead) >= 2 else None
        routing = self.router(x_TD, seq_len=seq_len, task_ids_T=token_ids_T(task_ids, lead, "task_ids"))
        mask_T = token_ids_T(mask, lead, "mask")
        kept = capacity_filter(routing, self.cfg.capacity, self.training)

        dispatcher = self._dispatcher(routing)
        if getattr(dispatcher, "pipelined", False):  # comm/compute overlap: the dispatcher drives the experts
            y_TD = dispatcher.pipeline(x_TD, kept, self.experts)
        elif type(dispatcher) is LocalDispatcher and self.experts.use_blockwise(x_TD):
            # gather, experts and combine fused per expert block (cache-resident; the CPU default)
            counts_E, meta = dispatcher.plan(x_TD.shape[0], kept)
            y_TD = self.experts.forward_blockwise(x_TD, meta.token_R, meta.weight_R, counts_E)
        else:
            x_RD, counts_E, meta = dispatcher.dispatch(x_TD, kept)
            if type(dispatcher) is LocalDispatcher and self.experts.hidden < self.cfg.d_model:
                # fine-grained experts (hidden F < D): apply the gate weights to the F-wide hidden rows instead
                # of the D-wide outputs (the down projection is linear): less memory traffic, same function
                y_RD = self.experts(x_RD, counts_E, scale_R=meta.weight_R)
                y_TD = dispatcher.combine(y_RD, meta, weighted=False)
            else:
                y_RD = self.experts(x_RD, counts_E, uniform_rows=meta.uniform_rows)
                y_TD = dispatcher.combine(y_RD, meta)
        if self.shared is not None:
            s_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                s_TD = torch.sigmoid(self.shared_gate(x_TD)) * s_TD
            y_TD = y_TD + s_TD
        return MoEOutput(y_TD.view(x.shape), self._aux(routing, kept, seq_len, mask_T))

    def _dispatcher(self, routing: Routing):
        if self.dispatcher is not None:
            return self.dispatcher
        if self.cfg.dispatcher != "padded":
            return LocalDispatcher()
        factor = self.cfg.capacity.capacity_factor if self.training else self.cfg.capacity.eval_capacity_factor
        cap = None if factor is None else expert_capacity(routing.num_tokens, routing.num_experts, routing.top_k,
                                                          factor, self.cfg.capacity.min_capacity)
        return PaddedDispatcher(cap)

    def _aux(self, routing: Routing, kept: Routing, seq_len: int | None, mask_T: Tensor | None) -> MoEAux:
        lc = self.cfg.loss
        terms: dict[str, Tensor] = {
            "aux": losses.switch_aux_loss(routing.probs_TE, routing.expert_N, routing.token_N, mask_T),
            "z": losses.router_z_loss(routing.logits_TE, mask_T),
        }
        if lc.importance_coef > 0:
            terms["importance"] = losses.importance_loss(routing.gates_TE(), mask_T)
        if lc.load_coef > 0 and "load_prob_TE" in routing.extra:
            terms["load"] = losses.load_loss(routing.extra["load_prob_TE"], mask_T)
        if lc.seq_aux_coef > 0 and seq_len is not None:
            terms["seq_aux"] = losses.seq_aux_loss(routing.probs_TE, routing.expert_N, routing.token_N, seq_len,
                                                   routing.top_k, mask_T)
        coef = {"aux": lc.aux_coef, "z": lc.z_coef, "importance": lc.importance_coef, "load": lc.load_coef,
                "seq_aux": lc.seq_aux_coef}
        total = sum((coef[k] * v for k, v in terms.items() if coef[k] > 0), routing.logits_TE.new_zeros(()))
        n_before = max(routing.num_assignments, 1)
        return MoEAux(
            logits_TE=routing.logits_TE,
            counts_E=kept.counts_E(),
            dropped_fraction=routing.logits_TE.new_tensor(1.0 - kept.num_assignments / n_before),
            experts_per_token=routing.logits_TE.new_tensor(kept.num_assignments / max(routing.num_tokens, 1)),
            losses={k: v.detach() for k, v in terms.items()},
            loss=total,
            probs_TE=routing.probs_TE.detach(),
        )


def build_moe_layer(cfg: MoEConfig) -> nn.Module:
    """The MoE layer a config asks for: Soft MoE (router kind "soft"), two-level (hierarchical_groups > 1),
    or the sparse MoELayer. All share the outer API: forward(x, ...) -> MoEOutput."""
    if cfg.router.kind == "soft":
        from moekit.layers.soft_moe import SoftMoELayer

        return SoftMoELayer(cfg)
    if cfg.hierarchical_groups > 1:
        from moekit.layers.hierarchical import HierarchicalMoE

        return HierarchicalMoE(cfg)
    return MoELayer(cfg)
