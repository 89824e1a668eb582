"""Transformer building blocks: RMSNorm, rotary embeddings, causal GQA attention with a KV cache.

Conventions follow HF Llama (rotate_half RoPE, RMSNorm in float32) so HF checkpoints load unchanged.
Legend: B batch, S new positions, L cached + new positions, H query heads, G kv heads, K head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ModelConfig


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast back (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(s) + 1 for a context extension s > 1 (Peng et al. 2023)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[Tensor, float]:
    """Inverse frequencies [K/2] and the cos/sin scale of RoPE with optional context-extension scaling
    (``scaling`` holds HF's rope_parameters: rope_type and its fields).

    linear (position interpolation, Chen et al. 2023): every frequency / factor.
    llama3: wavelengths longer than original/low_freq_factor are divided by factor, shorter than
        original/high_freq_factor kept, and the band between interpolated smoothly.
    yarn (Peng et al. 2023): dims rotating fewer than beta_slow times over the original context are
        interpolated, more than beta_fast times kept, a linear ramp between; cos/sin scaled by the attention
        factor (given, or mscale ratios of ln(factor))."""
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    sc = scaling or {}
    kind = sc.get("rope_type", "default")
    if kind == "default":
        return base, 1.0
    factor = float(sc["factor"])
    if kind == "linear":
        return base / factor, 1.0
    orig = sc["original_max_position_embeddings"]
    if kind == "llama3":
        low_wavelen, high_wavelen = orig / sc["low_freq_factor"], orig / sc["high_freq_factor"]
        wavelen = 2 * math.pi / base
        smooth = (orig / wavelen - sc["low_freq_factor"]) / (sc["high_freq_factor"] - sc["low_freq_factor"])
        mid = (1 - smooth) * base / factor + smooth * base
        return torch.where(wavelen > low_wavelen, base / factor, torch.where(wavelen < high_wavelen, base, mid)), 1.0
    if kind != "yarn":
        raise ValueError(f"rope_type={kind!r}: expected default, linear, llama3 or yarn")

    def dim_of(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in orig
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(sc.get("beta_fast") or 32), dim_of(sc.get("beta_slow") or 1)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    inv_freq = base / factor * ramp + base * (1 - ramp)
    attn = sc.get("attention_factor")
    if attn is None:
        m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
        attn = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    return inv_freq, float(attn)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021) in the HF "rotate_half" layout: cos/sin tables [max_seq_len, K], with optional
    context-extension scaling (``rope_frequencies``)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        inv_freq, self.cos_sin_scale = rope_frequencies(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, start_pos: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if start_pos + length > self.max_seq_len:
            raise ValueError(f"positions up to {start_pos + length} exceed max_seq_len={self.max_seq_len}")
        t = torch.arange(start_pos, start_pos + length, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.cos_sin_scale, emb.sin() * self.cos_sin_scale


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHSK: Tensor, cos_SK: Tensor, sin_SK: Tensor) -> Tensor:
    return (x_BHSK * cos_SK + rotate_half(x_BHSK) * sin_SK).to(x_BHSK.dtype)


class KVCache(nn.Module):
    """Preallocated keys/values of one attention layer: [B, G, max_seq_len, K]."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype=torch.float32,
                 device=None, v_head_dim: int | None = None):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv_heads, max_seq_len, head_dim, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v", torch.zeros(batch, n_kv_heads, max_seq_len, v_head_dim or head_dim, dtype=dtype,
                                              device=device), persistent=False)

    def update(self, start_pos: int, k_BGSK: Tensor, v_BGSK: Tensor) -> tuple[Tensor, Tensor]:
        end = start_pos + k_BGSK.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; writing up to {end}")
        self.k[:, :, start_pos:end] = k_BGSK
        self.v[:, :, start_pos:end] = v_BGSK
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_attention(q_BHSK: Tensor, k_BGLK: Tensor, v_BGLK: Tensor, start_pos: int, scale: float | None = None,
                     dropout_p: float = 0.0, window: int = 0, sinks_H: Tensor | None = None, chunk: int = 0) -> Tensor:
    """Softmax attention where new position s (absolute start_pos + s) sees cached positions <= it; with a
    sliding ``window`` only the last ``window`` of them (itself included), as HF's sliding-window mask; with
    ``chunk`` (Llama 4) only those in its own chunk of ``chunk`` positions.
    ``sinks_H`` (gpt-oss): one more logit per head in every softmax, whose value is zero: it takes
    probability mass and adds nothing. Computed as an extra key of zeros whose score is set by the mask."""
    H, G = q_BHSK.shape[1], k_BGLK.shape[1]
    if G != H:  # grouped-query attention: each kv head serves H/G query heads
        k_BGLK = k_BGLK.repeat_interleave(H // G, dim=1)
        v_BGLK = v_BGLK.repeat_interleave(H // G, dim=1)
    S, L = q_BHSK.shape[2], k_BGLK.shape[2]
    if start_pos == 0 and S == L and not (window and window < L) and not (chunk and chunk < L) and sinks_H is None:
        return F.scaled_dot_product_attention(q_BHSK, k_BGLK, v_BGLK, is_causal=S > 1, dropout_p=dropout_p,
                                              scale=scale)
    pos_q = torch.arange(start_pos, start_pos + S, device=q_BHSK.device)[:, None]
    pos_k = torch.arange(L, device=q_BHSK.device)[None, :]
    allowed_SL = (pos_k <= pos_q) & ((pos_k > pos_q - window) if window else True)
    if chunk:
        allowed_SL = allowed_SL & (pos_k // chunk == pos_q // chunk)
    if sinks_H is None:
        return F.scaled_dot_product_attention(q_BHSK, k_BGLK, v_BGLK, attn_mask=allowed_SL, dropout_p=dropout_p,
                                              scale=scale)
    B, H = q_BHSK.shape[:2]
    bias_HSL = q_BHSK.new_zeros(S, L).masked_fill(~allowed_SL, float("-inf")).expand(H, S, L)
    bias_HSL1 = torch.cat([bias_HSL, sinks_H.to(q_BHSK.dtype)[:, None, None].expand(H, S, 1)], dim=-1)
    k_BHL1K = torch.cat([k_BGLK, k_BGLK.new_zeros(B, H, 1, k_BGLK.shape[-1])], dim=2)
    v_BHL1K = torch.cat([v_BGLK, v_BGLK.new_zeros(B, H, 1, v_BGLK.shape[-1])], dim=2)
    return F.scaled_dot_product_attention(q_BHSK, k_BHL1K, v_BHL1K, attn_mask=bias_HSL1[None], dropout_p=dropout_p,
                                          scale=scale)


def unit_rms(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim in float32, no weight (Llama 4's q/k "L2Norm")."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def nope_temperature(start_pos: int, length: int, scale: float, floor: int, device) -> Tensor:
    """Llama 4's query scale on NoPE layers, per position: 1 + scale * ln(1 + floor((pos + 1) / floor)); 1 up
    to position floor - 2, growing logarithmically with the context after (Nakanishi 2025, scalable softmax)."""
    pos = torch.arange(start_pos, start_pos + length, device=device, dtype=torch.float32)
    return torch.log1p(torch.floor((pos + 1.0) / floor)) * scale + 1.0


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE, optional q/k/v bias (Qwen2) and q/k RMSNorm
    (Qwen3: per head, before RoPE; OLMoE: over the whole projection; Llama 4: per head without a weight,
    after RoPE). Llama 4 layers may skip RoPE (NoPE, with temperature tuning) or attend within chunks."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        H, G, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        self.window, self.chunk = cfg.window(layer), cfg.chunk(layer)
        self.rope = layer not in cfg.nope_layers
        self.temp = (cfg.nope_temp_scale, cfg.nope_temp_floor) if not self.rope and cfg.nope_temp_scale else None
        self.eps = cfg.norm_eps
        self.n_heads, self.n_kv_heads, self.head_dim = H, G, K
        self.q_proj = nn.Linear(D, H * K, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, G * K, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, G * K, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * K, D, bias=cfg.attention_out_bias)
        self.qk_norm = cfg.qk_norm if cfg.qk_norm != "l2" or self.rope else "none"
        if cfg.qk_norm == "per_head":
            self.q_norm, self.k_norm = RMSNorm(K, cfg.norm_eps), RMSNorm(K, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(H * K, cfg.norm_eps), RMSNorm(G * K, cfg.norm_eps)
        self.sinks = nn.Parameter(torch.zeros(H)) if cfg.attn_sinks else None
        self.dropout = cfg.dropout

    def forward(self, x_BSD: Tensor, cos_SK: Tensor, sin_SK: Tensor, cache: KVCache | None = None,
                start_pos: int = 0) -> Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, cos_SK, sin_SK), apply_rope(k, cos_SK, sin_SK)
        if self.qk_norm == "l2":
            q, k = unit_rms(q, self.eps), unit_rms(k, self.eps)
        if self.temp is not None:
            q = (q * nope_temperature(start_pos, S, *self.temp, q.device)[:, None]).to(q.dtype)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        o = causal_attention(q, k, v, start_pos if cache is not None else 0,
                             dropout_p=self.dropout if self.training else 0.0, window=self.window, sinks_H=self.sinks,
                             chunk=self.chunk)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))

    def new_cache(self, batch: int, max_seq_len: int, dtype, device) -> KVCache:
        return KVCache(batch, self.n_kv_heads, max_seq_len, self.head_dim, dtype, device)
