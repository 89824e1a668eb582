"""The MoE layer a config asks for. All share the outer API: forward(x, *, task_ids, mask) -> MoEOutput."""

from __future__ import annotations

from torch import nn

from moekit.config import MoEConfig
from moekit.layers.hierarchical import HierarchicalMoE
from moekit.layers.moe import MoELayer
from moekit.layers.soft_moe import SoftMoELayer


def build_moe_layer(cfg: MoEConfig) -> nn.Module:
    """Soft MoE (router kind "soft"), two-level (hierarchical_groups > 1), or the sparse MoELayer."""
    if cfg.router.kind == "soft":
        return SoftMoELayer(cfg)
    if cfg.hierarchical_groups > 1:
        return HierarchicalMoE(cfg)
    return MoELayer(cfg)
