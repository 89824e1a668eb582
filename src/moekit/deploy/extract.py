"""Task sub-network extraction, and the saved format of transformed models.

Extraction: run the model on a task's data, keep in every MoE layer only the experts whose load share
is >= a threshold (``prune.select_experts``), drop the rest. Task-specific expert usage is skewed
(Chen et al. 2023 "Task-Specific Expert Pruning for Sparse Mixture-of-Experts"; Kudugunta et al. 2021
"Beyond Distillation: Task-level Mixture-of-Experts"), so a small sub-network often keeps the task's
quality at a fraction of the size.

Saved format (a directory): ``model.safetensors`` (all parameters and buffers, shared tensors once)
and ``deploy.json``: the base model config plus, per transformed MoE layer, its layer config and
structure (merged many-to-one router over how many original experts, int8 experts), so that
``load_model`` can rebuild the exact module tree before loading the tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from torch import Tensor, nn

from moekit.config import ModelConfig, MoEConfig
from moekit.deploy import moe_layers, replace_module
from moekit.deploy.merge import GroupRouter
from moekit.deploy.offload import OffloadedExperts
from moekit.deploy.prune import measure_loads, prune_model
from moekit.deploy.quantize import Int8Experts
from moekit.layers.moe import MoELayer
from moekit.layers.routing import build_router
from moekit.models.decoder import MoETransformer

WEIGHTS_FILE, META_FILE = "model.safetensors", "deploy.json"


def extract_task(model: nn.Module, task_batches: Iterable, min_share: float = 0.05,
                 forward: Callable | None = None) -> tuple[nn.Module, dict[str, list[int]], dict[str, Tensor]]:
    """Keep the experts with load share >= ``min_share`` on ``task_batches``; edits ``model`` in place.
    Returns (model, kept experts per layer, measured loads)."""
    loads = measure_loads(model, task_batches, forward)
    model, kept = prune_model(model, loads, min_share=min_share)
    return model, kept, loads


def layer_spec(layer: MoELayer) -> dict:
    """What ``build_layer`` needs to recreate this layer's module tree."""
    if isinstance(layer.experts, OffloadedExperts):
        raise ValueError("offloaded experts are a runtime view; save the model before offloading")
    spec: dict = {"config": layer.cfg.to_dict(), "int8": isinstance(layer.experts, Int8Experts)}
    if isinstance(layer.router, GroupRouter):
        spec["router_config"] = layer.router.inner_cfg.to_dict()
    return spec


def build_layer(spec: dict) -> MoELayer:
    layer = MoELayer(MoEConfig.from_dict(spec["config"]))
    if "router_config" in spec:
        inner_cfg = MoEConfig.from_dict(spec["router_config"])
        group_of_E = layer.router.gate.weight.new_zeros(inner_cfg.num_experts).long()  # loaded below
        layer.router = GroupRouter(build_router(inner_cfg), group_of_E, layer.cfg.num_experts, inner_cfg)
    if spec["int8"]:
        layer.experts = Int8Experts(layer.experts)
    return layer


def save_model(model: nn.Module, path: str, base_config: dict | None = None, meta: dict | None = None) -> None:
    """Write ``model`` (possibly pruned / merged / int8) to directory ``path``. ``base_config`` is the
    dict the untransformed model is built from (default: ``model.cfg.to_dict()``); ``meta`` is free-form."""
    base_config = model.cfg.to_dict() if base_config is None else base_config
    os.makedirs(path, exist_ok=True)
    layers = {name: layer_spec(layer) for name, layer in moe_layers(model).items()}
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump({"model_config": base_config, "moe_layers": layers, "meta": meta or {}}, f, indent=1)
    st_save_model(model, os.path.join(path, WEIGHTS_FILE))


def build_transformer(base_config: dict) -> nn.Module:
    return MoETransformer(ModelConfig.from_dict(base_config))


def load_model(path: str, build: Callable[[dict], nn.Module] = build_transformer) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by ``save_model``: ``build(base_config)`` makes the untransformed model
    (default: an ``MoETransformer`` from a ModelConfig dict),
    its MoE layers are replaced by the saved structures, then the tensors are loaded (strictly).
    Returns (model, meta)."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path}: not a moekit deploy directory (expected {META_FILE})")
    with open(meta_path) as f:
        saved = json.load(f)
    model = build(saved["model_config"])
    for name, spec in saved["moe_layers"].items():
        model = replace_module(model, name, build_layer(spec))
    st_load_model(model, os.path.join(path, WEIGHTS_FILE), strict=True)
    return model.eval(), saved["meta"]
