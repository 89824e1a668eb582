"""One declarative description per HF family: config translation and a key map.

A key map is a list of (hf_key, moekit_key) templates. ``{i}`` is the layer index, ``{e}`` the expert
index; a moekit key ending in ``[e]`` is a slice of a stacked [E, ...] expert tensor. Which templates apply
to a layer depends on its kind: "attn" (all layers), "dense" (dense FFN layers), "moe" (MoE layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from moekit.config import LossConfig, MLAConfig, ModelConfig, MoEConfig, RouterConfig

COMMON = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
LAYER_NORMS = [
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
]
GQA = [(f"model.layers.{{i}}.self_attn.{n}", f"layers.{{i}}.attn.{n}") for n in
       ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")]
GQA_BIAS = [(f"model.layers.{{i}}.self_attn.{n}", f"layers.{{i}}.attn.{n}") for n in
            ("q_proj.bias", "k_proj.bias", "v_proj.bias")]
QK_NORM = [(f"model.layers.{{i}}.self_attn.{n}", f"layers.{{i}}.attn.{n}") for n in
           ("q_norm.weight", "k_norm.weight")]
MLA_Q_LORA = [(f"model.layers.{{i}}.self_attn.{n}", f"layers.{{i}}.attn.{n}") for n in
              ("q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight")]
MLA_Q_FULL = [("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_proj.weight")]
MLA_KV = [(f"model.layers.{{i}}.self_attn.{n}", f"layers.{{i}}.attn.{n}") for n in
          ("kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight")]
DENSE_MLP = [(f"model.layers.{{i}}.mlp.{h}.weight", f"layers.{{i}}.ffn.{m}.weight") for h, m in
             (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down"))]


def experts_map(prefix: str, names: tuple[str, str, str]) -> list[tuple[str, str]]:
    """Per-expert HF keys (gate, up, down names) -> slices of moekit's stacked expert tensors."""
    gate, up, down = names
    return [(f"model.layers.{{i}}.{prefix}.experts.{{e}}.{gate}.weight", "layers.{i}.ffn.experts.w_gate_EFD[e]"),
            (f"model.layers.{{i}}.{prefix}.experts.{{e}}.{up}.weight", "layers.{i}.ffn.experts.w_up_EFD[e]"),
            (f"model.layers.{{i}}.{prefix}.experts.{{e}}.{down}.weight", "layers.{i}.ffn.experts.w_down_EDF[e]")]


