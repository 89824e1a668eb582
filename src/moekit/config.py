"""Configuration: one kw_only dataclass per concern, validated in ``__post_init__``.

Validation errors are ``ConfigError`` (a ``ValueError``) and name the field, the value given and
what is allowed, e.g. ``RouterConfig.top_k=9: must be an integer in [1, num_experts=8]``.

One generic mechanism checks every field: ``validate(self)`` (first line of each ``__post_init__``)
checks the value against the field's annotation (a bool must be a bool, an int an int, a float a
finite number, nested configs may be given as dicts, JSON lists become tuples) and against the range
or choices declared next to the field with ``spec(...)``. ``__post_init__`` then only adds the checks
that involve several fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from moekit.errors import ConfigError  # re-exported: config.ConfigError stays valid


def check(ok: bool, owner: str, name: str, value: Any, allowed: str) -> None:
    """Raise ConfigError naming ``owner.name``, the bad value and what is allowed."""
    if not ok:
        raise ConfigError(f"{owner}.{name}={value!r}: {allowed}")


def check_choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    check(value in choices, owner, name, value, f"must be one of {list(choices)}")


@dataclass(frozen=True)
class Allowed:
    """What a field accepts beyond its type: a range (bounds open or closed) or a set of choices."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    note: str = ""  # appended to the message, e.g. "or None for dropless"

    def ok(self, v: Any) -> bool:
        if self.choices is not None:
            return v in self.choices
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def describe(self, integer: bool) -> str:
        if self.choices is not None:
            text = f"must be one of {list(self.choices)}"
        else:
            what = "an integer" if integer else "a number"
            lo = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
            hi = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
            if lo and hi:
                text = f"must be {what} in {lo}, {hi}"
            elif lo:
                text = f"must be {what} {'>=' if lo[0] == '[' else '>'} {lo[1:]}"
            else:
                text = f"must be {what} {'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"
        return f"{text}, {self.note}" if self.note else text


def spec(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **allowed) -> Any:
    """A dataclass field whose value must also satisfy ``Allowed(**allowed)`` (checked by ``validate``)."""
    return field(default=default, default_factory=factory, metadata={"allowed": Allowed(**allowed)})


