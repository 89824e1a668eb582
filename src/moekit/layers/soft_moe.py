"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Per sequence X [m, D] and learned slot parameters Phi [D, E*p] (p slots per expert):
    logits = X Phi                       [m, E*p]
    D = softmax over tokens (columns)     slot inputs  X~ = D^T X       [E*p, D]
    C = softmax over slots (rows)         outputs      Y  = C f(X~)     [m, D]
where expert e processes its own p slots. Every slot mixes all tokens of the sequence, so a token's
output depends on later tokens: Soft MoE is not causal and a decoder LM refuses it unless
``MoEConfig.allow_noncausal`` is set. No tokens are dropped; the layer has no load-balancing loss.
Padding (``mask`` = 0) takes no part in any slot (its dispatch logits are -inf-like) and gets output 0.
Sequences are the input's second-to-last dim ([..., S, D]; a [T, D] input is one sequence).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.layers.experts import MLP, GroupedExperts
from moekit.layers.output import MoEAux, MoEOutput, flatten_tokens, token_ids_T


class SoftMoELayer(nn.Module):
    causal_safe = False

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, p, D = cfg.num_experts, cfg.router.slots_per_expert, cfg.d_model
        self.slots = E * p
        # Phi, stored like a Linear weight [E*p, D]; the paper normalises X and Phi for large D (omitted)
        self.phi = nn.Linear(D, self.slots, bias=False)
        self.experts = GroupedExperts(E, D, cfg.expert_hidden, cfg.activation, cfg.expert_dropout,
                                      backend=cfg.experts, bias=cfg.bias)
        self.shared = MLP(D, cfg.num_shared_experts * cfg.shared_hidden_size, cfg.activation, bias=cfg.bias) \
            if cfg.num_shared_experts else None

    def active_params(self) -> int:
        """Every expert processes slots that mix every token: all parameters are active."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: Tensor, *, task_ids: Tensor | None = None, mask: Tensor | None = None) -> MoEOutput:
        """x: [..., S, D]; mask: [..., S] 1 = real token; no task routing (``task_ids`` must be None)."""
        if task_ids is not None:
            raise ValueError("task_ids: RouterConfig.kind='soft' does not route by task; use kind='task'")
        x_TD = flatten_tokens(x, self.cfg.d_model)
        # [..., M, D] -> [B, M, D]; a 2-D input is one sequence (math.prod(()) = 1)
        x_BMD = x_TD.view(math.prod(x.shape[:-2]), *x.shape[-2:]) if x.dim() >= 2 else x_TD[None]
        B, M, D = x_BMD.shape
        E, p = self.cfg.num_experts, self.cfg.router.slots_per_expert
        mask_T = token_ids_T(mask, tuple(x.shape[:-1]), "mask")
        with torch.autocast(device_type=x.device.type, enabled=False):  # slot softmaxes in >= float32
            dt = torch.promote_types(x.dtype, torch.float32)
            logits_BMS = torch.nn.functional.linear(x_BMD.to(dt), self.phi.weight.to(dt))
            token_logits_BMS = logits_BMS
            if mask_T is not None:  # the lowest finite value, not -inf: an all-padding sequence stays finite
                pad_BM1 = (mask_T == 0).view(B, M, 1)
                token_logits_BMS = logits_BMS.masked_fill(pad_BM1, torch.finfo(dt).min)
            dispatch_BMS = token_logits_BMS.softmax(dim=1)  # over tokens: each slot is a convex mix of tokens
            combine_BMS = logits_BMS.softmax(dim=2)  # over slots: each output a convex mix of slots
        slots_BSD = torch.einsum("bms,bmd->bsd", dispatch_BMS.to(x.dtype), x_BMD)
        # expert e's rows: its p slots of every sequence -> contiguous [E, B*p, D] blocks
        rows_RD = slots_BSD.view(B, E, p, D).transpose(0, 1).reshape(E * B * p, D)
        counts_E = torch.full((E,), B * p, dtype=torch.long, device=x.device)
        y_RD = self.experts(rows_RD, counts_E, uniform_rows=True)
        y_BSD = y_RD.view(E, B, p, D).transpose(0, 1).reshape(B, E * p, D)
        y_BMD = torch.einsum("bms,bsd->bmd", combine_BMS.to(y_BSD.dtype), y_BSD)
        y_TD = y_BMD.reshape(-1, D)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        if mask_T is not None:
            y_TD = y_TD * (mask_T != 0).to(y_TD.dtype)[:, None]
        # per-expert logit for statistics: its softmax is each token's combine mass per expert
        logits_TE = logits_BMS.reshape(-1, self.slots).view(-1, E, p).logsumexp(-1)
        aux = MoEAux(logits_TE=logits_TE, counts_E=counts_E, dropped_fraction=logits_TE.new_zeros(()),
                     experts_per_token=logits_TE.new_tensor(float(E)), losses={},
                     loss=logits_TE.new_zeros(()))
        return MoEOutput(y_TD.view(x.shape), aux)
