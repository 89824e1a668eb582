"""``patch(hf_model)``: swap the MoE blocks of a loaded transformers model for moekit's MoELayer in place.

The HF model keeps its attention, embeddings, generation and loss code; only ``model.layers[i].mlp`` (the
sparse MoE block) changes. Weights are copied from the HF block by one declarative table (HF block tensor
-> MoELayer tensor, with the split of HF's fused ``gate_up_proj``), so outputs are identical.

Router logits: transformers collects them with forward hooks on instances of its router class
(``output_router_logits=True`` -> ``outputs.router_logits`` and the load-balancing loss). The HF router
module is kept as ``block.gate``, its weight shared with moekit's router, and re-classed so that calling
it only echoes the logits moekit computed: the hooks fire exactly as before and see the same tensor.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from moekit.interop.hf import family_of
from moekit.layers.moe import MoELayer

# (HF block tensor, MoELayer tensor, transform); transforms act on the HF tensor
BLOCK_KEYS = [
    ("gate.weight", "router.gate.weight", None),
    ("gate.e_score_correction_bias", "router.bias", None),  # DeepSeek-V3 selection bias
    ("experts.gate_up_proj", "experts.w_gate_EFD", "first_half"),  # [E, 2F, D]: gate rows, then up rows
    ("experts.gate_up_proj", "experts.w_up_EFD", "second_half"),
    ("experts.down_proj", "experts.w_down_EDF", None),
    ("shared_expert.gate_proj.weight", "shared.w_gate.weight", None),  # Qwen2-MoE
    ("shared_expert.up_proj.weight", "shared.w_up.weight", None),
    ("shared_expert.down_proj.weight", "shared.w_down.weight", None),
    ("shared_expert_gate.weight", "shared_gate.weight", None),
    ("shared_experts.gate_proj.weight", "shared.w_gate.weight", None),  # DeepSeek-V3
    ("shared_experts.up_proj.weight", "shared.w_up.weight", None),
    ("shared_experts.down_proj.weight", "shared.w_down.weight", None),
]
TRANSFORMS = {None: lambda t: t, "first_half": lambda t: t.chunk(2, dim=-2)[0],
              "second_half": lambda t: t.chunk(2, dim=-2)[1]}


class _RouterLogitsEcho:
    """Mixed in front of the HF router class: forward(logits) returns HF's (logits, weights, indices) shape
    with the logits moekit computed, so transformers' output-recording hooks (index 0) see them."""

    def forward(self, logits_TE: Tensor):
        return logits_TE, None, None


def _echo(router: nn.Module) -> nn.Module:
    router.__class__ = type(f"Echo{type(router).__name__}", (_RouterLogitsEcho, type(router)), {})
    return router


class PatchedMoEBlock(nn.Module):
    """moekit's MoELayer behind the HF block interface: hidden_states [B, S, D] -> [B, S, D]."""

    def __init__(self, moe: MoELayer, hf_router: nn.Module):
        super().__init__()
        self.moe = moe
        self.gate = _echo(hf_router)
        self.moe.router.gate.weight = self.gate.weight  # one parameter, visible under both names

    def forward(self, hidden_states: Tensor) -> Tensor:
        out = self.moe(hidden_states)
        logits_TE = out.aux.logits_TE
        self.gate(logits_TE.to(hidden_states.dtype))
        return out.y


def moe_state_from_block(block: nn.Module, layer: MoELayer) -> dict[str, Tensor]:
    """MoELayer state dict built from an HF sparse MoE block by BLOCK_KEYS; shapes checked."""
    src = block.state_dict()
    want = layer.state_dict()
    out = {}
    for hk, mk, transform in BLOCK_KEYS:
        if hk in src and mk in want:
            t = TRANSFORMS[transform](src[hk])
            if tuple(t.shape) != tuple(want[mk].shape):
                raise ValueError(f"HF block tensor {hk!r} gives shape {tuple(t.shape)} for {mk!r}, expected "
                                 f"{tuple(want[mk].shape)}")
            out[mk] = t
    missing = sorted(set(want) - set(out))
    if missing:
        raise ValueError(f"HF block {type(block).__name__} has no tensors for moekit's {missing}")
    return out


def patch(hf_model: nn.Module, dispatcher: str = "local", experts: str = "auto") -> nn.Module:
    """Replace every sparse MoE block of a transformers causal LM (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
    DeepSeek-V3) by moekit's MoELayer with the same weights; returns the same model object.

    The patched blocks' parameters are moekit's (``mlp.moe.*``); export with ``moekit.interop.hf.save_hf``
    after ``load_hf``-style conversion, not with ``save_pretrained``.
    """
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"hf_model must be a transformers PreTrainedModel, got {type(hf_model).__name__}")
    moe_cfg = family_of(config.to_dict()).to_moekit(config.to_dict()).moe
    moe_cfg = dataclasses.replace(moe_cfg, dispatcher=dispatcher, experts=experts)  # validated by MoEConfig
    layers = getattr(getattr(hf_model, "model", hf_model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(hf_model).__name__} has no .model.layers: not a supported decoder LM")
    n = 0
    for layer in layers:
        block = layer.mlp
        if isinstance(block, PatchedMoEBlock) or not hasattr(block, "experts"):
            continue  # already patched, or a dense layer (DeepSeek first_k_dense, Qwen mlp_only_layers)
        ref = block.gate.weight
        moe = MoELayer(moe_cfg).to(device=ref.device, dtype=ref.dtype)
        moe.load_state_dict(moe_state_from_block(block, moe))
        layer.mlp = PatchedMoEBlock(moe, block.gate).train(block.training)
        n += 1
    if n == 0:
        raise ValueError(f"{type(hf_model).__name__}: no sparse MoE blocks found to patch")
    return hf_model
