"""Configuration: one kw_only dataclass per concern, validated in ``__post_init__``.

Validation errors are ``ConfigError`` (a ``ValueError``) and name the field, the value given and
what is allowed, e.g. ``RouterConfig.top_k=9: must be an integer in [1, num_experts=8]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moekit.errors import ConfigError  # re-exported: config.ConfigError stays valid


def check(ok: bool, owner: str, name: str, value: Any, allowed: str) -> None:
    """Raise ConfigError naming ``owner.name``, the bad value and what is allowed."""
    if not ok:
        raise ConfigError(f"{owner}.{name}={value!r}: {allowed}")


def check_choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    check(value in choices, owner, name, value, f"must be one of {list(choices)}")


def check_positive_int(owner: str, name: str, value: Any) -> None:
    check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, owner, name, value,
          "must be a positive integer")


def check_fraction(owner: str, name: str, value: Any, *, closed_right: bool = False) -> None:
    ok = isinstance(value, (int, float)) and 0.0 <= value and (value <= 1.0 if closed_right else value < 1.0)
    check(ok, owner, name, value, "must be in [0, 1]" if closed_right else "must be in [0, 1)")


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
    top_k: int = 2
    renormalize: bool = True  # renormalise the kept top-k weights to sum to 1 (Mixtral does)
    jitter_eps: float = 0.0  # Switch: multiply router input by U(1-eps, 1+eps) in training
    noise_std: float = 1.0  # noisy_topk: scale of the N(0,1) * softplus(x W_noise) noise
    # top_p
    top_p: float = 0.5
    # expert_choice / sinkhorn
    sinkhorn_iters: int = 8
    # deepseek
    score_func: str = "softmax"  # "softmax" | "sigmoid" (DeepSeek-V3 uses sigmoid)
    n_groups: int = 1  # group-limited routing: experts split into n_groups groups
    topk_groups: int = 1  # ... of which the best topk_groups are eligible per token
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 0.0  # aux-loss-free balancing step gamma (0 = no bias)
    # task routing
    num_tasks: int = 1
    # soft MoE
    slots_per_expert: int = 1

    def __post_init__(self) -> None:
        o = "RouterConfig"
        check_choice(o, "kind", self.kind, (*registries()[0], SOFT_KIND))
        check_positive_int(o, "top_k", self.top_k)
        check(isinstance(self.jitter_eps, (int, float)) and 0 <= self.jitter_eps < 1, o, "jitter_eps",
              self.jitter_eps, "must be in [0, 1)")
        check(self.noise_std >= 0, o, "noise_std", self.noise_std, "must be >= 0")
        check(0 < self.top_p <= 1, o, "top_p", self.top_p, "must be in (0, 1]")
        check_positive_int(o, "sinkhorn_iters", self.sinkhorn_iters)
        check_choice(o, "score_func", self.score_func, ("softmax", "sigmoid"))
        check_positive_int(o, "n_groups", self.n_groups)
        check(isinstance(self.topk_groups, int) and 1 <= self.topk_groups <= self.n_groups, o, "topk_groups",
              self.topk_groups, f"must be an integer in [1, n_groups={self.n_groups}]")
        check(self.routed_scaling_factor > 0, o, "routed_scaling_factor", self.routed_scaling_factor,
              "must be > 0")
        check(self.bias_update_rate >= 0, o, "bias_update_rate", self.bias_update_rate, "must be >= 0")
        check_positive_int(o, "num_tasks", self.num_tasks)
        check_positive_int(o, "slots_per_expert", self.slots_per_expert)


@dataclass(kw_only=True)
class CapacityConfig:
    """Expert capacity C = ceil(tokens / experts * factor * top_k); None = dropless.

    The factor multiplies the balanced per-expert share of the N = T*k assignments, as in
    Switch/GShard (capacity_factor=1.0 gives exactly the balanced share).
    """

    capacity_factor: float | None = None  # training; None = dropless (MegaBlocks-style)
    eval_capacity_factor: float | None = None  # evaluation; None = dropless
    drop_policy: str = "position"  # "position": earlier tokens win; "priority": higher gate wins
    overflow: str = "drop"  # "drop" | "reroute" (to the next-best expert with room)
    min_capacity: int = 1

    def __post_init__(self) -> None:
        o = "CapacityConfig"
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            check(v is None or (isinstance(v, (int, float)) and v > 0), o, name, v,
                  "must be > 0, or None for dropless")
        check_choice(o, "drop_policy", self.drop_policy, ("position", "priority"))
        check_choice(o, "overflow", self.overflow, ("drop", "reroute"))
        check(isinstance(self.min_capacity, int) and self.min_capacity >= 0, o, "min_capacity",
              self.min_capacity, "must be an integer >= 0")


@dataclass(kw_only=True)
class LossConfig:
    """Coefficients of the router losses added to the task loss (0 = off)."""

    aux_coef: float = 0.01  # Switch/GShard load-balancing loss  N * sum_i f_i P_i
    seq_aux_coef: float = 0.0  # DeepSeek-V2/V3 sequence-level balance loss
    importance_coef: float = 0.0  # Shazeer 2017 importance loss (CV^2 of gate sums)
    load_coef: float = 0.0  # Shazeer 2017 load loss (CV^2 of smooth load estimate)
    z_coef: float = 0.0  # ST-MoE router z-loss

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            check(isinstance(v, (int, float)) and v >= 0, "LossConfig", f.name, v, "must be a number >= 0")


ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")


@dataclass(kw_only=True)
class MoEConfig:
    """One MoE layer replacing an FFN of width d_model."""

    d_model: int
    num_experts: int = 8
    expert_hidden: int = 0  # hidden size of each routed expert (ignored if expert_hidden_sizes is set)
    expert_hidden_sizes: tuple[int, ...] | None = None  # heterogeneous experts (overrides expert_hidden)
    activation: str = "swiglu"
    bias: bool = False  # biases on every expert projection (routed and shared; gpt-oss)
    num_shared_experts: int = 0
    shared_hidden: int = 0  # hidden size of each shared expert (0 = expert_hidden)
    shared_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared-expert output
    expert_dropout: float = 0.0  # dropout inside experts (ST-MoE: higher than dense dropout)
    dispatcher: str = "local"  # how tokens move to the experts: a registered dispatcher (layers/dispatch.py)
    experts: str = "auto"  # which kernel computes them: a registered experts backend (layers/experts.py) or auto
    allow_noncausal: bool = False  # let a causal decoder use routers that look at later tokens
    hierarchical_groups: int = 0  # > 1: two-level MoE, a router over groups, each group an MoE layer
    # the router over the groups: any registered router; None = softmax top-min(top_k, groups)
    top_router: RouterConfig | None = None
    router: RouterConfig = field(default_factory=RouterConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        o = "MoEConfig"
        if isinstance(self.router, dict):
            self.router = RouterConfig(**self.router)
        if isinstance(self.top_router, dict):
            self.top_router = RouterConfig(**self.top_router)
        if isinstance(self.capacity, dict):
            self.capacity = CapacityConfig(**self.capacity)
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        if isinstance(self.expert_hidden_sizes, list):
            self.expert_hidden_sizes = tuple(self.expert_hidden_sizes)
        check_positive_int(o, "d_model", self.d_model)
        check_positive_int(o, "num_experts", self.num_experts)
        if self.expert_hidden_sizes is None:
            check_positive_int(o, "expert_hidden", self.expert_hidden)
        else:
            check(len(self.expert_hidden_sizes) == self.num_experts
                  and all(isinstance(h, int) and h >= 1 for h in self.expert_hidden_sizes), o,
                  "expert_hidden_sizes", self.expert_hidden_sizes,
                  f"must hold num_experts={self.num_experts} positive integers")
        check_choice(o, "activation", self.activation, ACTIVATIONS)
        check(isinstance(self.num_shared_experts, int) and self.num_shared_experts >= 0, o,
              "num_shared_experts", self.num_shared_experts, "must be an integer >= 0")
        check(isinstance(self.shared_hidden, int) and self.shared_hidden >= 0, o, "shared_hidden",
              self.shared_hidden, "must be an integer >= 0 (0 = expert_hidden)")
        check_fraction(o, "expert_dropout", self.expert_dropout)
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
        check(isinstance(g, int) and (g == 0 or (g >= 2 and self.num_experts % g == 0)), o, "hierarchical_groups", g,
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
        return cls(**d)


ATTENTION_KINDS = ("gqa", "mla")  # mla: DeepSeek-V2/V3 multi-head latent attention (models/mla.py)
QK_NORMS = ("none", "per_head", "full")


@dataclass(kw_only=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2, Liu et al. 2024): low-rank compressed queries and keys/values,
    a decoupled RoPE key shared by all heads."""

    q_lora_rank: int = 0  # 0 = full-rank query projection (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True  # DeepSeek checkpoints store the RoPE dims as interleaved pairs

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            check_positive_int("MLAConfig", name, getattr(self, name))
        check(isinstance(self.q_lora_rank, int) and self.q_lora_rank >= 0, "MLAConfig", "q_lora_rank",
              self.q_lora_rank, "must be an integer >= 0 (0 = no query compression)")


