"""One declarative description per HF family: config translation and a key map.

Translations read the full config from ``config_reader.read_hf_config`` (every field present, with
transformers' defaults), never a field default of their own.

A key map is a list of (hf_key, moekit_key) templates, or (hf_key, moekit_key, View) when the moekit tensor
is a linear view of the HF one (transposed, interleaved halves: ``View``). ``{i}`` is the layer index, ``{e}``
the expert index; a moekit key ending in ``[e]`` is a slice of a stacked [E, ...] expert tensor. Which
templates apply to a layer depends on its kind: "attn" (all layers), "dense" (dense FFN layers), "moe" (MoE
layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from moekit.config import LossConfig, MLAConfig, ModelConfig, MoEConfig, RouterConfig
from moekit.errors import ConfigError, UsageError
from moekit.interop.config_reader import rope_parameters
from moekit.layers.ffn import OSS_ALPHA, OSS_LIMIT

@dataclass(frozen=True)
class View:
    """The moekit tensor is ``view(hf_tensor)`` reshaped to its own shape. Load reads through the view; export
    allocates the HF tensor (``hf_shape`` of the moekit shape) and writes through it, so two moekit tensors can
    share one HF tensor (gpt-oss's interleaved gate_up_proj)."""

    view: Callable[[Tensor], Tensor]
    hf_shape: Callable[[tuple], tuple]


SAME = View(lambda t: t, lambda s: s)
# HF stacked experts in x @ W layout [E, D, 2F] / [E, F, D] -> moekit's nn.Linear layout [E, F, D] / [E, D, F]
T = View(lambda t: t.transpose(-1, -2), lambda s: (*s[:-2], s[-1], s[-2]))
EVEN_T = View(lambda t: t[..., ::2].transpose(-1, -2), lambda s: (*s[:-2], s[-1], 2 * s[-2]))  # gpt-oss: gate
ODD_T = View(lambda t: t[..., 1::2].transpose(-1, -2), lambda s: (*s[:-2], s[-1], 2 * s[-2]))  # ... up
FIRST_T = View(lambda t: t[..., :t.shape[-1] // 2].transpose(-1, -2), EVEN_T.hf_shape)  # Llama 4: gate, then up
SECOND_T = View(lambda t: t[..., t.shape[-1] // 2:].transpose(-1, -2), EVEN_T.hf_shape)
EVEN = View(lambda t: t[..., ::2], lambda s: (*s[:-1], 2 * s[-1]))  # ... their biases
ODD = View(lambda t: t[..., 1::2], lambda s: (*s[:-1], 2 * s[-1]))



def rope_pairs(head_dim: int) -> View:
    """q/k projection rows of a family that rotates interleaved pairs (2j, 2j+1) (Llama 4) -> moekit's halves
    (j, j + K/2), head by head: the same rotation, and q.k is unchanged when both are permuted alike."""
    return View(lambda t: t.unflatten(0, (-1, head_dim // 2, 2)).transpose(1, 2), lambda s: s)


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
O_BIAS = [("model.layers.{i}.self_attn.o_proj.bias", "layers.{i}.attn.o_proj.bias")]
GQA_BIAS = [(f"model.layers.{{i}}.self_attn.{n}", f"layers.{{i}}.attn.{n}") for n in
            ("q_proj.bias", "k_proj.bias", "v_proj.bias")]
QK_NORM = [(f"model.layers.{{i}}.self_attn.{n}", f"layers.{{i}}.attn.{n}") for n in
           ("q_norm.weight", "k_norm.weight")]
MLA_Q_LORA = [(f"model.layers.{{i}}.self_attn.{n}", f"layers.{{i}}.attn.{n}") for n in
              ("q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight")]
MLA_BIAS = [(f"model.layers.{{i}}.self_attn.{n}", f"layers.{{i}}.attn.{n}") for n in
            ("kv_a_proj_with_mqa.bias", "o_proj.bias")]
MLA_Q_FULL = [("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_proj.weight")]
MLA_KV = [(f"model.layers.{{i}}.self_attn.{n}", f"layers.{{i}}.attn.{n}") for n in
          ("kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight")]
ROUTER = [("model.layers.{i}.mlp.gate.weight", "layers.{i}.ffn.router.gate.weight")]
DENSE_MLP = [(f"model.layers.{{i}}.mlp.{h}.weight", f"layers.{{i}}.ffn.{m}.weight") for h, m in
             (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down"))]


def experts_map(prefix: str, names: tuple[str, str, str]) -> list[tuple[str, str]]:
    """Per-expert HF keys (gate, up, down names) -> slices of moekit's stacked expert tensors."""
    gate, up, down = names
    return [(f"model.layers.{{i}}.{prefix}.experts.{{e}}.{gate}.weight", "layers.{i}.ffn.experts.w_gate_EFD[e]"),
            (f"model.layers.{{i}}.{prefix}.experts.{{e}}.{up}.weight", "layers.{i}.ffn.experts.w_up_EFD[e]"),
            (f"model.layers.{{i}}.{prefix}.experts.{{e}}.{down}.weight", "layers.{i}.ffn.experts.w_down_EDF[e]")]


def zero_width_shared(hf_prefix: str, d: int, gate: str | None = None) -> list[tuple[str, tuple]]:
    """A shared MLP HF builds at width 0 (and its gate, whose output then multiplies nothing)."""
    out = [(f"model.layers.{{i}}.{hf_prefix}.{h}.weight", shape) for h, shape in
           (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0)))]
    return out + ([(f"model.layers.{{i}}.{gate}.weight", (1, d))] if gate else [])


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
    moe: Callable[[dict], list] = lambda cfg: []  # hf config -> templates of an MoE layer
    # hf config -> (hf key template, shape) of an MoE layer's tensors that compute nothing under this config
    # (HF builds a shared expert of width 0): skipped on load, written as zeros on export
    inert: Callable[[dict], list] = lambda cfg: []
    # moekit tensor templates of an MoE layer the format has no place for and that must stay zero
    zero: list = field(default_factory=list)
    prefix: str = ""  # before every HF key (Llama 4's multimodal checkpoint: "language_model.")
    skip: tuple[str, ...] = ()  # HF key prefixes of modules moekit's LM leaves out (a vision tower)


def need(cfg: dict, name: str):
    """A field the model cannot be built without (a config may set it to null explicitly)."""
    if cfg.get(name) is None:
        raise ConfigError(f"config.json {name}={cfg.get(name)!r} (model_type={cfg.get('model_type')!r}): this "
                          f"family needs a value")
    return cfg[name]


ROPE_SCALING = ("linear", "llama3", "yarn")


def _rope_scaling(cfg: dict) -> dict:
    """HF's rope_parameters when they extend the context (moekit's ModelConfig.rope_scaling), else {}."""
    rp = rope_parameters(cfg)
    kind = rp["rope_type"]
    if kind == "default":
        return {}
    if kind not in ROPE_SCALING or rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"config.json rope_type={kind!r} (partial_rotary_factor="
                          f"{rp.get('partial_rotary_factor', 1.0)}): supported are default, {', '.join(ROPE_SCALING)}"
                          " on the full head")
    if kind == "yarn" and rp.get("factor") is None:  # transformers: the context extension it was trained for
        rp = dict(rp, factor=cfg["max_position_embeddings"] / rp["original_max_position_embeddings"])
    return {k: v for k, v in rp.items() if k not in ("rope_theta", "type")}


def _check_unsupported(cfg: dict) -> None:
    """Fields whose other values moekit's decoder does not compute; loading them would silently change logits."""
    act = cfg["hidden_act"]
    if act != "silu":
        raise ConfigError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU FFNs) is supported")


def _windows(cfg: dict) -> tuple[int, ...]:
    """Per-layer sliding-window spans as the family's HF modelling applies them (0 = full attention).
    Mixtral: sliding_window on every layer. Qwen3-MoE: on every layer when use_sliding_window. Qwen2(-MoE):
    the layers layer_types marks (transformers derives them from use_sliding_window and max_window_layers)."""
    L, W = cfg["num_hidden_layers"], cfg.get("sliding_window") or 0
    if "use_sliding_window" in cfg and not cfg["use_sliding_window"]:
        return ()
    if "max_window_layers" in cfg:  # Qwen2 / Qwen2-MoE
        return _typed_windows(cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 and
                                                         i < cfg["max_window_layers"] else "full_attention"
                                                         for i in range(L)], W)
    return (W,) * L if W else ()


def _typed_windows(layer_types: list[str], W: int) -> tuple[int, ...]:
    spans = tuple(W if t == "sliding_attention" else 0 for t in layer_types)
    return spans if any(spans) else ()


def _hf_windows(c: ModelConfig, per_layer: bool) -> dict:
    """Sliding windows back to HF fields: one span on every layer (Mixtral, Qwen3-MoE) or layer_types (Qwen2)."""
    spans = {w for w in c.attn_windows if w}
    if not spans:
        return dict(sliding_window=None, use_sliding_window=False)
    if len(spans) > 1 or (not per_layer and 0 in c.attn_windows):
        raise UsageError(f"ModelConfig.attn_windows={c.attn_windows}: this family has one span on every layer")
    W = spans.pop()
    if per_layer:
        return dict(sliding_window=W, use_sliding_window=True, max_window_layers=c.n_layers,
                    layer_types=["sliding_attention" if w else "full_attention" for w in c.attn_windows])
    return dict(sliding_window=W, use_sliding_window=True)


def _dense_layers(cfg: dict) -> tuple[int, ...]:
    """Qwen MoE families: dense FFN on mlp_only_layers and off the decoder_sparse_step pattern."""
    step = cfg["decoder_sparse_step"] or 1
    only = set(cfg["mlp_only_layers"] or [])
    return tuple(i for i in range(cfg["num_hidden_layers"]) if i in only or (i + 1) % step)


def _hf_dense_layers(c: ModelConfig) -> dict:
    dense = [i for i in range(c.n_layers) if not c.is_moe_layer(i)]
    return dict(decoder_sparse_step=1, mlp_only_layers=dense)


def _base(cfg: dict, **kw) -> dict:
    _check_unsupported(cfg)
    kw.setdefault("attn_windows", _windows(cfg))
    H = need(cfg, "num_attention_heads")
    return dict(vocab_size=need(cfg, "vocab_size"), d_model=need(cfg, "hidden_size"),
                n_layers=need(cfg, "num_hidden_layers"), n_heads=H, n_kv_heads=cfg.get("num_key_value_heads") or H,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // H,
                max_seq_len=min(cfg["max_position_embeddings"], 1 << 16),
                rope_theta=float(rope_parameters(cfg)["rope_theta"]), rope_scaling=_rope_scaling(cfg),
                norm_eps=cfg["rms_norm_eps"],
                tie_embeddings=bool(cfg["tie_word_embeddings"]), **kw)


def _hf_base(c: ModelConfig, model_type: str, arch: str) -> dict:
    return dict(model_type=model_type, architectures=[arch], vocab_size=c.vocab_size, hidden_size=c.d_model,
                num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                rope_parameters=dict(c.rope_scaling or {"rope_type": "default"}, rope_theta=c.rope_theta),
                tie_word_embeddings=c.tie_embeddings, hidden_act="silu")


def _moe(d: int, E: int, k: int, h: int, renorm: bool, **kw) -> MoEConfig:
    return MoEConfig(d_model=d, num_experts=E, expert_hidden=h, router=RouterConfig(top_k=k, renormalize=renorm),
                     loss=LossConfig(aux_coef=0.0), **kw)


# ------------------------------------------------------------------ Mixtral
def mixtral_to_moekit(cfg: dict) -> ModelConfig:
    return ModelConfig(**_base(cfg), moe=_moe(cfg["hidden_size"], need(cfg, "num_local_experts"),
                                              need(cfg, "num_experts_per_tok"), need(cfg, "intermediate_size"), True))


def mixtral_to_hf(c: ModelConfig) -> dict:
    window = _hf_windows(c, per_layer=False)["sliding_window"]
    return dict(_hf_base(c, "mixtral", "MixtralForCausalLM"), intermediate_size=c.moe.expert_hidden,
                num_local_experts=c.moe.num_experts, num_experts_per_tok=c.moe.router.top_k, sliding_window=window)


# ------------------------------------------------------------------ Qwen2-MoE / Qwen3-MoE
def qwen2_moe_to_moekit(cfg: dict) -> ModelConfig:
    d = cfg["hidden_size"]
    shared = need(cfg, "shared_expert_intermediate_size")  # 0: HF's shared expert computes nothing
    moe = _moe(d, need(cfg, "num_experts"), need(cfg, "num_experts_per_tok"), need(cfg, "moe_intermediate_size"),
               bool(cfg["norm_topk_prob"]), num_shared_experts=int(shared > 0), shared_hidden=shared,
               shared_gate=shared > 0)
    return ModelConfig(**_base(cfg), attention_bias=bool(cfg["qkv_bias"]), moe=moe, dense_layers=_dense_layers(cfg),
                       dense_hidden=need(cfg, "intermediate_size"))


def qwen2_moe_to_hf(c: ModelConfig) -> dict:
    m = c.moe
    return dict(_hf_base(c, "qwen2_moe", "Qwen2MoeForCausalLM"), intermediate_size=c.dense_hidden,
                moe_intermediate_size=m.expert_hidden,
                shared_expert_intermediate_size=m.num_shared_experts * m.shared_hidden_size,
                num_experts=m.num_experts, num_experts_per_tok=m.router.top_k, norm_topk_prob=m.router.renormalize,
                qkv_bias=c.attention_bias, **_hf_dense_layers(c), **_hf_windows(c, per_layer=True))


def qwen3_moe_to_moekit(cfg: dict) -> ModelConfig:
    moe = _moe(cfg["hidden_size"], need(cfg, "num_experts"), need(cfg, "num_experts_per_tok"),
               need(cfg, "moe_intermediate_size"), bool(cfg["norm_topk_prob"]))
    return ModelConfig(**_base(cfg), **_qkvo_bias(cfg), qk_norm="per_head", moe=moe, dense_layers=_dense_layers(cfg),
                       dense_hidden=need(cfg, "intermediate_size"))


def _qkvo_bias(cfg: dict) -> dict:
    """attention_bias puts a bias on q, k, v and the output projection (Llama, Qwen3-MoE, OLMoE)."""
    return dict(attention_bias=bool(cfg["attention_bias"]), attention_out_bias=bool(cfg["attention_bias"]))


def qwen3_moe_to_hf(c: ModelConfig) -> dict:
    m = c.moe
    return dict(_hf_base(c, "qwen3_moe", "Qwen3MoeForCausalLM"), intermediate_size=c.dense_hidden,
                moe_intermediate_size=m.expert_hidden, num_experts=m.num_experts, num_experts_per_tok=m.router.top_k,
                norm_topk_prob=m.router.renormalize, attention_bias=c.attention_bias or c.attention_out_bias,
                **_hf_dense_layers(c), **_hf_windows(c, per_layer=False))


# ------------------------------------------------------------------ OLMoE
def olmoe_to_moekit(cfg: dict) -> ModelConfig:
    if cfg["clip_qkv"]:
        raise ConfigError(f"config.json clip_qkv={cfg['clip_qkv']}: not supported")
    moe = _moe(cfg["hidden_size"], need(cfg, "num_experts"), need(cfg, "num_experts_per_tok"),
               need(cfg, "intermediate_size"), bool(cfg["norm_topk_prob"]))
    return ModelConfig(**_base(cfg), **_qkvo_bias(cfg), qk_norm="full", moe=moe)


def olmoe_to_hf(c: ModelConfig) -> dict:
    m = c.moe
    return dict(_hf_base(c, "olmoe", "OlmoeForCausalLM"), intermediate_size=m.expert_hidden,
                num_experts=m.num_experts, num_experts_per_tok=m.router.top_k, norm_topk_prob=m.router.renormalize,
                attention_bias=c.attention_bias or c.attention_out_bias, clip_qkv=None)


# ------------------------------------------------------------------ DeepSeek-V2 / V3
def _deepseek_model(cfg: dict, router: RouterConfig, rope_interleave: bool) -> ModelConfig:
    """MLA attention, dense first layers, fine-grained routed experts and n_shared_experts shared ones."""
    if cfg.get("mlp_bias"):
        raise ConfigError("config.json mlp_bias=True: FFN biases are not supported")
    # HF builds the shared MLP even with n_shared_experts=0, at width 0 (Family.inert): moekit has none
    moe = MoEConfig(d_model=cfg["hidden_size"], num_experts=need(cfg, "n_routed_experts"),
                    expert_hidden=need(cfg, "moe_intermediate_size"), num_shared_experts=cfg["n_shared_experts"] or 0,
                    shared_hidden=cfg["moe_intermediate_size"], router=router, loss=LossConfig(aux_coef=0.0))
    mla = MLAConfig(q_lora_rank=cfg["q_lora_rank"] or 0, kv_lora_rank=cfg["kv_lora_rank"],
                    qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
                    v_head_dim=cfg["v_head_dim"], rope_interleave=rope_interleave)
    base = _base(cfg)
    base["head_dim"] = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    return ModelConfig(**base, attention="mla", mla=mla, attention_bias=bool(cfg["attention_bias"]),
                       dense_hidden=cfg["intermediate_size"], first_k_dense=cfg["first_k_dense_replace"] or 0,
                       moe=moe)


def deepseek_v3_to_moekit(cfg: dict) -> ModelConfig:
    router = RouterConfig(kind="deepseek", top_k=need(cfg, "num_experts_per_tok"), score_func="sigmoid",
                          n_groups=cfg["n_group"] or 1, topk_groups=cfg["topk_group"] or 1,
                          routed_scaling_factor=cfg["routed_scaling_factor"], renormalize=bool(cfg["norm_topk_prob"]))
    return _deepseek_model(cfg, router, bool(cfg["rope_interleave"]))


def deepseek_v2_to_moekit(cfg: dict) -> ModelConfig:
    """DeepSeek-V2: softmax scores, greedy or group-limited (best expert per group) top-k, weights times
    routed_scaling_factor and never renormalised (HF's router ignores norm_topk_prob); RoPE on interleaved
    pairs (HF rotates them as complex numbers, which gives moekit's interleaved scores)."""
    method = cfg["topk_method"]
    if method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"config.json topk_method={method!r}: DeepSeek-V2 routes 'greedy' or 'group_limited_greedy'")
    grouped = method == "group_limited_greedy"
    router = RouterConfig(kind="deepseek", top_k=need(cfg, "num_experts_per_tok"), score_func="softmax",
                          n_groups=(cfg["n_group"] or 1) if grouped else 1,
                          topk_groups=(cfg["topk_group"] or 1) if grouped else 1,
                          routed_scaling_factor=cfg["routed_scaling_factor"], renormalize=False)
    return _deepseek_model(cfg, router, True)


def _deepseek_hf(c: ModelConfig, model_type: str, arch: str, **extra) -> dict:
    m, a = c.moe, c.mla
    out = dict(_hf_base(c, model_type, arch), intermediate_size=c.dense_hidden,
               moe_intermediate_size=m.expert_hidden, n_routed_experts=m.num_experts,
               n_shared_experts=m.num_shared_experts, num_experts_per_tok=m.router.top_k, n_group=m.router.n_groups,
               topk_group=m.router.topk_groups, routed_scaling_factor=m.router.routed_scaling_factor,
               first_k_dense_replace=c.first_k_dense, q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank,
               qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim,
               attention_bias=c.attention_bias, **extra)
    out.pop("head_dim")
    return out


def deepseek_v3_to_hf(c: ModelConfig) -> dict:
    return _deepseek_hf(c, "deepseek_v3", "DeepseekV3ForCausalLM", norm_topk_prob=c.moe.router.renormalize,
                        rope_interleave=c.mla.rope_interleave, num_nextn_predict_layers=0)


def deepseek_v2_to_hf(c: ModelConfig) -> dict:
    grouped = c.moe.router.n_groups > 1
    return _deepseek_hf(c, "deepseek_v2", "DeepseekV2ForCausalLM",
                        topk_method="group_limited_greedy" if grouped else "greedy")


def _deepseek_attn(cfg: dict) -> list:
    q = MLA_Q_LORA if cfg["q_lora_rank"] else MLA_Q_FULL
    q_bias = [("model.layers.{i}.self_attn.q_a_proj.bias", "layers.{i}.attn.q_a_proj.bias")] if cfg["q_lora_rank"] else []
    return q + MLA_KV + (MLA_BIAS + q_bias if cfg["attention_bias"] else [])


def _deepseek_moe(cfg: dict, correction_bias: bool) -> list:
    bias = [("model.layers.{i}.mlp.gate.e_score_correction_bias", "layers.{i}.ffn.router.bias")] if correction_bias else []
    return (ROUTER + bias + experts_map("mlp", ("gate_proj", "up_proj", "down_proj"))
            + (shared_map("mlp.shared_experts") if cfg["n_shared_experts"] else []))


def _deepseek_inert(cfg: dict) -> list:
    return [] if cfg["n_shared_experts"] else zero_width_shared("mlp.shared_experts", cfg["hidden_size"])


# ------------------------------------------------------------------ gpt-oss
def gpt_oss_to_moekit(cfg: dict) -> ModelConfig:
    """Attention sinks, q/k/v/o biases, sliding windows on the layers layer_types marks (transformers fills it:
    even layers), yarn RoPE; router with a bias, softmax over the top-k logits (= softmax, top-k, renormalise);
    biased experts with the clamped SwiGLU."""
    oss = (cfg["swiglu_alpha"], cfg["swiglu_limit"])
    if oss != (OSS_ALPHA, OSS_LIMIT):
        raise ConfigError(f"config.json swiglu_alpha={oss[0]}, swiglu_limit={oss[1]}: moekit's clamped_swiglu is "
                          f"gpt-oss's ({OSS_ALPHA}, {OSS_LIMIT})")
    L = need(cfg, "num_hidden_layers")
    types = cfg["layer_types"] or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
    moe = MoEConfig(d_model=cfg["hidden_size"], num_experts=need(cfg, "num_local_experts"),
                    expert_hidden=need(cfg, "intermediate_size"), activation="clamped_swiglu", bias=True,
                    router=RouterConfig(top_k=need(cfg, "num_experts_per_tok"), renormalize=True, gate_bias=True),
                    loss=LossConfig(aux_coef=0.0))
    return ModelConfig(**_base(cfg, attn_windows=_typed_windows(types, cfg["sliding_window"] or 0)),
                       **_qkvo_bias(cfg), attn_sinks=True, moe=moe)


def gpt_oss_to_hf(c: ModelConfig) -> dict:
    spans = {w for w in c.attn_windows if w}
    if len(spans) > 1:
        raise UsageError(f"ModelConfig.attn_windows={c.attn_windows}: gpt-oss has one sliding-window span")
    m = c.moe
    return dict(_hf_base(c, "gpt_oss", "GptOssForCausalLM"), intermediate_size=m.expert_hidden,
                num_local_experts=m.num_experts, num_experts_per_tok=m.router.top_k,
                attention_bias=c.attention_bias or c.attention_out_bias, sliding_window=max(spans, default=None),
                layer_types=["sliding_attention" if c.window(i) else "full_attention" for i in range(c.n_layers)],
                swiglu_alpha=OSS_ALPHA, swiglu_limit=OSS_LIMIT)


GPT_OSS_MOE = [
    ("model.layers.{i}.mlp.router.weight", "layers.{i}.ffn.router.gate.weight"),
    ("model.layers.{i}.mlp.router.bias", "layers.{i}.ffn.router.gate.bias"),
    ("model.layers.{i}.mlp.experts.gate_up_proj", "layers.{i}.ffn.experts.w_gate_EFD", EVEN_T),
    ("model.layers.{i}.mlp.experts.gate_up_proj", "layers.{i}.ffn.experts.w_up_EFD", ODD_T),
    ("model.layers.{i}.mlp.experts.gate_up_proj_bias", "layers.{i}.ffn.experts.b_gate_EF", EVEN),
    ("model.layers.{i}.mlp.experts.gate_up_proj_bias", "layers.{i}.ffn.experts.b_up_EF", ODD),
    ("model.layers.{i}.mlp.experts.down_proj", "layers.{i}.ffn.experts.w_down_EDF", T),
    ("model.layers.{i}.mlp.experts.down_proj_bias", "layers.{i}.ffn.experts.b_down_ED"),
]


# ------------------------------------------------------------------ Llama 4 (text)
def llama4_text_to_moekit(cfg: dict) -> ModelConfig:
    """MoE on moe_layers (transformers fills them from interleave_moe_layer_step), dense FFNs of
    intermediate_size_mlp elsewhere; a shared expert; sigmoid top-k router whose gate scales the expert input
    (moekit's DeepSeek router with sigmoid scores, no selection bias, no renormalisation); NoPE layers
    (no_rope_layers[i] == 0) with temperature tuning; chunked attention and weightless q/k norm elsewhere."""
    L = need(cfg, "num_hidden_layers")
    use_rope = cfg["no_rope_layers"] or [int((i + 1) % 4 != 0) for i in range(L)]  # transformers' default
    moe_layers = cfg["moe_layers"]
    if moe_layers is None:
        step = cfg["interleave_moe_layer_step"]
        moe_layers = list(range(step - 1, L, step))
    types = cfg["layer_types"] or ["chunked_attention" if r else "full_attention" for r in use_rope]
    C = cfg["attention_chunk_size"] or 0
    chunks = tuple(C if t == "chunked_attention" else 0 for t in types)
    F = need(cfg, "intermediate_size")
    router = RouterConfig(kind="deepseek", score_func="sigmoid", top_k=need(cfg, "num_experts_per_tok"),
                          renormalize=False)
    moe = MoEConfig(d_model=cfg["hidden_size"], num_experts=need(cfg, "num_local_experts"), expert_hidden=F,
                    num_shared_experts=1, shared_hidden=F, gate_input=True, router=router,
                    loss=LossConfig(aux_coef=0.0))
    return ModelConfig(**_base(cfg), **_qkvo_bias(cfg), qk_norm="l2" if cfg["use_qk_norm"] else "none",
                       nope_layers=tuple(i for i, r in enumerate(use_rope) if not r),
                       attn_chunks=chunks if any(chunks) else (),
                       nope_temp_scale=float(cfg["attn_scale"]) if cfg["attn_temperature_tuning"] else 0.0,
                       nope_temp_floor=int(cfg["floor_scale"]), moe=moe,
                       dense_layers=tuple(i for i in range(L) if i not in moe_layers),
                       dense_hidden=need(cfg, "intermediate_size_mlp"))


def llama4_text_to_hf(c: ModelConfig) -> dict:
    spans = {w for w in c.attn_chunks if w}
    if len(spans) > 1 or any(c.attn_windows):
        raise UsageError(f"ModelConfig.attn_chunks={c.attn_chunks}, attn_windows={c.attn_windows}: Llama 4 has one "
                         "chunk span and no sliding windows")
    m = c.moe
    return dict(_hf_base(c, "llama4_text", "Llama4ForCausalLM"), intermediate_size=m.expert_hidden,
                intermediate_size_mlp=c.dense_hidden, num_local_experts=m.num_experts,
                num_experts_per_tok=m.router.top_k, moe_layers=[i for i in range(c.n_layers) if c.is_moe_layer(i)],
                no_rope_layers=[int(i not in c.nope_layers) for i in range(c.n_layers)],
                attention_chunk_size=max(spans, default=None),
                layer_types=["chunked_attention" if c.chunk(i) else "full_attention" for i in range(c.n_layers)],
                use_qk_norm=c.qk_norm == "l2", attn_temperature_tuning=c.nope_temp_scale > 0,
                attn_scale=c.nope_temp_scale or 0.1, floor_scale=c.nope_temp_floor,
                attention_bias=c.attention_bias or c.attention_out_bias)


def llama4_to_moekit(cfg: dict) -> ModelConfig:
    """The multimodal checkpoint's language model (its vision tower is not part of moekit's LM)."""
    return llama4_text_to_moekit(dict(cfg["text_config"], tie_word_embeddings=cfg["tie_word_embeddings"]))


def llama4_to_hf(c: ModelConfig) -> dict:
    raise UsageError("model_type='llama4' holds a vision tower moekit does not have: export with --model-type "
                     "llama4_text (Llama4ForCausalLM)")


def _llama4_attn(cfg: dict) -> list:
    text = cfg.get("text_config") or cfg
    pairs = rope_pairs(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    out = [(h, m, pairs if "q_proj" in h or "k_proj" in h else SAME) for h, m in GQA]
    if text["attention_bias"]:
        out += [(h, m, pairs if "q_proj" in h or "k_proj" in h else SAME) for h, m in GQA_BIAS + O_BIAS]
    return out


LLAMA4_DENSE = [(f"model.layers.{{i}}.feed_forward.{h}.weight", f"layers.{{i}}.ffn.{m}.weight") for h, m in
                (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down"))]
LLAMA4_MOE = [
    ("model.layers.{i}.feed_forward.router.weight", "layers.{i}.ffn.router.gate.weight"),
    ("model.layers.{i}.feed_forward.experts.gate_up_proj", "layers.{i}.ffn.experts.w_gate_EFD", FIRST_T),
    ("model.layers.{i}.feed_forward.experts.gate_up_proj", "layers.{i}.ffn.experts.w_up_EFD", SECOND_T),
    ("model.layers.{i}.feed_forward.experts.down_proj", "layers.{i}.ffn.experts.w_down_EDF", T),
] + shared_map("feed_forward.shared_expert")
LLAMA4 = dict(attn=_llama4_attn, dense=LLAMA4_DENSE, moe=lambda cfg: LLAMA4_MOE, zero=["layers.{i}.ffn.router.bias"])


# ------------------------------------------------------------------ dense Llama / Qwen2 (upcycling sources)
def llama_to_moekit(cfg: dict) -> ModelConfig:
    if cfg.get("mlp_bias"):
        raise ConfigError("config.json mlp_bias=True: FFN biases are not supported")
    bias = dict(attention_bias=True) if cfg["model_type"] == "qwen2" else _qkvo_bias(cfg)
    return ModelConfig(**_base(cfg), dense_hidden=cfg["intermediate_size"], **bias)


def llama_to_hf(c: ModelConfig) -> dict:
    return dict(_hf_base(c, "llama", "LlamaForCausalLM"), intermediate_size=c.dense_hidden,
                attention_bias=c.attention_bias or c.attention_out_bias, mlp_bias=False)


def qwen2_to_hf(c: ModelConfig) -> dict:
    return dict(_hf_base(c, "qwen2", "Qwen2ForCausalLM"), intermediate_size=c.dense_hidden,
                **_hf_windows(c, per_layer=True))


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", llama_to_moekit, llama_to_hf,
                    lambda cfg: GQA + (GQA_BIAS + O_BIAS if cfg["attention_bias"] else []), dense=DENSE_MLP),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", llama_to_moekit, qwen2_to_hf, lambda cfg: GQA + GQA_BIAS,
                    dense=DENSE_MLP),
    "mixtral": Family("mixtral", "MixtralForCausalLM", mixtral_to_moekit, mixtral_to_hf, lambda cfg: GQA,
                      moe=lambda cfg: [("model.layers.{i}.block_sparse_moe.gate.weight",
                                        "layers.{i}.ffn.router.gate.weight")]
                      + experts_map("block_sparse_moe", ("w1", "w3", "w2"))),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", qwen2_moe_to_moekit, qwen2_moe_to_hf,
                        lambda cfg: GQA + (GQA_BIAS if cfg["qkv_bias"] else []), dense=DENSE_MLP,
                        moe=lambda cfg: ROUTER + experts_map("mlp", ("gate_proj", "up_proj", "down_proj"))
                        + ([("model.layers.{i}.mlp.shared_expert_gate.weight", "layers.{i}.ffn.shared_gate.weight")]
                           + shared_map("mlp.shared_expert") if cfg["shared_expert_intermediate_size"] else []),
                        inert=lambda cfg: [] if cfg["shared_expert_intermediate_size"] else zero_width_shared(
                            "mlp.shared_expert", cfg["hidden_size"], gate="mlp.shared_expert_gate")),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", qwen3_moe_to_moekit, qwen3_moe_to_hf,
                        lambda cfg: GQA + QK_NORM + (GQA_BIAS + O_BIAS if cfg["attention_bias"] else []), dense=DENSE_MLP,
                        moe=lambda cfg: ROUTER + experts_map("mlp", ("gate_proj", "up_proj", "down_proj"))),
    "olmoe": Family("olmoe", "OlmoeForCausalLM", olmoe_to_moekit, olmoe_to_hf,
                    lambda cfg: GQA + QK_NORM + (GQA_BIAS + O_BIAS if cfg["attention_bias"] else []),
                    moe=lambda cfg: ROUTER + experts_map("mlp", ("gate_proj", "up_proj", "down_proj"))),
    "deepseek_v3": Family("deepseek_v3", "DeepseekV3ForCausalLM", deepseek_v3_to_moekit, deepseek_v3_to_hf,
                          _deepseek_attn, dense=DENSE_MLP, moe=lambda cfg: _deepseek_moe(cfg, True),
                          inert=_deepseek_inert),
    "gpt_oss": Family("gpt_oss", "GptOssForCausalLM", gpt_oss_to_moekit, gpt_oss_to_hf,
                      lambda cfg: GQA + (GQA_BIAS + O_BIAS if cfg["attention_bias"] else [])
                      + [("model.layers.{i}.self_attn.sinks", "layers.{i}.attn.sinks")],
                      moe=lambda cfg: GPT_OSS_MOE),
    # Llama 4 has no selection bias: moekit's DeepSeek router keeps its bias buffer at zero (Family.zero)
    "llama4_text": Family("llama4_text", "Llama4ForCausalLM", llama4_text_to_moekit, llama4_text_to_hf, **LLAMA4),
    "llama4": Family("llama4", "Llama4ForConditionalGeneration", llama4_to_moekit, llama4_to_hf, **LLAMA4,
                     prefix="language_model.", skip=("vision_model.", "multi_modal_projector.")),
    # V2 has no selection bias: moekit's DeepSeek router keeps its bias buffer at zero (Family.zero)
    "deepseek_v2": Family("deepseek_v2", "DeepseekV2ForCausalLM", deepseek_v2_to_moekit, deepseek_v2_to_hf,
                          _deepseek_attn, dense=DENSE_MLP, moe=lambda cfg: _deepseek_moe(cfg, False),
                          inert=_deepseek_inert, zero=["layers.{i}.ffn.router.bias"]),
}
