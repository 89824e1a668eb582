"""What ``patch`` needs to know about each transformers MoE family: one declarative entry per family.

An entry names the family's sparse MoE block class, the block's router attribute (transformers records
``router_logits`` with hooks on that module), a key map from the block's tensors to MoELayer tensors with a
linear reshape rule each, and the gating details (``RouterConfig``) read from the family's transformers config
object, so every default is transformers' own. The number of experts, widths and the shared expert come from
the block's tensors (some families vary them per layer).

Gating shapes that are the same function under another name map onto one moekit router:
- top-k of the logits, then softmax over the k kept (Granite, JetMoE) = softmax, top-k, renormalise;
- DBRX's p=1 norm of the kept (positive) softmax weights = renormalise;
- gpt-oss's softmax over the top-k of (biased) logits = softmax, top-k, renormalise;
- Llama 4's sigmoid of the top-k logits = DeepSeek's sigmoid router without selection bias or renormalisation.
A router bias and expert biases in the key map give the MoELayer a biased gate and biased experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from moekit.config import RouterConfig
from moekit.errors import ConfigError
from moekit.interop.families import EVEN, EVEN_T, ODD, ODD_T
from moekit.layers.ffn import OSS_ALPHA, OSS_LIMIT, SWIGLU_LIMIT

# reshape rules, HF tensor -> moekit tensor; each is linear, so it maps gradients the same way (tests rely on it)
TRANSFORMS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "same": lambda t, E: t,
    "first_half": lambda t, E: t.chunk(2, dim=-2)[0],  # fused [E, 2F, D]: gate rows, then up rows
    "second_half": lambda t, E: t.chunk(2, dim=-2)[1],
    "flat": lambda t, E: t.reshape(-1),  # [1, E] -> [E]
    "rows_EFD": lambda t, E: t.view(E, -1, t.shape[-1]),  # DBRX: experts stacked along rows [E*F, D]
    "rows_EFD_T": lambda t, E: t.view(E, -1, t.shape[-1]).transpose(1, 2),  # DBRX w2 [E*F, D] -> [E, D, F]
    # Aria and Llama 4 store experts as (in, out): gate_up [E, D, 2F] (gate columns, then up), down [E, F, D]
    "T_first_half": lambda t, E: t.chunk(2, dim=-1)[0].transpose(1, 2),
    "T_second_half": lambda t, E: t.chunk(2, dim=-1)[1].transpose(1, 2),
    "T": lambda t, E: t.transpose(1, 2),
    "cols_first_half": lambda t, E: t.chunk(2, dim=-1)[0],  # fused biases [E, 2F]: gate, then up
    "cols_second_half": lambda t, E: t.chunk(2, dim=-1)[1],
    # gpt-oss: gate and up interleaved along the last dim of gate_up [E, D, 2F] and its bias [E, 2F] (the
    # views convert uses, interop.families)
    "even_T": lambda t, E: EVEN_T.view(t),
    "odd_T": lambda t, E: ODD_T.view(t),
    "even": lambda t, E: EVEN.view(t),
    "odd": lambda t, E: ODD.view(t),
}

Key = tuple[str, str, str]  # (HF tensor under the block, MoELayer tensor, TRANSFORMS name)

FUSED_EXPERTS: tuple[Key, ...] = (
    ("experts.gate_up_proj", "experts.w_gate_EFD", "first_half"),
    ("experts.gate_up_proj", "experts.w_up_EFD", "second_half"),
    ("experts.down_proj", "experts.w_down_EDF", "same"),
)


def shared_keys(prefix: str) -> tuple[Key, ...]:
    return tuple((f"{prefix}.{h}.weight", f"shared.{m}.weight", "same")
                 for h, m in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")))


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _per_layer(value: Any, layer: int) -> Any:
    return value[layer] if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- gating: HF config (+ layer index) -> RouterConfig
def softmax_topk(renorm_field: str | None, default: bool = True, k_field: str = "num_experts_per_tok"):
    """Softmax over all experts, top-k, optionally renormalised (Mixtral, Qwen-MoE, OLMoE, Hunyuan)."""
    def gating(cfg: Any, layer: int) -> RouterConfig:
        renorm = default if renorm_field is None else bool(_get(cfg, renorm_field, default=default))
        return RouterConfig(kind="softmax_topk", top_k=int(_per_layer(getattr(cfg, k_field), layer)),
                            renormalize=renorm)
    return gating


def topk_softmax(cfg: Any, layer: int) -> RouterConfig:
    """Top-k of the logits, softmax over the kept k (Granite, JetMoE): softmax top-k renormalised."""
    return RouterConfig(kind="softmax_topk", top_k=int(cfg.num_experts_per_tok), renormalize=True)


def sigmoid_topk(renorm_field: str | None = "norm_topk_prob", scale_field: str | None = "routed_scaling_factor"):
    """Sigmoid scores, selection by score + bias (0 where the family has none), group-limited where the config
    has n_group (sum of the two best per group), renormalised (always if ``renorm_field`` is None), scaled."""
    def gating(cfg: Any, layer: int) -> RouterConfig:
        return RouterConfig(kind="deepseek", score_func="sigmoid", top_k=int(cfg.num_experts_per_tok),
                            n_groups=int(_get(cfg, "n_group", default=1)),
                            topk_groups=int(_get(cfg, "topk_group", default=1)),
                            renormalize=True if renorm_field is None else bool(getattr(cfg, renorm_field)),
                            routed_scaling_factor=1.0 if scale_field is None else float(getattr(cfg, scale_field)))
    return gating


deepseek_v3 = sigmoid_topk()


def laguna(cfg: Any, layer: int) -> RouterConfig:
    """Sigmoid + correction bias, renormalised; the block scales the routed output (= the gate weights)."""
    if cfg.moe_router_logit_softcapping or cfg.moe_apply_router_weight_on_input:
        raise ConfigError(f"config.moe_router_logit_softcapping={cfg.moe_router_logit_softcapping}, "
                          f"moe_apply_router_weight_on_input={cfg.moe_apply_router_weight_on_input}: patch supports "
                          "0 and False (moekit's router has no soft cap and weights expert outputs)")
    return sigmoid_topk(None, "moe_routed_scaling_factor")(cfg, layer)


def cohere2_moe(cfg: Any, layer: int) -> RouterConfig:
    """Top-k of the logits, then softmax over the k (= softmax top-k renormalised) or sigmoid (renormalised
    if norm_topk_prob); a shared expert must be summed, not averaged."""
    if cfg.num_shared_experts and cfg.shared_expert_combination_strategy != "sum":
        raise ConfigError(f"config.shared_expert_combination_strategy={cfg.shared_expert_combination_strategy!r}: "
                          "patch supports 'sum' (moekit adds the shared expert)")
    if cfg.expert_selection_fn == "sigmoid":
        return sigmoid_topk("norm_topk_prob", None)(cfg, layer)
    return topk_softmax(cfg, layer)


def deepseek_v2(cfg: Any, layer: int) -> RouterConfig:
    """Softmax scores, greedy or group-limited greedy (best expert per group), scaled, never renormalised."""
    grouped = cfg.topk_method == "group_limited_greedy"
    if cfg.topk_method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"config.topk_method={cfg.topk_method!r}: patch knows 'greedy' and 'group_limited_greedy'")
    return RouterConfig(kind="deepseek", score_func="softmax", top_k=int(cfg.num_experts_per_tok),
                        n_groups=int(cfg.n_group) if grouped else 1, topk_groups=int(cfg.topk_group) if grouped else 1,
                        renormalize=False, routed_scaling_factor=float(cfg.routed_scaling_factor))


def ernie(cfg: Any, layer: int) -> RouterConfig:
    """Softmax scores, selection by score + correction bias, kept weights renormalised (clamped at moe_norm_min,
    which a sum of k >= 2 softmax weights never reaches)."""
    k = int(cfg.num_experts_per_tok)
    if k < 2:  # moekit's softmax DeepSeek router leaves a single weight unnormalised; ERNIE divides it to 1
        raise ConfigError(f"config.num_experts_per_tok={k}: patch supports ERNIE-4.5-MoE with top-k >= 2")
    return RouterConfig(kind="deepseek", score_func="softmax", top_k=k, renormalize=True)


def phimoe(cfg: Any, layer: int) -> RouterConfig:
    """SparseMixer top-2 with ``router_jitter_noise`` as its candidate threshold; always two experts, as
    transformers' sparsemixer (it ignores num_experts_per_tok)."""
    return RouterConfig(kind="sparsemixer", top_k=2, sparsemixer_eps=float(cfg.router_jitter_noise))


