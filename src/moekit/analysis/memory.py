"""Memory estimates: weights per dtype, KV cache, and training state per GPU for an EP x DP layout.

Weights: bytes/param = 4 (fp32), 2 (bf16/fp16), 1 (fp8), 0.5 (int4) + one bf16 scale per group of
``int4_group`` weights (0.125 bytes/param more at group 128).
KV cache per token and layer: GQA stores K and V for n_kv_heads heads (kv_heads x (head_dim + v_head_dim)
values; v_head_dim = head_dim except in MiMo-V2-Flash), per layer where heads differ by layer;
MLA (DeepSeek) stores the compressed latent plus the shared RoPE key (kv_lora_rank + qk_rope_head_dim).
Sliding-window (gpt-oss) and chunked (Llama 4) layers keep at most their window. An encoder-decoder
keeps the decoder's self-attention K/V per generated token and the cross-attention K/V of each encoder
token; "per token" counts one of each.
Training (mixed-precision AdamW, ZeRO paper, Rajbhandari et al. 2020): bf16 weights 2 + bf16 grads 2 +
fp32 master weights 4 + Adam m and v 8 = 16 bytes/param. Layout: ep x dp GPUs; every MoE layer's experts
are split over the ep ranks of a group and replicated over dp groups; all other parameters are replicated
on all ep x dp GPUs. ZeRO-1 splits the 12 bytes/param of optimizer state over the replicas: ep x dp for
non-expert parameters, dp for an expert shard. Activations are not included (they depend on batch,
sequence and recomputation).
"""

from __future__ import annotations

from moekit.analysis.params import ArchSpec, count_params, gqa_v_dim
from moekit.errors import UsageError

BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int4": 0.5}
WEIGHT_GRAD_BYTES = 4.0  # bf16 weights + bf16 grads
OPTIMIZER_BYTES = 12.0  # fp32 master weights + Adam m, v


def weight_bytes(total_params: int, int4_group: int = 128) -> dict[str, float]:
    if int4_group < 1:
        raise UsageError(f"int4_group={int4_group}: must be >= 1 (weights per scale)")
    out = {k: total_params * v for k, v in BYTES.items()}
    out["int4"] += total_params / int4_group * 2  # one bf16 scale per group
    return out


def _kv_values_per_token_layer(s: ArchSpec) -> int:
    return s.kv_lora_rank + s.qk_rope_dim if s.attention == "mla" else s.n_kv_heads * (s.head_dim + gqa_v_dim(s))


def kv_cache_bytes_per_token(s: ArchSpec, bytes_per_value: float = 2.0) -> float:
    """Bytes per cached position with no window limit (every layer that caches K/V)."""
    return kv_cache_bytes(s, 1, 1, bytes_per_value)


def kv_cache_bytes(s: ArchSpec, batch: int, context: int, bytes_per_value: float = 2.0) -> float:
    if batch < 1 or context < 0:
        raise UsageError(f"batch={batch}, context={context}: need batch >= 1 and context >= 0")
    total = 0.0
    for i in s.attention_layers():  # linear attention / Mamba layers keep a fixed-size state
        if s.is_encoder_decoder and not s.is_decoder_layer(i):
            continue  # the encoder runs once over the input
        per_layer = _kv_values_per_token_layer(s.attn_at(i)) * bytes_per_value
        w = s.window(i)
        positions = min(context, w) if w else context
        total += per_layer * positions * (2 if s.is_encoder_decoder else 1)  # + cross-attention K/V
    return batch * total


def training_bytes_per_gpu(s: ArchSpec, ep: int = 1, dp: int = 1, zero1: bool = False) -> dict[str, float]:
    """Weights + grads + optimizer states per GPU (bytes) on ep x dp GPUs (see the module docstring)."""
    if not (isinstance(ep, int) and isinstance(dp, int) and ep >= 1 and dp >= 1):
        raise UsageError(f"ep={ep} and dp={dp}: must be integers >= 1")
    if s.num_experts and s.num_experts % ep:
        raise UsageError(f"ep={ep} must divide num_experts={s.num_experts}")
    if not s.num_experts and ep > 1:
        raise UsageError(f"ep={ep}: a dense model has no experts to shard; use ep=1")
    c = count_params(s)
    expert_local = c.breakdown["routed_experts"] / ep
    other = c.total - c.breakdown["routed_experts"]
    params = other + expert_local
    states = OPTIMIZER_BYTES * (other / (ep * dp) + expert_local / dp if zero1 else params)
    return {"gpus": ep * dp, "params_per_gpu": params, "weights_and_grads": WEIGHT_GRAD_BYTES * params,
            "optimizer_states": states, "total": WEIGHT_GRAD_BYTES * params + states}


def memory_report(s: ArchSpec, batch: int = 1, context: int = 4096, ep: int = 1, dp: int = 1,
                  zero1: bool = False, int4_group: int = 128) -> dict:
    c = count_params(s)
    return {"weights": weight_bytes(c.total, int4_group), "int4_group": int4_group,
            "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(s),
            "kv_cache_bytes_bf16": kv_cache_bytes(s, batch, context), "batch": batch, "context": context,
            "training_per_gpu": training_bytes_per_gpu(s, ep, dp, zero1),
            "layout": {"ep": ep, "dp": dp, "zero1": zero1},
            "convention": "weights: bytes/param 4/2/1/0.5 (+ a bf16 scale per int4 group); KV cache in bf16; "
                          "training: 16 bytes/param (bf16 weights+grads, fp32 master + Adam m, v), experts "
                          "sharded over ep, the rest replicated on ep x dp GPUs, activations excluded"}
