"""Exact parameter counts of MoE transformers from their HF ``config.json`` (or a moekit ModelConfig).

Every HF config is first normalised into an ``ArchSpec`` (pure data), then counted by pure functions.
Conventions, stated once:
  total   = every parameter the HF model class instantiates (``sum(p.numel())``; buffers excluded,
            tied embeddings counted once). DeepSeek-V3's multi-token-prediction (MTP) module is not
            instantiated by HF; it is reported separately (``mtp``).
  active  = parameters a token touches in one forward pass: all non-expert parameters, top_k routed
            experts and all shared experts per MoE layer. "active" includes the embedding table and the
            LM head (the convention of Mixtral's 12.9B); "active_non_embedding" excludes both (the
            convention of scaling-law papers, Kaplan et al. 2020).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "llama", "qwen2",
             "qwen3", "moekit")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(kw_only=True)
class ArchSpec:
    """What a parameter count needs to know about a decoder-only (MoE) transformer."""

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
    qk_norm: str = "none"  # "none" | "per_head" | "full"
    attn_sinks: bool = False  # gpt-oss: one learned sink logit per head
    sliding_window: int = 0  # gpt-oss: every other layer
    # MLA (DeepSeek-V2/V3)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    # FFN
    dense_inter: int = 0
    dense_inter_overrides: dict[int, int] = field(default_factory=dict)  # layer -> hidden (moekit dense twins)
    expert_matrices: int = 3  # 3 for gated (SwiGLU/GeGLU) experts, 2 for plain (GELU) ones
    moe_layers: list[int] = field(default_factory=list)
    num_experts: int = 0
    top_k: int = 0
    expert_inter: int = 0
    shared_inter: int = 0  # total hidden of the shared expert(s) (0 = none)
    shared_gate: bool = False  # Qwen2-MoE: sigmoid gate Linear(d, 1)
    router_bias: bool = False  # gpt-oss
    expert_bias: bool = False  # gpt-oss
    router_correction_bias: bool = False  # DeepSeek-V3 e_score_correction_bias (an HF buffer, not a parameter)
    mtp_layers: int = 0  # DeepSeek-V3 next-token-prediction modules (not in HF)


def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def spec_from_hf(cfg: dict, name: str = "") -> ArchSpec:
    """Normalise an HF config.json dict into an ArchSpec (model_type dispatch)."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED or mt == "moekit":
        raise ValueError(f"model_type={mt!r}: not supported by the calculator; supported: "
                         f"{[s for s in SUPPORTED if s != 'moekit']}")
    L, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    H = cfg["num_attention_heads"]
    base = dict(name=name or mt, family=mt, vocab=cfg["vocab_size"], d=d, n_layers=L,
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
    # gpt_oss
    return ArchSpec(**base, qkv_bias=bool(cfg.get("attention_bias", True)), o_bias=bool(cfg.get("attention_bias", True)),
                    attn_sinks=True, sliding_window=cfg.get("sliding_window", 0), moe_layers=list(range(L)),
                    num_experts=cfg["num_local_experts"], top_k=cfg["num_experts_per_tok"],
                    expert_inter=cfg["intermediate_size"], router_bias=True, expert_bias=True)


def spec_from_moekit(cfg, name: str = "moekit") -> ArchSpec:
    """An ArchSpec of moekit's own MoETransformer (ModelConfig)."""
    m = cfg.moe
    moe_layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    return ArchSpec(name=name, family="moekit", vocab=cfg.vocab_size, d=cfg.d_model, n_layers=cfg.n_layers,
                    tie_embeddings=cfg.tie_embeddings, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                    head_dim=cfg.head_dim, qkv_bias=cfg.attention_bias, qk_norm=cfg.qk_norm,
                    dense_inter=cfg.dense_hidden, moe_layers=moe_layers,
                    dense_inter_overrides={i: cfg.ffn_hidden(i) for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)},
                    expert_matrices=3 if (m is None or m.activation in ("swiglu", "geglu")) else 2,
                    num_experts=m.num_experts if m else 0, top_k=m.router.top_k if m else 0,
                    expert_inter=m.expert_hidden if m else 0,
                    shared_inter=m.num_shared_experts * m.shared_hidden_size if m else 0,
                    shared_gate=bool(m and m.shared_gate))


