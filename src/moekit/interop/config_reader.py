"""The one reader of Hugging Face ``config.json`` files, shared by ``calc`` and interop.

A config.json leaves out every field equal to its default, so whoever reads it must know transformers'
defaults; a reader with its own guesses computes another model silently (Mixtral's rope_theta is 1e6,
not 1e4). ``read_hf_config`` returns the config with every field filled:

- with transformers installed, through the family's own config class (``AutoConfig.for_model``), so
  defaults, renamed fields (``attribute_map``) and legacy RoPE fields are transformers' own;
- without it, from ``hf_defaults.json``: the same defaults, generated from those classes by
  ``defaults_from_transformers`` and compared with them field by field by the tests.

A ``model_type`` transformers does not ship (remote code) is read through its ``architectures`` entry
(Kimi-K2: ``kimi_k2`` with ``DeepseekV3ForCausalLM`` is read as ``deepseek_v3``) or through a declared
analytic family (DeepSeekMoE v1, ``deepseek``, whose defaults are those of its published configuration
code). The result is a plain dict: ``model_type`` is the family it was read as, ``source_model_type``
what the file said.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from functools import cache
from pathlib import Path

from moekit.errors import ConfigError

DEFAULTS_FILE = Path(__file__).resolve().parent / "hf_defaults.json"

# Families whose defaults hf_defaults.json holds (with their sub-configs): every family calc or convert reads
TABLE_FAMILIES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "flex_olmo", "deepseek_v2", "deepseek_v3",
    "gpt_oss", "llama4", "llama4_text", "phimoe", "granitemoe", "granitemoeshared", "jetmoe", "ernie4_5_moe",
    "glm4_moe", "dots1", "hunyuan_v1_moe", "minimax", "dbrx", "switch_transformers", "llama", "qwen2", "qwen3",
    "deepseek_v32", "glm_moe_dsa", "glm4_moe_lite", "solar_open", "minimax_m2", "exaone_moe", "flint", "mellum",
    "granitemoe_swa", "hy_v3", "afmoe", "qwen3_5_moe_text", "granitemoehybrid", "cohere2_moe", "laguna", "jamba",
    "mimo_v2_flash", "lara_mini", "lfm2_moe", "kimi_linear", "bailing_hybrid", "aria_text", "mistral4",
    "nemotron_h", "kolibri1", "qwen3_5_moe", "qwen3_vl_moe", "glm4v_moe", "aria",
    "beam", "glm5_next", "minimax_m3_vl_text", "minimax_m3_vl", "qwen3_omni_moe_thinker",
    "qwen4_exp_text", "qwen4_exp", "openai_privacy_filter", "deepseek_ocr2", "unlimited_ocr",
    "axk2", "dots3_note_text", "mistral_large4", "dots3_note",
)

# Remote-code families counted analytically. DeepSeekMoE v1 (Dai et al. 2024; deepseek-ai/deepseek-moe-16b):
# the defaults of its configuration_deepseek.py. Its layers are DeepSeek-V2's without MLA: GQA attention,
# fine-grained routed experts, shared experts as one MLP of n_shared_experts * moe_intermediate_size.
ANALYTIC_DEFAULTS: dict[str, dict] = {
    "deepseek": dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
                     num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32, n_shared_experts=None,
                     n_routed_experts=None, num_experts_per_tok=None, moe_layer_freq=1, first_k_dense_replace=0,
                     norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True,
                     hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                     rope_theta=10000.0, rope_scaling=None, attention_bias=False, attention_dropout=0.0),
}


def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def read_hf_config(raw: dict, *, use_transformers: bool | None = None) -> dict:
    """config.json dict -> the full config (every default filled) of the family it is read as.

    ``use_transformers``: None = whenever it is installed; False = the defaults table (what a machine
    without transformers does; the tests compare both)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(raw).__name__}")
    tf = _transformers() if use_transformers is not False else None
    if use_transformers and tf is None:
        raise ConfigError("use_transformers=True but transformers is not installed")
    mt = canonical_model_type(raw, tf)
    body = {k: v for k, v in raw.items() if k != "model_type"}
    if mt in ANALYTIC_DEFAULTS:
        full = _fill_analytic(mt, body)
    elif tf is not None:
        full = _through_transformers(tf, mt, body)
    else:
        full = _through_table(mt, body)
    full["model_type"] = mt
    full["source_model_type"] = raw.get("model_type")
    return full


def _both_names(full: dict, aliases: dict[str, str]) -> dict:
    """Every renamed field under both its names (transformers' to_dict keeps one, not always the same)."""
    for alias, target in aliases.items():
        if alias in full or target in full:
            full[alias] = full[target] = full.get(target, full.get(alias))
    return full


def canonical_model_type(raw: dict, tf=None) -> str:
    """The family a config is read as: its model_type when known, else the family of its architecture."""
    mt = raw.get("model_type")
    known = set(ANALYTIC_DEFAULTS) | set(table())
    if tf is not None:
        known |= set(tf.CONFIG_MAPPING.keys())
    if mt in known:
        return mt
    archs = raw.get("architectures") or []
    by_arch = architecture_families(tf)
    for arch in archs:
        if arch in by_arch:
            return by_arch[arch]
    raise ConfigError(f"config.json model_type={mt!r} (architectures={archs}): neither transformers nor moekit "
                      f"knows this family or its architecture")


def architecture_families(tf=None) -> dict[str, str]:
    """Causal-LM class name -> model_type (transformers' auto mapping, or the table's)."""
    by_arch = {e["architecture"]: mt for mt, e in table().items() if e.get("architecture")}
    if tf is not None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        # several model_types may share a class (sarvam_mla -> DeepseekV3ForCausalLM): keep the first owner
        for mt, arch in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
            by_arch.setdefault(arch, mt)
    return by_arch


