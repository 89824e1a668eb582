"""``patch(hf_model)``: swap the sparse MoE blocks of a loaded transformers model for moekit's MoELayer in place.

The HF model keeps its attention, embeddings, dense FFN layers, generation and loss code; only the modules of
the family's sparse-block class (``patch_families.PATCH_FAMILIES``) change. Weights come from the HF block by the
entry's key map, so outputs and gradients are the same function.

Router logits: transformers collects them with forward hooks on instances of its router class
(``output_router_logits=True`` -> ``outputs.router_logits`` and the load-balancing loss). The HF router module
is kept under its own name (``block.gate``, ``block.router``: some recorders match the module path), its weight
(and bias, gpt-oss) shared with moekit's router, and re-classed so that calling it only echoes the logits moekit
computed: the hooks fire exactly as before and see the same tensor.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from moekit.config import LossConfig, MoEConfig
from moekit.errors import UsageError
from moekit.interop.patch_families import NOT_PATCHABLE, PATCH_FAMILIES, TRANSFORMS, PatchEntry
from moekit.layers.moe import MoELayer


def _echo(router: nn.Module, logits_index: int) -> nn.Module:
    """Re-class the HF router so forward(logits) returns its output tuple with moekit's logits at the index
    transformers' recorder reads (0 for most routers, 1 for Llama 4, 4 for JetMoE)."""
    def forward(self, logits_TE: Tensor):
        return (None,) * logits_index + (logits_TE,)

    router.__class__ = type(f"Echo{type(router).__name__}", (type(router),), {"forward": forward})
    return router


