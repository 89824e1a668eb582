"""Exact parameter counts of MoE transformers from their HF ``config.json`` (or a moekit ModelConfig).

Every config is first normalised into an ``ArchSpec`` (pure data), then counted by pure functions.
Conventions, stated once:
  total   = every parameter the HF model class instantiates (``sum(p.numel())``; buffers excluded,
            tied embeddings counted once). Modules HF does not build into the language model are reported
            apart in ``separate`` (never inside ``total``): DeepSeek-V3's multi-token-prediction module
            (``mtp``; DeepSeek-V3 report, Liu et al. 2024, sec. 2.2) and Llama 4's vision encoder + projector
            (``vision``; the text decoder is what ``total`` counts), likewise the vision towers of Qwen3.5-MoE,
            Qwen3-VL-MoE, GLM-4.5V, Aria, GLM-5-Next, MiniMax-M3, Qwen4-Exp and Qwen3-Omni's thinker (its audio
            encoder too, as ``audio``), and the vision encoders of DeepSeek-OCR-2 and Unlimited-OCR.
  active  = parameters a token touches in one forward pass: all non-expert parameters, top_k routed
            experts and all shared experts per MoE layer. ``active`` includes the embedding table and the
            LM head (the convention of Mixtral's "12.9B", Qwen3's and Llama 4's figures);
            ``active_non_embedding`` excludes both (scaling-law papers, Kaplan et al. 2020);
            ``active_with_head`` excludes only the input embedding table, a lookup, and keeps the LM head, a
            matmul (the convention of DeepSeek-V2/V3's and gpt-oss's published figures; counts a tied head).
            For an encoder-decoder (Switch/T5) it is the path of one encoder token plus one decoder token.
  buffers = non-parameter tensors stored in checkpoints (DeepSeek-V3's ``e_score_correction_bias``, a
            selection-only router bias that HF registers as a buffer).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moekit.errors import ConfigError, UsageError
from moekit.interop.config_reader import read_hf_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(kw_only=True)
class ArchSpec:
    """What a parameter count needs to know about a (MoE) transformer. Layers are numbered 0..n_layers-1;
    for an encoder-decoder the first ``n_encoder_layers`` are the encoder, the rest the decoder."""

    name: str
    family: str
    vocab: int
    d: int
    n_layers: int
    tie_embeddings: bool
    # attention
    attention: str = "gqa"  # "gqa" | "mla"
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none" | "per_head" (RMSNorm over head_dim) | "full" (over the projection)
    attn_sinks: bool = False  # gpt-oss: one learned sink logit per head
    # output gate on the attention heads: "q_doubled" (Qwen3-Next/3.5: q_proj also produces a gate per head dim,
    # with the q bias doubled too) | "per_dim" (AFMoE, Laguna "per-element": a bias-free projection, a gate per
    # head dim) | "per_head" (Laguna: a bias-free g_proj of one gate per head) | "per_dim_head_bias" (Beam: the
    # bias-free per-dim projection plus one gate bias per head) | "mla_fused_q" (A.X-K2: MLA whose query up-projection
    # reads twice the q latent and also produces a gate per value dim)
    attn_output_gate: str = "none"
    # JetMoE mixture of attention heads: attn_experts experts, each a query projection to n_kv_heads heads and
    # an output projection back, top_k per token (n_heads = top_k * n_kv_heads query heads), a router, and a
    # shared key/value projection
    attn_experts: int = 0
    moe_out_bias: bool = False  # JetMoE: one output bias per mixture block (attention and FFN)
    attn_windows: list[int] = field(default_factory=list)  # per layer: max positions attended (0 = all)
    window_kind: str = ""  # "sliding" (gpt-oss) | "chunked" (Llama 4: attention within fixed chunks)
    # layer -> attention fields that differ on that layer (MiMo-V2-Flash's sliding layers: twice the kv heads and
    # sinks; Laguna: heads per layer); attn_at(i) applies them
    layer_attention: dict[int, dict] = field(default_factory=dict)
    # hybrids: these layers replace softmax attention by a fixed-state mixer of linear_attn_params parameters,
    # linear_kind says which (gated DeltaNet, lightning attention, Mamba, Mamba-2)
    linear_layers: list[int] = field(default_factory=list)
    linear_attn_params: int = 0
    linear_kind: str = "linear attention"
    # Nemotron-H: a layer (block) holds one mixer or one FFN; these layers have no mixer / no FFN
    mixer_free_layers: list[int] = field(default_factory=list)
    ffn_free_layers: list[int] = field(default_factory=list)
    norm_bias: bool = False  # LayerNorms with a bias (PhiMoE)
    norms_per_layer: int = 2  # AFMoE: 4 (norms before and after the FFN too); Cohere2-MoE: 1 (parallel block)
    lm_head_bias: bool = False
    # A.X-K2's gated RMSNorms: a low-rank gate MLP (d -> gated_norm_rank -> d) on every input norm and on the
    # post-attention norm of MoE layers
    gated_norm_rank: int = 0
    head_rows: int = 0  # outputs of the head when they are not the vocabulary (a token classifier's labels)
    # MLA (DeepSeek-V2/V3)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0  # also GQA with value heads narrower than query/key heads (MiMo-V2-Flash); 0 = head_dim
    # DeepSeek-V3.2 / GLM-5 sparse attention: a lightning indexer per layer, indexer_heads query heads of
    # indexer_head_dim from the compressed query, one key head (LayerNorm with bias), per-head weights; with GQA
    # (MiniMax-M3) the query heads come from the hidden state, q and k have RMSNorms, there are no head weights
    indexer_heads: int = 0
    indexer_head_dim: int = 0
    indexer_kv_heads: int = 1  # GQA indexers: key heads of the indexer (one fused q/k projection in Qwen4-Exp)
    # Mistral Large 4: layers that reuse an earlier layer's KV latent (no kv down-projection, no latent norm), a
    # learned scale and bias per head on the attention and indexer logits (its indexer also LayerNorms its input),
    # and learned per-frequency RoPE parameters (one set per model)
    kv_shared: bool = False
    softmax_scaling: bool = False
    rope_params: int = 0
    k_rope_norm: bool = False  # dots3: an RMSNorm over the shared rotary key (qk_rope_dim) in MLA
    indexer_kpool: int = 0  # GLM-5-Next's k-pool compression: a kpool x indexer_head_dim table and a gate from d
    # manifold-constrained hyper-connections (Xie et al. 2026): hc_streams residual streams; each layer has two
    # mixers (attention, FFN), each a projection from the n*d streams to (2+n)*n weights, their bias and 3 scales
    hc_streams: int = 0
    # Qwen4-Exp's gated residuals instead: per mixer a norm over the n*d streams, a rank-hc_lowrank mixing
    # projection (down and up) and an injection projection to n weights; a last mixer (no injection) before the head
    hc_lowrank: int = 0
    final_norm: bool = True  # Qwen4-Exp: no final norm (its last hyper-connection mixer has one)
    # Qwen4-Exp's per-layer n-gram embeddings (hashed n-gram tables, key/value projections, norms, a convolution)
    ple_params: int = 0
    # FFN
    dense_inter: int = 0
    dense_inter_overrides: dict[int, int] = field(default_factory=dict)  # layer -> hidden (moekit dense twins)
    dense_matrices: int = 3  # 3 for gated (SwiGLU) FFNs, 2 for plain (ReLU/GELU) ones
    dense_matrices_overrides: dict[int, int] = field(default_factory=dict)  # layer -> matrices (GELU twins)
    expert_matrices: int = 3
    moe_layers: list[int] = field(default_factory=list)
    num_experts: int = 0
    top_k: int = 0
    expert_inter: int = 0
    shared_inter: int = 0  # total hidden of the shared expert(s) (0 = none)
    shared_gate: bool = False  # Qwen2-MoE: sigmoid gate Linear(d, 1)
    router_bias: bool = False  # gpt-oss; ERNIE 4.5's correction bias (a parameter there)
    router_noise: bool = False  # moekit noisy_topk: a second Linear(d, E) for the noise scale
    expert_bias: bool = False  # gpt-oss
    router_correction_bias: bool = False  # DeepSeek-V3 / GLM-4.5 / dots1 e_score_correction_bias (an HF buffer)
    # encoder-decoder (T5 / Switch): decoder layers add cross-attention and its norm
    n_encoder_layers: int = 0
    rel_pos_buckets: int = 0  # T5 relative position bias: Embedding(buckets, heads) per stack
    # modules outside `total`
    mtp_layers: int = 0  # DeepSeek-V3 multi-token-prediction modules
    vision_params: int = 0  # Llama 4 vision encoder + multimodal projector
    audio_params: int = 0  # Qwen3-Omni's audio encoder

    @property
    def is_encoder_decoder(self) -> bool:
        return self.n_encoder_layers > 0

    def is_decoder_layer(self, i: int) -> bool:
        return i >= self.n_encoder_layers

    def window(self, i: int) -> int:
        return self.attn_windows[i] if self.attn_windows else 0

    def attn_at(self, i: int) -> ArchSpec:
        """The spec of layer i's attention (layer_attention applied)."""
        over = self.layer_attention.get(i)
        return dataclasses.replace(self, layer_attention={}, **over) if over else self

    def attention_layers(self) -> list[int]:
        """Layers with softmax self-attention (not a linear-attention / Mamba mixer, not a mixer-free block)."""
        other = set(self.linear_layers) | set(self.mixer_free_layers)
        return [i for i in range(self.n_layers) if i not in other]


def _windows(layer_types: list[str] | None, n_layers: int, default_local, local_kind: str, span: int) -> list[int]:
    """Per-layer attention span from HF ``layer_types`` (or the family default pattern)."""
    types = layer_types or [local_kind if default_local(i) else "full_attention" for i in range(n_layers)]
    return [span if t == local_kind and span else 0 for t in types]


def llama4_vision_params(v: dict, text_d: int) -> int:
    """Llama 4 vision encoder (ViT with biased attention/MLP and LayerNorms, unfold patch embedding,
    class and position embeddings, pixel-shuffle MLP adapter) + the multimodal projector to the text width."""
    h, inter, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    n_pos = (v["image_size"] // p) ** 2 + 1
    embed = v["num_channels"] * p * p * h + h + n_pos * h + 2 * 2 * h  # patches, class, positions, pre/post LN
    layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * 2 * h
    adapter = inter * v["projector_input_dim"] + v["projector_output_dim"] ** 2
    return embed + v["num_hidden_layers"] * layer + adapter + v["vision_output_dim"] * text_d


def qwen3_vl_vision_params(v: dict) -> int:
    """Qwen3-VL's vision tower (also Qwen3.5's): a 3-D patch convolution with bias, learned position embeddings,
    ViT blocks (LayerNorms with bias, fused qkv and output projections with biases, a two-layer MLP with biases),
    the merger (a LayerNorm over the patch width, then an MLP from spatial_merge_size^2 patches to the text
    width) and one DeepStack merger per deepstack_visual_indexes entry (its LayerNorm over the merged width)."""
    h, inter, p, m, out = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["spatial_merge_size"], \
        v["out_hidden_size"]
    embed = v["in_channels"] * v["temporal_patch_size"] * p * p * h + h + v["num_position_embeddings"] * h
    block = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * inter + inter) + (inter * h + h)
    merged = h * m * m
    mlp = merged * merged + merged + merged * out + out
    deepstack = len(v.get("deepstack_visual_indexes") or []) * (2 * merged + mlp)
    return embed + v["depth"] * block + 2 * h + mlp + deepstack


