"""Sparse upcycling (Komatsuzaki et al. 2022): initialise an MoE model from a dense checkpoint.

Every expert of an MoE layer starts as a copy of that layer's dense FFN (optionally perturbed with
Gaussian noise of relative scale ``expert_noise``); the router starts small (N(0, router_std)); all
other weights are copied. With renormalised top-k weights (they sum to 1), k identical experts reproduce
the dense FFN exactly, so at step 0 the MoE computes the dense model's function.
"""

from __future__ import annotations

import dataclasses

import torch

from moekit.config import LossConfig, MoEConfig, RouterConfig
from moekit.errors import UsageError
from moekit.models.decoder import MoETransformer


@torch.no_grad()
def upcycle(dense: MoETransformer, num_experts: int = 8, top_k: int = 2, *, moe_layers: str = "all",
            router_std: float = 0.02, expert_noise: float = 0.0, aux_coef: float = 0.01,
            seed: int = 0) -> MoETransformer:
    if dense.cfg.moe is not None:
        raise UsageError("upcycle expects a dense model (ModelConfig.moe is None)")
    if not 1 <= top_k <= num_experts:
        raise UsageError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    c = dense.cfg
    # the experts copy the dense FFNs they replace (a dense twin's are narrower than dense_hidden)
    # and their activation (a GELU dense twin has no gate projection to copy)
    slots = dataclasses.replace(c, moe_layers=moe_layers)
    ffns = [dense.layers[i].ffn for i in range(c.n_layers) if slots.moe_slot(i)]
    widths, activations = {f.w_up.weight.shape[0] for f in ffns}, {f.act.name for f in ffns}
    if len(widths) != 1 or len(activations) != 1:
        raise UsageError(f"upcycle: the FFNs that become MoE layers have hidden sizes {sorted(widths)} and "
                         f"activations {sorted(activations)}; experts of one kind need one of each (try "
                         f"--moe-layers all or every_other)")
    moe = MoEConfig(d_model=c.d_model, num_experts=num_experts, expert_hidden=widths.pop(),
                    activation=activations.pop(), router=RouterConfig(top_k=top_k, renormalize=True),
                    loss=LossConfig(aux_coef=aux_coef))
    cfg = dataclasses.replace(c, moe=moe, moe_layers=moe_layers)
    model = MoETransformer(cfg)
    src = dense.state_dict()
    g = torch.Generator().manual_seed(seed)
    own = model.state_dict()
    for name, t in own.items():
        if name in src and src[name].shape == t.shape:
            t.copy_(src[name])
    for i, block in enumerate(model.layers):
        if not block.is_moe:
            continue
        mlp, experts = dense.layers[i].ffn, block.ffn.experts
        gate = [(experts.w_gate_EFD, mlp.w_gate)] if experts.gated else []
        for stacked, linear in gate + [(experts.w_up_EFD, mlp.w_up), (experts.w_down_EDF, mlp.w_down)]:
            w = linear.weight
            copies = w.detach()[None].repeat(num_experts, 1, 1)
            if expert_noise > 0:
                copies += torch.randn(copies.shape, generator=g) * expert_noise * w.detach().std()
            stacked.copy_(copies)
        block.ffn.router.gate.weight.copy_(torch.randn(block.ffn.router.gate.weight.shape, generator=g) * router_std)
    return model
