"""MoELayer: router -> capacity -> dispatcher -> experts -> combine (+ shared experts).

A drop-in replacement for a transformer FFN: input [..., D] -> output of the same shape, plus an
``MoEAux`` record. Tokens dropped by capacity get 0 from the routed experts (the residual
connection around the layer carries them), and are counted.
"""

from __future__ import annotations

import torch
from dataclasses import replace

from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.layers import losses
from moekit.layers.capacity import capacity_filter
from moekit.layers.dispatch import DISPATCHERS
from moekit.layers.experts import MLP, GroupedExperts
from moekit.layers.output import MoEAux, MoEOutput, flatten_tokens, seq_len_of, token_ids_T
from moekit.layers.routing import Routing, build_router


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg)
        self.experts = GroupedExperts(cfg.num_experts, cfg.d_model, max(cfg.hidden_sizes), cfg.activation,
                                      cfg.expert_dropout, backend=cfg.experts, hidden_sizes=cfg.hidden_sizes,
                                      bias=cfg.bias)
        # any object implementing the dispatcher protocol (dispatch.py); moekit.distributed.parallelize plugs
        # in the expert-parallel one (self.experts then holds only this rank's experts)
        self.dispatcher = DISPATCHERS[cfg.dispatcher](cfg)
        self.shared = None
        self.shared_gate = None
        if cfg.num_shared_experts > 0:
            # n shared experts of width h are one MLP of width n*h (DeepSeekMoE, Dai et al. 2024)
            self.shared = MLP(cfg.d_model, cfg.num_shared_experts * cfg.shared_hidden_size, cfg.activation,
                              bias=cfg.bias)
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
        routing = self.router(x_TD, seq_len=seq_len_of(lead), task_ids_T=token_ids_T(task_ids, lead, "task_ids"))
        kept = capacity_filter(routing, self.cfg.capacity, self.training)
        if self.cfg.gate_input:
            y_TD = self.run_gated_inputs(x_TD, kept)
        else:
            y_TD = self.dispatcher.run(x_TD, kept, self.experts)
        if self.shared is not None:
            y_TD = y_TD + self.shared_out(x_TD)
        aux = self._aux(routing, kept, seq_len_of(lead), token_ids_T(mask, lead, "mask"))
        return MoEOutput(y_TD.view(x.shape), aux)

    def run_gated_inputs(self, x_TD: Tensor, kept: Routing) -> Tensor:
        """Llama 4: y_t = sum over t's assignments (e, w) of expert_e(w x_t), the gate on the input. Each
        assignment becomes a row of its own, scaled, and goes through the dispatcher with weight 1."""
        N = kept.num_assignments
        x_ND = x_TD.index_select(0, kept.token_N) * kept.weight_N.to(x_TD.dtype)[:, None]
        rows = replace(kept, token_N=torch.arange(N, device=x_TD.device), weight_N=kept.weight_N.new_ones(N),
                       num_tokens=N)
        y_ND = self.dispatcher.run(x_ND, rows, self.experts)
        return y_ND.new_zeros(x_TD.shape[0], y_ND.shape[-1]).index_add(0, kept.token_N, y_ND)

    def shared_out(self, x_TD: Tensor) -> Tensor:
        # the sigmoid gate is a per-row factor of the FFN (scaling its hidden units when narrower than D,
        # fused into SwiGLU's pass on the CPU): the same function as gating the output
        gate_T = None if self.shared_gate is None else torch.sigmoid(self.shared_gate(x_TD)).squeeze(-1)
        return self.shared(x_TD, scale=gate_T)

    def _aux(self, routing: Routing, kept: Routing, seq_len: int | None, mask_T: Tensor | None) -> MoEAux:
        terms, total = losses.router_losses(routing, self.cfg.loss, seq_len, mask_T)
        n_before = routing.num_assignments
        return MoEAux(
            logits_TE=routing.logits_TE,
            counts_E=kept.counts_E(),
            # no assignments (zero tokens): nothing was dropped
            dropped_fraction=routing.logits_TE.new_tensor(1.0 - kept.num_assignments / n_before if n_before else 0.0),
            experts_per_token=routing.logits_TE.new_tensor(kept.num_assignments / max(routing.num_tokens, 1)),
            losses={k: v.detach() for k, v in terms.items()},
            loss=total,
            probs_TE=routing.probs_TE.detach(),
        )