def llama4(cfg: Any, layer: int) -> RouterConfig:
    """Sigmoid of the top-k logits, not renormalised (the block scales each expert's *input* by it)."""
    return RouterConfig(kind="deepseek", score_func="sigmoid", top_k=int(cfg.num_experts_per_tok),
                        renormalize=False)


def dbrx(cfg: Any, layer: int) -> RouterConfig:
    ffn = cfg.ffn_config
    p = ffn.moe_normalize_expert_weights
    if p not in (None, 1, 1.0):
        raise ConfigError(f"config.ffn_config.moe_normalize_expert_weights={p!r}: patch supports 1 (renormalise) "
                          "or None")
    return RouterConfig(kind="softmax_topk", top_k=int(ffn.moe_top_k), renormalize=p is not None)


def axk2(cfg: Any, layer: int) -> RouterConfig:
    """DeepSeek-V3 gating; with expert groups, A.X-K2 fills the experts of dropped groups with score 0 (not -inf)."""
    return replace(deepseek_v3(cfg, layer), group_mask_fill="zero")



def kolibri1(cfg: Any, layer: int) -> RouterConfig:
    """Top-k of logits + correction bias, weights the sigmoid of the chosen logits (`norm_topk_prob`), unscaled."""
    return RouterConfig(kind="deepseek", score_func="sigmoid", select_on="logits", top_k=int(cfg.num_experts_per_tok),
                        renormalize=bool(cfg.norm_topk_prob))


