"""Every config field is type- and range-checked and the error names the field.

The allowed values below are written from the fields' documentation, independently of the
``spec(...)`` declarations in config.py; a coverage test makes sure no field is left out.
"""
import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.config import (CapacityConfig, ConfigError, LossConfig, MLAConfig, ModelConfig, MoEConfig, RouterConfig,
                           TrainConfig)
from moekit.train.finetune import FinetuneRecipe

INF = math.inf
# field -> (kind, lower, upper, lower_open, upper_open) for numbers; ("bool",), ("choice",), ("config",) else
R = dict
ALLOWED = {
    RouterConfig: R(kind=("choice",), top_k=("int", 1, INF), renormalize=("bool",), gate_bias=("bool",),
                    jitter_eps=("float", 0, 1, 0, 1),
                    noise_std=("float", 0, INF), top_p=("float", 0, 1, 1, 0), sparsemixer_eps=("float", 0, INF),
                    sinkhorn_iters=("int", 1, INF),
                    score_func=("choice",), n_groups=("int", 1, INF), topk_groups=("int", 1, INF), group_score=("choice",),
                    group_mask_fill=("choice",), select_on=("choice",),
                    routed_scaling_factor=("float", 0, INF, 1), bias_update_rate=("float", 0, INF),
                    num_tasks=("int", 1, INF), slots_per_expert=("int", 1, INF)),
    CapacityConfig: R(capacity_factor=("float?", 0, INF, 1), eval_capacity_factor=("float?", 0, INF, 1),
                      drop_policy=("choice",), overflow=("choice",), min_capacity=("int", 0, INF)),
    LossConfig: R(aux_coef=("float", 0, INF), seq_aux_coef=("float", 0, INF), importance_coef=("float", 0, INF),
                  load_coef=("float", 0, INF), z_coef=("float", 0, INF)),
    MoEConfig: R(d_model=("int", 1, INF), num_experts=("int", 1, INF), expert_hidden=("int", 1, INF),
                 expert_hidden_sizes=("ints?",), activation=("choice",), bias=("bool",),
                 num_shared_experts=("int", 0, INF), shared_hidden=("int", 0, INF), shared_gate=("bool",),
                 expert_dropout=("float", 0, 1, 0, 1), dispatcher=("choice",), experts=("choice",),
                 allow_noncausal=("bool",), hierarchical_groups=("int", 0, INF), top_router=("config?",),
                 gate_input=("bool",), router=("config",), capacity=("config",), loss=("config",)),
    MLAConfig: R(q_lora_rank=("int", 0, INF), kv_lora_rank=("int", 1, INF), qk_nope_head_dim=("int", 1, INF),
                 qk_rope_head_dim=("int", 1, INF), v_head_dim=("int", 1, INF), rope_interleave=("bool",)),
    ModelConfig: R(vocab_size=("int", 1, INF), d_model=("int", 1, INF), n_layers=("int", 1, INF),
                   n_heads=("int", 1, INF), n_kv_heads=("int", 0, INF), head_dim=("int", 0, INF),
                   max_seq_len=("int", 1, INF), rope_theta=("float", 0, INF, 1), rope_scaling=("dict",),
                   norm_eps=("float", 0, INF, 1), dense_hidden=("int", 0, INF), moe=("config?",),
                   moe_layers=("choice",), first_k_dense=("int", 0, INF), dense_layers=("ints",),
                   attention=("choice",), mla=("config?",), attention_bias=("bool",), attention_out_bias=("bool",),
                   attn_windows=("ints",), qk_norm=("choice",), attn_sinks=("bool",),
                   nope_layers=("ints",), attn_chunks=("ints",), nope_temp_scale=("float", 0, INF),
                   nope_temp_floor=("int", 1, INF), tie_embeddings=("bool",), dropout=("float", 0, 1, 0, 1),
                   init_std=("float", 0, INF, 1), extra=("dict",)),
    TrainConfig: R(steps=("int", 1, INF), batch_size=("int", 1, INF), seq_len=("int", 1, INF),
                   grad_accum=("int", 1, INF), lr=("float", 0, INF, 1), min_lr_ratio=("float", 0, 1),
                   warmup_steps=("int", 0, INF), weight_decay=("float", 0, INF), beta1=("float", 0, 1, 0, 1),
                   beta2=("float", 0, 1, 0, 1), grad_clip=("float", 0, INF), bf16=("bool",),
                   eval_every=("int", 0, INF), eval_batches=("int", 1, INF), save_every=("int", 0, INF),
                   log_every=("int", 1, INF), seed=("int", 0, INF)),
    FinetuneRecipe: R(freeze=("choice",), lr=("float", 0, INF, 1), batch_size=("int", 1, INF),
                      steps=("int", 1, INF), weight_decay=("float", 0, INF), warmup_steps=("int", 0, INF),
                      dropout=("float?", 0, 1, 0, 1), expert_dropout=("float?", 0, 1, 0, 1),
                      aux_coef=("float?", 0, INF), capacity_factor=("float?", 0, INF, 1)),
}
REQUIRED = {MoEConfig: {"d_model": 8, "expert_hidden": 8}, ModelConfig: {"vocab_size": 10}}
FIELDS = [(cls, name) for cls, fields in ALLOWED.items() for name in fields]


def test_every_config_field_has_an_allowed_entry():
    for cls, fields in ALLOWED.items():
        assert [f.name for f in dataclasses.fields(cls)] == list(fields), cls.__name__


def not_a_number():
    return st.sampled_from(["a", "1", True, False, [1], {"x": 1}])