_TYPE_OK = {bool: lambda v: type(v) is bool,  # True == 1, but "renormalize": 1 or "no" is a mistake
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
_TYPE_TEXT = {bool: "true or false (a bool)", int: "an integer", float: "a finite number", str: "a string",
              dict: "a dict (JSON object)"}


def _conform(owner: str, name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against annotation ``tp``; returned converted (dict -> config, list -> tuple)."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        tp, args = inner, typing.get_args(inner)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value)
        check(isinstance(value, tp), owner, name, value, f"must be a {tp.__name__} or a dict of its fields")
        return value
    if typing.get_origin(tp) is tuple:
        check(isinstance(value, (list, tuple)), owner, name, value, "must be a list")
        return tuple(_conform(owner, f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
    ok = _TYPE_OK.get(tp, lambda v: isinstance(v, tp))(value)
    check(ok, owner, name, value, f"must be {_TYPE_TEXT.get(tp, tp.__name__)}")
    return value


@functools.cache
def _field_types(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


def validate(obj: Any) -> None:
    """Check (and normalise in place) every field of config dataclass ``obj``: its annotated type first,
    then the ``Allowed`` range or choices given by ``spec``."""
    owner = type(obj).__name__
    for f, tp in _field_types(type(obj)):
        value = _conform(owner, f.name, getattr(obj, f.name), tp)
        setattr(obj, f.name, value)
        allowed = f.metadata.get("allowed")
        if allowed is not None and value is not None:
            check(allowed.ok(value), owner, f.name, value, allowed.describe(integer=int in (tp, *typing.get_args(tp))))


def from_dict(cls: type, d: Any) -> Any:
    """``cls(**d)`` with unknown and missing fields reported by name (e.g. a typo in a JSON config)."""
    name = cls.__name__
    if not isinstance(d, dict):
        raise ConfigError(f"{name}: expected a JSON object (dict) of its fields, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in d:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(fields)}"
            raise ConfigError(f"{name}: unknown field {key!r} ({hint})")
    for f in fields.values():
        if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{name}.{f.name}: missing (a required field)")
    return cls(**d)


def _plain(v: Any) -> Any:
    """A config value as JSON sees it (dataclasses as dicts, tuples as lists)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def changed_fields(obj: Any) -> dict:
    """The fields of config dataclass ``obj`` that differ from their defaults (nested configs likewise, relative
    to their own class's defaults), as JSON values. It determines the config as fully as ``asdict`` but stays
    the same when a later version adds a field whose default keeps the old behaviour, so caches keyed by it (the
    experiments' runs) survive such additions; ``asdict`` keys did not (four router fields added by the interop
    work orphaned every committed run)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            out[f.name] = _plain(v)  # required: always part of the identity
            continue
        if _plain(v) == _plain(default):
            continue
        out[f.name] = changed_fields(v) if dataclasses.is_dataclass(v) else _plain(v)
    return out


# a router kind that is its own layer, not a registered Router: Soft MoE (Puigcerver et al. 2023) mixes
# tokens into slots densely (layers/soft_moe.py)
SOFT_KIND = "soft"
# MoEConfig.dispatcher used to name the experts kernel too; configs written that way still load
LEGACY_DISPATCHERS = {"auto": ("local", "auto"), "blockwise": ("local", "blockwise"),
                      "grouped": ("local", "grouped_mm"), "loop": ("local", "loop")}


def registries() -> tuple[dict, dict, dict]:
    """The router, dispatcher and experts-backend registries (layers/), which validation reads; imported
    on first use because they import torch."""
    from moekit.layers.dispatch import DISPATCHERS
    from moekit.layers.experts import EXPERTS_BACKENDS
    from moekit.layers.routing import ROUTERS

    return ROUTERS, DISPATCHERS, EXPERTS_BACKENDS


@dataclass(kw_only=True)
class RouterConfig:
    """How tokens are assigned to experts: ``kind`` names a registered router (layers/routing.py) or "soft"."""

    kind: str = "softmax_topk"
    top_k: int = spec(2, ge=1)
    renormalize: bool = True  # renormalise the kept top-k weights to sum to 1 (Mixtral does)
    gate_bias: bool = False  # a learned bias on the router logits (gpt-oss)
    jitter_eps: float = spec(0.0, ge=0, lt=1)  # Switch: multiply router input by U(1-eps, 1+eps) in training
    noise_std: float = spec(1.0, ge=0)  # noisy_topk: scale of the N(0,1) * softplus(x W_noise) noise
    # top_p
    top_p: float = spec(0.5, gt=0, le=1)
    # sparsemixer: candidates lie within a relative logit gap 2*eps of the best (PhiMoE's router_jitter_noise)
    sparsemixer_eps: float = spec(0.01, ge=0)
    # expert_choice / sinkhorn
    sinkhorn_iters: int = spec(8, ge=1)
    # deepseek
    score_func: str = spec("softmax", choices=("softmax", "sigmoid"))  # DeepSeek-V3 uses sigmoid
    n_groups: int = spec(1, ge=1)  # group-limited routing: experts split into n_groups groups
    topk_groups: int = spec(1, ge=1)  # ... of which the best topk_groups are eligible per token
    # a group's score: the sum of its two best experts or its best one; auto = two (sigmoid, V3) / one (softmax, V2).
    # Mistral 4 scores softmax groups by their two best
    group_score: str = spec("auto", choices=("auto", "top2_sum", "max"))
    # what the experts of dropped groups score for selection: -inf (never chosen) or zero (A.X-K2: a kept expert
    # whose score + bias is negative loses to them)
    group_mask_fill: str = spec("-inf", choices=("-inf", "zero"))
    # what the selection bias is added to: the scores (DeepSeek-V3) or the raw logits (Kolibri-1, which still
    # weights by the sigmoid scores)
    select_on: str = spec("scores", choices=("scores", "logits"))
    routed_scaling_factor: float = spec(1.0, gt=0)
    bias_update_rate: float = spec(0.0, ge=0)  # aux-loss-free balancing step gamma (0 = no bias)
    # task routing
    num_tasks: int = spec(1, ge=1)
    # soft MoE
    slots_per_expert: int = spec(1, ge=1)

    def __post_init__(self) -> None:
        validate(self)
        check_choice("RouterConfig", "kind", self.kind, (*registries()[0], SOFT_KIND))
        check(self.topk_groups <= self.n_groups, "RouterConfig", "topk_groups", self.topk_groups,
              f"must be an integer in [1, n_groups={self.n_groups}]")


@dataclass(kw_only=True)
class CapacityConfig:
    """Expert capacity C = ceil(tokens / experts * factor * top_k); None = dropless.

    The factor multiplies the balanced per-expert share of the N = T*k assignments, as in
    Switch/GShard (capacity_factor=1.0 gives exactly the balanced share).
    """

    capacity_factor: float | None = spec(None, gt=0, note="or None for dropless")  # training
    eval_capacity_factor: float | None = spec(None, gt=0, note="or None for dropless")  # evaluation
    drop_policy: str = spec("position", choices=("position", "priority"))  # priority: higher gate wins
    overflow: str = spec("drop", choices=("drop", "reroute"))  # reroute: to the next-best expert with room
    min_capacity: int = spec(1, ge=0)

    def __post_init__(self) -> None:
        validate(self)


@dataclass(kw_only=True)
class LossConfig:
    """Coefficients of the router losses added to the task loss (0 = off)."""

    aux_coef: float = spec(0.01, ge=0)  # Switch/GShard load-balancing loss  N * sum_i f_i P_i
    seq_aux_coef: float = spec(0.0, ge=0)  # DeepSeek-V2/V3 sequence-level balance loss
    importance_coef: float = spec(0.0, ge=0)  # Shazeer 2017 importance loss (CV^2 of gate sums)
    load_coef: float = spec(0.0, ge=0)  # Shazeer 2017 load loss (CV^2 of smooth load estimate)
    z_coef: float = spec(0.0, ge=0)  # ST-MoE router z-loss

    def __post_init__(self) -> None:
        validate(self)


ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu", "clamped_swiglu", "relu2", "swiglu_limit10")  # clamped_swiglu: gpt-oss


@dataclass(kw_only=True)
class MoEConfig:
    """One MoE layer replacing an FFN of width d_model."""

    d_model: int = spec(ge=1)
    num_experts: int = spec(8, ge=1)
    expert_hidden: int = spec(0, ge=0)  # hidden size of each routed expert (ignored if expert_hidden_sizes is set)
    expert_hidden_sizes: tuple[int, ...] | None = None  # heterogeneous experts (overrides expert_hidden)
    activation: str = spec("swiglu", choices=ACTIVATIONS)
    bias: bool = False  # biases on every expert projection (routed and shared; gpt-oss)
    num_shared_experts: int = spec(0, ge=0)
    shared_hidden: int = spec(0, ge=0, note="0 = expert_hidden")  # hidden size of each shared expert
    shared_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared-expert output
    expert_dropout: float = spec(0.0, ge=0, lt=1)  # dropout inside experts (ST-MoE: higher than dense dropout)
    dispatcher: str = "local"  # how tokens move to the experts: a registered dispatcher (layers/dispatch.py)
    experts: str = "auto"  # which kernel computes them: a registered experts backend (layers/experts.py) or auto
    allow_noncausal: bool = False  # let a causal decoder use routers that look at later tokens
    hierarchical_groups: int = spec(0, ge=0)  # > 1: two-level MoE, a router over groups, each group an MoE layer
    # the router over the groups: any registered router; None = softmax top-min(top_k, groups)
    top_router: RouterConfig | None = None
    gate_input: bool = False  # Llama 4: the gate weight scales the expert's input, expert(w x), not w expert(x)
    router: RouterConfig = field(default_factory=RouterConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        validate(self)
        o = "MoEConfig"
        if self.expert_hidden_sizes is None:
            check(self.expert_hidden >= 1, o, "expert_hidden", self.expert_hidden,
                  "must be a positive integer (or give expert_hidden_sizes)")
        else:
            check(len(self.expert_hidden_sizes) == self.num_experts and min(self.expert_hidden_sizes) >= 1, o,
                  "expert_hidden_sizes", self.expert_hidden_sizes,
                  f"must hold num_experts={self.num_experts} positive integers")
        routers, dispatchers, backends = registries()
        if self.dispatcher in LEGACY_DISPATCHERS:
            check(self.experts == "auto", o, "experts", self.experts,
                  f"must be 'auto' with the old-style dispatcher={self.dispatcher!r} (which names the experts "
                  "backend); set dispatcher='local' and experts instead")
            self.dispatcher, self.experts = LEGACY_DISPATCHERS[self.dispatcher]
        check_choice(o, "dispatcher", self.dispatcher, tuple(dispatchers))
        check_choice(o, "experts", self.experts, ("auto", *backends))
        check(self.num_experts % self.router.n_groups == 0, "RouterConfig", "n_groups", self.router.n_groups,
              f"must divide num_experts={self.num_experts}")
        problem = routers[self.router.kind].config_problem(self) if self.router.kind in routers else None
        if problem is not None:
            check(False, "RouterConfig", *problem)
        g = self.hierarchical_groups
        check((g == 0 or (g >= 2 and self.num_experts % g == 0)), o, "hierarchical_groups", g,
              f"must be 0 (flat) or an integer >= 2 dividing num_experts={self.num_experts}")
        check(self.top_router is None or g > 1, o, "top_router", self.top_router,
              "must be None unless hierarchical_groups > 1")
        if g > 1:
            self.group_configs()  # validates the top router against the G groups and the inner layers

    def group_configs(self) -> tuple[MoEConfig, MoEConfig]:
        """A hierarchical layer's (top level: its router over G "experts" = groups, one group: an MoE layer
        over E/G experts with the configured router)."""
        G, per_group = self.hierarchical_groups, self.num_experts // self.hierarchical_groups
        top_router = self.top_router or RouterConfig(kind="softmax_topk", top_k=min(self.router.top_k, G))
        top = dataclasses.replace(self, num_experts=G, router=top_router, hierarchical_groups=0, top_router=None,
                                  num_shared_experts=0)
        inner_router = dataclasses.replace(self.router, top_k=min(self.router.top_k, per_group), n_groups=1,
                                           topk_groups=1)
        inner = dataclasses.replace(self, num_experts=per_group, hierarchical_groups=0, top_router=None,
                                    num_shared_experts=0, router=inner_router)
        return top, inner

    @property
    def shared_hidden_size(self) -> int:
        return self.shared_hidden or self.expert_hidden

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return self.expert_hidden_sizes or (self.expert_hidden,) * self.num_experts

    def fine_grained(self, m: int) -> MoEConfig:
        """Fine-grained expert segmentation (DeepSeekMoE, Dai et al. 2024, sec. 3.1): split every expert
        into m experts of hidden size expert_hidden/m and route each token to m*top_k of them. Total and
        active parameters and FLOPs stay the same; the number of possible expert combinations grows."""
        check(isinstance(m, int) and m >= 1 and self.expert_hidden % m == 0 and self.expert_hidden_sizes is None,
              "MoEConfig.fine_grained", "m", m, f"must be a positive integer dividing expert_hidden={self.expert_hidden}")
        router = dataclasses.replace(self.router, top_k=self.router.top_k * m,
                                     n_groups=self.router.n_groups, topk_groups=self.router.topk_groups)
        return dataclasses.replace(self, num_experts=self.num_experts * m, expert_hidden=self.expert_hidden // m,
                                   router=router)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MoEConfig:
        return from_dict(cls, d)


ATTENTION_KINDS = ("gqa", "mla")  # mla: DeepSeek-V2/V3 multi-head latent attention (models/mla.py)
QK_NORMS = ("none", "per_head", "full", "l2")


@dataclass(kw_only=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2, Liu et al. 2024): low-rank compressed queries and keys/values,
    a decoupled RoPE key shared by all heads."""

    q_lora_rank: int = spec(0, ge=0, note="0 = no query compression")  # DeepSeek-V2-Lite: 0
    kv_lora_rank: int = spec(512, ge=1)
    qk_nope_head_dim: int = spec(128, ge=1)
    qk_rope_head_dim: int = spec(64, ge=1)
    v_head_dim: int = spec(128, ge=1)
    rope_interleave: bool = True  # DeepSeek checkpoints store the RoPE dims as interleaved pairs

    def __post_init__(self) -> None:
        validate(self)


@dataclass(kw_only=True)
class ModelConfig:
    """A decoder-only Transformer LM; the FFN of the chosen layers is an MoE layer (``moe``)."""

    vocab_size: int = spec(ge=1)
    d_model: int = spec(128, ge=1)
    n_layers: int = spec(4, ge=1)
    n_heads: int = spec(4, ge=1)
    n_kv_heads: int = spec(0, ge=0, note="0 = n_heads")  # grouped-query attention; 0 = n_heads (multi-head)
    head_dim: int = spec(0, ge=0, note="0 = d_model // n_heads")
    max_seq_len: int = spec(256, ge=1)
    rope_theta: float = spec(10000.0, gt=0)
    # context-extension RoPE scaling as HF's rope_parameters ({} = none): rope_type linear | llama3 | yarn
    rope_scaling: dict = field(default_factory=dict)
    norm_eps: float = spec(1e-6, gt=0)
    dense_hidden: int = spec(0, ge=0, note="0 = 4 * d_model")  # FFN hidden size of dense layers
    moe: MoEConfig | None = None  # None = a dense model
    moe_layers: str = spec("all", choices=("all", "every_other"))  # every_other: Switch/GShard layers 1, 3, 5, ...
    first_k_dense: int = spec(0, ge=0)  # DeepSeek: the first k layers keep a dense FFN
    dense_layers: tuple[int, ...] = ()  # more layers that keep a dense FFN (Qwen mlp_only_layers / sparse step)
    attention: str = spec("gqa", choices=ATTENTION_KINDS)
    mla: MLAConfig | None = None  # required when attention == "mla"
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    attention_out_bias: bool = False  # bias on the output projection too (Llama / Qwen3-MoE attention_bias)
    attn_windows: tuple[int, ...] = ()  # per layer: sliding-window span (0 = full causal); () = all full
    qk_norm: str = spec("none", choices=QK_NORMS)  # "per_head" (Qwen3: over head_dim) | "full" (OLMoE)
    attn_sinks: bool = False  # gpt-oss: a learned per-head logit in every softmax that attends to nothing
    # qk_norm "l2" (Llama 4): per-head RMS normalisation without a weight, after RoPE, on RoPE layers only
    nope_layers: tuple[int, ...] = ()  # layers without RoPE (Llama 4: every fourth)
    attn_chunks: tuple[int, ...] = ()  # per layer: chunked attention, a query sees only its own chunk (0 = off)
    # Llama 4 temperature tuning on NoPE layers: queries times 1 + scale * ln(1 + floor((pos + 1) / floor))
    nope_temp_scale: float = spec(0.0, ge=0, note="0 = off")
    nope_temp_floor: int = spec(8192, ge=1)
    tie_embeddings: bool = False
    dropout: float = spec(0.0, ge=0, lt=1)
    init_std: float = spec(0.02, gt=0)
    extra: dict = field(default_factory=dict)  # family-specific options (e.g. MLA ranks), kept verbatim

    def __post_init__(self) -> None:
        validate(self)
        o = "ModelConfig"
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.d_model // self.n_heads
        self.dense_hidden = self.dense_hidden or 4 * self.d_model
        check(self.n_heads % self.n_kv_heads == 0, o, "n_kv_heads", self.n_kv_heads,
              f"must divide n_heads={self.n_heads}")
        check(self.head_dim >= 1, o, "head_dim", self.head_dim, "must be a positive integer")
        check(self.first_k_dense <= self.n_layers, o, "first_k_dense", self.first_k_dense,
              f"must be an integer in [0, n_layers={self.n_layers}]")
        check(self.attention != "mla" or self.mla is not None, o, "mla", self.mla,
              "must be an MLAConfig when attention='mla'")
        check(self.rope_scaling.get("rope_type", "default") in ("default", "linear", "llama3", "yarn"), o,
              "rope_scaling", self.rope_scaling, "must be {} or HF rope_parameters whose rope_type is linear, llama3 "
              "or yarn")
        check(all(0 <= i < self.n_layers for i in self.dense_layers), o, "dense_layers", self.dense_layers,
              f"must hold layer indices in [0, n_layers={self.n_layers})")
        check(not self.attn_windows or (len(self.attn_windows) == self.n_layers and min(self.attn_windows) >= 0), o,
              "attn_windows", self.attn_windows, f"must be empty or hold n_layers={self.n_layers} spans >= 0")
        check(self.attention != "mla" or not any(self.attn_windows), o, "attn_windows", self.attn_windows,
              "sliding windows are implemented for attention='gqa' only")
        check(self.attention != "mla" or not self.attn_sinks, o, "attn_sinks", self.attn_sinks,
              "attention sinks are implemented for attention='gqa' only")
        check(all(0 <= i < self.n_layers for i in self.nope_layers), o, "nope_layers", self.nope_layers,
              f"must hold layer indices in [0, n_layers={self.n_layers})")
        check(not self.attn_chunks or (len(self.attn_chunks) == self.n_layers and min(self.attn_chunks) >= 0), o,
              "attn_chunks", self.attn_chunks, f"must be empty or hold n_layers={self.n_layers} spans >= 0")
        check(self.attention != "mla" or not (self.nope_layers or any(self.attn_chunks) or self.qk_norm == "l2"), o,
              "attention", self.attention, "NoPE layers, chunked attention and qk_norm='l2' need attention='gqa'")
        if self.moe is not None:
            check(self.moe.d_model == self.d_model, o, "moe.d_model", self.moe.d_model,
                  f"must equal d_model={self.d_model}")

    def moe_slot(self, i: int) -> bool:
        """Whether layer i's FFN is in an MoE position of the layout (first_k_dense, dense_layers, moe_layers),
        whether or not this config has an MoE (the dense twin keeps the layout and widens those FFNs)."""
        return i >= self.first_k_dense and i not in self.dense_layers and (self.moe_layers == "all" or i % 2 == 1)

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and self.moe_slot(i)

    def window(self, i: int) -> int:
        return self.attn_windows[i] if self.attn_windows else 0

    def chunk(self, i: int) -> int:
        return self.attn_chunks[i] if self.attn_chunks else 0

    def dense_twin(self) -> ModelConfig:
        """The dense model with the same active FLOPs per token: every MoE FFN becomes a dense FFN of
        hidden top_k * expert_hidden + num_shared_experts * shared_hidden (the active expert width) and the
        experts' activation (a plain GELU FFN has 2 matrices, a SwiGLU one 3: the width alone is not enough)."""
        if self.moe is None:
            return self
        m = self.moe
        active_hidden = m.router.top_k * m.expert_hidden + m.num_shared_experts * m.shared_hidden_size
        extra = dict(self.extra, moe_layer_dense_hidden=active_hidden, moe_layer_dense_activation=m.activation)
        return dataclasses.replace(self, moe=None, extra=extra, moe_layers=self.moe_layers,
                                   first_k_dense=self.first_k_dense)

    def ffn_hidden(self, i: int) -> int:
        """Dense FFN width of layer i (the dense twin widens former MoE layers to the active width)."""
        twin_hidden = self.extra.get("moe_layer_dense_hidden")
        return twin_hidden if twin_hidden and self.moe_slot(i) else self.dense_hidden

    def ffn_activation(self, i: int) -> str:
        """Dense FFN activation of layer i: SwiGLU, or the experts' one in a dense twin's former MoE layers."""
        twin_activation = self.extra.get("moe_layer_dense_activation")
        return twin_activation if twin_activation and self.moe_slot(i) else "swiglu"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return from_dict(cls, d)


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop: AdamW, linear warmup + cosine decay, clipping, accumulation, eval, checkpoints."""

    steps: int = spec(300, ge=1)
    batch_size: int = spec(16, ge=1)
    seq_len: int = spec(128, ge=1)
    grad_accum: int = spec(1, ge=1)
    lr: float = spec(3e-3, gt=0)
    min_lr_ratio: float = spec(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = spec(30, ge=0)
    weight_decay: float = spec(0.1, ge=0)
    beta1: float = spec(0.9, ge=0, lt=1)
    beta2: float = spec(0.95, ge=0, lt=1)
    grad_clip: float = spec(1.0, ge=0, note="0 = no clipping")
    bf16: bool = False  # bf16 autocast (router stays float32)
    eval_every: int = spec(100, ge=0)
    eval_batches: int = spec(8, ge=1)
    save_every: int = spec(0, ge=0)  # 0 = only at the end
    log_every: int = spec(10, ge=1)
    seed: int = spec(0, ge=0)

    def __post_init__(self) -> None:
        validate(self)
