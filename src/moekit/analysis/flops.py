"""FLOPs per token of an ArchSpec (one multiply-add = 2 FLOPs).

forward(context) = 2 * (active matmul parameters)         every Linear/expert weight a token multiplies
                 + sum over layers of 2 * ctx_l * H * (qk_dim + v_dim)    scores QK^T and the weighted sum AV
where ctx_l = min(context, window_l) on sliding-window (gpt-oss) or chunked (Llama 4) layers, at most the
chunk size, and decoder layers of an encoder-decoder attend twice (self + cross over ``context`` encoder
positions). The embedding lookup is not a matmul (0 FLOPs); the LM head is, also when it is tied.
``context`` is the number of positions the token attends to: a decode step at that length, or
seq_len / 2 for the mean over a causal training sequence. MLA is counted in its naive (non-absorbed)
form, qk_dim = nope + rope head dims. Training = 3 x forward (backward ~ 2 x forward, Kaplan et al. 2020).
"""

from __future__ import annotations

from moekit.analysis.params import (
    ArchSpec,
    attention_vector_params,
    count_params,
    expert_bias_params,
    rel_pos_params,
)
from moekit.errors import UsageError


def matmul_params_per_token(s: ArchSpec) -> int:
    """Weight-matrix parameters a token multiplies: ``active_with_head`` (no embedding table: a lookup)
    minus every vector parameter (norm weights, biases, attention sinks, T5 relative position biases)."""
    c = count_params(s)
    # + cross-attention; linear-attention layers (hybrids) count all their parameters as matmul ones
    n_cross = s.n_layers - s.n_encoder_layers if s.is_encoder_decoder else 0
    attn_vectors = sum(attention_vector_params(s.attn_at(i)) for i in s.attention_layers())
    n_moe = len(s.moe_layers)
    vectors = (c.breakdown["norms"] + rel_pos_params(s) + attn_vectors + n_cross * attention_vector_params(s)
               + n_moe * (s.top_k * expert_bias_params(s) + (s.num_experts if s.router_bias else 0)
                          + (expert_bias_params(s, s.shared_inter) if s.shared_inter else 0)
                          + (s.d if s.moe_out_bias else 0)))
    return c.active_with_head - vectors


def attention_flops_per_token(s: ArchSpec, context: int) -> int:
    if context < 0:
        raise UsageError(f"context={context}: must be >= 0 (positions attended)")
    qk_dim = s.qk_nope_dim + s.qk_rope_dim if s.attention == "mla" else s.head_dim
    v_dim = s.v_head_dim or s.head_dim
    total = 0
    for i in s.attention_layers():  # linear attention / Mamba: a fixed-size state, no per-position scores
        w = s.window(i)
        ctx = min(context, w) if w else context
        reads = 2 if s.is_encoder_decoder and s.is_decoder_layer(i) else 1
        total += reads * 2 * ctx * s.attn_at(i).n_heads * (qk_dim + v_dim)
    return total


def forward_flops_per_token(s: ArchSpec, context: int = 4096) -> int:
    return 2 * matmul_params_per_token(s) + attention_flops_per_token(s, context)


def flops_report(s: ArchSpec, context: int = 4096) -> dict:
    fwd = forward_flops_per_token(s, context)
    return {"context": context, "forward_flops_per_token": fwd, "train_flops_per_token": 3 * fwd,
            "matmul_params_per_token": matmul_params_per_token(s),
            "attention_flops_per_token": attention_flops_per_token(s, context),
            "convention": "2 FLOPs per multiply-add: forward = 2 x active matmul params + attention scores/values "
                          "over `context` positions; training = 3 x forward"}
