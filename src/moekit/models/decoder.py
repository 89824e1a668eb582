"""Decoder-only Transformer LM whose FFN in chosen layers is an MoELayer; the same class builds the
dense twin (``ModelConfig.dense_twin()``). Architecture only: no training, distribution or interop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moekit.config import ConfigError, ModelConfig
from moekit.layers.build import build_moe_layer
from moekit.layers.experts import MLP, GroupedExperts
from moekit.layers.moe import MoELayer
from moekit.layers.output import MoEAux
from moekit.models.blocks import Attention, RMSNorm, RotaryEmbedding
from moekit.models.mla import MLAttention

ATTENTION: dict[str, type[nn.Module]] = {"gqa": Attention, "mla": MLAttention}


@dataclass
class LMOutput:
    logits: Tensor  # [B, S, V]
    aux_loss: Tensor  # 0-d: sum of the MoE layers' weighted router losses (0 for dense)
    moe_aux: list[MoEAux] = field(default_factory=list)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = ATTENTION[cfg.attention](cfg, i)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(i)
        self.ffn = build_moe_layer(cfg.moe) if self.is_moe else MLP(cfg.d_model, cfg.ffn_hidden(i), cfg.ffn_activation(i))
        if self.is_moe and not self.ffn.causal_safe and not cfg.moe.allow_noncausal:
            raise ConfigError(f"MoEConfig.router.kind={cfg.moe.router.kind!r} (or this layer type) lets a token's "
                              "output depend on later tokens, which leaks the future in a causal decoder LM; "
                              "set MoEConfig.allow_noncausal=True to use it anyway")
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # recompute this block's activations in backward instead of keeping them (set by
        # moekit.distributed.parallelize.apply_activation_checkpointing)
        self.checkpoint_activations = False

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache=None, start_pos: int = 0,
                task_ids: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, MoEAux | None]:
        if self.checkpoint_activations and torch.is_grad_enabled():
            # non-reentrant: any output structure, and the RNG (dropout, router noise) replays identically
            return checkpoint(self._forward, x, cos, sin, cache, start_pos, task_ids, mask, use_reentrant=False)
        return self._forward(x, cos, sin, cache, start_pos, task_ids, mask)

    def _forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache, start_pos: int, task_ids: Tensor | None,
                 mask: Tensor | None) -> tuple[Tensor, MoEAux | None]:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, start_pos))
        h = self.ffn_norm(x)
        if self.is_moe:
            out = self.ffn(h, task_ids=task_ids, mask=mask)
            return x + self.drop(out.y), out.aux
        return x + self.drop(self.ffn(h)), None


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        rope_dim = cfg.mla.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim
        self.rope = RotaryEmbedding(rope_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) everywhere; projections that write into the residual stream scaled by
        1/sqrt(2 * n_layers) (GPT-2, Radford et al. 2019); norms at 1, biases at 0."""
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                (nn.init.ones_ if name.endswith("norm.weight") else nn.init.zeros_)(p)
            elif name.endswith(("o_proj.weight", "w_down.weight", "w_down_EDF")):
                nn.init.normal_(p, 0.0, resid_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, input_ids: Tensor, *, task_ids: Tensor | None = None, cache: list | None = None,
                start_pos: int = 0, mask: Tensor | None = None) -> LMOutput:
        """input_ids [B, S]; cache: from ``new_cache`` for incremental decoding; mask [B, S] (1 = real
        token) only affects the router losses."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [B, S], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        B, S = input_ids.shape
        cos, sin = self.rope(start_pos, S, input_ids.device)
        x = self.embed(input_ids)
        aux_list: list[MoEAux] = []
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, cos, sin, cache[i] if cache is not None else None, start_pos, task_ids, mask)
            if aux is not None:
                aux_list.append(aux)
        logits = self.lm_head(self.norm(x))
        aux_loss = sum((a.loss for a in aux_list), logits.new_zeros((), dtype=torch.float32))
        return LMOutput(logits, aux_loss, aux_list)

    def new_cache(self, batch: int, max_seq_len: int | None = None, dtype=None) -> list:
        dtype = dtype or self.embed.weight.dtype
        n = max_seq_len or self.cfg.max_seq_len
        return [layer.attn.new_cache(batch, n, dtype, self.embed.weight.device) for layer in self.layers]

    def moe_layers(self) -> list[nn.Module]:
        return [layer.ffn for layer in self.layers if layer.is_moe]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() deduplicates tied weights
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def num_active_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters touched per token: each MoE layer reports its own (top_k of E routed experts, ...)."""
        n = self.num_params(exclude_embeddings)
        for moe in self.moe_layers():
            n -= sum(p.numel() for p in moe.parameters()) - moe.active_params()
        return n

    def param_groups(self) -> dict[str, list[str]]:
        """Parameter names by role, for freeze policies: experts, router, shared, dense (everything else)."""
        groups: dict[str, list[str]] = {"experts": [], "router": [], "shared": [], "dense": []}
        owner = {}
        for mname, mod in self.named_modules():
            if isinstance(mod, GroupedExperts):
                owner[mname] = "experts"
            elif isinstance(mod, MoELayer):
                owner[mname + ".router"] = "router"
                owner[mname + ".shared"] = "shared"
                owner[mname + ".shared_gate"] = "shared"
        for name, _ in self.named_parameters():
            role = next((r for prefix, r in owner.items() if name.startswith(prefix + ".")), "dense")
            groups[role].append(name)
        return groups


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy in float32 over positions whose target is not ``ignore_index``."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index)
