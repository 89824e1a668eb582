"""Memory estimates: weights per dtype, KV cache, and training state per GPU for an EP x DP layout.

Weights: bytes/param = 4 (fp32), 2 (bf16/fp16), 1 (fp8), 0.5 (int4) + one bf16 scale per group of
``int4_group`` weights. KV cache per token: GQA stores K and V for n_kv_heads heads; MLA (DeepSeek) stores
the compressed latent (kv_lora_rank) plus the shared RoPE key (qk_rope_head_dim) per layer.
Training (mixed precision AdamW, Rajbhandari et al. 2020): bf16 weights 2 + bf16 grads 2 + fp32 master 4 +
Adam m, v 8 = 16 bytes/param. Experts are sharded over EP ranks; all other parameters are replicated on
every rank, or with ZeRO-1 their optimizer states (12 bytes/param) are split over the DP ranks.
Activations are not included (they depend on batch, sequence and recomputation policy).
"""

from __future__ import annotations

from moekit.analysis.params import ArchSpec, count_params

BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int4": 0.5}


def weight_bytes(total_params: int, int4_group: int = 128) -> dict[str, float]:
    out = {k: total_params * v for k, v in BYTES.items()}
    out["int4"] += total_params / int4_group * 2  # one bf16 scale per group
    return out


def kv_cache_bytes_per_token(s: ArchSpec, bytes_per_value: float = 2.0) -> float:
    if s.attention == "mla":
        per_layer = s.kv_lora_rank + s.qk_rope_dim
    else:
        per_layer = 2 * s.n_kv_heads * s.head_dim
    return s.n_layers * per_layer * bytes_per_value


def kv_cache_bytes(s: ArchSpec, batch: int, context: int, bytes_per_value: float = 2.0) -> float:
    """Full-attention layers hold `context` positions; gpt-oss sliding layers at most `sliding_window`."""
    if s.sliding_window:
        per_layer_tok = kv_cache_bytes_per_token(s, bytes_per_value) / s.n_layers
        n_sliding = (s.n_layers + 1) // 2
        return batch * per_layer_tok * (n_sliding * min(context, s.sliding_window) + (s.n_layers - n_sliding) * context)
    return batch * context * kv_cache_bytes_per_token(s, bytes_per_value)


def training_bytes_per_gpu(s: ArchSpec, ep: int = 1, dp: int = 1, zero1: bool = False) -> dict[str, float]:
    """Weights + grads + optimizer states per GPU (bytes), experts sharded over `ep` ranks."""
    if ep < 1 or dp < 1:
        raise ValueError(f"ep={ep} and dp={dp} must be >= 1")
    if s.num_experts and s.num_experts % ep:
        raise ValueError(f"ep={ep} must divide num_experts={s.num_experts}")
    c = count_params(s)
    experts = c.breakdown["routed_experts"]
    expert_local = experts / ep
    other = c.total - experts
    # expert replicas: world = ep * dp ranks; each expert shard lives on dp ranks (ZeRO-1 splits its states too)
    weights_grads = 4.0 * (other + expert_local)
    states = 12.0 * ((other + expert_local) / dp if zero1 else (other + expert_local))
    return {"params_per_gpu": other + expert_local, "weights_and_grads": weights_grads, "optimizer_states": states,
            "total": weights_grads + states}


def memory_report(s: ArchSpec, batch: int = 1, context: int = 4096, ep: int = 1, dp: int = 1,
                  zero1: bool = False) -> dict:
    c = count_params(s)
    return {"weights": weight_bytes(c.total), "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(s),
            "kv_cache_bytes_bf16": kv_cache_bytes(s, batch, context), "batch": batch, "context": context,
            "training_per_gpu": training_bytes_per_gpu(s, ep, dp, zero1), "layout": {"ep": ep, "dp": dp,
                                                                                    "zero1": zero1}}
