"""Multi-head latent attention (MLA), DeepSeek-V2/V3.

    q      = W_qb RMSNorm(W_qa x)            (or W_q x when q_lora_rank = 0)   -> per head [nope | rope]
    [c, kr]= W_kva x                          c: kv latent (kv_lora_rank), kr: one RoPE key shared by all heads
    [kn, v]= W_kvb RMSNorm(c)                 per head
    k      = [kn | rope(kr)],  q = [qn | rope(qr)],  softmax(q k^T / sqrt(nope + rope)) v
Module names follow the HF checkpoints (q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa,
kv_a_layernorm, kv_b_proj, o_proj) so weights map one to one. The cache stores expanded per-head keys and
values (simple and exact; the compressed-latent cache is a memory optimisation left for later).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.models.blocks import KVCache, RMSNorm, apply_rope, causal_attention, yarn_mscale

# DeepSeek's latent RMSNorms use a fixed eps, not the model's rms_norm_eps (HF DeepseekV3Attention too)
LATENT_NORM_EPS = 1e-6


def apply_rope_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on dims stored as interleaved pairs (x0, x1), (x2, x3), ...: rotate each pair by its angle and
    return the result in half layout [evens | odds], as DeepSeek's reference code does."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        m = cfg.mla
        D, H = cfg.d_model, cfg.n_heads
        self.n_heads, self.m = H, m
        self.qk_head_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank:
            self.q_a_proj = nn.Linear(D, m.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(m.q_lora_rank, H * self.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(D, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, m.kv_lora_rank + m.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * m.v_head_dim, D, bias=cfg.attention_bias)
        self.dropout = cfg.dropout
        # DeepSeek with YaRN also sharpens the softmax by mscale(factor, mscale_all_dim)^2
        sc = cfg.rope_scaling
        m_all = sc.get("mscale_all_dim") if sc.get("rope_type", "default") != "default" else 0
        self.scale = self.qk_head_dim ** -0.5 * (yarn_mscale(sc["factor"], m_all) ** 2 if m_all else 1.0)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                start_pos: int = 0) -> Tensor:
        B, S, _ = x.shape
        m, H = self.m, self.n_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if m.q_lora_rank else self.q_proj(x)
        q = q.view(B, S, H, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rot = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        kv_lat, k_rot = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_lat)).view(B, S, H, m.qk_nope_head_dim + m.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k_rot = k_rot.view(B, 1, S, m.qk_rope_head_dim)
        rope = apply_rope_interleaved if m.rope_interleave else apply_rope
        q_rot, k_rot = rope(q_rot, cos, sin), rope(k_rot, cos, sin)
        q = torch.cat([q_nope, q_rot], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(B, H, S, m.qk_rope_head_dim)], dim=-1)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        o = causal_attention(q, k, v, start_pos if cache is not None else 0, scale=self.scale,
                             dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))

    def new_cache(self, batch: int, max_seq_len: int, dtype, device) -> KVCache:
        return KVCache(batch, self.n_heads, max_seq_len, self.qk_head_dim, dtype, device, v_head_dim=self.m.v_head_dim)
