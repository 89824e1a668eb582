"""Model presets by family, at CPU-friendly sizes. ``get_preset(name, vocab_size=..., **overrides)``."""

from __future__ import annotations

import dataclasses

from moekit.config import CapacityConfig, ConfigError, LossConfig, ModelConfig, MoEConfig, RouterConfig


def tiny(vocab_size: int = 2048) -> ModelConfig:
    """The demo/test model: 4 layers, d=128, 8 experts of hidden 256, top-2 (Mixtral-style routing)."""
    d = 128
    return ModelConfig(vocab_size=vocab_size, d_model=d, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256,
                       dense_hidden=512,
                       moe=MoEConfig(d_model=d, num_experts=8, expert_hidden=256, router=RouterConfig(top_k=2),
                                     loss=LossConfig(aux_coef=0.01, z_coef=1e-3)))


def mixtral_like(vocab_size: int = 32000) -> ModelConfig:
    """Mixtral's shape, scaled down: every layer MoE, 8 experts, top-2, GQA 4:1, dropless."""
    d = 256
    return ModelConfig(vocab_size=vocab_size, d_model=d, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=1024,
                       rope_theta=1e6,
                       moe=MoEConfig(d_model=d, num_experts=8, expert_hidden=896, router=RouterConfig(top_k=2),
                                     loss=LossConfig(aux_coef=0.02)))


def deepseek_like(vocab_size: int = 32000) -> ModelConfig:
    """DeepSeek-V3's recipe, scaled down: first layer dense, 2 shared + 32 fine-grained routed experts,
    top-4 chosen within the best 2 of 4 groups, sigmoid scores with aux-loss-free bias balancing."""
    d = 256
    router = RouterConfig(kind="deepseek", top_k=4, score_func="sigmoid", n_groups=4, topk_groups=2,
                          routed_scaling_factor=2.5, bias_update_rate=1e-3)
    return ModelConfig(vocab_size=vocab_size, d_model=d, n_layers=8, n_heads=8, max_seq_len=1024, first_k_dense=1,
                       dense_hidden=1024,
                       moe=MoEConfig(d_model=d, num_experts=32, expert_hidden=128, num_shared_experts=2,
                                     router=router, loss=LossConfig(aux_coef=0.0, seq_aux_coef=1e-4)))


def switch_like(vocab_size: int = 32000) -> ModelConfig:
    """Switch Transformer's recipe: top-1, every other layer MoE, capacity factor 1.25 (2.0 at eval)."""
    d = 256
    return ModelConfig(vocab_size=vocab_size, d_model=d, n_layers=8, n_heads=8, max_seq_len=1024,
                       moe_layers="every_other",
                       moe=MoEConfig(d_model=d, num_experts=16, expert_hidden=1024, activation="gelu",
                                     router=RouterConfig(kind="switch", top_k=1, jitter_eps=0.01),
                                     capacity=CapacityConfig(capacity_factor=1.25, eval_capacity_factor=2.0),
                                     loss=LossConfig(aux_coef=0.01)))


PRESETS = {"tiny": tiny, "mixtral-like": mixtral_like, "deepseek-like": deepseek_like, "switch-like": switch_like}


def get_preset(name: str, vocab_size: int | None = None, **overrides) -> ModelConfig:
    """A preset's ModelConfig; ``overrides`` replace top-level ModelConfig fields."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r}: unknown; available: {sorted(PRESETS)}")
    cfg = PRESETS[name]() if vocab_size is None else PRESETS[name](vocab_size)
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