def bad_values(kind: tuple):
    """Values that must be refused for a field of this kind."""
    k, opt = kind[0].rstrip("?"), kind[0].endswith("?")
    none = st.nothing() if opt else st.just(None)
    if k == "bool":
        return st.one_of(st.sampled_from([0, 1, "no", "yes", "true", 1.0]), none)
    if k == "choice":
        return st.one_of(st.text(min_size=1).map(lambda s: "zz-" + s), st.integers(), none)
    if k in ("config", "dict"):
        return st.one_of(st.integers(), st.text(), st.lists(st.integers(), max_size=2), none)
    if k == "ints":
        return st.one_of(st.just("a"), st.lists(st.sampled_from(["a", 1.5, None, True]), min_size=1, max_size=3))
    lo, hi = kind[1], kind[2]
    lo_open, hi_open = (list(kind[3:]) + [0, 0])[:2]
    below = st.floats(max_value=lo, allow_nan=False, allow_infinity=False, exclude_max=not lo_open)
    above = (st.nothing() if hi == INF else
             st.floats(min_value=hi, allow_nan=False, allow_infinity=False, exclude_min=not hi_open))
    if k == "int":
        out_of_range = st.one_of(st.integers(max_value=lo - 1),
                                 st.nothing() if hi == INF else st.integers(min_value=hi + 1))
        return st.one_of(out_of_range, st.floats(allow_nan=True), not_a_number(), none)
    return st.one_of(below, above, st.sampled_from([math.nan, INF, -INF]), not_a_number(), none)


@st.composite
def bad_field(draw):
    cls, name = draw(st.sampled_from(FIELDS))
    return cls, name, draw(bad_values(ALLOWED[cls][name]))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(bad_field())
def test_bad_value_is_refused_naming_the_field(case):
    cls, name, value = case
    kwargs = dict(REQUIRED.get(cls, {}), **{name: value})
    with pytest.raises(ConfigError) as err:
        cls(**kwargs)
    assert str(err.value).startswith(f"{cls.__name__}.{name}"), str(err.value)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.sampled_from(["noise_std", "top_p", "jitter_eps"]), bad_values(("float", 0, INF)))
def test_nested_dicts_are_validated_too(name, value):
    if name == "top_p" and isinstance(value, float) and 0 < value <= 1:
        return
    if name == "jitter_eps" and isinstance(value, float) and 0 <= value < 1:
        return
    with pytest.raises(ConfigError, match=f"^RouterConfig.{name}"):
        ModelConfig.from_dict({"vocab_size": 10, "d_model": 8,
                               "moe": {"d_model": 8, "expert_hidden": 8, "router": {name: value}}})


@pytest.mark.parametrize("make, message", [
    (lambda: CapacityConfig(capacity_factor=math.inf), "CapacityConfig.capacity_factor=inf: must be a finite number"),
    (lambda: RouterConfig(noise_std="a"), "RouterConfig.noise_std='a': must be a finite number"),
    (lambda: RouterConfig(renormalize="no"), "RouterConfig.renormalize='no': must be true or false"),
    (lambda: RouterConfig(renormalize=1), "RouterConfig.renormalize=1: must be true or false"),
    (lambda: TrainConfig(lr=math.nan), "TrainConfig.lr=nan: must be a finite number"),
    (lambda: ModelConfig.from_dict({"vocab_size": 10, "n_layrs": 2}), "unknown field 'n_layrs' (did you mean 'n_layers'"),
    (lambda: ModelConfig.from_dict({"d_model": 8}), "ModelConfig.vocab_size: missing"),
    (lambda: ModelConfig.from_dict([1, 2]), "ModelConfig: expected a JSON object"),
])
def test_issue_examples(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert message in str(err.value)


def test_json_forms_are_normalised():
    """A config read back from JSON (lists, dicts) equals the original."""
    cfg = ModelConfig(vocab_size=10, d_model=8, moe=MoEConfig(d_model=8, num_experts=2, expert_hidden_sizes=(4, 6)))
    again = ModelConfig.from_dict(cfg.to_dict() | {"moe": dict(cfg.moe.to_dict(), expert_hidden_sizes=[4, 6])})
    assert again == cfg and isinstance(again.moe.expert_hidden_sizes, tuple)
    assert isinstance(again.moe.router, RouterConfig)


def test_changed_fields_ignore_fields_added_at_their_default_and_determine_the_config():
    """A field added later with a default keeps the identity of every config that leaves it at the default;
    any changed value, nested ones included, changes it, and the dict rebuilds the config."""
    import dataclasses

    from moekit.config import LossConfig, ModelConfig, MoEConfig, RouterConfig, changed_fields

    @dataclasses.dataclass
    class Old:
        a: int
        b: tuple[int, ...] = (1, 2)

    @dataclasses.dataclass
    class New:
        a: int
        b: tuple[int, ...] = (1, 2)
        c: float = float("-inf")

    assert changed_fields(Old(3)) == changed_fields(New(3)) == {"a": 3}
    assert changed_fields(New(3, c=0.0)) == {"a": 3, "c": 0.0}
    assert changed_fields(Old(3, b=[1, 2])) == {"a": 3}  # a list equal to a tuple default is the default
    moe = MoEConfig(d_model=16, num_experts=4, expert_hidden=8, router=RouterConfig(top_k=1),
                    loss=LossConfig(aux_coef=0.0))
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, moe=moe)
    got = changed_fields(cfg)
    assert got["moe"]["router"] == {"top_k": 1} and got["moe"]["loss"] == {"aux_coef": 0.0}
    assert changed_fields(dataclasses.replace(cfg, moe=dataclasses.replace(moe, router=RouterConfig()))) != got
    assert ModelConfig.from_dict(got) == cfg