def attention_params(s: ArchSpec) -> int:
    d = s.d
    if s.attention == "mla":
        qk_head = s.qk_nope_dim + s.qk_rope_dim
        if s.q_lora_rank:
            q = d * s.q_lora_rank + s.q_lora_rank + s.q_lora_rank * s.n_heads * qk_head  # a, norm, b
        else:
            q = d * s.n_heads * qk_head
        kv = (d * (s.kv_lora_rank + s.qk_rope_dim) + s.kv_lora_rank
              + s.kv_lora_rank * s.n_heads * (s.qk_nope_dim + s.v_head_dim))
        o = s.n_heads * s.v_head_dim * d
        bias = (s.q_lora_rank if s.q_lora_rank else 0) + (s.kv_lora_rank + s.qk_rope_dim) + d if s.qkv_bias else 0
        return q + kv + o + bias
    q_out, kv_out = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    n = d * q_out + 2 * d * kv_out + q_out * d
    if s.qkv_bias:
        n += q_out + 2 * kv_out
    if s.o_bias:
        n += d
    if s.qk_norm == "per_head":
        n += 2 * s.head_dim
    elif s.qk_norm == "full":
        n += q_out + kv_out
    if s.attn_sinks:
        n += s.n_heads
    return n


def expert_params(s: ArchSpec) -> int:
    """One routed expert (SwiGLU: gate, up, down; gpt-oss adds biases)."""
    n = s.expert_matrices * s.d * s.expert_inter
    if s.expert_bias:
        n += 2 * s.expert_inter + s.d
    return n


def router_params(s: ArchSpec) -> int:
    n = s.num_experts * s.d
    if s.router_bias:
        n += s.num_experts
    return n


def shared_params(s: ArchSpec) -> int:
    return s.expert_matrices * s.d * s.shared_inter + (s.d if s.shared_gate else 0) if s.shared_inter else 0


@dataclass
class ParamCount:
    name: str
    total: int
    active: int
    active_non_embedding: int
    breakdown: dict[str, int]
    mtp: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(s: ArchSpec) -> ParamCount:
    n_moe = len(s.moe_layers)
    b = {
        "embeddings": s.vocab * s.d,
        "lm_head": 0 if s.tie_embeddings else s.vocab * s.d,
        "attention": s.n_layers * attention_params(s),
        "norms": (2 * s.n_layers + 1) * s.d,
        "dense_ffn": sum(3 * s.d * s.dense_inter_overrides.get(i, s.dense_inter)
                         for i in range(s.n_layers) if i not in s.moe_layers),
        "routed_experts": n_moe * s.num_experts * expert_params(s),
        "shared_experts": n_moe * shared_params(s),
        "router": n_moe * router_params(s),
    }
    total = sum(b.values())
    inactive = n_moe * (s.num_experts - s.top_k) * expert_params(s)
    active = total - inactive
    notes = []
    mtp = 0
    if s.mtp_layers:
        # per MTP module: embedding projection [2d -> d], two RMSNorms (enorm, hnorm), one MoE decoder layer
        # and a final norm; embeddings and head are shared with the main model (DeepSeek-V3 report, sec. 2.2)
        layer = attention_params(s) + 2 * s.d + s.num_experts * expert_params(s) + shared_params(s) + router_params(s)
        mtp = s.mtp_layers * (2 * s.d * s.d + 3 * s.d + layer)
        notes.append(f"MTP module ({s.mtp_layers} layer) not counted in total: {mtp:,} parameters "
                     f"(total with MTP {total + mtp:,})")
    if s.router_correction_bias:
        notes.append(f"e_score_correction_bias: {n_moe * s.num_experts:,} values per checkpoint, a buffer "
                     "(selection-only bias), not counted as parameters")
    if s.sliding_window:
        notes.append(f"sliding-window attention ({s.sliding_window}) on alternate layers: same parameters, "
                     "smaller KV cache")
    emb = b["embeddings"] + b["lm_head"]
    return ParamCount(s.name, total, active, active - emb, b, mtp, notes)


def load_config(name_or_path: str | Path) -> tuple[dict, str]:
    """A config.json path, or the name of one shipped in moekit/configs (e.g. "mixtral-8x7b")."""
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        shipped = CONFIG_DIR / f"{str(name_or_path).lower()}.json"
        if not shipped.is_file():
            names = sorted(f.stem for f in CONFIG_DIR.glob("*.json"))
            raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a config.json path nor a shipped "
                                    f"config; shipped: {names}")
        p = shipped
    try:
        return json.loads(p.read_text()), p.stem if p.name != "config.json" else p.parent.name
    except json.JSONDecodeError as e:
        raise ValueError(f"config {str(p)!r} is not valid JSON: {e}") from None


def shipped_configs() -> list[str]:
    return sorted(f.stem for f in CONFIG_DIR.glob("*.json"))