def glm4v_vision_params(v: dict) -> int:
    """GLM-4.5V's vision tower: learned position embeddings, a 3-D patch convolution with bias, ViT blocks (two
    RMSNorms, fused qkv (biased if attention_bias) and a bias-free output projection, a gated MLP of the
    out_hidden_size width), RMSNorms after the patch convolution and after the blocks, a spatial_merge_size
    downsampling convolution to the text width, and the merger (a projection, a LayerNorm, a gated MLP of
    intermediate_size)."""
    h, o, inter, p, m = v["hidden_size"], v["out_hidden_size"], v["intermediate_size"], v["patch_size"], \
        v["spatial_merge_size"]
    embed = (v["image_size"] // p) ** 2 * h + v["in_channels"] * v["temporal_patch_size"] * p * p * h + h
    block = 2 * h + 3 * h * h + (3 * h if v["attention_bias"] else 0) + h * h + 3 * h * o
    merger = o * o + 2 * o + 3 * o * inter
    return embed + v["depth"] * block + 2 * h + (o * h * m * m + o) + merger


def aria_vision_params(c: dict) -> int:
    """Aria's vision tower and projector: an Idefics3 (SigLIP) ViT (patch convolution with bias, position
    embeddings, biased attention and MLP, LayerNorms with bias, a post-LayerNorm), then the projector: learned
    queries (max_value_projector_patch_to_query_dict of them), a cross-attention (bias-free q/k/v, a torch
    MultiheadAttention, a biased output linear, two LayerNorms), a LayerNorm and a bias-free MLP to the text width."""
    v, T = c["vision_config"], c["text_config"]["hidden_size"]
    h, inter, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    embed = v["num_channels"] * p * p * h + h + (v["image_size"] // p) ** 2 * h
    layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * 2 * h
    cross = 3 * h * h + (3 * h * h + 3 * h) + (h * h + h) + (h * h + h) + 2 * 2 * h
    # transformers derives the query count in __post_init__ from projector_patch_to_query_dict, whose default
    # (None in the class) it fills with {1225: 128, 4900: 256}: read here the same way without transformers
    queries = c.get("max_value_projector_patch_to_query_dict") or max(
        (c["projector_patch_to_query_dict"] or {1225: 128, 4900: 256}).values())
    projector = queries * h + cross + 2 * h + h * T + T * T
    return embed + v["num_hidden_layers"] * layer + 2 * h + projector


def glm5_next_vision_params(v: dict) -> int:
    """GLM-5-Next's vision tower: a 3-D patch convolution with bias, ViT blocks (two RMSNorms, fused qkv and output
    projections biased if attention_bias, per-head q/k RMSNorms, a gated MLP of intermediate_size biased likewise),
    an RMSNorm after the blocks, a spatial_merge_size downsampling convolution to out_hidden_size, and the bias-free
    merger (a projection, a LayerNorm, a gated MLP of projection_intermediate_size); no position embeddings."""
    h, o, inter, p, m = v["hidden_size"], v["out_hidden_size"], v["intermediate_size"], v["patch_size"], \
        v["spatial_merge_size"]
    bias = bool(v["attention_bias"])
    embed = v["in_channels"] * v["temporal_patch_size"] * p * p * h + h
    block = 2 * h + 4 * h * h + (4 * h if bias else 0) + 2 * (h // v["num_heads"]) + 3 * h * inter \
        + ((2 * inter + h) if bias else 0)
    merger = o * o + 2 * o + 3 * o * v["projection_intermediate_size"]
    return embed + v["depth"] * block + h + (o * h * m * m + o) + merger


def minimax_m3_vision_params(c: dict) -> int:
    """MiniMax-M3's vision tower and projector: a bias-free 3-D patch convolution, a pre-LayerNorm, CLIP-like
    blocks (biased q/k/v/out projections and two-layer MLP, two LayerNorms with bias), then the projector: a biased
    two-layer MLP per patch to the text width, and one from spatial_merge_size^2 merged patches to the text width."""
    v, T, P = c["vision_config"], c["text_config"]["hidden_size"], c["projector_hidden_size"]
    h, inter, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    embed = v["num_channels"] * v["temporal_patch_size"] * p * p * h + 2 * h
    layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * 2 * h
    merged = T * v["spatial_merge_size"] ** 2
    projector = (h * P + P + P * T + T) + (merged * P + P + P * T + T)
    return embed + v["num_hidden_layers"] * layer + projector


def pixtral_vision_params(c: dict) -> int:
    """Mistral Large 4's Pixtral vision tower and projector: a bias-free patch convolution, an RMSNorm, bias-free
    blocks (two RMSNorms, q/k/v/o of the width, a gated MLP), then the projector: an RMSNorm, the bias-free
    spatial_merge_size^2 patch merger, and two linears to the text width (biased if multimodal_projector_bias)
    from the concatenated vision_feature_layer outputs."""
    v, T = c["vision_config"], c["text_config"]["hidden_size"]
    h, inter, p, m = v["hidden_size"], v["intermediate_size"], v["patch_size"], c["spatial_merge_size"]
    layers = c["vision_feature_layer"]
    n_feature = len(layers) if isinstance(layers, list) else 1
    bias = bool(c["multimodal_projector_bias"])
    tower = v["num_channels"] * p * p * h + h + v["num_hidden_layers"] * (2 * h + 4 * h * h + 3 * h * inter)
    projector = h + h * m * m * h + (h * n_feature * T + (T if bias else 0)) + (T * T + (T if bias else 0))
    return tower + projector


def dots3_vision_params(v: dict) -> int:
    """dots3's vision tower: a patch convolution with bias and an RMSNorm, blocks of two RMSNorms, fused qkv and
    output projections (biased if attention_bias), per-head q/k RMSNorms and an FFN by mlp_layer_types (a router and
    num_local_experts gated experts of moe_intermediate_size, or a gated MLP of intermediate_size biased if
    mlp_bias), a final RMSNorm, and the merger (a LayerNorm, an MLP over adapter_merge_size^2 patches to
    adapter_out_dim, biased)."""
    # the released checkpoint's names, read by Dots3NoteVisionEncoderConfig (kept here without transformers)
    v = {**v, **{new: v[old] for old, new in (("embed_dim", "hidden_size"), ("num_heads", "num_attention_heads"),
                                              ("use_bias", "attention_bias")) if old in v}}
    h, p = v["hidden_size"], v["patch_size"]
    bias = bool(v["attention_bias"])
    attention = 2 * h + 4 * h * h + (4 * h if bias else 0) + 2 * (h // v["num_attention_heads"])
    dense = 3 * h * v["intermediate_size"] + ((2 * v["intermediate_size"] + h) if v["mlp_bias"] else 0)
    # experts per layer: per_layer_config, or the "pyramid" (25 dense layers, then 4, 8, ... 64 experts) by default
    pyramid = v.get("pyramid_num_routed")
    if pyramid is None and v["mlp_layer_types"] is None:
        pyramid = [-1] * 25 + list(range(4, 65, 4)) + [64]
    per_layer = {int(i): e.get("num_local_experts", v["num_local_experts"])
                 for i, e in (v.get("per_layer_config") or {}).items()}
    if pyramid is not None:
        types, per_layer = ["sparse" if n > 0 else "dense" for n in pyramid], {i: n for i, n in enumerate(pyramid)}
    else:
        types = v["mlp_layer_types"]
    moe = lambda E: E * 3 * h * v["moe_intermediate_size"] + E * h
    blocks = sum(attention + (moe(per_layer.get(i, v["num_local_experts"])) if t == "sparse" else dense)
                 for i, t in enumerate(types))
    merged, out = h * v["adapter_merge_size"] ** 2, v["adapter_out_dim"]
    merger = 2 * h + (merged * merged + merged) + (merged * out + out)
    return v["num_channels"] * p * p * h + h + h + blocks + h + merger


def dots3_audio_params(a: dict) -> int:
    """dots3's audio tower: three 3x3 convolutions with biases, a bias-free projection from the flattened
    (channels x mel bins / 8) to the width, blocks of two RMSNorms, q/k/v/o projections (q, v and o biased if
    attention_bias) and a biased gated MLP, a final RMSNorm, and the adapter (a LayerNorm, two biased linears)."""
    h, inter, ch, out = a["hidden_size"], a["intermediate_size"], a["downsample_hidden_size"], a["adapter_out_dim"]
    convs = (9 * ch + ch) + 2 * (9 * ch * ch + ch) + ch * ((a["feature_size"] + 7) // 8) * h
    layer = 2 * h + 4 * h * h + (3 * h if a["attention_bias"] else 0) + (2 * inter * h + 2 * inter) + (inter * h + h)
    adapter = 2 * a["adapter_input_size"] + (a["adapter_input_size"] * out + out) + (out * out + out)
    return convs + a["num_hidden_layers"] * layer + h + adapter


def hyper_connection_params(s: ArchSpec) -> int:
    """All hyper-connection mixers: two per layer (ArchSpec.hc_streams), and Qwen4-Exp's last one."""
    n, nd, r = s.hc_streams, s.hc_streams * s.d, s.hc_lowrank
    if not n:
        return 0
    if r:  # Qwen4-Exp's gated residual
        return s.n_layers * 2 * (nd + 2 * nd * r + nd * n) + (nd + 2 * nd * r)
    return s.n_layers * 2 * ((2 + n) * n * (nd + 1) + 3)


def _nth_prime_after(start: int, count: int) -> int:
    """The count-th prime above start (Qwen4-Exp sizes each hashed n-gram table by one)."""
    def is_prime(n: int) -> bool:
        return n > 1 and all(n % f for f in range(2, math.isqrt(n) + 1))
    n = start
    for _ in range(count):
        n += 1
        while not is_prime(n):
            n += 1
    return n


def qwen4_exp_ple_params(c: dict) -> int:
    """Qwen4-Exp's per-layer embeddings on the layers ple_layer_ids lists (1-indexed): (ngram_size - 1) *
    heads_per_ngram hashed n-gram tables of ple_embed_dim / heads columns, each a distinct prime number of rows
    above ngram_vocab_size_base (the j-th PLE layer continues the count), one table padded to
    make_ngram_vocab_size_divisible_by rows; a key projection to the hc_count streams and a value projection to d,
    three norms over the streams and a depthwise dilated convolution over them."""
    d, n = c["hidden_size"], c["hc_count"]
    E = c.get("ple_embed_dim") or d
    heads = (c["ngram_size"] - 1) * c["heads_per_ngram"]
    total = 0
    for j, _ in enumerate(sorted(set(c["ple_layer_ids"] or []))):
        rows = sum(_nth_prime_after(c["ngram_vocab_size_base"] - 1, j * heads + h + 1) for h in range(heads))
        div = c["make_ngram_vocab_size_divisible_by"]
        total += -(-rows // div) * div * (E // heads) + E * n * d + E * d + 3 * n * d + n * d * c["ple_conv_kernel_size"]
    return total


def qwen3_omni_audio_params(a: dict) -> int:
    """Qwen3-Omni's audio encoder: three stride-2 3x3 convolutions with biases over the mel spectrogram, a
    bias-free linear from the flattened (channels x downsampled mel bins) to d_model, sinusoidal positions (a
    buffer), Whisper-style encoder layers (biased attention and MLP, LayerNorms with bias), a final LayerNorm and
    two biased projections to output_dim."""
    d, ffn, ch = a["d_model"], a["encoder_ffn_dim"], a["downsample_hidden_size"]
    mel = a["num_mel_bins"]
    for _ in range(3):  # each conv halves the mel axis (kernel 3, stride 2, padding 1)
        mel = (mel + 1) // 2
    convs = (9 * ch + ch) + 2 * (9 * ch * ch + ch)
    layer = 4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 2 * 2 * d
    out = a["output_dim"]
    return convs + ch * mel * d + a["encoder_layers"] * layer + 2 * d + (d * d + d) + (d * out + out)


def sam_vision_params(s: dict) -> int:
    """The SAM ViT-B image encoder of DeepSeek-OCR-2 and Unlimited-OCR: a patch convolution with bias, absolute
    position embeddings (use_abs_pos), blocks (LayerNorms with bias, fused qkv (biased if qkv_bias) and output
    projections, relative position tables (use_rel_pos) over the window, or the whole patch grid on the
    global_attn_indexes layers, a biased two-layer MLP of mlp_dim), the neck (bias-free 1x1 and 3x3 convolutions to
    output_channels, each followed by a LayerNorm with bias) and two bias-free stride-2 3x3 convolutions through
    downsample_channels."""
    h, p, grid, out = s["hidden_size"], s["patch_size"], s["image_size"] // s["patch_size"], s["output_channels"]
    # DeepSeek-OCR-2's config leaves these None and derives them in __post_init__ (read the same way without it)
    mlp = s["mlp_dim"] or int(h * s["mlp_ratio"])
    c0, c1 = s["downsample_channels"] or (512, 896)
    embed = s["num_channels"] * p * p * h + h + (grid * grid * h if s["use_abs_pos"] else 0)
    blocks = 0
    for i in range(s["num_hidden_layers"]):
        span = grid if i in s["global_attn_indexes"] or not s["window_size"] else s["window_size"]
        rel = 2 * (2 * span - 1) * (h // s["num_attention_heads"]) if s["use_rel_pos"] else 0
        blocks += 2 * 2 * h + 3 * h * h + (3 * h if s["qkv_bias"] else 0) + h * h + h + rel + 2 * h * mlp + mlp + h
    neck = h * out + 2 * out + 9 * out * out + 2 * out
    return embed + blocks + neck + 9 * out * c0 + 9 * c0 * c1


def deepseek_ocr2_vision_params(c: dict) -> int:
    """DeepSeek-OCR-2's vision side: the SAM encoder, a Qwen2-style encoder over its features (q/k/v biases, a
    bias-free output projection, gated MLPs, RMSNorms, a final norm, no token embedding), learned queries for the
    768 px (144) and 1024 px (256) resolutions, the linear projector (with bias) to the text width, and the learned
    view separator (one text-width vector)."""
    e, T = c["vision_config"]["encoder_config"], c["text_config"]["hidden_size"]
    h, H = e["hidden_size"], e["num_attention_heads"]
    hd, kv = e.get("head_dim") or h // H, e["num_key_value_heads"] or H
    layer = (h * H * hd + H * hd) + 2 * (h * kv * hd + kv * hd) + H * hd * h + 3 * h * e["intermediate_size"] + 2 * h
    encoder = e["num_hidden_layers"] * layer + h
    return sam_vision_params(c["vision_config"]["sam_config"]) + encoder + (144 + 256) * h + (h * T + T) + T


def unlimited_ocr_vision_params(c: dict) -> int:
    """Unlimited-OCR's vision side: the SAM encoder, a CLIP ViT over its features (class and position embeddings, a
    pre-LayerNorm, biased attention and MLP, LayerNorms with bias; no patch embedding, no post-LayerNorm), the
    linear projector (with bias) from the concatenated SAM and CLIP features to the text width, and two learned
    text-width vectors (view separator, image newline)."""
    v, T = c["vision_config"], c["text_config"]["hidden_size"]
    e, s = v["encoder_config"], v["sam_config"]
    h, inter = e["hidden_size"], e["intermediate_size"]
    embed = h + ((e["image_size"] // e["patch_size"]) ** 2 + 1) * h + 2 * h
    layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * 2 * h
    projector = (s["downsample_channels"][-1] + h) * T + T
    return sam_vision_params(s) + embed + e["num_hidden_layers"] * layer + projector + 2 * T


def _switch_layers(n: int, n_sparse: int, offset: int) -> list[int]:
    # HF derives the step from the number of sparse layers and makes layer i sparse when i % step == 1
    step = n // n_sparse if n_sparse > 0 else n
    return [offset + i for i in range(n) if step == 1 or i % step == 1]


# ---------------------------------------------------------------- one builder per family (the table below)
# Each reads a full config (config_reader.read_hf_config: every field present, transformers' defaults).
def _decoder(c: dict, name: str, **kw) -> ArchSpec:
    """The fields every decoder-only family shares; ``kw`` overrides them."""
    H, d = kw.get("n_heads") or c["num_attention_heads"], c["hidden_size"]
    base = dict(name=name, family=c["model_type"], vocab=c["vocab_size"], d=d, n_layers=c["num_hidden_layers"],
                tie_embeddings=bool(c["tie_word_embeddings"]), n_heads=H,
                n_kv_heads=c.get("num_key_value_heads") or H, head_dim=c.get("head_dim") or d // H,
                dense_inter=c.get("intermediate_size") or 0)
    return ArchSpec(**{**base, **kw})


def _all_layers(c: dict) -> list[int]:
    return list(range(c["num_hidden_layers"]))


def _bias(c: dict, key: str = "attention_bias") -> dict:
    """q/k/v and output projection biases both set by one field."""
    return dict(qkv_bias=bool(c[key]), o_bias=bool(c[key]))


def _sparse_step_layers(c: dict, E: int) -> list[int]:
    """Qwen MoE families: layer i is sparse unless listed in mlp_only_layers, every decoder_sparse_step-th."""
    skip = set(c["mlp_only_layers"] or [])
    step = c["decoder_sparse_step"] or 1
    return [i for i in range(c["num_hidden_layers"]) if E and i not in skip and (i + 1) % step == 0]


def _first_k_dense_layers(c: dict, E: int | None) -> list[int]:
    """DeepSeek-style: dense before first_k_dense_replace, then MoE every moe_layer_freq-th layer."""
    first, freq = c.get("first_k_dense_replace") or 0, c.get("moe_layer_freq") or 1
    return [i for i in range(c["num_hidden_layers"]) if E and i >= first and i % freq == 0]


def _typed_moe_layers(c: dict, E: int | None) -> list[int]:
    """The layers mlp_layer_types marks "sparse" (transformers 5 families), else DeepSeek's pattern."""
    types = c.get("mlp_layer_types")
    return [i for i, t in enumerate(types) if E and t == "sparse"] if types else _first_k_dense_layers(c, E)


def _experts(c: dict, E: str, k: str, inter: str) -> dict:
    return dict(num_experts=c[E] or 0, top_k=c[k] or 0, expert_inter=c[inter])


def _spec_mixtral(c: dict, name: str) -> ArchSpec:  # also MiniMax's and GraniteMoE's MoE blocks
    return _decoder(c, name, moe_layers=_all_layers(c), **_experts(c, "num_local_experts", "num_experts_per_tok",
                                                                   "intermediate_size"))


def _spec_phimoe(c: dict, name: str) -> ArchSpec:
    """PhiMoE: LayerNorms with biases, optional biases on attention and on the LM head."""
    return dataclasses.replace(_spec_mixtral(c, name), norm_bias=True, lm_head_bias=bool(c["lm_head_bias"]),
                               **_bias(c))


def _spec_granitemoe(c: dict, name: str) -> ArchSpec:
    """GraniteMoE(-Shared): Mixtral's layout with optional attention biases and a shared MLP; GraniteMoE-SWA
    adds attention sinks on every layer."""
    return dataclasses.replace(_spec_mixtral(c, name), shared_inter=c.get("shared_intermediate_size") or 0,
                               attn_sinks=c["model_type"] == "granitemoe_swa", **_bias(c))


def _spec_minimax(c: dict, name: str) -> ArchSpec:
    """MiniMax-01: lightning (linear) attention on the layers layer_types marks, each a fused qkv projection,
    an output gate, a norm over the heads and an output projection."""
    L, hd = c["num_hidden_layers"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    types = c["layer_types"] or ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(L)]
    inner, d = c["num_attention_heads"] * hd, c["hidden_size"]
    return dataclasses.replace(_spec_mixtral(c, name), linear_layers=[i for i, t in enumerate(types)
                                                                      if t == "linear_attention"],
                               linear_attn_params=3 * d * inner + inner * d + d * inner + inner,
                               linear_kind="lightning attention")


def _spec_minimax_m2(c: dict, name: str) -> ArchSpec:
    """MiniMax-M2: GQA with q/k norms over the whole projection, MoE on every layer, sigmoid routing with a
    selection-only correction bias (a buffer)."""
    return _decoder(c, name, qk_norm="full", moe_layers=_all_layers(c), router_correction_bias=True,
                    **_experts(c, "num_local_experts", "num_experts_per_tok", "intermediate_size"))


def _spec_exaone_moe(c: dict, name: str) -> ArchSpec:
    """EXAONE-MoE and HY-V3: per-head q/k norms, dense layers by mlp_layer_types, num_shared_experts shared
    experts as one MLP, a selection-only correction bias (a buffer); HY-V3 optional q/k/v/o biases."""
    if c.get("mlp_bias"):
        raise ConfigError(f"config.json mlp_bias=True ({c['model_type']}): the calculator counts bias-free FFNs")
    E = c["num_experts"]
    return _decoder(c, name, **(_bias(c) if "attention_bias" in c else {}), qk_norm="per_head",
                    moe_layers=_typed_moe_layers(c, E), router_correction_bias=True,
                    **_experts(c, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
                    shared_inter=(c["num_shared_experts"] or 0) * c["moe_intermediate_size"])


def _spec_afmoe(c: dict, name: str) -> ArchSpec:
    """AFMoE: per-head q/k norms, a sigmoid output gate per attention head dim (a second d x H*K projection, as
    Qwen3-Next's doubled q_proj), norms before and after the FFN too, num_dense_layers dense layers first,
    shared experts as one MLP, a selection bias that is a (frozen) parameter."""
    E, L = c["num_experts"], c["num_hidden_layers"]
    return _decoder(c, name, **_bias(c), qk_norm="per_head", attn_output_gate="per_dim", norms_per_layer=4,
                    moe_layers=[i for i in range(L) if E and i >= (c["num_dense_layers"] or 0)], router_bias=True,
                    **_experts(c, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
                    shared_inter=(c["num_shared_experts"] or 0) * c["moe_intermediate_size"])


def _spec_aria_text(c: dict, name: str) -> ArchSpec:
    """Aria's text decoder: Mixtral's layout (MoE on every layer) with moe_num_shared_experts shared experts of
    the expert width as one MLP."""
    if c["mlp_bias"]:
        raise ConfigError("config.json mlp_bias=True (aria_text): the calculator counts bias-free FFNs")
    return _decoder(c, name, **_bias(c), moe_layers=_all_layers(c) if c["moe_num_experts"] else [],
                    **_experts(c, "moe_num_experts", "moe_topk", "intermediate_size"),
                    shared_inter=(c["moe_num_shared_experts"] or 0) * c["intermediate_size"])


def _spec_kolibri1(c: dict, name: str) -> ArchSpec:
    """Kolibri-1: GQA with per-head q/k norms and no biases, sliding-window attention on the layers layer_types
    marks (all but every 5th by default), norms after attention and FFN too, MoE on every layer with an ungated
    shared expert and a selection-only correction bias (a buffer)."""
    L = c["num_hidden_layers"]
    types = c["layer_types"] or ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(L)]
    return _decoder(c, name, qk_norm="per_head", norms_per_layer=4, attn_windows=_sliding(dict(c, layer_types=types)),
                    window_kind="sliding", moe_layers=_all_layers(c) if c["num_local_experts"] else [],
                    router_correction_bias=True,
                    **_experts(c, "num_local_experts", "num_experts_per_tok", "moe_intermediate_size"),
                    shared_inter=c["shared_expert_intermediate_size"] or 0)


def _spec_aria(c: dict, name: str) -> ArchSpec:
    """Aria (image-text): its text decoder is counted, the vision tower and projector reported apart."""
    text = dict(c["text_config"], tie_word_embeddings=c["tie_word_embeddings"], model_type="aria_text")
    return dataclasses.replace(_spec_aria_text(text, name), vision_params=aria_vision_params(c))


def _spec_flint(c: dict, name: str) -> ArchSpec:
    """Flint: Qwen3-MoE's layout (mlp_only_layers, decoder_sparse_step, per-head q/k norms) with attention sinks
    and an ungated shared expert."""
    E = c["num_experts"]
    return _decoder(c, name, **_bias(c), qk_norm="per_head", attn_sinks=True, moe_layers=_sparse_step_layers(c, E),
                    **_experts(c, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
                    shared_inter=c["shared_expert_intermediate_size"] or 0)


def _spec_mellum(c: dict, name: str) -> ArchSpec:
    """Mellum: GQA with per-head q/k norms, MoE on the layers mlp_layer_types marks, no shared expert."""
    E = c["num_local_experts"]
    return _decoder(c, name, **_bias(c), qk_norm="per_head", moe_layers=_typed_moe_layers(c, E),
                    **_experts(c, "num_local_experts", "num_experts_per_tok", "moe_intermediate_size"))


def _spec_qwen_moe(c: dict, name: str) -> ArchSpec:
    """Qwen2-MoE (q/k/v biases, a sigmoid-gated shared expert) and Qwen3-MoE (per-head q/k norms)."""
    mt, E = c["model_type"], c["num_experts"]
    qwen2 = mt == "qwen2_moe"
    bias = dict(qkv_bias=bool(c["qkv_bias"])) if qwen2 else _bias(c)
    return _decoder(c, name, **bias, qk_norm="none" if qwen2 else "per_head", moe_layers=_sparse_step_layers(c, E),
                    **_experts(c, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
                    shared_inter=c["shared_expert_intermediate_size"] if qwen2 else 0, shared_gate=qwen2)


def _gated_deltanet(c: dict, types: list[str]) -> dict:
    """Gated DeltaNet linear attention on the layers ``types`` marks "linear_attention": q, k, v, z, beta and
    alpha projections (fused or not, the same count), a causal depthwise convolution over q, k, v, per-value-head
    decay parameters (dt_bias, A_log), a norm over the value head dim, the output projection."""
    d = c["hidden_size"]
    hk, dk, hv, dv = (c["linear_num_key_heads"], c["linear_key_head_dim"], c["linear_num_value_heads"],
                      c["linear_value_head_dim"])
    conv = 2 * hk * dk + hv * dv
    linear = d * (2 * hk * dk + 2 * hv * dv) + d * 2 * hv + conv * c["linear_conv_kernel_dim"] + 2 * hv + dv \
        + hv * dv * d
    return dict(linear_kind="gated DeltaNet", linear_layers=[i for i, t in enumerate(types) if t == "linear_attention"],
                linear_attn_params=linear)


def _qwen_next(c: dict) -> dict:
    """Qwen3-Next / Qwen3.5: gated full attention (q_proj doubled for the output gate, per-head q/k norms) on every
    full_attention_interval-th layer (4), gated DeltaNet on the others, a sigmoid-gated shared expert."""
    L, interval = c["num_hidden_layers"], c.get("full_attention_interval") or 4
    types = c["layer_types"] or ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(L)]
    return dict(**_gated_deltanet(c, types), **_bias(c), qk_norm="per_head", attn_output_gate="q_doubled",
                **_experts(c, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
                shared_inter=c["shared_expert_intermediate_size"], shared_gate=True)


def _spec_qwen3_next(c: dict, name: str) -> ArchSpec:
    """Qwen3-Next: MoE layers by mlp_only_layers / decoder_sparse_step."""
    return _decoder(c, name, **_qwen_next(c), moe_layers=_sparse_step_layers(c, c["num_experts"]))


def _spec_qwen3_5_moe(c: dict, name: str) -> ArchSpec:
    """Qwen3.5-MoE's text decoder: Qwen3-Next's hybrid with MoE on every layer."""
    return _decoder(c, name, **_qwen_next(c), moe_layers=_all_layers(c) if c["num_experts"] else [])


def _spec_qwen3_5_moe_vl(c: dict, name: str) -> ArchSpec:
    """Qwen3.5-MoE (image-text, the hub's model_type): the text decoder is counted, the vision tower reported
    apart."""
    text = dict(c["text_config"], tie_word_embeddings=c["tie_word_embeddings"], model_type="qwen3_5_moe_text")
    return dataclasses.replace(_spec_qwen3_5_moe(text, name), vision_params=qwen3_vl_vision_params(c["vision_config"]))


def _spec_qwen3_vl_moe(c: dict, name: str) -> ArchSpec:
    """Qwen3-VL-MoE (image-text): its Qwen3-MoE text decoder is counted, the vision tower reported apart."""
    text = dict(c["text_config"], tie_word_embeddings=c["tie_word_embeddings"], model_type="qwen3_vl_moe_text")
    return dataclasses.replace(_spec_qwen_moe(text, name), vision_params=qwen3_vl_vision_params(c["vision_config"]))


def _spec_qwen3_omni_moe_thinker(c: dict, name: str) -> ArchSpec:
    """Qwen3-Omni's thinker (text, image, audio in; text out): its Qwen3-MoE text decoder is counted, the
    Qwen3-VL-style vision tower and the audio encoder reported apart."""
    text = dict(c["text_config"], tie_word_embeddings=c["tie_word_embeddings"], model_type="qwen3_omni_moe_text")
    return dataclasses.replace(_spec_qwen_moe(text, name), vision_params=qwen3_vl_vision_params(c["vision_config"]),
                               audio_params=qwen3_omni_audio_params(c["audio_config"]))


def _spec_ocr_text(c: dict, name: str, family: str) -> ArchSpec:
    """The DeepSeek-OCR-2 / Unlimited-OCR text decoder: DeepSeekMoE's GQA layout (head_dim always hidden_size /
    heads, as their configs set it), MoE on the layers mlp_layer_types marks "sparse", shared experts as one MLP, no
    correction bias."""
    if c["mlp_bias"]:
        raise ConfigError(f"config.json text_config.mlp_bias=True ({family}): the calculator counts "
                          "bias-free FFNs")
    if c["mlp_layer_types"] is None:
        raise ConfigError(f"config.json text_config.mlp_layer_types=None ({family}): expected a list of "
                          "'dense'/'sparse' per layer (transformers cannot build the model without it)")
    text = dict(c, model_type="deepseek", head_dim=c["hidden_size"] // c["num_attention_heads"])
    return dataclasses.replace(_spec_deepseek(text, name), family=family)


def _spec_deepseek_ocr2(c: dict, name: str) -> ArchSpec:
    """DeepSeek-OCR-2 (image-text): its text decoder is counted, the SAM + Qwen2-style vision encoders, queries,
    projector and view separator reported apart."""
    text = dict(c["text_config"], tie_word_embeddings=c["tie_word_embeddings"])
    return dataclasses.replace(_spec_ocr_text(text, name, "deepseek_ocr2"),
                               vision_params=deepseek_ocr2_vision_params(c))


def _spec_unlimited_ocr(c: dict, name: str) -> ArchSpec:
    """Unlimited-OCR (image-text): its text decoder is counted, the SAM + CLIP vision encoders, projector and
    learned separators reported apart. The original checkpoint's config stores the text config as language_config,
    which transformers reads as text_config; the defaults table is read the same way."""
    text = c["text_config"]
    if isinstance(c.get("language_config"), dict):  # (transformers has consumed it; the table has not)
        text = read_hf_config(dict(c["language_config"], model_type="unlimited_ocr_text"), use_transformers=False)
    if text["mlp_layer_types"] is None:  # UnlimitedOcrTextConfig derives them from first_k_dense_replace (1)
        k = text.get("first_k_dense_replace", 1)
        text = dict(text, mlp_layer_types=["sparse" if i >= k else "dense" for i in range(text["num_hidden_layers"])])
    text = dict(text, tie_word_embeddings=c["tie_word_embeddings"])
    return dataclasses.replace(_spec_ocr_text(text, name, "unlimited_ocr"),
                               vision_params=unlimited_ocr_vision_params(dict(c, text_config=text)))


def _spec_glm4v_moe(c: dict, name: str) -> ArchSpec:
    """GLM-4.5V (image-text): its GLM-4.5 text decoder (q/k/v biases, no q/k norms) is counted, the vision tower
    reported apart."""
    text = dict(c["text_config"], tie_word_embeddings=c["tie_word_embeddings"], model_type="glm4_moe",
                use_qk_norm=c["text_config"].get("use_qk_norm", False))
    return dataclasses.replace(_spec_deepseek(text, name), vision_params=glm4v_vision_params(c["vision_config"]))


def _spec_lara_mini(c: dict, name: str) -> ArchSpec:
    """Lara-mini: gated DeltaNet, sliding-window and full attention layers (layer_types; by default the pattern
    linear, sliding, linear, full, sliding), per-head q/k norms, no output gate, MoE on every layer with an ungated
    shared expert."""
    pattern = ["linear_attention", "sliding_attention", "linear_attention", "full_attention", "sliding_attention"]
    types = c["layer_types"] or [pattern[i % 5] for i in range(c["num_hidden_layers"])]
    return _decoder(c, name, **_gated_deltanet(c, types), **_bias(c), qk_norm="per_head",
                    attn_windows=_sliding(dict(c, layer_types=types)), window_kind="sliding",
                    moe_layers=_all_layers(c) if c["num_experts"] else [],
                    **_experts(c, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
                    shared_inter=c["shared_expert_intermediate_size"])


def _spec_lfm2_moe(c: dict, name: str) -> ArchSpec:
    """LFM2-MoE: gated short-convolution layers (in_proj to 3 x d, a depthwise causal convolution of conv_L_cache,
    out_proj; biases if conv_bias) and GQA layers with per-head q/k norms, as layer_types marks; num_dense_layers
    dense layers first, then MoE without shared experts, a selection-only expert bias (a buffer)."""
    if c["layer_types"] is None:
        raise ConfigError("config.json layer_types=None (lfm2_moe): the calculator needs the per-layer list of "
                          "'full_attention' / 'conv' (transformers cannot build the model without it either)")
    L, E, d, K = c["num_hidden_layers"], c["num_experts"], c["hidden_size"], c["conv_L_cache"]
    conv = 3 * d * d + d * K + d * d + (5 * d if c["conv_bias"] else 0)
    return _decoder(c, name, qk_norm="per_head", linear_layers=[i for i, t in enumerate(c["layer_types"]) if t == "conv"],
                    linear_attn_params=conv, linear_kind="gated short convolution",
                    moe_layers=[i for i in range(L) if E and i >= c["num_dense_layers"]],
                    router_correction_bias=bool(c["use_expert_bias"]),
                    **_experts(c, "num_experts", "num_experts_per_tok", "moe_intermediate_size"))


def _kda_params(d: int, head_dim: int, heads: int, conv_kernel: int, low_rank: bool) -> int:
    """Kimi Delta Attention (Kimi Linear, Moonshot 2025) of heads x head_dim = Q: q, k, v projections, a depthwise
    convolution over them, a forget gate projection with dt_bias and per-head A_log, a beta projection per head,
    an output gate projection, a norm over head_dim, the output projection. Kimi's gate projections are low-rank
    (d -> head_dim -> Q), Bailing-hybrid's full (d -> Q)."""
    Q = heads * head_dim
    gate = d * head_dim + head_dim * Q if low_rank else d * Q
    return 3 * d * Q + 3 * Q * conv_kernel + (gate + Q + heads) + d * heads + gate + head_dim + Q * d


def _spec_bailing_hybrid(c: dict, name: str) -> ArchSpec:
    """Bailing-hybrid (Ling 2.5): KDA with full-rank gates (head_dim and heads those of the config's attention) and
    MLA with a sigmoid gate per head (g_proj) on every layer_group_size-th layer, first_k_dense_replace dense
    layers, n_shared_experts shared experts as one MLP, a selection-only correction bias (a buffer). The MTP layers
    (num_mtp_layers) are not built by transformers and not counted."""
    L, E = c["num_hidden_layers"], c["num_local_experts"]
    types = c["layer_types"] or ["full_attention" if (i + 1) % c["layer_group_size"] == 0 else "linear_attention"
                                 for i in range(L)]
    mlp = c["mlp_layer_types"] or ["dense" if i < c["first_k_dense_replace"] else "sparse" for i in range(L)]
    # transformers sets linear_* from head_dim / num_attention_heads / short_conv_kernel_size when it reads a config
    kda = _kda_params(c["hidden_size"], c.get("linear_head_dim") or c["head_dim"],
                      c.get("linear_num_heads") or c["num_attention_heads"],
                      c.get("linear_conv_kernel_dim") or c["short_conv_kernel_size"], low_rank=False)
    return _decoder(c, name, **_mla(c), attn_output_gate="per_head",
                    linear_layers=[i for i, t in enumerate(types) if t == "linear_attention"],
                    linear_attn_params=kda, linear_kind="Kimi Delta Attention",
                    moe_layers=[i for i, t in enumerate(mlp) if E and t == "sparse"], router_correction_bias=True,
                    **_experts(c, "num_local_experts", "num_experts_per_tok", "moe_intermediate_size"),
                    shared_inter=(c["n_shared_experts"] or 0) * c["moe_intermediate_size"])


def _spec_kimi_linear(c: dict, name: str) -> ArchSpec:
    """Kimi Linear: KDA layers and MLA layers (layer_types; the config.json's linear_attn_config lists both,
    1-indexed; else MLA on every 4th layer from layer 4), dense layers by mlp_layer_types (first_k_dense_replace,
    1), n_shared_experts shared experts as one MLP, a selection-only correction bias (a buffer)."""
    L, E = c["num_hidden_layers"], c["num_local_experts"]
    lin = c.get("linear_attn_config") or {}
    types = c["layer_types"]
    if types is None and "full_attn_layers" in lin and "kda_layers" in lin:
        types = ["full_attention" if i + 1 in lin["full_attn_layers"] else "linear_attention" for i in range(L)]
    types = types or ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(L)]
    mlp = c["mlp_layer_types"] or ["dense" if i < c.get("first_k_dense_replace", 1) else "sparse" for i in range(L)]
    kda = _kda_params(c["hidden_size"], lin.get("head_dim", c["linear_head_dim"]),
                      lin.get("num_heads", c["linear_num_heads"]),
                      lin.get("short_conv_kernel_size", c["linear_conv_kernel_dim"]), low_rank=True)
    return _decoder(c, name, **_mla(c), linear_layers=[i for i, t in enumerate(types) if t == "linear_attention"],
                    linear_attn_params=kda, linear_kind="Kimi Delta Attention",
                    moe_layers=[i for i, t in enumerate(mlp) if E and t == "sparse"], router_correction_bias=True,
                    **_experts(c, "num_local_experts", "num_experts_per_tok", "moe_intermediate_size"),
                    shared_inter=(c["n_shared_experts"] or 0) * c["moe_intermediate_size"])


def _mamba_params(c: dict) -> int:
    """Jamba's Mamba mixer (Gu & Dao 2023) on width I = mamba_expand * d: in_proj to (x, z), a causal depthwise
    convolution, x_proj to (dt, B, C), dt_proj with a bias, A_log [I, N], D, out_proj, and Jamba's RMSNorms on
    dt, B and C (Lieber et al. 2024)."""
    d = c["hidden_size"]
    I, N, K, R = c["mamba_expand"] * d, c["mamba_d_state"], c["mamba_d_conv"], c["mamba_dt_rank"]
    R = math.ceil(d / 16) if R == "auto" else R
    proj_bias = 2 * I + d if c["mamba_proj_bias"] else 0
    return (2 * d * I + I * d + proj_bias + I * K + (I if c["mamba_conv_bias"] else 0)
            + I * (R + 2 * N) + R * I + I + I * N + I + R + 2 * N)


def _mamba2_params(d: int, I: int, G: int, N: int, nh: int, K: int, conv_bias: bool, proj_bias: bool) -> int:
    """A Mamba-2 mixer (Dao & Gu 2024) on width I with G groups of B/C of state N and nh heads: in_proj to (z, x, B,
    C, dt), a causal depthwise convolution of K over (x, B, C), per-head dt_bias, A_log and D, a gated RMSNorm over
    I, out_proj."""
    conv = I + 2 * G * N
    biases = I + conv + nh + d if proj_bias else 0
    return d * (I + conv + nh) + I * d + biases + conv * K + (conv if conv_bias else 0) + 3 * nh + I


def _spec_jamba(c: dict, name: str) -> ArchSpec:
    """Jamba: attention on every attn_layer_period-th layer (from attn_layer_offset), Mamba on the others; MoE on
    every expert_layer_period-th layer (from expert_layer_offset), dense MLPs on the others."""
    L, E = c["num_hidden_layers"], c["num_experts"]
    return _decoder(c, name, linear_layers=[i for i in range(L) if i % c["attn_layer_period"] != c["attn_layer_offset"]],
                    linear_attn_params=_mamba_params(c), linear_kind="Mamba",
                    moe_layers=[i for i in range(L) if E > 1 and i % c["expert_layer_period"] == c["expert_layer_offset"]],
                    **_experts(c, "num_experts", "num_experts_per_tok", "intermediate_size"))


def _spec_granitemoehybrid(c: dict, name: str) -> ArchSpec:
    """GraniteMoE-Hybrid (Granite 4.0-H): Mamba-2 on the layers layer_types marks, attention on the others; every
    layer has the shared MLP, and routed experts unless num_local_experts is 0 (then the shared MLP is the only
    FFN)."""
    types = c["layer_types"] or ["linear_attention"] * c["num_hidden_layers"]
    hybrid = dict(linear_layers=[i for i, t in enumerate(types) if t in ("mamba", "linear_attention")],
                  linear_attn_params=_mamba2_params(c["hidden_size"], c["mamba_expand"] * c["hidden_size"],
                                                    c["mamba_n_groups"], c["mamba_d_state"], c["mamba_n_heads"],
                                                    c["mamba_d_conv"], c["mamba_conv_bias"], c["mamba_proj_bias"]),
                  linear_kind="Mamba-2", **_bias(c))
    if not c["num_local_experts"]:
        return _decoder(c, name, **hybrid, dense_inter=c["shared_intermediate_size"])
    return dataclasses.replace(_spec_granitemoe(c, name), **hybrid)


NEMOTRON_H_BLOCKS = {"M": "linear_attention", "mamba": "linear_attention", "E": "moe", "*": "full_attention",
                     "attention": "full_attention", "-": "mlp"}  # pattern characters and legacy names


def _spec_nemotron_h(c: dict, name: str) -> ArchSpec:
    """Nemotron-H: each block is one norm and one of a Mamba-2 mixer (width mamba_num_heads x mamba_head_dim; its
    projection biases follow use_bias, not mamba_proj_bias), GQA attention without biases, a ReLU^2 MLP (up, down) or an MoE of ReLU^2 experts with a shared expert and a
    selection-only correction bias (a buffer); layers_block_type (or hybrid_override_pattern) lists them. Latent
    MoE (moe_latent_size) and mlp_bias are refused; MTP layers are not built by transformers and not counted."""
    if c.get("moe_latent_size") or c["mlp_bias"]:
        raise ConfigError(f"config.json moe_latent_size={c.get('moe_latent_size')}, mlp_bias={c['mlp_bias']} "
                          "(nemotron_h): the calculator counts experts on the model width without biases (None, False)")
    pattern = c.get("hybrid_override_pattern")
    types = c["layers_block_type"] or (list(pattern) if pattern else ["M", "E", "*", "-"])
    types = [NEMOTRON_H_BLOCKS.get(t, t) for t in types]
    layers = lambda *kinds: [i for i, t in enumerate(types) if t in kinds]
    d, E = c["hidden_size"], c["n_routed_experts"]
    # legacy config.json names transformers reads into these fields (without transformers: read here)
    c = {**c, **{new: c[old] for old, new in (("mamba_n_groups", "n_groups"), ("mamba_d_conv", "conv_kernel"),
                                              ("mamba_conv_bias", "use_conv_bias")) if old in c}}
    mamba = _mamba2_params(d, c["mamba_num_heads"] * c["mamba_head_dim"], c["n_groups"], c["ssm_state_size"],
                           c["mamba_num_heads"], c["conv_kernel"], c["use_conv_bias"], c["use_bias"])  # not mamba_proj_bias
    return _decoder(dict(c, num_hidden_layers=len(types)), name, norms_per_layer=1,
                    linear_layers=layers("linear_attention"), linear_attn_params=mamba, linear_kind="Mamba-2",
                    mixer_free_layers=layers("moe", "mlp"), ffn_free_layers=layers("linear_attention", "full_attention"),
                    dense_matrices=2, expert_matrices=2, moe_layers=layers("moe") if E else [],
                    router_correction_bias=True, **_experts(c, "n_routed_experts", "num_experts_per_tok",
                                                            "moe_intermediate_size"),
                    shared_inter=c["moe_shared_expert_intermediate_size"])


def _spec_cohere2_moe(c: dict, name: str) -> ArchSpec:
    """Cohere2-MoE: parallel attention + FFN blocks (one norm per layer), no biases but attention_bias, dense
    layers (mlp_layer_types; prefix_dense_intermediate_size wide) before the MoE ones, num_shared_experts
    shared experts as one MLP, sliding-window attention on the layers layer_types marks."""
    L, E, inter = c["num_hidden_layers"], c["num_experts"], c["intermediate_size"]
    first = c.get("first_k_dense_replace") or 0  # a config.json field transformers reads into the two lists
    types = c["mlp_layer_types"] or ["dense" if i < first else "sparse" for i in range(L)]
    pattern = lambda i: c["prefix_dense_sliding_window_pattern"] if i < first else c["sliding_window_pattern"]
    local = lambda i: (i - (first if i >= first else 0) + 1) % pattern(i) != 0
    windows = _sliding(c) if c["layer_types"] else [(c["sliding_window"] or 0) if local(i) else 0 for i in range(L)]
    return _decoder(c, name, **_bias(c), norms_per_layer=1, dense_inter=c["prefix_dense_intermediate_size"] or inter,
                    moe_layers=[i for i, t in enumerate(types) if E and t == "sparse"],
                    attn_windows=windows, window_kind="sliding",
                    **_experts(c, "num_experts", "num_experts_per_tok", "intermediate_size"),
                    shared_inter=(c["num_shared_experts"] or 0) * inter)


def _sliding(c: dict) -> list[int]:
    """Per-layer window from layer_types (transformers 5 fills it in every family that has it)."""
    types = c["layer_types"] or []
    return [c["sliding_window"] if t == "sliding_attention" and c["sliding_window"] else 0 for t in types]


def _mlp_types_dense_first(c: dict) -> list[str]:
    """mlp_layer_types, or the default of the families that have one dense layer first (Laguna, MiMo-V2-Flash)."""
    return c["mlp_layer_types"] or ["dense"] + ["sparse"] * (c["num_hidden_layers"] - 1)


def _spec_laguna(c: dict, name: str) -> ArchSpec:
    """Laguna: per-head q/k norms, a softplus output gate (g_proj: one per head, or per head dim when gating is
    "per-element"), heads per layer (num_attention_heads_per_layer), sliding-window layers, dense layers by
    mlp_layer_types (first only by default), an ungated shared expert, a selection bias that is a (frozen)
    parameter."""
    E, heads = c["num_experts"], c["num_attention_heads_per_layer"]
    gate = "per_head" if c["gating"] is True or c["gating"] == "per-head" else "per_dim"
    return _decoder(c, name, **_bias(c), qk_norm="per_head", attn_output_gate=gate,
                    layer_attention={i: dict(n_heads=h) for i, h in enumerate(heads or []) if h != c["num_attention_heads"]},
                    attn_windows=_sliding(c), window_kind="sliding",
                    moe_layers=[i for i, t in enumerate(_mlp_types_dense_first(c)) if E and t == "sparse"],
                    router_bias=True, **_experts(c, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
                    shared_inter=c["shared_expert_intermediate_size"] or 0)


def _spec_mimo_v2_flash(c: dict, name: str) -> ArchSpec:
    """MiMo-V2-Flash: GQA with value heads narrower than query/key heads (v_head_dim), q/k/v biases only; its
    sliding-window layers (layer_types; the first and every 6th layer are full by default) have twice the kv
    heads and attention sinks; dense layers by mlp_layer_types (first only by default), no shared expert, a
    selection-only correction bias (a buffer)."""
    L, E, kv = c["num_hidden_layers"], c["n_routed_experts"], c["num_key_value_heads"]
    types = c["layer_types"] or ["full_attention" if i == 0 or (i + 1) % 6 == 0 else "sliding_attention"
                                 for i in range(L)]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    return _decoder(c, name, qkv_bias=bool(c["attention_bias"]), v_head_dim=c["v_head_dim"],
                    layer_attention={i: dict(n_kv_heads=2 * kv, attn_sinks=True) for i in sliding},
                    attn_windows=[c["sliding_window"] if i in sliding else 0 for i in range(L)], window_kind="sliding",
                    moe_layers=[i for i, t in enumerate(_mlp_types_dense_first(c)) if E and t == "sparse"],
                    router_correction_bias=True,
                    **_experts(c, "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"))


def _spec_beam(c: dict, name: str) -> ArchSpec:
    """Beam: GQA with per-head q/k norms and a sigmoid output gate per head dim (a bias-free projection plus one
    bias per head), norms before and after attention and FFN, sliding-window attention on the layers layer_types
    marks (all but every 6th and the last by default), dense layers by mlp_layer_types (the first three by
    default), no shared expert, a selection-only correction bias (a buffer)."""
    L, E = c["num_hidden_layers"], c["num_experts"]
    types = c["layer_types"] or ["full_attention" if (i + 1) % 6 == 0 or i == L - 1 else "sliding_attention"
                                 for i in range(L)]
    mlp = c["mlp_layer_types"] or ["dense" if i < 3 else "sparse" for i in range(L)]
    return _decoder(c, name, **_bias(c), qk_norm="per_head", attn_output_gate="per_dim_head_bias", norms_per_layer=4,
                    attn_windows=_sliding(dict(c, layer_types=types)), window_kind="sliding",
                    moe_layers=[i for i, t in enumerate(mlp) if E and t == "sparse"], router_correction_bias=True,
                    **_experts(c, "num_experts", "num_experts_per_tok", "moe_intermediate_size"))


def _indexer_types(t: dict, L: int) -> list[str]:
    """Which layers run the sparse-attention indexer ("full") and which reuse the previous selection ("shared"):
    ``indexer_types``, else derived from the file's schedule fields as Glm5NextTextConfig and
    MistralLarge4TextConfig do."""
    if t["indexer_types"] is not None:
        return t["indexer_types"]
    pattern = t.get("index_topk_pattern")
    if isinstance(pattern, str):
        return [{"F": "full", "S": "shared"}[ch] for ch in pattern]
    if pattern is not None:
        return list(pattern)
    freq, offset = max(t.get("index_topk_freq", 1), 1), t.get("index_skip_topk_offset", 2)
    return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(L)]


def _spec_glm5_next(c: dict, name: str) -> ArchSpec:
    """GLM-5-Next (image-text): its text decoder is counted, the vision tower reported apart. The decoder: Kimi Delta
    Attention (low-rank gates) and MLA without RoPE dims, with a sparse-attention indexer (k-pool compression) on
    the layers indexer_types marks "full" (the others reuse the previous selection); every 4th layer is MLA by
    default; the first three layers dense by default; shared experts as one MLP, a selection-only correction bias
    (a buffer); hyper-connections (hc_mult streams) around attention and FFN."""
    t = c["text_config"]
    L, E = t["num_hidden_layers"], t["n_routed_experts"]
    types = t["layer_types"] or ["linear_attention" if i % 4 != 3 else "indexed_attention" for i in range(L)]
    mlp = t["mlp_layer_types"] or ["dense"] * min(3, L) + ["sparse"] * (L - 3)
    indexers = _indexer_types(t, L)
    lin = t.get("linear_attn_config") or {}
    kda = _kda_params(t["hidden_size"], lin.get("head_dim", t["linear_head_dim"]),
                      lin.get("num_heads", t["linear_num_heads"]),
                      lin.get("short_conv_kernel_size", t["linear_conv_kernel_dim"]), low_rank=True)
    no_indexer = dict(indexer_heads=0, indexer_head_dim=0, indexer_kpool=0)
    return _decoder(dict(t, tie_word_embeddings=c["tie_word_embeddings"], model_type="glm5_next"), name, **_mla(t),
                    indexer_heads=t["index_n_heads"], indexer_head_dim=t["index_head_dim"],
                    indexer_kpool=t["index_kpool"],
                    layer_attention={i: no_indexer for i, kind in enumerate(indexers) if kind == "shared"},
                    linear_layers=[i for i, kind in enumerate(types) if kind == "linear_attention"],
                    linear_attn_params=kda, linear_kind="Kimi Delta Attention", hc_streams=t["hc_mult"],
                    moe_layers=[i for i, kind in enumerate(mlp) if E and kind == "sparse"], router_correction_bias=True,
                    **_experts(t, "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
                    shared_inter=(t["n_shared_experts"] or 0) * t["moe_intermediate_size"],
                    vision_params=glm5_next_vision_params(c["vision_config"]))


MINIMAX_M3_LEGACY_INDEXER = {"index_n_heads": "sparse_num_index_heads", "index_head_dim": "sparse_index_dim"}


def _spec_minimax_m3_text(c: dict, name: str, vision: int = 0) -> ArchSpec:
    """MiniMax-M3's text decoder: GQA with per-head q/k norms and no biases, a lightning indexer (query heads from
    the hidden state, q/k RMSNorms) on the layers layer_types marks "minimax_m3_sparse" (from the file's
    sparse_attention_config when layer_types is absent; none by default), dense layers of dense_intermediate_size
    by mlp_layer_types (from moe_layer_freq; all MoE by default), a gated shared expert of shared_intermediate_size,
    a selection-only correction bias (a buffer)."""
    L, E = c["num_hidden_layers"], c["num_local_experts"]
    sparse = c.get("sparse_attention_config") or {}  # read by MiniMaxM3VLTextConfig, kept here without transformers
    c = {**c, **{flat: sparse[old] for flat, old in MINIMAX_M3_LEGACY_INDEXER.items() if old in sparse}}
    types = c["layer_types"] or ["minimax_m3_sparse" if f else "full_attention"
                                 for f in sparse.get("sparse_attention_freq") or [0] * L]
    freq = c.get("moe_layer_freq")
    mlp = c["mlp_layer_types"] or (["sparse" if f else "dense" for f in freq] if freq is not None else ["sparse"] * L)
    indexer = dict(indexer_heads=c["index_n_heads"], indexer_head_dim=c["index_head_dim"])
    return _decoder(c, name, qk_norm="per_head", dense_inter=c["dense_intermediate_size"],
                    layer_attention={i: indexer for i, t in enumerate(types) if t == "minimax_m3_sparse"},
                    moe_layers=[i for i, t in enumerate(mlp) if E and t == "sparse"], router_correction_bias=True,
                    **_experts(c, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
                    shared_inter=c["shared_intermediate_size"] or 0, vision_params=vision)


def _spec_minimax_m3_vl(c: dict, name: str) -> ArchSpec:
    """MiniMax-M3 (image-text): its text decoder is counted, the vision tower and projector reported apart."""
    text = dict(c["text_config"], tie_word_embeddings=c["tie_word_embeddings"], model_type="minimax_m3_vl_text")
    return _spec_minimax_m3_text(text, name, minimax_m3_vision_params(c))


def _spec_qwen4_exp_text(c: dict, name: str, vision: int = 0) -> ArchSpec:
    """Qwen4-Exp's text decoder: Qwen3-Next's hybrid (gated DeltaNet; gated attention with q_proj doubled and per-head
    q/k norms; every full_attention_interval-th layer, 4, is attention by default), a QSA indexer (one fused q/k
    projection, q/k norms) on every attention layer, MoE with a sigmoid-gated shared expert on every layer, gated
    residual hyper-connections (no per-layer or final norms outside them) and per-layer n-gram embeddings."""
    if c["indexer_n_heads"] is None:
        raise ConfigError("config.json indexer_n_heads=None (qwen4_exp_text): the calculator needs the QSA indexer "
                          "fields (transformers cannot build the model without them either)")
    L = c["num_hidden_layers"]
    interval = c.get("full_attention_interval") or 4
    types = c["layer_types"] or ["linear_attention" if (i + 1) % interval else "indexed_attention" for i in range(L)]
    return _decoder(c, name, **_qwen_next(dict(c, layer_types=types)), norms_per_layer=0, final_norm=False,
                    indexer_heads=c["indexer_n_heads"], indexer_kv_heads=c["indexer_kv_heads"],
                    indexer_head_dim=c["indexer_head_dim"], hc_streams=c["hc_count"], hc_lowrank=c["hc_lowrank"],
                    ple_params=qwen4_exp_ple_params(c), moe_layers=_all_layers(c), vision_params=vision)


def _spec_qwen4_exp(c: dict, name: str) -> ArchSpec:
    """Qwen4-Exp (image-text): its text decoder is counted, the Qwen3-VL-style vision tower reported apart."""
    text = dict(c["text_config"], tie_word_embeddings=c["tie_word_embeddings"], model_type="qwen4_exp_text")
    return _spec_qwen4_exp_text(text, name, qwen3_vl_vision_params(c["vision_config"]))


# "O" and the B/I/E/S tags of its 8 span labels: the id2label transformers' config fills when the file has none
PRIVACY_FILTER_DEFAULT_LABELS = 33


def _spec_openai_privacy_filter(c: dict, name: str) -> ArchSpec:
    """OpenAI Privacy Filter: gpt-oss's layers (biases everywhere, attention sinks, biased experts and router) as a
    bidirectional encoder with a band (sliding_window) on every layer, and a biased token-classification head of
    num_labels outputs instead of an LM head."""
    L = c["num_hidden_layers"]
    labels = len(c["id2label"]) if c.get("id2label") else c.get("num_labels") or PRIVACY_FILTER_DEFAULT_LABELS
    return _decoder(c, name, **_bias(c), attn_sinks=True, window_kind="sliding",
                    attn_windows=[c["sliding_window"] or 0] * L, head_rows=labels, lm_head_bias=True,
                    moe_layers=_all_layers(c), **_experts(c, "num_local_experts", "num_experts_per_tok",
                                                          "intermediate_size"), router_bias=True, expert_bias=True)


def _spec_axk2(c: dict, name: str) -> ArchSpec:
    """A.X-K2: MLA whose fused query/gate projection reads twice the q latent, a DeepSeek-V3.2 indexer on every
    layer, gated RMSNorms (low-rank gate MLPs) before attention and before MoE FFNs, dense layers by mlp_layer_types
    (first_k_dense_replace 1 / moe_layer_freq 1 by default), shared experts as one MLP, a selection-only correction
    bias (a buffer)."""
    L, E = c["num_hidden_layers"], c["n_routed_experts"]
    first, freq = c.get("first_k_dense_replace", 1), c.get("moe_layer_freq", 1)  # read by AXK2Config
    mlp = c["mlp_layer_types"] or ["sparse" if i >= first and i % freq == 0 else "dense" for i in range(L)]
    return _decoder(c, name, **_mla(c), attn_output_gate="mla_fused_q", indexer_heads=c["index_n_heads"],
                    indexer_head_dim=c["index_head_dim"], gated_norm_rank=c["gated_norm_rank"],
                    moe_layers=[i for i, t in enumerate(mlp) if E and t == "sparse"], router_correction_bias=True,
                    **_experts(c, "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
                    shared_inter=(c["n_shared_experts"] or 0) * c["moe_intermediate_size"])


# dots3's sliding-window layers: the MLA shape its config gives them unless the file's swa_* fields say otherwise
DOTS3_SLIDING_ATTENTION = dict(num_attention_heads=64, num_key_value_heads=64, q_lora_rank=1024, kv_lora_rank=1024,
                               head_dim=256, qk_nope_head_dim=192, v_head_dim=128)


def _dots3_layers(c: dict) -> tuple[list[str], dict[int, dict]]:
    """dots3's layer_types and per-layer attention overrides, as Dots3NoteTextConfig derives them from the file's
    legacy fields (use_dsa, use_sliding_window, swa_*) when it has no per_layer_config."""
    L = c["num_hidden_layers"]
    use_dsa = c.get("use_dsa", None if "per_layer_config" in c else True)
    types = c["layer_types"] or [("full_attention" if use_dsa is False else "indexed_attention")
                                 if not c.get("use_sliding_window", True) or i < 2 or i % 4 == 1
                                 else "sliding_attention" for i in range(L)]
    if use_dsa is not None:
        old, new = ("full_attention", "indexed_attention") if use_dsa else ("indexed_attention", "full_attention")
        types = [new if t == old else t for t in types]
    per_layer = c.get("per_layer_config")
    if per_layer is None:
        sliding = {k: c.get(f"swa_{k}", v) for k, v in DOTS3_SLIDING_ATTENTION.items()}
        sliding["qk_rope_head_dim"] = c.get("swa_qk_rope_head_dim", sliding["head_dim"] - sliding["qk_nope_head_dim"])
        per_layer = {i: sliding for i, t in enumerate(types) if t == "sliding_attention"}
    return types, {int(i): v for i, v in per_layer.items()}


def _spec_dots3_note_text(c: dict, name: str) -> ArchSpec:
    """dots3 (Dots 3 Note) text decoder: MLA with a per-head output gate (g_proj) and an RMSNorm over the rotary key,
    each layer's MLA shape from per_layer_config (sliding-window layers are wider by default), a DeepSeek-V3.2
    indexer on the indexed_attention layers, dense layers by mlp_layer_types (first_k_dense_replace 1 by default),
    shared experts of shared_experts_intermediate_size as one MLP, a selection-only correction bias (a buffer)."""
    if c["mlp_bias"]:
        raise ConfigError("config.json mlp_bias=True (dots3_note_text): the calculator counts bias-free FFNs")
    L, E = c["num_hidden_layers"], c["n_routed_experts"]
    first, freq = c.get("first_k_dense_replace", 1), c.get("moe_layer_freq", 1)  # read by Dots3NoteTextConfig
    mlp = c["mlp_layer_types"] or ["sparse" if i >= first and (bool(freq[i]) if isinstance(freq, list) else
                                                               i % freq == 0) else "dense" for i in range(L)]
    types, per_layer = _dots3_layers(c)

    def attention(i: int) -> dict:
        layer = {**c, **per_layer.get(i, {})}
        indexed = types[i] == "indexed_attention"
        return dict(**_mla(layer), n_heads=layer["num_attention_heads"],
                    indexer_heads=c["index_n_heads"] if indexed else 0,
                    indexer_head_dim=c["index_head_dim"] if indexed else 0)
    sliding = c.get("sliding_window") or c.get("sliding_window_size", 512)
    shared = c.get("moe_shared_expert_intermediate_size", c["shared_experts_intermediate_size"])  # the legacy name
    return _decoder(c, name, **attention(0), attn_output_gate="per_head", k_rope_norm=True,
                    layer_attention={i: attention(i) for i in range(1, L)},
                    attn_windows=[sliding if t == "sliding_attention" else 0 for t in types], window_kind="sliding",
                    moe_layers=[i for i, t in enumerate(mlp) if E and t == "sparse"], router_correction_bias=True,
                    **_experts(c, "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
                    shared_inter=(c["n_shared_experts"] or 0) * shared)


def _spec_mistral_large4(c: dict, name: str) -> ArchSpec:
    """Mistral Large 4 (image-text): its text decoder is counted, the Pixtral vision tower and projector reported
    apart. The decoder: MLA without a q latent, every no_rope_layer_interval-th layer (4) without RoPE dims (their
    kv up-projection carries them as nope dims), layers reusing an earlier layer's KV latent (kv_source_layers), a
    DeepSeek-V3.2-style indexer with its queries from the (LayerNormed) hidden state on the layers indexer_types
    marks "full", learned per-head logit scales and biases, learned RoPE frequencies, first_k_dense_replace dense
    layers, shared experts as one MLP, no correction bias."""
    t = c["text_config"]
    L, E = t["num_hidden_layers"], t["n_routed_experts"]
    rope = t["no_rope_layers"] or [int((i + 1) % t.get("no_rope_layer_interval", 4) != 0) for i in range(L)]
    source = t["kv_source_layers"] or list(range(L))
    indexers = _indexer_types(t, L)
    mlp = t["mlp_layer_types"] or ["dense" if i < t["first_k_dense_replace"] else "sparse" for i in range(L)]
    nope, rdim = t["qk_nope_head_dim"], t["qk_rope_head_dim"]

    def attention(i: int) -> dict:
        full = indexers[i] == "full"
        return dict(qk_nope_dim=nope if rope[i] else nope + rdim, qk_rope_dim=rdim if rope[i] else 0,
                    kv_shared=source[i] != i, indexer_heads=t["index_n_heads"] if full else 0,
                    indexer_head_dim=t["index_head_dim"] if full else 0)
    text = dict(t, q_lora_rank=None, tie_word_embeddings=c["tie_word_embeddings"], model_type="mistral_large4_text")
    return _decoder(text, name, **{**_mla(text), **attention(0)}, layer_attention={i: attention(i) for i in range(1, L)},
                    softmax_scaling=True, rope_params=rdim // 2,
                    moe_layers=[i for i, kind in enumerate(mlp) if E and kind == "sparse"],
                    **_experts(t, "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
                    shared_inter=(t["n_shared_experts"] or 0) * t["moe_intermediate_size"],
                    vision_params=pixtral_vision_params(c))


def _spec_dots3_note(c: dict, name: str) -> ArchSpec:
    """dots3 (text, image and audio in): its text decoder is counted, the vision tower (with its own MoE blocks) and
    the audio tower reported apart."""
    text = dict(c["text_config"], tie_word_embeddings=c["tie_word_embeddings"], model_type="dots3_note_text")
    return dataclasses.replace(_spec_dots3_note_text(text, name), vision_params=dots3_vision_params(c["vision_config"]),
                               audio_params=dots3_audio_params(c["audio_config"]))


def _spec_olmoe(c: dict, name: str) -> ArchSpec:
    """OLMoE and FlexOlmo: q/k norms over the whole projection."""
    E = "num_experts"
    return _decoder(c, name, **_bias(c), qk_norm="full", moe_layers=_all_layers(c),
                    **_experts(c, E, "num_experts_per_tok", "intermediate_size"))


MLA_FAMILIES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "mistral4")


def _mla(c: dict) -> dict:
    """DeepSeek-V2's multi-head latent attention fields; attention_bias biases the q/kv down-projections and o."""
    return dict(attention="mla", **_bias(c), q_lora_rank=c["q_lora_rank"] or 0, kv_lora_rank=c["kv_lora_rank"],
                qk_nope_dim=c["qk_nope_head_dim"], qk_rope_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"])


def _spec_deepseek(c: dict, name: str) -> ArchSpec:
    """DeepSeekMoE v1 (GQA) and the families that kept its FFN: fine-grained routed experts after
    first_k_dense_replace dense layers (or on the layers mlp_layer_types marks "sparse"), n_shared_experts
    shared experts as one MLP. DeepSeek-V2/V3 (and Kimi-K2), GLM-4.7-Flash (glm4_moe_lite) add MLA,
    DeepSeek-V3.2 and GLM-5 (glm_moe_dsa) MLA with a sparse-attention indexer; dots1 adds per-head q/k norms;
    GLM-4.5 optional q/k norms and q/k/v biases; Solar Open is GQA; Mistral 4 is DeepSeek-V3's layout; all but
    V1/V2 and Mistral 4 have a selection-only correction bias (a buffer)."""
    mt, E = c["model_type"], c["n_routed_experts"]
    kw = dict(moe_layers=_typed_moe_layers(c, E),
              **_experts(c, "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
              shared_inter=(c["n_shared_experts"] or 0) * c["moe_intermediate_size"],
              router_correction_bias=mt not in ("deepseek", "deepseek_v2", "mistral4"))
    if mt in MLA_FAMILIES:
        kw.update(**_mla(c), mtp_layers=c["num_nextn_predict_layers"] if mt == "deepseek_v3" else 0,
                  indexer_heads=c.get("index_n_heads") or 0, indexer_head_dim=c.get("index_head_dim") or 0)
    elif mt == "glm4_moe":
        kw.update(qkv_bias=bool(c["attention_bias"]), qk_norm="per_head" if c["use_qk_norm"] else "none")
    elif mt == "dots1":
        kw.update(**_bias(c), qk_norm="per_head")
    else:
        kw.update(**_bias(c))
    return _decoder(c, name, **kw)


def _spec_ernie(c: dict, name: str) -> ArchSpec:
    """ERNIE 4.5 MoE: MoE on layers start..end every moe_layer_interval-th, shared experts as one MLP, the
    routing correction bias a parameter."""
    if c["use_bias"]:
        raise ConfigError("config.json use_bias=True (ernie4_5_moe): the calculator counts bias-free ERNIE models")
    L = c["num_hidden_layers"]
    end = L - 1 if c["moe_layer_end_index"] == -1 else c["moe_layer_end_index"]
    moe = [i for i in range(L) if (i + 1) % c["moe_layer_interval"] == 0 and c["moe_layer_start_index"] <= i <= end]
    return _decoder(c, name, moe_layers=moe, **_experts(c, "moe_num_experts", "moe_k", "moe_intermediate_size"),
                    shared_inter=(c["moe_num_shared_experts"] or 0) * c["moe_intermediate_size"], router_bias=True)


def _spec_hunyuan(c: dict, name: str) -> ArchSpec:
    """Hunyuan-A13B: per-head q/k norms, every layer MoE with a shared MLP of the dense width."""
    if not isinstance(c["moe_topk"], int):
        raise ConfigError(f"config.json moe_topk={c['moe_topk']!r}: the calculator needs one top-k for all layers")
    return _decoder(c, name, **_bias(c), qk_norm="per_head", moe_layers=_all_layers(c),
                    **_experts(c, "num_experts", "moe_topk", "intermediate_size"), shared_inter=c["intermediate_size"])


def _spec_dbrx(c: dict, name: str) -> ArchSpec:
    """DBRX: Mixtral's layout under other names (fused Wqkv, LayerNorms without bias, experts w1/v1/w2), the
    attention and FFN fields in sub-configs."""
    a, f = c["attn_config"], c["ffn_config"]
    d, H = c["d_model"], c["n_heads"]
    return ArchSpec(name=name, family="dbrx", vocab=c["vocab_size"], d=d, n_layers=c["n_layers"],
                    tie_embeddings=bool(c["tie_word_embeddings"]), n_heads=H, n_kv_heads=a["kv_n_heads"],
                    head_dim=d // H, moe_layers=list(range(c["n_layers"])), num_experts=f["moe_num_experts"],
                    top_k=f["moe_top_k"], expert_inter=f["ffn_hidden_size"])


def _spec_jetmoe(c: dict, name: str) -> ArchSpec:
    """JetMoE (Shen et al. 2024): mixture-of-attention-heads layers (ArchSpec.attn_experts) and MoE MLPs of the
    same experts count and top-k, each block with one output bias; embeddings tied by default."""
    k, G = c["num_experts_per_tok"], c["num_key_value_heads"]
    return _decoder(c, name, n_heads=G * k, n_kv_heads=G, head_dim=c["kv_channels"],
                    attn_experts=c["num_local_experts"], moe_out_bias=True, moe_layers=_all_layers(c),
                    **_experts(c, "num_local_experts", "num_experts_per_tok", "intermediate_size"))


def _spec_gpt_oss(c: dict, name: str) -> ArchSpec:
    """gpt-oss: attention sinks, biases everywhere, sliding-window attention on the layers layer_types marks."""
    L = c["num_hidden_layers"]
    return _decoder(c, name, **_bias(c), attn_sinks=True, window_kind="sliding",
                    attn_windows=_windows(c["layer_types"], L, lambda i: i % 2 == 0, "sliding_attention",
                                          c["sliding_window"] or 0),
                    moe_layers=_all_layers(c), **_experts(c, "num_local_experts", "num_experts_per_tok",
                                                          "intermediate_size"), router_bias=True, expert_bias=True)


def _spec_llama4_text(c: dict, name: str, vision: int = 0) -> ArchSpec:
    """Llama 4's text decoder: MoE on interleaved layers (or moe_layers), a shared expert of the expert width,
    chunked attention on RoPE layers and global NoPE attention on every no_rope_layer_interval-th."""
    L = c["num_hidden_layers"]
    moe = c["moe_layers"]
    if moe is None:
        step = c["interleave_moe_layer_step"]
        moe = list(range(step - 1, L, step))
    rope = c["no_rope_layers"] or [int((i + 1) % c["no_rope_layer_interval"] != 0) for i in range(L)]
    chunk = c["attention_chunk_size"] or 0
    return _decoder(c, name, **_bias(c), dense_inter=c["intermediate_size_mlp"],
                    attn_windows=[chunk if r else 0 for r in rope], window_kind="chunked", moe_layers=list(moe),
                    **_experts(c, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
                    shared_inter=c["intermediate_size"], vision_params=vision)


def _spec_llama4(c: dict, name: str) -> ArchSpec:
    """Llama 4 (image-text): the text decoder is counted, the vision tower reported apart."""
    vision = llama4_vision_params(c["vision_config"], c["text_config"]["hidden_size"]) if c.get("vision_config") else 0
    text = dict(c["text_config"], tie_word_embeddings=c["tie_word_embeddings"], model_type="llama4")
    return _spec_llama4_text(text, name, vision)


def _spec_switch(c: dict, name: str) -> ArchSpec:
    n_enc = c["num_layers"]
    n_dec = c["num_decoder_layers"] if c["num_decoder_layers"] is not None else n_enc
    moe = (_switch_layers(n_enc, c["num_sparse_encoder_layers"], 0)
           + _switch_layers(n_dec, c["num_sparse_decoder_layers"], n_enc))
    return ArchSpec(name=name, family="switch_transformers", vocab=c["vocab_size"], d=c["d_model"],
                    n_layers=n_enc + n_dec, n_encoder_layers=n_enc, tie_embeddings=c["tie_word_embeddings"],
                    n_heads=c["num_heads"], n_kv_heads=c["num_heads"], head_dim=c["d_kv"],
                    rel_pos_buckets=c["relative_attention_num_buckets"], dense_inter=c["d_ff"],
                    dense_matrices=2, expert_matrices=2, moe_layers=moe, num_experts=c["num_experts"],
                    top_k=1, expert_inter=c["d_ff"], router_bias=bool(c["router_bias"]))


def _spec_dense(c: dict, name: str) -> ArchSpec:
    """Dense Llama / Qwen2 / Qwen3 (upcycling sources, dense twins)."""
    mt = c["model_type"]
    if mt == "qwen2":
        return _decoder(c, name, qkv_bias=True)
    return _decoder(c, name, **_bias(c), qk_norm="per_head" if mt == "qwen3" else "none")


# model_type (as config_reader reads it: Kimi-K2 arrives as deepseek_v3) -> ArchSpec builder
HF_SPECS: dict[str, Callable[[dict, str], ArchSpec]] = {
    "mixtral": _spec_mixtral, "minimax": _spec_minimax, "phimoe": _spec_phimoe, "granitemoe": _spec_granitemoe,
    "granitemoeshared": _spec_granitemoe, "granitemoe_swa": _spec_granitemoe, "qwen2_moe": _spec_qwen_moe,
    "qwen3_moe": _spec_qwen_moe, "qwen3_next": _spec_qwen3_next, "qwen3_5_moe_text": _spec_qwen3_5_moe,
    "jamba": _spec_jamba, "granitemoehybrid": _spec_granitemoehybrid, "cohere2_moe": _spec_cohere2_moe,
    "laguna": _spec_laguna, "mimo_v2_flash": _spec_mimo_v2_flash, "lara_mini": _spec_lara_mini,
    "lfm2_moe": _spec_lfm2_moe, "kimi_linear": _spec_kimi_linear, "bailing_hybrid": _spec_bailing_hybrid,
    "aria_text": _spec_aria_text, "mistral4": _spec_deepseek, "nemotron_h": _spec_nemotron_h,
    "kolibri1": _spec_kolibri1, "beam": _spec_beam, "glm5_next": _spec_glm5_next,
    "minimax_m3_vl_text": _spec_minimax_m3_text, "minimax_m3_vl": _spec_minimax_m3_vl,
    "qwen4_exp_text": _spec_qwen4_exp_text, "qwen4_exp": _spec_qwen4_exp,
    "openai_privacy_filter": _spec_openai_privacy_filter, "axk2": _spec_axk2,
    "dots3_note_text": _spec_dots3_note_text, "mistral_large4": _spec_mistral_large4,
    "dots3_note": _spec_dots3_note, "qwen3_5_moe": _spec_qwen3_5_moe_vl,
    "qwen3_vl_moe": _spec_qwen3_vl_moe, "glm4v_moe": _spec_glm4v_moe,
    "aria": _spec_aria, "qwen3_omni_moe_thinker": _spec_qwen3_omni_moe_thinker,
    "deepseek_ocr2": _spec_deepseek_ocr2, "unlimited_ocr": _spec_unlimited_ocr,
    "olmoe": _spec_olmoe, "flex_olmo": _spec_olmoe,
    "deepseek": _spec_deepseek, "deepseek_v2": _spec_deepseek, "deepseek_v3": _spec_deepseek,
    "glm4_moe": _spec_deepseek, "dots1": _spec_deepseek, "deepseek_v32": _spec_deepseek,
    "glm4_moe_lite": _spec_deepseek, "glm_moe_dsa": _spec_deepseek, "solar_open": _spec_deepseek,
    "minimax_m2": _spec_minimax_m2, "exaone_moe": _spec_exaone_moe, "hy_v3": _spec_exaone_moe,
    "afmoe": _spec_afmoe, "flint": _spec_flint, "mellum": _spec_mellum, "ernie4_5_moe": _spec_ernie,
    "hunyuan_v1_moe": _spec_hunyuan, "dbrx": _spec_dbrx, "jetmoe": _spec_jetmoe, "gpt_oss": _spec_gpt_oss,
    "llama4": _spec_llama4, "llama4_text": _spec_llama4_text, "switch_transformers": _spec_switch,
    "llama": _spec_dense, "qwen2": _spec_dense, "qwen3": _spec_dense,
}
HF_FAMILIES = tuple(HF_SPECS)


def spec_from_hf(cfg: dict, name: str = "") -> ArchSpec:
    """Normalise an HF config.json dict into an ArchSpec: read by config_reader (transformers' defaults),
    then built by the family's entry in HF_SPECS."""
    full = read_hf_config(cfg)
    mt = full["model_type"]
    if mt not in HF_SPECS:
        raise ConfigError(f"config.json model_type={full['source_model_type']!r}: not supported by the calculator; "
                          f"supported: {list(HF_SPECS)} (and remote-code configs whose architecture is one of them)")
    return HF_SPECS[mt](full, name or full["source_model_type"] or mt)


def spec_from_moekit(cfg, name: str = "moekit") -> ArchSpec:
    """An ArchSpec of moekit's own MoETransformer (ModelConfig). Token-choice routers with a fixed top_k
    only: for top-p, expert-choice, Soft MoE, task/sequence routing, hierarchical or heterogeneous experts
    "active parameters per token" is not a fixed number."""
    from moekit.layers.ffn import ACTIVATIONS  # (imports torch: only for moekit configs)
    from moekit.layers.routing import ROUTERS  # the router registry

    m = cfg.moe
    router = ROUTERS.get(m.router.kind) if m is not None else None
    fixed = sorted(k for k, r in ROUTERS.items() if r.fixed_top_k)
    if m is not None and (router is None or not router.fixed_top_k or m.hierarchical_groups or m.expert_hidden_sizes):
        raise UsageError(f"moe config (router.kind={m.router.kind!r}, hierarchical_groups={m.hierarchical_groups}, "
                         f"expert_hidden_sizes={m.expert_hidden_sizes}): the calculator needs a fixed top_k over "
                         f"equal experts; router.kind must be one of {fixed}")
    mla = cfg.mla if cfg.attention == "mla" else None
    return ArchSpec(name=name, family="moekit", vocab=cfg.vocab_size, d=cfg.d_model, n_layers=cfg.n_layers,
                    tie_embeddings=cfg.tie_embeddings, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                    head_dim=cfg.head_dim, qkv_bias=cfg.attention_bias, o_bias=cfg.attention_out_bias,
                    attn_windows=list(cfg.attn_windows), window_kind="sliding" if any(cfg.attn_windows) else "",
                    qk_norm="none" if cfg.qk_norm == "l2" else cfg.qk_norm, attention=cfg.attention,
                    q_lora_rank=mla.q_lora_rank if mla else 0, kv_lora_rank=mla.kv_lora_rank if mla else 0,
                    qk_nope_dim=mla.qk_nope_head_dim if mla else 0, qk_rope_dim=mla.qk_rope_head_dim if mla else 0,
                    v_head_dim=mla.v_head_dim if mla else 0,
                    dense_inter=cfg.dense_hidden, moe_layers=[i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)],
                    dense_inter_overrides={i: cfg.ffn_hidden(i) for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)},
                    dense_matrices_overrides={i: 3 if ACTIVATIONS[cfg.ffn_activation(i)].gated else 2
                                              for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)},
                    expert_matrices=3 if (m is None or ACTIVATIONS[m.activation].gated) else 2,
                    num_experts=m.num_experts if m else 0, top_k=m.router.top_k if m else 0,
                    expert_inter=m.expert_hidden if m else 0,
                    shared_inter=m.num_shared_experts * m.shared_hidden_size if m else 0,
                    shared_gate=bool(m and m.shared_gate), router_noise=bool(router and router.num_gates == 2),
                    expert_bias=bool(m and m.bias), router_bias=bool(m and m.router.gate_bias),
                    attn_sinks=cfg.attn_sinks)


def attention_params(s: ArchSpec) -> int:
    """One self-attention block: projection matrices + vectors (biases, q/k/latent norms, sinks)."""
    return attention_matrix_params(s) + attention_vector_params(s)


def attention_expert_params(s: ArchSpec) -> int:
    """One JetMoE attention expert: query projection d -> n_kv_heads * head_dim and the output projection."""
    return 2 * s.d * s.n_kv_heads * s.head_dim if s.attn_experts else 0


def attention_matrix_params(s: ArchSpec) -> int:
    d = s.d
    if s.attn_experts:
        return 2 * d * s.n_kv_heads * s.head_dim + s.attn_experts * (attention_expert_params(s) + d)
    if s.attention == "mla":
        qk_head = s.qk_nope_dim + s.qk_rope_dim
        q = (d * s.q_lora_rank + s.q_lora_rank * s.n_heads * qk_head) if s.q_lora_rank else d * s.n_heads * qk_head
        if s.attn_output_gate == "mla_fused_q":
            q = d * s.q_lora_rank + 2 * s.q_lora_rank * s.n_heads * (qk_head + s.v_head_dim)
        kv_down = 0 if s.kv_shared else d * (s.kv_lora_rank + s.qk_rope_dim)
        kv = kv_down + s.kv_lora_rank * s.n_heads * (s.qk_nope_dim + s.v_head_dim)
        # the indexer's queries come from the q latent, or from the hidden state without one (Mistral Large 4)
        indexer = (s.indexer_heads * s.indexer_head_dim * (s.q_lora_rank or d) + s.indexer_head_dim * d
                   + s.indexer_heads * d)
        indexer += s.indexer_kpool * s.indexer_head_dim + s.indexer_head_dim * d if s.indexer_kpool else 0
        gate = d * s.n_heads if s.attn_output_gate == "per_head" else 0  # Bailing-hybrid's g_proj
        return q + kv + s.n_heads * s.v_head_dim * d + indexer + gate
    q_out, k_out, v_out = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_kv_heads * gqa_v_dim(s)
    indexer = (s.indexer_heads + s.indexer_kv_heads) * s.indexer_head_dim * d if s.indexer_heads else 0
    gate = {"none": 0, "q_doubled": q_out, "per_dim": q_out, "per_dim_head_bias": q_out,
            "per_head": s.n_heads}[s.attn_output_gate]
    return d * (q_out + k_out + v_out + gate) + s.n_heads * gqa_v_dim(s) * d + indexer


def gqa_v_dim(s: ArchSpec) -> int:
    return s.v_head_dim or s.head_dim


def attention_vector_params(s: ArchSpec) -> int:
    if s.attn_experts:
        return s.d if s.moe_out_bias else 0
    if s.attention == "mla":
        norms = s.q_lora_rank + (0 if s.kv_shared else s.kv_lora_rank)  # RMSNorms on the q and kv latents
        if s.softmax_scaling:
            norms += 2 * s.n_heads + (2 * s.indexer_heads + 2 * s.d if s.indexer_heads else 0)
        norms += 2 * s.indexer_head_dim  # the indexer's key LayerNorm
        norms += s.qk_rope_dim if s.k_rope_norm else 0
        kv_down = 0 if s.kv_shared else s.kv_lora_rank + s.qk_rope_dim
        return norms + ((s.q_lora_rank + kv_down + s.d) if s.qkv_bias else 0)
    q_out, k_out, v_out = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_kv_heads * gqa_v_dim(s)
    q_bias = 2 * q_out if s.attn_output_gate == "q_doubled" else q_out
    n = (q_bias + k_out + v_out if s.qkv_bias else 0) + (s.d if s.o_bias else 0)
    n += {"none": 0, "per_head": 2 * s.head_dim, "full": q_out + k_out}[s.qk_norm]
    n += s.n_heads if s.attn_output_gate == "per_dim_head_bias" else 0
    n += 2 * s.indexer_head_dim if s.indexer_heads else 0  # the GQA indexer's q/k RMSNorms
    return n + (s.n_heads if s.attn_sinks else 0)


def expert_bias_params(s: ArchSpec, inter: int | None = None) -> int:
    """Biases of one expert of width ``inter`` (routed by default): every projection but the down one is
    ``inter`` wide, the down one d."""
    inter = s.expert_inter if inter is None else inter
    return (s.expert_matrices - 1) * inter + s.d if s.expert_bias else 0


def expert_params(s: ArchSpec) -> int:
    """One routed expert (gated: gate, up, down; plain: in, out; gpt-oss adds biases)."""
    return s.expert_matrices * s.d * s.expert_inter + expert_bias_params(s)


def router_params(s: ArchSpec) -> int:
    """Router matrices and biases; JetMoE's block output bias is counted here too (one per MoE block)."""
    return (s.num_experts * s.d * (2 if s.router_noise else 1) + (s.num_experts if s.router_bias else 0)
            + (s.d if s.moe_out_bias else 0))


def shared_params(s: ArchSpec) -> int:
    if not s.shared_inter:
        return 0
    matrices = s.expert_matrices * s.d * s.shared_inter
    return matrices + expert_bias_params(s, s.shared_inter) + (s.d if s.shared_gate else 0)


def moe_layer_params(s: ArchSpec) -> int:
    return s.num_experts * expert_params(s) + shared_params(s) + router_params(s)


def rel_pos_params(s: ArchSpec) -> int:
    """T5 relative position biases: one Embedding(buckets, heads) in the first layer of each stack."""
    return 2 * s.rel_pos_buckets * s.n_heads if s.is_encoder_decoder else 0


def norm_count(s: ArchSpec) -> int:
    """Norm weight vectors of width d: two per layer (three in a decoder layer with cross-attention) and a
    final norm per stack."""
    n_dec = s.n_layers - s.n_encoder_layers
    if s.is_encoder_decoder:
        return 2 * s.n_encoder_layers + 1 + 3 * n_dec + 1
    return s.norms_per_layer * s.n_layers + (1 if s.final_norm else 0)


@dataclass
class ParamCount:
    name: str
    total: int
    active: int
    active_non_embedding: int
    active_with_head: int
    breakdown: dict[str, int]
    separate: dict[str, int] = field(default_factory=dict)  # modules outside `total` (mtp, vision)
    buffers: dict[str, int] = field(default_factory=dict)  # checkpoint tensors that are not parameters
    notes: list[str] = field(default_factory=list)

    @property
    def total_with_separate(self) -> int:
        return self.total + sum(self.separate.values())

    def to_dict(self) -> dict:
        return dict(asdict(self), total_with_separate=self.total_with_separate)


def mtp_params(s: ArchSpec) -> int:
    """Per MTP module: projection [2d -> d] of (normed hidden, normed next-token embedding), two input
    RMSNorms, one MoE decoder layer, the shared head's norm. Embedding and output head are shared with the
    main model (DeepSeek-V3 report, sec. 2.2), so they are not counted again."""
    layer = attention_params(s) + 2 * s.d + moe_layer_params(s)
    return s.mtp_layers * (2 * s.d * s.d + 3 * s.d + layer)


def count_params(s: ArchSpec) -> ParamCount:
    n_moe = len(s.moe_layers)
    n_dec = s.n_layers - s.n_encoder_layers
    rows = s.head_rows or s.vocab
    cross = n_dec * attention_params(s) if s.is_encoder_decoder else 0
    b = {
        "embeddings": s.vocab * s.d,
        "lm_head": (0 if s.tie_embeddings else rows * s.d) + (rows if s.lm_head_bias else 0),
        "attention": sum(attention_params(s.attn_at(i)) for i in s.attention_layers()) + cross + rel_pos_params(s)
        + len(s.linear_layers) * s.linear_attn_params,
        "norms": norm_count(s) * s.d * (2 if s.norm_bias else 1),
        "per_layer_embeddings": s.ple_params,
        "norm_gates": (s.n_layers + n_moe) * 2 * s.d * s.gated_norm_rank,
        "dense_ffn": sum(s.dense_matrices_overrides.get(i, s.dense_matrices) * s.d
                         * s.dense_inter_overrides.get(i, s.dense_inter)
                         for i in range(s.n_layers) if i not in s.moe_layers and i not in s.ffn_free_layers),
        "routed_experts": n_moe * s.num_experts * expert_params(s),
        "shared_experts": n_moe * shared_params(s),
        "router": n_moe * router_params(s),
        "hyper_connections": hyper_connection_params(s),
        "rope": s.rope_params,
    }
    total = sum(b.values())
    active = (total - n_moe * (s.num_experts - s.top_k) * expert_params(s)
              - s.n_layers * (s.attn_experts - s.top_k) * attention_expert_params(s))
    separate, buffers, notes = {}, {}, []
    if s.mtp_layers:
        separate["mtp"] = mtp_params(s)
        notes.append(f"MTP module ({s.mtp_layers} layer, not instantiated by HF) reported apart: "
                     f"{separate['mtp']:,}; the HF checkpoint also stores a copy of the embedding and the head "
                     f"in it ({2 * s.vocab * s.d:,} more)")
    if s.vision_params:
        separate["vision"] = s.vision_params
        notes.append(f"counts the text decoder; the vision encoder + projector ({s.vision_params:,}) are "
                     "reported apart")
    if s.audio_params:
        separate["audio"] = s.audio_params
        notes.append(f"the audio encoder ({s.audio_params:,}) is reported apart")
    if s.router_correction_bias:
        buffers["e_score_correction_bias"] = n_moe * s.num_experts
        notes.append(f"router e_score_correction_bias: {n_moe * s.num_experts:,} values, an HF buffer "
                     "(selection-only bias), not a parameter")
    if any(s.attn_windows):
        n_local = sum(1 for w in s.attn_windows if w)
        notes.append(f"{s.window_kind} attention ({max(s.attn_windows)} positions) on {n_local} of {s.n_layers} "
                     "layers: same parameters, smaller KV cache and attention FLOPs")
    if s.is_encoder_decoder:
        notes.append("encoder-decoder: active = one encoder token + one decoder token")
    if s.linear_layers:
        notes.append(f"hybrid: {len(s.linear_layers)} of {s.n_layers} layers use {s.linear_kind} (a fixed-size "
                     "state: no KV cache, no per-position attention FLOPs; the conv/recurrence FLOPs beyond the "
                     "projections are not counted)")
    emb = b["embeddings"] + b["lm_head"]
    head = rows * s.d + (rows if s.lm_head_bias else 0)
    return ParamCount(s.name, total, active, active - emb, active - emb + head, b, separate, buffers, notes)


def load_config(name_or_path: str | Path) -> tuple[dict, str]:
    """A config.json path (or its folder), or the name of one shipped in moekit/configs ("mixtral-8x7b")."""
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        shipped = CONFIG_DIR / f"{str(name_or_path).lower()}.json"
        if not shipped.is_file():
            raise UsageError(f"config {str(name_or_path)!r} is neither a config.json path nor a shipped "
                                    f"config; shipped: {shipped_configs()}")
        p = shipped
    try:
        return json.loads(p.read_text()), p.stem if p.name != "config.json" else p.parent.name
    except json.JSONDecodeError as e:
        raise UsageError(f"config {str(p)!r} is not valid JSON: {e}") from None


def shipped_configs() -> list[str]:
    return sorted(f.stem for f in CONFIG_DIR.glob("*.json"))