@dataclass(kw_only=True)
class ModelConfig:
    """A decoder-only Transformer LM; the FFN of the chosen layers is an MoE layer (``moe``)."""

    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # grouped-query attention; 0 = n_heads (multi-head)
    head_dim: int = 0  # 0 = d_model // n_heads
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dense_hidden: int = 0  # FFN hidden size of dense layers; 0 = 4 * d_model
    moe: MoEConfig | None = None  # None = a dense model
    moe_layers: str = "all"  # "all" | "every_other" (Switch/GShard: layers 1, 3, 5, ...)
    first_k_dense: int = 0  # DeepSeek: the first k layers keep a dense FFN
    attention: str = "gqa"
    mla: MLAConfig | None = None  # required when attention == "mla"
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: str = "none"  # "per_head" (Qwen3: RMSNorm over head_dim) | "full" (OLMoE: over the projection)
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)  # family-specific options (e.g. MLA ranks), kept verbatim

    def __post_init__(self) -> None:
        o = "ModelConfig"
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if isinstance(self.mla, dict):
            self.mla = MLAConfig(**self.mla)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            check_positive_int(o, name, getattr(self, name))
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.d_model // self.n_heads
        self.dense_hidden = self.dense_hidden or 4 * self.d_model
        check(self.n_heads % self.n_kv_heads == 0, o, "n_kv_heads", self.n_kv_heads,
              f"must divide n_heads={self.n_heads}")
        check_positive_int(o, "head_dim", self.head_dim)
        check(self.rope_theta > 0, o, "rope_theta", self.rope_theta, "must be > 0")
        check_choice(o, "moe_layers", self.moe_layers, ("all", "every_other"))
        check(isinstance(self.first_k_dense, int) and 0 <= self.first_k_dense <= self.n_layers, o,
              "first_k_dense", self.first_k_dense, f"must be an integer in [0, n_layers={self.n_layers}]")
        check_choice(o, "attention", self.attention, ATTENTION_KINDS)
        check_choice(o, "qk_norm", self.qk_norm, QK_NORMS)
        check(self.attention != "mla" or self.mla is not None, o, "mla", self.mla,
              "must be an MLAConfig when attention='mla'")
        check_fraction(o, "dropout", self.dropout)
        check(self.init_std > 0, o, "init_std", self.init_std, "must be > 0")
        if self.moe is not None:
            check(self.moe.d_model == self.d_model, o, "moe.d_model", self.moe.d_model,
                  f"must equal d_model={self.d_model}")

    def moe_slot(self, i: int) -> bool:
        """Whether layer i's FFN is in an MoE position of the layout (first_k_dense, moe_layers), whether or
        not this config has an MoE (the dense twin keeps the layout and widens those FFNs)."""
        return i >= self.first_k_dense and (self.moe_layers == "all" or i % 2 == 1)

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and self.moe_slot(i)

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
        return cls(**d)


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop: AdamW, linear warmup + cosine decay, clipping, accumulation, eval, checkpoints."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = no clipping
    bf16: bool = False  # bf16 autocast (router stays float32)
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 0  # 0 = only at the end
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        o = "TrainConfig"
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every"):
            check_positive_int(o, name, getattr(self, name))
        for name in ("eval_every", "save_every", "warmup_steps"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 0, o, name, v, "must be an integer >= 0")
        check(self.lr > 0, o, "lr", self.lr, "must be > 0")
        check(0 <= self.min_lr_ratio <= 1, o, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(self.weight_decay >= 0, o, "weight_decay", self.weight_decay, "must be >= 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, o, "beta1/beta2", (self.beta1, self.beta2),
              "must be in [0, 1)")
        check(self.grad_clip >= 0, o, "grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
