"""Exact parameter counts of MoE transformers from their HF ``config.json`` (or a moekit ModelConfig).

Every config is first normalised into an ``ArchSpec`` (pure data), then counted by pure functions.
Conventions, stated once:
  total   = every parameter the HF model class instantiates (``sum(p.numel())``; buffers excluded,
            tied embeddings counted once). Modules HF does not build into the language model are reported
            apart in ``separate`` (never inside ``total``): DeepSeek-V3's multi-token-prediction module
            (``mtp``; DeepSeek-V3 report, Liu et al. 2024, sec. 2.2) and Llama 4's vision encoder + projector
            (``vision``; the text decoder is what ``total`` counts).
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

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moekit.errors import UsageError

HF_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "llama4",
               "switch_transformers", "llama", "qwen2", "qwen3")
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
    attn_windows: list[int] = field(default_factory=list)  # per layer: max positions attended (0 = all)
    window_kind: str = ""  # "sliding" (gpt-oss) | "chunked" (Llama 4: attention within fixed chunks)
    # MLA (DeepSeek-V2/V3)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
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
    router_bias: bool = False  # gpt-oss
    router_noise: bool = False  # moekit noisy_topk: a second Linear(d, E) for the noise scale
    expert_bias: bool = False  # gpt-oss
    router_correction_bias: bool = False  # DeepSeek-V3 e_score_correction_bias (an HF buffer)
    # encoder-decoder (T5 / Switch): decoder layers add cross-attention and its norm
    n_encoder_layers: int = 0
    rel_pos_buckets: int = 0  # T5 relative position bias: Embedding(buckets, heads) per stack
    # modules outside `total`
    mtp_layers: int = 0  # DeepSeek-V3 multi-token-prediction modules
    vision_params: int = 0  # Llama 4 vision encoder + multimodal projector

    @property
    def is_encoder_decoder(self) -> bool:
        return self.n_encoder_layers > 0

    def is_decoder_layer(self, i: int) -> bool:
        return i >= self.n_encoder_layers

    def window(self, i: int) -> int:
        return self.attn_windows[i] if self.attn_windows else 0


def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _windows(layer_types: list[str] | None, n_layers: int, default_local, local_kind: str, span: int) -> list[int]:
    """Per-layer attention span from HF ``layer_types`` (or the family default pattern)."""
    types = layer_types or [local_kind if default_local(i) else "full_attention" for i in range(n_layers)]
    return [span if t == local_kind and span else 0 for t in types]


def llama4_vision_params(v: dict, text_d: int) -> int:
    """Llama 4 vision encoder (ViT with biased attention/MLP and LayerNorms, unfold patch embedding,
    class and position embeddings, pixel-shuffle MLP adapter) + the multimodal projector to the text width."""
    h, inter, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    n_pos = (v["image_size"] // p) ** 2 + 1
    embed = v.get("num_channels", 3) * p * p * h + h + n_pos * h + 2 * 2 * h  # patches, class, positions, pre/post LN
    layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * 2 * h
    adapter = inter * v["projector_input_dim"] + v["projector_output_dim"] ** 2
    return embed + v["num_hidden_layers"] * layer + adapter + v["vision_output_dim"] * text_d


def _switch_layers(n: int, n_sparse: int, offset: int) -> list[int]:
    # HF derives the step from the number of sparse layers and makes layer i sparse when i % step == 1
    step = n // n_sparse if n_sparse > 0 else n
    return [offset + i for i in range(n) if step == 1 or i % step == 1]


def _spec_switch(cfg: dict, name: str) -> ArchSpec:
    n_enc, n_dec = cfg["num_layers"], _get(cfg, "num_decoder_layers", default=cfg["num_layers"])
    moe = (_switch_layers(n_enc, cfg.get("num_sparse_encoder_layers", 3), 0)
           + _switch_layers(n_dec, cfg.get("num_sparse_decoder_layers", 3), n_enc))
    return ArchSpec(name=name, family="switch_transformers", vocab=cfg["vocab_size"], d=cfg["d_model"],
                    n_layers=n_enc + n_dec, n_encoder_layers=n_enc, tie_embeddings=cfg.get("tie_word_embeddings", True),
                    n_heads=cfg["num_heads"], n_kv_heads=cfg["num_heads"], head_dim=cfg["d_kv"],
                    rel_pos_buckets=cfg.get("relative_attention_num_buckets", 32), dense_inter=cfg["d_ff"],
                    dense_matrices=2, expert_matrices=2, moe_layers=moe, num_experts=cfg["num_experts"],
                    top_k=1, expert_inter=cfg["d_ff"], router_bias=bool(cfg.get("router_bias", False)))


def spec_from_hf(cfg: dict, name: str = "") -> ArchSpec:
    """Normalise an HF config.json dict into an ArchSpec (model_type dispatch)."""
    mt = cfg.get("model_type")
    if mt not in HF_FAMILIES:
        raise UsageError(f"model_type={mt!r}: not supported by the calculator; supported: {list(HF_FAMILIES)}")
    name = name or mt
    if mt == "switch_transformers":
        return _spec_switch(cfg, name)
    vision = 0
    if mt == "llama4":  # the text decoder; the vision tower is counted apart
        vision = llama4_vision_params(cfg["vision_config"], cfg["text_config"]["hidden_size"]) \
            if cfg.get("vision_config") else 0
        cfg = dict(cfg["text_config"], tie_word_embeddings=cfg.get("tie_word_embeddings", False))
    L, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    H = cfg["num_attention_heads"]
    base = dict(name=name, family=mt, vocab=cfg["vocab_size"], d=d, n_layers=L,
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), n_heads=H,
                n_kv_heads=_get(cfg, "num_key_value_heads", default=H),
                head_dim=_get(cfg, "head_dim", default=d // H), dense_inter=cfg.get("intermediate_size", 0))
    if mt in ("llama", "qwen2", "qwen3"):
        return ArchSpec(**base, qkv_bias=mt == "qwen2" or bool(cfg.get("attention_bias")),
                        o_bias=mt == "llama" and bool(cfg.get("attention_bias")),
                        qk_norm="per_head" if mt == "qwen3" else "none")
    if mt == "mixtral":
        return ArchSpec(**base, moe_layers=list(range(L)), num_experts=cfg["num_local_experts"],
                        top_k=cfg["num_experts_per_tok"], expert_inter=cfg["intermediate_size"])
    if mt in ("qwen2_moe", "qwen3_moe"):
        step = cfg.get("decoder_sparse_step", 1) or 1
        skip = set(cfg.get("mlp_only_layers") or [])
        E = _get(cfg, "num_experts", "num_local_experts", default=0)  # transformers 5 renamed the qwen3 key
        moe = [i for i in range(L) if i not in skip and E > 0 and (i + 1) % step == 0]
        return ArchSpec(**base, qkv_bias=mt == "qwen2_moe" and bool(cfg.get("qkv_bias", True)),
                        qk_norm="per_head" if mt == "qwen3_moe" else "none", moe_layers=moe,
                        num_experts=E, top_k=cfg["num_experts_per_tok"],
                        expert_inter=cfg["moe_intermediate_size"],
                        shared_inter=cfg.get("shared_expert_intermediate_size", 0) if mt == "qwen2_moe" else 0,
                        shared_gate=mt == "qwen2_moe")
    if mt == "olmoe":
        return ArchSpec(**base, qkv_bias=bool(cfg.get("attention_bias")), o_bias=bool(cfg.get("attention_bias")),
                        qk_norm="full", moe_layers=list(range(L)), num_experts=cfg["num_experts"],
                        top_k=cfg["num_experts_per_tok"], expert_inter=cfg["intermediate_size"])
    if mt in ("deepseek_v2", "deepseek_v3"):
        first = cfg.get("first_k_dense_replace", 0)
        freq = cfg.get("moe_layer_freq", 1) or 1
        moe = [i for i in range(L) if cfg.get("n_routed_experts") and i >= first and i % freq == 0]
        return ArchSpec(**base, attention="mla", qkv_bias=bool(cfg.get("attention_bias")),
                        o_bias=bool(cfg.get("attention_bias")),
                        q_lora_rank=cfg.get("q_lora_rank") or 0, kv_lora_rank=cfg["kv_lora_rank"],
                        qk_nope_dim=cfg["qk_nope_head_dim"], qk_rope_dim=cfg["qk_rope_head_dim"],
                        v_head_dim=cfg["v_head_dim"], moe_layers=moe, num_experts=cfg["n_routed_experts"],
                        top_k=cfg["num_experts_per_tok"], expert_inter=cfg["moe_intermediate_size"],
                        shared_inter=(cfg.get("n_shared_experts") or 0) * cfg["moe_intermediate_size"],
                        router_correction_bias=mt == "deepseek_v3",
                        mtp_layers=cfg.get("num_nextn_predict_layers", 0) if mt == "deepseek_v3" else 0)
    if mt == "llama4":
        moe = cfg.get("moe_layers")
        if moe is None:
            step = cfg.get("interleave_moe_layer_step", 1)
            moe = list(range(step - 1, L, step))
        # layers with RoPE use chunked attention; every no_rope_layer_interval-th layer is global (NoPE)
        interval = cfg.get("no_rope_layer_interval", 4)
        rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(L)]
        chunk = cfg.get("attention_chunk_size") or 0
        return ArchSpec(**{**base, "dense_inter": cfg["intermediate_size_mlp"]},
                        qkv_bias=bool(cfg.get("attention_bias")), o_bias=bool(cfg.get("attention_bias")),
                        attn_windows=[chunk if r else 0 for r in rope], window_kind="chunked",
                        moe_layers=list(moe), num_experts=cfg["num_local_experts"], top_k=cfg["num_experts_per_tok"],
                        expert_inter=cfg["intermediate_size"], shared_inter=cfg["intermediate_size"],
                        vision_params=vision)
    # gpt_oss: sliding-window attention on even layers unless layer_types says otherwise
    return ArchSpec(**base, qkv_bias=bool(cfg.get("attention_bias", True)), o_bias=bool(cfg.get("attention_bias", True)),
                    attn_sinks=True, window_kind="sliding",
                    attn_windows=_windows(cfg.get("layer_types"), L, lambda i: i % 2 == 0, "sliding_attention",
                                          cfg.get("sliding_window") or 0),
                    moe_layers=list(range(L)), num_experts=cfg["num_local_experts"], top_k=cfg["num_experts_per_tok"],
                    expert_inter=cfg["intermediate_size"], router_bias=True, expert_bias=True)


def spec_from_moekit(cfg, name: str = "moekit") -> ArchSpec:
    """An ArchSpec of moekit's own MoETransformer (ModelConfig). Token-choice routers with a fixed top_k
    only: for top-p, expert-choice, Soft MoE, task/sequence routing, hierarchical or heterogeneous experts
    "active parameters per token" is not a fixed number."""
    from moekit.layers.routing import ROUTERS  # the router registry (imports torch: only for moekit configs)

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
                    head_dim=cfg.head_dim, qkv_bias=cfg.attention_bias,
                    qk_norm=cfg.qk_norm, attention=cfg.attention,
                    q_lora_rank=mla.q_lora_rank if mla else 0, kv_lora_rank=mla.kv_lora_rank if mla else 0,
                    qk_nope_dim=mla.qk_nope_head_dim if mla else 0, qk_rope_dim=mla.qk_rope_head_dim if mla else 0,
                    v_head_dim=mla.v_head_dim if mla else 0,
                    dense_inter=cfg.dense_hidden, moe_layers=[i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)],
                    dense_inter_overrides={i: cfg.ffn_hidden(i) for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)},
                    dense_matrices_overrides={i: 3 if cfg.ffn_activation(i) in ("swiglu", "geglu") else 2
                                              for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)},
                    expert_matrices=3 if (m is None or m.activation in ("swiglu", "geglu")) else 2,
                    num_experts=m.num_experts if m else 0, top_k=m.router.top_k if m else 0,
                    expert_inter=m.expert_hidden if m else 0,
                    shared_inter=m.num_shared_experts * m.shared_hidden_size if m else 0,
                    shared_gate=bool(m and m.shared_gate), router_noise=bool(router and router.num_gates == 2),
                    expert_bias=bool(m and m.bias))


def attention_params(s: ArchSpec) -> int:
    """One self-attention block: projection matrices + vectors (biases, q/k/latent norms, sinks)."""
    return attention_matrix_params(s) + attention_vector_params(s)


def attention_matrix_params(s: ArchSpec) -> int:
    d = s.d
    if s.attention == "mla":
        qk_head = s.qk_nope_dim + s.qk_rope_dim
        q = (d * s.q_lora_rank + s.q_lora_rank * s.n_heads * qk_head) if s.q_lora_rank else d * s.n_heads * qk_head
        kv = d * (s.kv_lora_rank + s.qk_rope_dim) + s.kv_lora_rank * s.n_heads * (s.qk_nope_dim + s.v_head_dim)
        return q + kv + s.n_heads * s.v_head_dim * d
    q_out, kv_out = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    return 2 * d * q_out + 2 * d * kv_out


def attention_vector_params(s: ArchSpec) -> int:
    if s.attention == "mla":
        norms = s.q_lora_rank + s.kv_lora_rank  # RMSNorms on the compressed query and kv latents
        return norms + ((s.q_lora_rank + s.kv_lora_rank + s.qk_rope_dim + s.d) if s.qkv_bias else 0)
    q_out, kv_out = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    n = (q_out + 2 * kv_out if s.qkv_bias else 0) + (s.d if s.o_bias else 0)
    n += {"none": 0, "per_head": 2 * s.head_dim, "full": q_out + kv_out}[s.qk_norm]
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
    return s.num_experts * s.d * (2 if s.router_noise else 1) + (s.num_experts if s.router_bias else 0)


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
    return 2 * s.n_layers + 1


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
    cross = n_dec * attention_params(s) if s.is_encoder_decoder else 0
    b = {
        "embeddings": s.vocab * s.d,
        "lm_head": 0 if s.tie_embeddings else s.vocab * s.d,
        "attention": s.n_layers * attention_params(s) + cross + rel_pos_params(s),
        "norms": norm_count(s) * s.d,
        "dense_ffn": sum(s.dense_matrices_overrides.get(i, s.dense_matrices) * s.d
                         * s.dense_inter_overrides.get(i, s.dense_inter)
                         for i in range(s.n_layers) if i not in s.moe_layers),
        "routed_experts": n_moe * s.num_experts * expert_params(s),
        "shared_experts": n_moe * shared_params(s),
        "router": n_moe * router_params(s),
    }
    total = sum(b.values())
    active = total - n_moe * (s.num_experts - s.top_k) * expert_params(s)
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
    emb = b["embeddings"] + b["lm_head"]
    return ParamCount(s.name, total, active, active - emb, active - emb + s.vocab * s.d, b, separate, buffers, notes)


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