def mistral4(renorm_field: str | None):
    """Softmax scores, groups ranked by their two best experts, renormalised (always if ``renorm_field`` is None;
    a single expert too), scaled."""
    def gating(cfg: Any, layer: int) -> RouterConfig:
        k = int(cfg.num_experts_per_tok)
        renorm = True if renorm_field is None else bool(getattr(cfg, renorm_field))
        if renorm and k < 2:  # moekit's softmax DeepSeek router leaves a single weight unnormalised
            raise ConfigError(f"config.num_experts_per_tok={k}: patch supports Mistral 4 with top-k >= 2")
        return RouterConfig(kind="deepseek", score_func="softmax", top_k=k, n_groups=int(_get(cfg, "n_group", default=1)),
                            topk_groups=int(_get(cfg, "topk_group", default=1)), group_score="top2_sum",
                            renormalize=renorm, routed_scaling_factor=float(cfg.routed_scaling_factor))
    return gating

def nemotron_act(cfg: Any) -> str:
    """Nemotron-H's experts and shared expert are plain (ungated) MLPs with mlp_hidden_act (relu2 by default)."""
    name = cfg.mlp_hidden_act
    if name not in ("relu2", "relu", "silu", "gelu"):
        raise ConfigError(f"config.mlp_hidden_act={name!r}: patch supports 'relu2', 'relu', 'silu' and 'gelu'")
    return name


def swiglu_limit(cfg: Any) -> str:
    """GLM-5-Next's experts (routed and shared): silu(min(gate, limit)) * clamp(up, -limit, limit)."""
    if cfg.hidden_act != "silu" or cfg.swiglu_limit != SWIGLU_LIMIT:
        raise ConfigError(f"config.hidden_act={cfg.hidden_act!r}, swiglu_limit={cfg.swiglu_limit}: patch supports "
                          f"'silu' with {SWIGLU_LIMIT} (moekit's swiglu_limit10)")
    return "swiglu_limit10"


def aria_swiglu(cfg: Any) -> str:
    """Aria's routed experts are always SiLU-gated; its shared experts follow hidden_act (one activation in moekit)."""
    if cfg.hidden_act != "silu":
        raise ConfigError(f"config.hidden_act={cfg.hidden_act!r}: patch supports Aria with 'silu' (its routed experts "
                          "are SiLU-gated whatever hidden_act says; moekit's shared expert uses the same activation)")
    return "swiglu"