def shared_map(hf_prefix: str) -> list[tuple[str, str]]:
    return [(f"model.layers.{{i}}.{hf_prefix}.{h}.weight", f"layers.{{i}}.ffn.shared.{m}.weight") for h, m in
            (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down"))]


@dataclass
class Family:
    model_type: str
    architecture: str
    to_moekit: Callable[[dict], ModelConfig]
    to_hf: Callable[[ModelConfig], dict]
    attn: Callable[[dict], list]  # hf config -> templates for every layer
    dense: list = field(default_factory=list)
    moe: list = field(default_factory=list)


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _check_rope(cfg: dict) -> None:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ("default", None):
        raise ValueError(f"config.json rope_type={kind!r}: only the default RoPE is supported so far")


def _check_unsupported(cfg: dict) -> None:
    """Fields whose other values moekit's decoder does not compute; loading them would silently change logits."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU FFNs) is supported")
    # Qwen configs carry a sliding_window that only applies when use_sliding_window is true
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", "use_sliding_window" not in cfg) else None
    if window:
        raise ValueError(f"config.json sliding_window={window}: sliding-window attention is not supported")


def _base(cfg: dict, **kw) -> dict:
    _check_rope(cfg)
    _check_unsupported(cfg)
    H = cfg["num_attention_heads"]
    return dict(vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                n_heads=H, n_kv_heads=cfg.get("num_key_value_heads") or H,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // H,
                max_seq_len=min(cfg.get("max_position_embeddings", 4096), 1 << 16), rope_theta=_rope_theta(cfg),
                norm_eps=cfg.get("rms_norm_eps", 1e-6), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                **kw)


def _hf_base(c: ModelConfig, model_type: str, arch: str) -> dict:
    return dict(model_type=model_type, architectures=[arch], vocab_size=c.vocab_size, hidden_size=c.d_model,
                num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings, hidden_act="silu")


def _moe(d: int, E: int, k: int, h: int, renorm: bool, **kw) -> MoEConfig:
    return MoEConfig(d_model=d, num_experts=E, expert_hidden=h, router=RouterConfig(top_k=k, renormalize=renorm),
                     loss=LossConfig(aux_coef=0.0), **kw)


# ------------------------------------------------------------------ Mixtral
def mixtral_to_moekit(cfg: dict) -> ModelConfig:
    return ModelConfig(**_base(cfg), moe=_moe(cfg["hidden_size"], cfg["num_local_experts"],
                                              cfg["num_experts_per_tok"], cfg["intermediate_size"], True))


def mixtral_to_hf(c: ModelConfig) -> dict:
    return dict(_hf_base(c, "mixtral", "MixtralForCausalLM"), intermediate_size=c.moe.expert_hidden,
                num_local_experts=c.moe.num_experts, num_experts_per_tok=c.moe.router.top_k, sliding_window=None)


# ------------------------------------------------------------------ Qwen2-MoE / Qwen3-MoE
def _qwen_moe_layers(cfg: dict) -> None:
    if (cfg.get("decoder_sparse_step") or 1) != 1 or cfg.get("mlp_only_layers"):
        raise ValueError("config.json decoder_sparse_step != 1 or mlp_only_layers: only all-MoE Qwen models are "
                         "supported so far")


def qwen2_moe_to_moekit(cfg: dict) -> ModelConfig:
    _qwen_moe_layers(cfg)
    d = cfg["hidden_size"]
    moe = _moe(d, cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
               bool(cfg.get("norm_topk_prob", False)), num_shared_experts=1,
               shared_hidden=cfg["shared_expert_intermediate_size"], shared_gate=True)
    return ModelConfig(**_base(cfg), attention_bias=bool(cfg.get("qkv_bias", True)), moe=moe)


def qwen2_moe_to_hf(c: ModelConfig) -> dict:
    m = c.moe
    return dict(_hf_base(c, "qwen2_moe", "Qwen2MoeForCausalLM"), intermediate_size=c.dense_hidden,
                moe_intermediate_size=m.expert_hidden, shared_expert_intermediate_size=m.shared_hidden_size,
                num_experts=m.num_experts, num_experts_per_tok=m.router.top_k, norm_topk_prob=m.router.renormalize,
                decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=c.attention_bias)


def qwen3_moe_to_moekit(cfg: dict) -> ModelConfig:
    _qwen_moe_layers(cfg)
    E = cfg.get("num_experts") or cfg.get("num_local_experts")
    moe = _moe(cfg["hidden_size"], E, cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
               bool(cfg.get("norm_topk_prob", True)))
    return ModelConfig(**_base(cfg), attention_bias=bool(cfg.get("attention_bias", False)), qk_norm="per_head",
                       moe=moe)


def qwen3_moe_to_hf(c: ModelConfig) -> dict:
    m = c.moe
    return dict(_hf_base(c, "qwen3_moe", "Qwen3MoeForCausalLM"), intermediate_size=c.dense_hidden,
                moe_intermediate_size=m.expert_hidden, num_experts=m.num_experts, num_experts_per_tok=m.router.top_k,
                norm_topk_prob=m.router.renormalize, decoder_sparse_step=1, mlp_only_layers=[],
                attention_bias=c.attention_bias)


# ------------------------------------------------------------------ OLMoE
def olmoe_to_moekit(cfg: dict) -> ModelConfig:
    if cfg.get("clip_qkv"):
        raise ValueError(f"config.json clip_qkv={cfg['clip_qkv']}: not supported")
    moe = _moe(cfg["hidden_size"], cfg["num_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"],
               bool(cfg.get("norm_topk_prob", False)))
    return ModelConfig(**_base(cfg), qk_norm="full", moe=moe)


def olmoe_to_hf(c: ModelConfig) -> dict:
    m = c.moe
    return dict(_hf_base(c, "olmoe", "OlmoeForCausalLM"), intermediate_size=m.expert_hidden,
                num_experts=m.num_experts, num_experts_per_tok=m.router.top_k, norm_topk_prob=m.router.renormalize,
                attention_bias=False, clip_qkv=None)


# ------------------------------------------------------------------ DeepSeek-V3
def deepseek_v3_to_moekit(cfg: dict) -> ModelConfig:
    if (cfg.get("moe_layer_freq") or 1) != 1:
        raise ValueError("config.json moe_layer_freq != 1: not supported")
    d = cfg["hidden_size"]
    router = RouterConfig(kind="deepseek", top_k=cfg["num_experts_per_tok"], score_func="sigmoid",
                          n_groups=cfg.get("n_group") or 1, topk_groups=cfg.get("topk_group") or 1,
                          routed_scaling_factor=cfg.get("routed_scaling_factor", 1.0),
                          renormalize=bool(cfg.get("norm_topk_prob", True)))
    moe = MoEConfig(d_model=d, num_experts=cfg["n_routed_experts"], expert_hidden=cfg["moe_intermediate_size"],
                    num_shared_experts=cfg.get("n_shared_experts") or 0, shared_hidden=cfg["moe_intermediate_size"],
                    router=router, loss=LossConfig(aux_coef=0.0))
    mla = MLAConfig(q_lora_rank=cfg.get("q_lora_rank") or 0, kv_lora_rank=cfg["kv_lora_rank"],
                    qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
                    v_head_dim=cfg["v_head_dim"], rope_interleave=bool(cfg.get("rope_interleave", True)))
    base = _base(cfg)
    base["head_dim"] = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    return ModelConfig(**base, attention="mla", mla=mla, attention_bias=bool(cfg.get("attention_bias", False)),
                       dense_hidden=cfg["intermediate_size"], first_k_dense=cfg.get("first_k_dense_replace", 0),
                       moe=moe)


def deepseek_v3_to_hf(c: ModelConfig) -> dict:
    m, a = c.moe, c.mla
    out = dict(_hf_base(c, "deepseek_v3", "DeepseekV3ForCausalLM"), intermediate_size=c.dense_hidden,
               moe_intermediate_size=m.expert_hidden, n_routed_experts=m.num_experts,
               n_shared_experts=m.num_shared_experts, num_experts_per_tok=m.router.top_k, n_group=m.router.n_groups,
               topk_group=m.router.topk_groups, routed_scaling_factor=m.router.routed_scaling_factor,
               norm_topk_prob=m.router.renormalize, first_k_dense_replace=c.first_k_dense,
               q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
               qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, rope_interleave=a.rope_interleave,
               attention_bias=c.attention_bias, num_nextn_predict_layers=0)
    out.pop("head_dim")
    return out


# ------------------------------------------------------------------ dense Llama / Qwen2 (upcycling sources)
def llama_to_moekit(cfg: dict) -> ModelConfig:
    bias = cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias"))
    return ModelConfig(**_base(cfg), dense_hidden=cfg["intermediate_size"], attention_bias=bias)


def llama_to_hf(c: ModelConfig) -> dict:
    return dict(_hf_base(c, "llama", "LlamaForCausalLM"), intermediate_size=c.dense_hidden,
                attention_bias=c.attention_bias, mlp_bias=False)


def qwen2_to_hf(c: ModelConfig) -> dict:
    return dict(_hf_base(c, "qwen2", "Qwen2ForCausalLM"), intermediate_size=c.dense_hidden, use_sliding_window=False)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", llama_to_moekit, llama_to_hf,
                    lambda cfg: GQA + (GQA_BIAS if cfg.get("attention_bias") else []), dense=DENSE_MLP),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", llama_to_moekit, qwen2_to_hf, lambda cfg: GQA + GQA_BIAS,
                    dense=DENSE_MLP),
    "mixtral": Family("mixtral", "MixtralForCausalLM", mixtral_to_moekit, mixtral_to_hf, lambda cfg: GQA,
                      moe=[("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.ffn.router.gate.weight")]
                      + experts_map("block_sparse_moe", ("w1", "w3", "w2"))),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", qwen2_moe_to_moekit, qwen2_moe_to_hf,
                        lambda cfg: GQA + (GQA_BIAS if cfg.get("qkv_bias", True) else []),
                        moe=[("model.layers.{i}.mlp.gate.weight", "layers.{i}.ffn.router.gate.weight"),
                             ("model.layers.{i}.mlp.shared_expert_gate.weight", "layers.{i}.ffn.shared_gate.weight")]
                        + experts_map("mlp", ("gate_proj", "up_proj", "down_proj")) + shared_map("mlp.shared_expert")),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", qwen3_moe_to_moekit, qwen3_moe_to_hf,
                        lambda cfg: GQA + QK_NORM + (GQA_BIAS if cfg.get("attention_bias") else []),
                        moe=[("model.layers.{i}.mlp.gate.weight", "layers.{i}.ffn.router.gate.weight")]
                        + experts_map("mlp", ("gate_proj", "up_proj", "down_proj"))),
    "olmoe": Family("olmoe", "OlmoeForCausalLM", olmoe_to_moekit, olmoe_to_hf, lambda cfg: GQA + QK_NORM,
                    moe=[("model.layers.{i}.mlp.gate.weight", "layers.{i}.ffn.router.gate.weight")]
                    + experts_map("mlp", ("gate_proj", "up_proj", "down_proj"))),
    "deepseek_v3": Family("deepseek_v3", "DeepseekV3ForCausalLM", deepseek_v3_to_moekit, deepseek_v3_to_hf,
                          lambda cfg: (MLA_Q_LORA if cfg.get("q_lora_rank") else MLA_Q_FULL) + MLA_KV,
                          dense=DENSE_MLP,
                          moe=[("model.layers.{i}.mlp.gate.weight", "layers.{i}.ffn.router.gate.weight"),
                               ("model.layers.{i}.mlp.gate.e_score_correction_bias", "layers.{i}.ffn.router.bias")]
                          + experts_map("mlp", ("gate_proj", "up_proj", "down_proj")) + shared_map("mlp.shared_experts")),
}