class PatchedMoEBlock(nn.Module):
    """moekit's MoELayer behind the HF block interface: hidden_states [B, S, D] -> [B, S, D] (or, with
    ``pair_output``, ([B, S, D], router logits [B*S, E]) for a decoder layer that unpacks a pair)."""

    def __init__(self, moe: MoELayer, router_name: str, hf_router: nn.Module, router_params: dict[str, nn.Parameter],
                 logits_index: int, jitter_eps: float = 0.0, output_bias: nn.Parameter | None = None,
                 jitter_draws: int = 1, pair_output: bool = False):
        super().__init__()
        self.moe = moe
        for name, p in router_params.items():  # one parameter each ("weight", "bias"), also the HF router's
            setattr(self.moe.router.gate, name, p)
        self.router_name = router_name
        router = _echo(hf_router, logits_index)
        for m in router.modules():  # its tensors now live in moekit's router: one copy for prune/merge/state dicts
            for tensors in (m._parameters, m._buffers):
                tensors.update(dict.fromkeys(tensors))  # None, like an nn.Linear without bias
        self.add_module(router_name, router)
        # Mixtral/DBRX/PhiMoE multiply the block input (router and experts see it) by U(1-eps, 1+eps) in
        # training (PhiMoE twice: its block and its router each multiply the same tensor in place)
        self.jitter_eps = jitter_eps
        self.jitter_draws = jitter_draws
        self.bias = output_bias
        self.pair_output = pair_output

    def forward(self, hidden_states: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = hidden_states
        if self.training and self.jitter_eps > 0:
            # in place, as transformers does: MiniMax reuses the block input as its residual, so the noise
            # reaches the residual too
            for _ in range(self.jitter_draws):
                x *= torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        out = self.moe(x)
        logits_TE = out.aux.logits_TE.to(x.dtype)
        getattr(self, self.router_name)(logits_TE)
        y = out.y if self.bias is None else out.y + self.bias
        return (y, logits_TE) if self.pair_output else y


def entry_for(config: Any) -> PatchEntry:
    mt = getattr(config, "model_type", None)
    if mt in NOT_PATCHABLE:
        raise UsageError(f"model_type={mt!r}: patch cannot reproduce this family: {NOT_PATCHABLE[mt]}; "
                         f"patchable: {', '.join(sorted(PATCH_FAMILIES))}")
    if mt not in PATCH_FAMILIES:
        raise UsageError(f"model_type={mt!r}: no patch entry; patchable: {', '.join(sorted(PATCH_FAMILIES))}")
    return PATCH_FAMILIES[mt]


def block_tensors(entry: PatchEntry, block: nn.Module) -> dict[str, Tensor]:
    """MoELayer tensors from an HF block by the entry's key map; every HF tensor must find a place."""
    src = block.state_dict()
    E = _num_experts(entry, src)
    out = {mk: TRANSFORMS[t](src[hk], E) for hk, mk, t in entry.keys if hk in src}
    left = sorted(set(src) - {hk for hk, _, _ in entry.keys} - {entry.output_bias})
    if left:
        raise UsageError(f"{type(block).__name__} holds tensors moekit's MoELayer has no place for: {left}; "
                         "patching would change the outputs")
    return out


def _num_experts(entry: PatchEntry, src: dict[str, Tensor]) -> int:
    router_key = next(hk for hk, mk, _ in entry.keys if mk == "router.gate.weight")
    return src[router_key].shape[0]


def moe_config(entry: PatchEntry, text_cfg: Any, layer: int, tensors: dict[str, Tensor],
               dispatcher: str = "local", experts: str = "auto") -> MoEConfig:
    E, D = tensors["router.gate.weight"].shape
    shared = tensors.get("shared.w_up.weight")
    router = replace(entry.gating(text_cfg, layer), gate_bias="router.gate.bias" in tensors)
    return MoEConfig(d_model=D, num_experts=E, expert_hidden=tensors["experts.w_up_EFD"].shape[1],
                     activation=entry.activation(text_cfg), bias="experts.b_up_EF" in tensors,
                     num_shared_experts=int(shared is not None), shared_hidden=0 if shared is None else shared.shape[0],
                     shared_gate="shared_gate.weight" in tensors, gate_input=entry.gate_input, dispatcher=dispatcher,
                     experts=experts, router=router, loss=LossConfig(aux_coef=0.0))


def _logits_index(hf_model: nn.Module, router: nn.Module) -> int:
    for m in hf_model.modules():  # Llama 4 declares its recorders on the text model, not on the LM class
        specs = (getattr(m, "_can_record_outputs", None) or {}).get("router_logits", [])
        for spec in specs if isinstance(specs, list) else [specs]:
            target = getattr(spec, "target_class", spec)
            if isinstance(target, type) and isinstance(router, target):
                return getattr(spec, "index", 1)  # a bare class records index 1 (transformers' rule)
    return 0


def layer_index(name: str) -> int:
    found = re.findall(r"\.(\d+)(?:\.|$)", name)
    return int(found[-1]) if found else 0


def patched_block(hf_model: nn.Module, entry: PatchEntry, block: nn.Module, layer: int,
                  dispatcher: str = "local", experts: str = "auto") -> PatchedMoEBlock:
    text_cfg = hf_model.config.get_text_config()
    tensors = block_tensors(entry, block)
    cfg = moe_config(entry, text_cfg, layer, tensors, dispatcher, experts)
    w = tensors["experts.w_up_EFD"]
    moe = MoELayer(cfg).to(device=w.device, dtype=w.dtype)
    moe.router.float()  # router maths and the DeepSeek selection bias stay float32, as in HF
    missing, unexpected = moe.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"router.bias"}:  # DeepSeek-V2 has no selection bias: moekit's stays 0
        raise RuntimeError(f"{entry.block} key map: MoELayer tensors missing {missing}, unexpected {unexpected}")
    router = block.get_submodule(entry.router)
    router_params = {mk.removeprefix("router.gate."): block.get_parameter(hk) for hk, mk, _ in entry.keys
                     if mk.startswith("router.gate.")}
    bias = block.get_parameter(entry.output_bias) if entry.output_bias else None
    patched = PatchedMoEBlock(moe, entry.router, router, router_params,
                              _logits_index(hf_model, router),
                              entry.jitter_eps(text_cfg), bias, entry.jitter_draws, entry.pair_output)
    return patched.train(block.training)


def patch(hf_model: nn.Module, dispatcher: str = "local", experts: str = "auto") -> nn.Module:
    """Replace every sparse MoE block of a transformers model (any family in ``PATCH_FAMILIES``) by moekit's
    MoELayer with the same weights; returns the same model object.

    The patched blocks' parameters are moekit's (``...mlp.moe.*``); to get an HF checkpoint back, convert with
    ``moekit.interop.hf``, not ``save_pretrained``.
    """
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise TypeError(f"hf_model must be a transformers PreTrainedModel, got {type(hf_model).__name__}")
    entry = entry_for(config)
    blocks = [(name, m) for name, m in hf_model.named_modules() if type(m).__name__ == entry.block]
    for name, block in blocks:
        hf_model.set_submodule(name, patched_block(hf_model, entry, block, layer_index(name),
                                                         dispatcher, experts))
    if not blocks and not any(isinstance(m, PatchedMoEBlock) for m in hf_model.modules()):
        raise UsageError(f"{type(hf_model).__name__}: no {entry.block} modules found to patch")
    return hf_model