# ---------------------------------------------------------------- activations
def hidden_act(field_name: str = "hidden_act") -> Callable[[Any], str]:
    def act(cfg: Any) -> str:
        name = getattr(cfg, field_name)
        if isinstance(name, dict):  # DBRX: ffn_act_fn = {"name": ...}
            name = name.get("name", "silu")
        if name not in ("silu", "gelu"):
            raise ConfigError(f"config.{field_name}={name!r}: patch supports gated 'silu' (SwiGLU) and 'gelu' (GeGLU)")
        return {"silu": "swiglu", "gelu": "geglu"}[name]
    return act


def clamped_swiglu(cfg: Any) -> str:
    """gpt-oss's expert activation; moekit's has gpt-oss's constants."""
    if (cfg.swiglu_alpha, cfg.swiglu_limit) != (OSS_ALPHA, OSS_LIMIT):
        raise ConfigError(f"config.swiglu_alpha={cfg.swiglu_alpha}, swiglu_limit={cfg.swiglu_limit}: patch supports "
                          f"gpt-oss's ({OSS_ALPHA}, {OSS_LIMIT}) (moekit's clamped_swiglu)")
    return "clamped_swiglu"


@dataclass(frozen=True)
class PatchEntry:
    block: str  # transformers class of the sparse MoE block
    router: str  # the block's router module (transformers hooks it to record router_logits)
    keys: tuple[Key, ...]  # every tensor of the block, mapped
    gating: Callable[[Any, int], RouterConfig]  # (HF text config, layer index) -> RouterConfig
    activation: Callable[[Any], str] = field(default_factory=hidden_act)
    jitter: str | None = None  # config field (dotted): training-time multiplicative noise on the block input
    jitter_draws: int = 1  # fresh noise multiplications of the input (PhiMoE: by its block, then its router)
    output_bias: str | None = None  # HF tensor added to the block output (JetMoE)
    gate_input: bool = False  # the gate weight scales the expert's input (Llama 4: MoEConfig.gate_input)
    # the block returns (y, a router tensor), which the family's decoder layer unpacks and drops (gpt-oss, Llama 4)
    pair_output: bool = False

    def jitter_eps(self, cfg: Any) -> float:
        if self.jitter is None:
            return 0.0
        for name in self.jitter.split("."):
            cfg = getattr(cfg, name, None)
        return float(cfg or 0.0)


def standard(prefix: str, gating, *, gate: str = "gate", router_key: str = "gate.weight", extra: tuple = (),
             **kw) -> PatchEntry:
    """A transformers v5 block: router weight [E, D], fused experts.gate_up_proj / experts.down_proj."""
    return PatchEntry(block=prefix, router=gate, keys=((router_key, "router.gate.weight", "same"),) + FUSED_EXPERTS
                      + extra, gating=gating, **kw)


QWEN_SHARED = shared_keys("shared_expert") + (("shared_expert_gate.weight", "shared_gate.weight", "same"),)
DEEPSEEK_SHARED = shared_keys("shared_experts")
E_SCORE_BIAS = (("gate.e_score_correction_bias", "router.bias", "same"),)
LLAMA4 = PatchEntry(block="Llama4TextMoe", router="router", keys=(
    ("router.weight", "router.gate.weight", "same"),
    ("experts.gate_up_proj", "experts.w_gate_EFD", "T_first_half"),
    ("experts.gate_up_proj", "experts.w_up_EFD", "T_second_half"),
    ("experts.down_proj", "experts.w_down_EDF", "T")) + shared_keys("shared_expert"),
    gating=llama4, gate_input=True, pair_output=True)

QWEN4_EXP = standard("Qwen4ExpTextSparseMoeBlock", softmax_topk("norm_topk_prob"), extra=QWEN_SHARED)
DOTS3_NOTE = standard("Dots3NoteTextMoE", deepseek_v3, extra=E_SCORE_BIAS + DEEPSEEK_SHARED)
# gpt-oss's clamped SwiGLU (gate/up in halves, not interleaved) in the routed and the shared experts; sigmoid +
# correction bias, renormalised, the routed output times routed_scaling_factor (= scaled weights)
MINIMAX_M3 = standard("MiniMaxM3VLSparseMoeBlock", sigmoid_topk(None), activation=clamped_swiglu, extra=E_SCORE_BIAS + (
    ("shared_experts.gate_up_proj.weight", "shared.w_gate.weight", "first_half"),
    ("shared_experts.gate_up_proj.weight", "shared.w_up.weight", "second_half"),
    ("shared_experts.down_proj.weight", "shared.w_down.weight", "same")))
