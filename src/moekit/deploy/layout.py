"""The structure of MoE layers that a model's config alone does not describe (pruned, merged, int8).

A model folder stores the config the untransformed model is built from plus, per transformed MoE layer,
a spec (its layer config, a merged many-to-one router over how many original experts, int8 experts);
``build_model`` recreates the exact module tree from the two before the tensors are loaded.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from moekit.config import ModelConfig, MoEConfig
from moekit.deploy import moe_layers, replace_module
from moekit.deploy.merge import GroupRouter
from moekit.deploy.offload import OffloadedExperts
from moekit.deploy.quantize import Int8Experts
from moekit.errors import UsageError
from moekit.layers.moe import MoELayer
from moekit.layers.routing import build_router
from moekit.models.decoder import MoETransformer


def layer_spec(layer: MoELayer) -> dict:
    """What ``build_layer`` needs to recreate this layer's module tree."""
    if isinstance(layer.experts, OffloadedExperts):
        raise UsageError("offloaded experts are a runtime view; save the model before offloading")
    spec: dict = {"config": layer.cfg.to_dict(), "int8": isinstance(layer.experts, Int8Experts)}
    if isinstance(layer.router, GroupRouter):
        spec["router_config"] = layer.router.inner_cfg.to_dict()
    return spec


def build_layer(spec: dict) -> MoELayer:
    layer = MoELayer(MoEConfig.from_dict(spec["config"]))
    if "router_config" in spec:
        inner_cfg = MoEConfig.from_dict(spec["router_config"])
        group_of_E = layer.router.gate.weight.new_zeros(inner_cfg.num_experts).long()  # loaded with the tensors
        layer.router = GroupRouter(build_router(inner_cfg), group_of_E, layer.cfg.num_experts, inner_cfg)
    if spec["int8"]:
        layer.experts = Int8Experts(layer.experts)
    return layer


def model_layout(model: nn.Module, config: dict) -> dict[str, dict]:
    """Qualified name -> spec of every MoE layer that ``build_model(config, {})`` would not build as it is:
    for an MoETransformer the layers that differ from ``config["moe"]``, for other models all of them."""
    plain = {"config": config.get("moe"), "int8": False} if isinstance(model, MoETransformer) else None
    specs = {name: layer_spec(layer) for name, layer in moe_layers(model).items()}
    return {name: spec for name, spec in specs.items() if spec != plain}


def build_transformer(config: dict) -> nn.Module:
    return MoETransformer(ModelConfig.from_dict(config))


def default_build(config: dict) -> nn.Module:
    """The untransformed model of a saved config: a patched transformers model for a pruned / merged /
    fine-tuned HF model (``interop.patched_lm.hf_base_config``), else an ``MoETransformer``."""
    if "hf_config" in config:
        from moekit.interop.patched_lm import build_patched

        return build_patched(config)
    return build_transformer(config)


def build_model(config: dict, layout: dict[str, dict],
                build: Callable[[dict], nn.Module] | None = None) -> nn.Module:
    """``build(config)`` (default: ``default_build``) with the MoE layers of ``layout`` put in place."""
    model = (build or default_build)(config)
    for name, spec in layout.items():
        model = replace_module(model, name, build_layer(spec))
    return model
