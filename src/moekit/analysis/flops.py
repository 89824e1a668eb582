"""FLOPs per token of an ArchSpec (multiply-add = 2 FLOPs).

forward(context)  = 2 * (active matmul parameters)            weights: every Linear/expert a token uses
                  + attention scores and weighted values       per layer 2 * 2 * context * H * head dims
The embedding lookup is not a matmul (0 FLOPs); the LM head is. Attention FLOPs are for a token that
attends to ``context`` positions (decode step at that length, or the mean of a causal sequence when
context = seq_len / 2). Training = 3 x forward (backward ~ 2 x forward, Kaplan et al. 2020).
"""

from __future__ import annotations

from moekit.analysis.params import ArchSpec, count_params


def matmul_params_per_token(s: ArchSpec) -> int:
    """Active parameters that take part in matmuls: active minus the embedding table and norm weights
    (biases and attention sinks are kept: they are < 0.01% of any real model)."""
    c = count_params(s)
    return c.active - c.breakdown["embeddings"] - c.breakdown["norms"]


def attention_flops_per_token(s: ArchSpec, context: int) -> int:
    if s.attention == "mla":
        qk_dim, v_dim = s.qk_nope_dim + s.qk_rope_dim, s.v_head_dim
    else:
        qk_dim = v_dim = s.head_dim
    per_layer = []
    for i in range(s.n_layers):
        # gpt-oss: sliding-window layers attend to at most `sliding_window` positions
        ctx = min(context, s.sliding_window) if s.sliding_window and i % 2 == 0 else context
        per_layer.append(2 * ctx * s.n_heads * (qk_dim + v_dim))
    return sum(per_layer)


def forward_flops_per_token(s: ArchSpec, context: int = 4096) -> int:
    return 2 * matmul_params_per_token(s) + attention_flops_per_token(s, context)


def flops_report(s: ArchSpec, context: int = 4096) -> dict:
    fwd = forward_flops_per_token(s, context)
    return {"context": context, "forward_flops_per_token": fwd, "train_flops_per_token": 3 * fwd,
            "matmul_params_per_token": matmul_params_per_token(s),
            "attention_flops_per_token": attention_flops_per_token(s, context),
            "convention": "2 FLOPs per multiply-add; training = 3 x forward; attention over `context` positions"}