ARIA = PatchEntry(block="AriaTextMoELayer", router="router", keys=(
    ("router.weight", "router.gate.weight", "same"),
    ("experts.gate_up_proj", "experts.w_gate_EFD", "T_first_half"),
    ("experts.gate_up_proj", "experts.w_up_EFD", "T_second_half"),
    ("experts.down_proj", "experts.w_down_EDF", "T")) + shared_keys("shared_experts"),
    gating=softmax_topk(None, k_field="moe_topk"), activation=aria_swiglu)  # top-k logits, softmax over the k

QWEN3_5_MOE = standard("Qwen3_5MoeSparseMoeBlock", softmax_topk(None), extra=QWEN_SHARED)

PATCH_FAMILIES: dict[str, PatchEntry] = {
    "mixtral": standard("MixtralSparseMoeBlock", softmax_topk(None), jitter="router_jitter_noise"),
    "minimax": standard("MiniMaxSparseMoeBlock", softmax_topk(None), jitter="router_jitter_noise"),
    "qwen2_moe": standard("Qwen2MoeSparseMoeBlock", softmax_topk("norm_topk_prob"), extra=QWEN_SHARED),
    "qwen3_moe": standard("Qwen3MoeSparseMoeBlock", softmax_topk("norm_topk_prob")),
    "qwen3_next": standard("Qwen3NextSparseMoeBlock", softmax_topk("norm_topk_prob"), extra=QWEN_SHARED),
    "olmoe": standard("OlmoeSparseMoeBlock", softmax_topk("norm_topk_prob")),
    "flex_olmo": standard("FlexOlmoSparseMoeBlock", softmax_topk("norm_topk_prob")),
    "hunyuan_v1_moe": standard("HunYuanMoEV1Moe", softmax_topk(None, k_field="moe_topk"), router_key="gate.wg.weight",
                               extra=shared_keys("shared_mlp")),
    "granitemoe": standard("GraniteMoeMoE", topk_softmax, gate="router", router_key="router.weight"),
    "granitemoeshared": standard("GraniteMoeSharedMoE", topk_softmax, gate="router", router_key="router.weight"),
    "deepseek_v2": standard("DeepseekV2Moe", deepseek_v2, extra=DEEPSEEK_SHARED),
    "deepseek_v3": standard("DeepseekV3MoE", deepseek_v3, extra=E_SCORE_BIAS + DEEPSEEK_SHARED),
    "glm4_moe": standard("Glm4MoeMoE", deepseek_v3, extra=E_SCORE_BIAS + DEEPSEEK_SHARED),
    "dots1": standard("Dots1MoE", deepseek_v3, extra=E_SCORE_BIAS + DEEPSEEK_SHARED),
    "deepseek_v32": standard("DeepseekV32MoE", deepseek_v3, extra=E_SCORE_BIAS + DEEPSEEK_SHARED),
    "glm4_moe_lite": standard("Glm4MoeLiteMoE", deepseek_v3, extra=E_SCORE_BIAS + DEEPSEEK_SHARED),
    "glm_moe_dsa": standard("GlmMoeDsaMoE", deepseek_v3, extra=E_SCORE_BIAS + DEEPSEEK_SHARED),
    "solar_open": standard("SolarOpenMoE", deepseek_v3, extra=E_SCORE_BIAS + DEEPSEEK_SHARED),
    "exaone_moe": standard("ExaoneMoeSparseMoEBlock", deepseek_v3, extra=E_SCORE_BIAS + DEEPSEEK_SHARED),
    "mimo_v2_flash": standard("MiMoV2FlashMoE", deepseek_v3, extra=E_SCORE_BIAS),
    "mellum": standard("MellumSparseMoeBlock", softmax_topk("norm_topk_prob")),
    "granitemoe_swa": standard("GraniteMoeSWAMoE", topk_softmax, gate="router", router_key="router.weight"),
    "granitemoehybrid": standard("GraniteMoeHybridMoE", topk_softmax, gate="router", router_key="router.weight"),
    "qwen3_5_moe_text": QWEN3_5_MOE,
    "minimax_m2": standard("MiniMaxM2SparseMoeBlock", sigmoid_topk(None, None), jitter="router_jitter_noise",
                           extra=(("e_score_correction_bias", "router.bias", "same"),)),
    "hy_v3": standard("HYV3MoE", sigmoid_topk(None, "router_scaling_factor"),
                      extra=(("e_score_correction_bias", "router.bias", "same"),) + DEEPSEEK_SHARED),
    "flint": standard("FlintSparseMoeBlock", sigmoid_topk("norm_topk_prob", None), extra=shared_keys("shared_expert")),
    "laguna": standard("LagunaSparseMoeBlock", laguna, extra=E_SCORE_BIAS + DEEPSEEK_SHARED),
    "cohere2_moe": standard("Cohere2MoeSparseMoeBlock", cohere2_moe, extra=DEEPSEEK_SHARED),
    "jamba": standard("JambaSparseMoeBlock", softmax_topk(None, default=False), gate="router",
                      router_key="router.weight"),
    "afmoe": standard("AfmoeSparseMoeBlock", sigmoid_topk(None, "route_scale"), gate="router",
                      router_key="router.gate.weight",
                      extra=(("expert_bias", "router.bias", "same"),) + DEEPSEEK_SHARED),
    "ernie4_5_moe": standard("Ernie4_5_MoeSparseMoeBlock", ernie, extra=(
        ("gate.moe_statics.e_score_correction_bias", "router.bias", "flat"),) + shared_keys("shared_experts")),
    "phimoe": standard("PhimoeSparseMoeBlock", phimoe, gate="router", router_key="router.weight",
                       jitter="input_jitter_noise", jitter_draws=2),
    "jetmoe": PatchEntry(block="JetMoeMoE", router="router", keys=(
        ("router.layer.weight", "router.gate.weight", "same"),
        ("input_linear.weight", "experts.w_gate_EFD", "first_half"),
        ("input_linear.weight", "experts.w_up_EFD", "second_half"),
        ("output_linear.weight", "experts.w_down_EDF", "same")),
        gating=topk_softmax, activation=hidden_act("activation_function"), output_bias="bias"),
    "dbrx": PatchEntry(block="DbrxFFN", router="router", keys=(
        ("router.layer.weight", "router.gate.weight", "same"),
        ("experts.mlp.w1", "experts.w_gate_EFD", "rows_EFD"),
        ("experts.mlp.v1", "experts.w_up_EFD", "rows_EFD"),
        ("experts.mlp.w2", "experts.w_down_EDF", "rows_EFD_T")),
        gating=dbrx, activation=lambda cfg: hidden_act("ffn_act_fn")(cfg.ffn_config),
        jitter="ffn_config.moe_jitter_eps"),
    # token-choice families examined for issue #18 (text models; multimodal ones patch their language model)
    "kimi_linear": standard("KimiLinearMoE", deepseek_v3, extra=E_SCORE_BIAS + DEEPSEEK_SHARED),
    "bailing_hybrid": standard("BailingHybridMoE", deepseek_v3, extra=E_SCORE_BIAS + DEEPSEEK_SHARED),
    "axk2": standard("AXK2MoE", axk2, extra=E_SCORE_BIAS + DEEPSEEK_SHARED),
    "lfm2_moe": standard("Lfm2MoeSparseMoeBlock", sigmoid_topk("norm_topk_prob"), activation=lambda cfg: "swiglu",
                         extra=(("expert_bias", "router.bias", "same"),)),
    "lara_mini": standard("LaraMiniSparseMoeBlock", softmax_topk("norm_topk_prob"), extra=shared_keys("shared_expert")),
    "qwen4_exp_text": QWEN4_EXP,
    "qwen4_exp": QWEN4_EXP,
    "dots3_note_text": DOTS3_NOTE,
    "dots3_note": DOTS3_NOTE,
    "minimax_m3_vl_text": MINIMAX_M3,
    "minimax_m3_vl": MINIMAX_M3,
    # the image-text model the hub's Qwen3.5-MoE configs name (its language model's blocks are qwen3_5_moe_text's)
    "qwen3_5_moe": QWEN3_5_MOE,
    "glm5_next": standard("Glm5NextTextMoE", deepseek_v3, activation=swiglu_limit, extra=E_SCORE_BIAS + DEEPSEEK_SHARED),
    "kolibri1": standard("Kolibri1SparseMoeBlock", kolibri1, extra=E_SCORE_BIAS + shared_keys("shared_experts")),
    "beam": standard("BeamMoE", deepseek_v3, extra=E_SCORE_BIAS),  # scales after summing the experts: same weights  # the multimodal model's language model (its vision MoE blocks stay transformers')
    "qwen3_vl_moe": standard("Qwen3VLMoeTextSparseMoeBlock", softmax_topk(None)),
    "qwen3_omni_moe_thinker": standard("Qwen3OmniMoeThinkerTextSparseMoeBlock", softmax_topk("norm_topk_prob")),
    "glm4v_moe": standard("Glm4vMoeTextMoE", deepseek_v3, extra=E_SCORE_BIAS + DEEPSEEK_SHARED),
    "deepseek_ocr2": standard("DeepseekOcr2TextMoe", deepseek_v2, extra=DEEPSEEK_SHARED),
    "unlimited_ocr": standard("UnlimitedOcrTextMoe", deepseek_v2, extra=DEEPSEEK_SHARED),
    "aria": ARIA,
    "aria_text": ARIA,
    "mistral4": standard("Mistral4MoE", mistral4("norm_topk_prob"), extra=DEEPSEEK_SHARED),
    "mistral_large4": standard("MistralLarge4TextMoE", mistral4(None), extra=DEEPSEEK_SHARED),
    # gpt-oss's experts with concatenated (not interleaved) gate/up columns; weights softmax(top-k logits) / k, the
    # block output times k: softmax top-k renormalised
    "openai_privacy_filter": PatchEntry(block="OpenAIPrivacyFilterMLP", router="router", keys=(
        ("router.weight", "router.gate.weight", "same"), ("router.bias", "router.gate.bias", "same"),
        ("experts.gate_up_proj", "experts.w_gate_EFD", "T_first_half"),
        ("experts.gate_up_proj", "experts.w_up_EFD", "T_second_half"),
        ("experts.gate_up_proj_bias", "experts.b_gate_EF", "cols_first_half"),
        ("experts.gate_up_proj_bias", "experts.b_up_EF", "cols_second_half"),
        ("experts.down_proj", "experts.w_down_EDF", "T"), ("experts.down_proj_bias", "experts.b_down_ED", "same")),
        gating=topk_softmax, activation=clamped_swiglu, pair_output=True),
    # plain experts [E, F, D] (no gate rows); a moe_latent_size block's latent projections have no place: refused
    "nemotron_h": PatchEntry(block="NemotronHMoE", router="gate", keys=(
        ("gate.weight", "router.gate.weight", "same"), ("gate.e_score_correction_bias", "router.bias", "same"),
        ("experts.up_proj", "experts.w_up_EFD", "same"), ("experts.down_proj", "experts.w_down_EDF", "same"),
        ("shared_experts.up_proj.weight", "shared.w_up.weight", "same"),
        ("shared_experts.down_proj.weight", "shared.w_down.weight", "same")),
        gating=deepseek_v3, activation=nemotron_act),
    "gpt_oss": PatchEntry(block="GptOssMLP", router="router", keys=(
        ("router.weight", "router.gate.weight", "same"),
        ("router.bias", "router.gate.bias", "same"),
        ("experts.gate_up_proj", "experts.w_gate_EFD", "even_T"),
        ("experts.gate_up_proj", "experts.w_up_EFD", "odd_T"),
        ("experts.gate_up_proj_bias", "experts.b_gate_EF", "even"),
        ("experts.gate_up_proj_bias", "experts.b_up_EF", "odd"),
        ("experts.down_proj", "experts.w_down_EDF", "T"),
        ("experts.down_proj_bias", "experts.b_down_ED", "same")),
        gating=topk_softmax, activation=clamped_swiglu, pair_output=True),
    "llama4_text": LLAMA4,
    "llama4": LLAMA4,  # the multimodal model's language model
}

# families whose MoE block moekit's MoELayer does not compute, by model_type, with the reason patch gives
# (none at present: gpt_oss, llama4 and phimoe moved to PATCH_FAMILIES)
NOT_PATCHABLE: dict[str, str] = {}