def _through_transformers(tf, mt: str, body: dict) -> dict:
    from huggingface_hub.errors import StrictDataclassError  # transformers' config classes validate with it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            conf = tf.AutoConfig.for_model(mt, **body)
        except (TypeError, ValueError, StrictDataclassError) as e:
            why = " ".join(line.strip() for line in str(e).splitlines()[:2])
            raise ConfigError(f"config.json (model_type={mt!r}) is rejected by transformers' "
                              f"{tf.CONFIG_MAPPING[mt].__name__}: {why}") from None
    full = _both_names(conf.to_dict(), type(conf).attribute_map)
    for key in getattr(type(conf), "sub_configs", None) or {}:  # (Qwen3-VL's text config renames num_experts)
        sub = getattr(conf, key, None)
        if sub is not None and isinstance(full.get(key), dict):
            full[key] = _both_names(full[key], type(sub).attribute_map)
    return full


@cache
def table() -> dict[str, dict]:
    return json.loads(DEFAULTS_FILE.read_text())


def _through_table(mt: str, body: dict) -> dict:
    entry = table().get(mt)
    if entry is None:
        raise ConfigError(f"config.json model_type={mt!r}: moekit reads this family only with transformers "
                          f"installed (pip install transformers); without it: {sorted(table())}")
    aliases = entry["aliases"]
    full = dict(entry["fields"])
    for k, v in body.items():
        full[aliases.get(k, k)] = v
    for key, sub_mt in entry["sub_configs"].items():
        sub = full.get(key)
        sub_defaults = entry.get("sub_config_defaults", {}).get(key, {})
        full[key] = _through_table(sub_mt, {**sub_defaults, **(sub or {})}) if isinstance(sub, dict) or sub is None \
            else sub
    if entry.get("default_rope") and not (body.get("rope_parameters") or body.get("rope_scaling")):
        full["rope_parameters"] = dict(entry["default_rope"])  # gpt-oss: yarn unless the file says otherwise
    if "rope_parameters" in full:
        full["rope_parameters"] = standard_rope(full, entry["default_theta"])
    return _both_names(full, aliases)


def _fill_analytic(mt: str, body: dict) -> dict:
    full = {**ANALYTIC_DEFAULTS[mt], **body}
    full["rope_parameters"] = standard_rope(full, 10000.0)
    return full


def standard_rope(cfg: dict, default_theta: float | None) -> dict:
    """transformers 5's one RoPE dict from its new (``rope_parameters``) or legacy (``rope_scaling`` +
    ``rope_theta``) fields: ``rope_type`` and ``rope_theta`` always present."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rp.setdefault("rope_theta", cfg.get("rope_theta") or default_theta or 10000.0)
    rp["rope_type"] = rp.get("rope_type", rp.get("type", "default"))
    return rp


def rope_parameters(full: dict) -> dict:
    return full.get("rope_parameters") or standard_rope(full, None)


def defaults_from_transformers(mt: str) -> dict[str, dict]:
    """What hf_defaults.json holds for one family and its sub-configs (Llama 4's text and vision configs),
    read off transformers' config classes: every field's default, renamed fields, RoPE base default,
    sub-config families and the causal-LM class name."""
    tf = _transformers()
    return _class_defaults(tf.CONFIG_MAPPING[mt])


def _class_defaults(cls, key: str = "") -> dict[str, dict]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    fields = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            fields[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            fields[f.name] = f.default_factory()
    fields.pop("transformers_version", None)
    # DBRX's sub-config classes have no model_type of their own: they are keyed by their parent's field
    subs = {k: (v, v.model_type or f"{cls.model_type}.{k}")
            for k, v in ((k, _sub_config_class(cls, k, v)) for k, v in (getattr(cls, "sub_configs", None) or {}).items())}
    # a parent may build a sub-config with other defaults than its class (Mistral Large 4's Pixtral tower)
    sub_defaults = {k: dict(spec.init_kwargs) for k, spec in (getattr(cls, "sub_configs_defaults", None) or {}).items()
                    if k in subs and getattr(spec, "init_kwargs", None)}
    out = {key or cls.model_type: dict(fields=json.loads(json.dumps(fields)), aliases=dict(cls.attribute_map),
                                default_theta=getattr(cls, "default_theta", None), default_rope=_default_rope(cls),
                                sub_configs={k: name for k, (_, name) in subs.items()},
                                architecture=MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cls.model_type))}
    if sub_defaults:
        out[key or cls.model_type]["sub_config_defaults"] = json.loads(json.dumps(sub_defaults))
    for sub, name in subs.values():
        out.update(_class_defaults(sub, name))
    return out


def _sub_config_class(cls, key: str, sub):
    """A sub-config's class; an AutoConfig slot (Aria's vision tower) is the class its parent builds by default."""
    if sub.__name__ != "AutoConfig":
        return sub
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(getattr(cls(), key))


def _default_rope(cls) -> dict | None:
    """The RoPE a config of ``cls`` gets when the file has none, if not plain RoPE (gpt-oss's __post_init__
    fills yarn); None otherwise."""
    if "rope_parameters" not in {f.name for f in dataclasses.fields(cls)}:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rp = cls().rope_parameters
    return dict(rp) if rp and rp.get("rope_type", "default") != "default" else None


def write_defaults_table(path: Path = DEFAULTS_FILE) -> None:
    """Regenerate hf_defaults.json from the installed transformers (run after upgrading it)."""
    out: dict[str, dict] = {}
    for mt in TABLE_FAMILIES:
        out.update(defaults_from_transformers(mt))
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
