"""Routers: x_TD -> Routing, a sparse assignment list (token_N, expert_N, weight_N) + router logits.

A router is one ``Router`` subclass registered by name (``@register_router("name")``): ``RouterConfig.kind``
validation, the per-kind config checks (``config_problem``) and the parameter calculator read ``ROUTERS``.
(Soft MoE is not a router: it mixes tokens into slots and is its own layer, layers/soft_moe.py.)

Router math runs in float32 even under bf16 autocast: the softmax over experts and top-k choice are
sensitive to rounding (Fedus et al. 2021, "selective precision").

Legend: T tokens, D model dim, E experts, K top-k, N assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Routing:
    """Every router's output. N assignments; ``rank_N`` is the assignment's choice rank for its token
    (0 = best), used by capacity priorities and overflow re-routing."""

    token_N: Tensor  # long
    expert_N: Tensor  # long
    weight_N: Tensor  # float32 gate weight applied to the expert output
    rank_N: Tensor  # long
    logits_TE: Tensor  # float32 raw router logits (z-loss, statistics)
    probs_TE: Tensor  # float32 gate scores over all experts (softmax or sigmoid); aux losses, re-routing
    num_tokens: int
    num_experts: int
    top_k: int  # nominal experts per token (for f_i normalisation and capacity)
    extra: dict[str, Tensor] = field(default_factory=dict)  # router-specific (e.g. load_prob_TE)
    capacity: int | None = None  # per-expert limit the capacity filter applied (None = dropless)

    @property
    def num_assignments(self) -> int:
        return self.token_N.numel()

    def select(self, keep_N: Tensor) -> Routing:
        """Keep only the assignments where ``keep_N`` is True."""
        return replace(self, token_N=self.token_N[keep_N], expert_N=self.expert_N[keep_N],
                       weight_N=self.weight_N[keep_N], rank_N=self.rank_N[keep_N])

    def counts_E(self) -> Tensor:
        return count_per_expert(self.expert_N, self.num_experts)

    def gates_TE(self) -> Tensor:
        """Dense [T, E] gate matrix (0 where a token does not use an expert)."""
        g = self.logits_TE.new_zeros(self.num_tokens, self.num_experts)
        return g.index_put((self.token_N, self.expert_N), self.weight_N, accumulate=True)


def count_per_expert(expert_N: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert, on the device, shape [E] whatever the data (unlike ``bincount``, whose
    length depends on the largest id): no host sync and a static shape under torch.compile."""
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=expert_N.device)
    return counts_E.scatter_add_(0, expert_N, torch.ones_like(expert_N))


def token_rank_TK(T: int, k: int, device) -> tuple[Tensor, Tensor]:
    """The (token, choice rank) of every slot of a [T, k] per-token choice table."""
    token_TK = torch.arange(T, device=device)[:, None].expand(T, k)
    rank_TK = torch.arange(k, device=device)[None, :].expand(T, k)
    return token_TK, rank_TK


def topk_assignments(select_TE: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k per token of a [T, E] score -> (token_N, expert_N, rank_N), N = T*k, token-major order."""
    expert_TK = select_TE.topk(k, dim=-1).indices
    token_TK, rank_TK = token_rank_TK(select_TE.shape[0], k, select_TE.device)
    return token_TK.reshape(-1), expert_TK.reshape(-1), rank_TK.reshape(-1)


def renormalize_per_token(weight_N: Tensor, token_N: Tensor, num_tokens: int, eps: float = 1e-20) -> Tensor:
    """Divide each assignment's weight by the sum of its token's weights."""
    sum_T = weight_N.new_zeros(num_tokens).index_add_(0, token_N, weight_N)
    return weight_N / sum_T[token_N].clamp_min(eps)


NONFINITE_LOGITS = ("router logits contain NaN or Inf: the MoE input or router weights are not finite "
                    "(check the learning rate / loss scale; router math already runs in float32)")


def check_finite_logits(logits_TE: Tensor) -> None:
    finite = torch.isfinite(logits_TE).all()
    if logits_TE.device.type == "cpu" and not torch.compiler.is_compiling():
        if not finite:
            raise FloatingPointError(NONFINITE_LOGITS)
    else:  # on accelerators (and compiled) the check stays on the device: no host sync in every MoE layer
        torch._assert_async(finite, NONFINITE_LOGITS)


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str):
    """Class decorator: ``RouterConfig(kind=name)`` builds this router."""
    def add(cls: type[Router]) -> type[Router]:
        ROUTERS[name] = cls
        return cls
    return add


class Router(nn.Module):
    """Base: a learned linear gate ``gate`` [E, D] evaluated in float32. Subclasses implement ``route``
    (from the logits) or ``forward`` (from the tokens), and are registered with ``register_router``.

    ``cfg`` is the layer's MoEConfig; the router's own options are ``cfg.router`` (a RouterConfig).
    ``causal_safe`` is False for routers whose choice for a token depends on later tokens of the same
    sequence (expert-choice, sequence-level routing): a causal decoder refuses them unless told otherwise.
    ``fixed_top_k``: every token uses exactly top_k experts, so active parameters per token are a fixed
    number (the calculator supports only those). ``num_gates``: [E, D] matrices the router holds.
    """

    causal_safe = True
    fixed_top_k = True
    num_gates = 1

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg.router
        self.num_experts = cfg.num_experts
        self.top_k = cfg.router.top_k
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=cfg.router.gate_bias)

    @classmethod
    def config_problem(cls, cfg) -> tuple[str, object, str] | None:
        """The first RouterConfig field of MoEConfig ``cfg`` this router cannot use, as (field, value,
        what is allowed); None if the config is fine. MoEConfig validation raises it as a ConfigError."""
        k, E = cfg.router.top_k, cfg.num_experts
        return None if k <= E else ("top_k", k, f"must be an integer in [1, num_experts={E}]")

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x32_TD = x_TD.float()
            if self.training and self.cfg.jitter_eps > 0:
                eps = self.cfg.jitter_eps
                x32_TD = x32_TD * torch.empty_like(x32_TD).uniform_(1.0 - eps, 1.0 + eps)
            b = self.gate.bias
            logits_TE = F.linear(x32_TD, self.gate.weight.float(), None if b is None else b.float())
        check_finite_logits(logits_TE)
        return logits_TE

    def forward(self, x_TD: Tensor, *, seq_len: int | None = None,
                task_ids_T: Tensor | None = None) -> Routing:
        logits_TE = self.compute_logits(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self.route(logits_TE, seq_len=seq_len, task_ids_T=task_ids_T)

    def route(self, logits_TE: Tensor, **ctx) -> Routing:
        raise NotImplementedError


@register_router("softmax_topk")
class SoftmaxTopKRouter(Router):
    """Mixtral: p = softmax(logits); keep the top-k; optionally renormalise the kept weights to sum 1.
    With k=1 and no renormalisation this is the Switch router (gate = softmax probability)."""

    def route(self, logits_TE: Tensor, **ctx) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        token_N, expert_N, rank_N = topk_assignments(probs_TE, self.top_k)
        weight_N = probs_TE[token_N, expert_N]
        if self.cfg.renormalize:
            weight_N = renormalize_per_token(weight_N, token_N, logits_TE.shape[0])
        return Routing(token_N, expert_N, weight_N, rank_N, logits_TE, probs_TE,
                       logits_TE.shape[0], self.num_experts, self.top_k)


@register_router("switch")
class SwitchRouter(SoftmaxTopKRouter):
    """Switch Transformer top-1 (Fedus et al. 2021): gate = softmax probability of the chosen expert."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.cfg = replace(cfg.router, renormalize=False)

    @classmethod
    def config_problem(cls, cfg):
        k = cfg.router.top_k
        return None if k == 1 else ("top_k", k, "must be 1 for kind='switch'")


@register_router("noisy_topk")
class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, eq. 3-5).

    H(x)_i = (x W_g)_i + N(0,1) * softplus((x W_noise)_i);  G(x) = softmax(KeepTopK(H(x), k)).
    Noise is only added in training. ``extra['load_prob_TE']`` is the smooth load estimate
    P(x, i) = Phi((clean_i - kth_excluding_i) / noise_std_i) used by the load loss (appendix A).
    """

    num_gates = 2  # the gate and the noise scale

    def __init__(self, cfg):
        super().__init__(cfg)
        self.noise = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        # start noise at softplus(0) = 0.69 * noise_std, as the paper's zero init
        nn.init.zeros_(self.noise.weight)

    def forward(self, x_TD: Tensor, **ctx) -> Routing:
        clean_TE = self.compute_logits(x_TD)
        T, E, k = clean_TE.shape[0], self.num_experts, self.top_k
        extra: dict[str, Tensor] = {}
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            if self.training and self.cfg.noise_std > 0:
                raw_TE = F.linear(x_TD.float(), self.noise.weight.float())
                std_TE = F.softplus(raw_TE) * self.cfg.noise_std + 1e-9
                noisy_TE = clean_TE + torch.randn_like(clean_TE) * std_TE
                if k < E:
                    # threshold a competitor must beat: the k-th largest noisy value if i is outside the
                    # top-k, else the (k+1)-th (Shazeer 2017 appendix A)
                    top_TK1 = noisy_TE.topk(k + 1, dim=-1).values
                    in_topk_TE = noisy_TE >= top_TK1[:, k - 1:k]
                    thresh_TE = torch.where(in_topk_TE, top_TK1[:, k:k + 1], top_TK1[:, k - 1:k])
                    normal = torch.distributions.Normal(0.0, 1.0)
                    extra["load_prob_TE"] = normal.cdf((clean_TE - thresh_TE) / std_TE)
                else:
                    extra["load_prob_TE"] = torch.ones_like(clean_TE)
            else:
                noisy_TE = clean_TE
            token_N, expert_N, rank_N = topk_assignments(noisy_TE, k)
            # softmax over the kept noisy logits only
            kept_TK = noisy_TE[token_N, expert_N].view(T, k)
            weight_N = kept_TK.softmax(-1).reshape(-1)
            probs_TE = noisy_TE.softmax(-1)
        return Routing(token_N, expert_N, weight_N, rank_N, clean_TE, probs_TE, T, E, k, extra)


def top2_problem(cfg, kind: str) -> tuple[str, object, str] | None:
    """``config_problem`` of the routers defined for exactly two experts per token (GShard, SparseMixer)."""
    k = cfg.router.top_k
    ok = k == 2 and cfg.num_experts >= 2
    return None if ok else ("top_k", k, f"must be 2 (and num_experts >= 2) for kind={kind!r}")


@register_router("gshard")
class GShardTop2Router(Router):
    """GShard top-2 (Lepikhin et al. 2020, Algorithm 1): g1, g2 = top-2 softmax gates renormalised to
    g1 + g2 = 1; the second expert is kept only with probability min(1, 2 * g2) during training
    ("random routing"), which skips second experts with small weight. In eval both are kept."""

    @classmethod
    def config_problem(cls, cfg):
        return top2_problem(cfg, "gshard")

    def route(self, logits_TE: Tensor, **ctx) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        T = logits_TE.shape[0]
        token_N, expert_N, rank_N = topk_assignments(probs_TE, 2)
        weight_N = renormalize_per_token(probs_TE[token_N, expert_N], token_N, T)
        r = Routing(token_N, expert_N, weight_N, rank_N, logits_TE, probs_TE, T, self.num_experts, 2)
        if not self.training:
            return r
        u_T = torch.rand(T, device=logits_TE.device)
        keep_second_T = u_T < 2.0 * weight_N.view(T, 2)[:, 1]
        keep_N = torch.stack([torch.ones_like(keep_second_T), keep_second_T], dim=1).reshape(-1)
        return r.select(keep_N)


def sparsemixer_choice(candidates_TE: Tensor, logits_TE: Tensor, eps: float, training: bool,
                       coin_draws: int = 1) -> tuple[Tensor, Tensor]:
    """One SparseMixer choice per token -> (expert_T1, weight_T1).

    Candidates are the experts whose logit lies within a relative gap 2*eps of the best remaining candidate
    m: (m - s_e) / max(|s_e|, m) <= 2*eps, a 0/0 gap (all-zero logits) inside (``candidates_TE`` holds -inf
    for experts already chosen). The gate is the chosen expert's softmax over the candidates only.
    Eval: the best candidate. Training: a sample from that masked softmax (Gumbel-max), and the gate's value
    is scaled by 1/3 (0.3333, transformers' constant) unless the sample is the argmax or a U(0,1) coin
    exceeds 0.75, while its gradient stays the unscaled gate's (straight-through): GRIN's Heun third-order
    estimate of the routing gradient.
    ``coin_draws``: U(0,1) draws consumed for the coin (transformers draws PhiMoE's second coin twice; the
    same RNG use lets a seeded run reproduce it).
    """
    with torch.no_grad():
        best_T1, best_expert_T1 = candidates_TE.max(dim=-1, keepdim=True)
        scale_TE = logits_TE.abs().clamp(min=best_T1)
        far_TE = (best_T1 - logits_TE) / scale_TE > 2 * eps
    masked_TE = candidates_TE.masked_fill(far_TE, float("-inf"))
    if training:
        with torch.no_grad():  # Gumbel-max: argmax(s - log(Exp(1))) samples from softmax(s)
            gumbel_TE = -torch.empty_like(masked_TE).exponential_().log()
            expert_T1 = (masked_TE + gumbel_TE).max(-1, keepdim=True)[1]
    else:
        expert_T1 = best_expert_T1
    probs_TE = masked_TE.softmax(dim=-1)
    weight_T1 = probs_TE.gather(-1, expert_T1)
    if not training:
        return expert_T1, weight_T1
    with torch.no_grad():
        coin_T1 = torch.rand_like(weight_T1)
        for _ in range(coin_draws - 1):
            coin_T1.uniform_()
        full_T1 = (expert_T1 == probs_TE.max(-1, keepdim=True)[1]) | (coin_T1 > 0.75)
        scale_T1 = torch.where(full_T1, 1.0, 0.3333).to(weight_T1.dtype)
    # value weight * scale, gradient d(weight): exact, since weight - weight.detach() is 0
    return expert_T1, weight_T1.detach() * scale_T1 + (weight_T1 - weight_T1.detach())


def sparsemixer_top2(logits_TE: Tensor, eps: float, training: bool) -> tuple[Tensor, Tensor]:
    """SparseMixer top-2 as PhiMoE routes -> (expert_T2, weight_T2): a first choice, then a second among the
    others with the candidate threshold measured from the best of them. The weights are not renormalised."""
    expert1_T1, weight1_T1 = sparsemixer_choice(logits_TE, logits_TE, eps, training)
    others_TE = logits_TE.scatter(-1, expert1_T1, float("-inf"))
    expert2_T1, weight2_T1 = sparsemixer_choice(others_TE, logits_TE, eps, training, coin_draws=2)
    return torch.cat([expert1_T1, expert2_T1], dim=-1), torch.cat([weight1_T1, weight2_T1], dim=-1)


@register_router("sparsemixer")
class SparseMixerRouter(Router):
    """SparseMixer top-2 (Liu et al. 2023, "Sparse Backpropagation for MoE Training"; the v2 in GRIN, Liu et
    al. 2024, is PhiMoE's router; ``sparsemixer_top2``). ``RouterConfig.sparsemixer_eps`` is the candidate
    threshold (PhiMoE's ``router_jitter_noise``). In training the experts are sampled and the gate gradient is
    a straight-through estimate, so training and eval outputs differ even without input jitter."""

    @classmethod
    def config_problem(cls, cfg):
        return top2_problem(cfg, "sparsemixer")

    def route(self, logits_TE: Tensor, **ctx) -> Routing:
        T, E = logits_TE.shape
        expert_TK, weight_TK = sparsemixer_top2(logits_TE, self.cfg.sparsemixer_eps, self.training)
        token_TK, rank_TK = token_rank_TK(T, 2, logits_TE.device)
        return Routing(token_TK.reshape(-1), expert_TK.reshape(-1), weight_TK.reshape(-1),
                       rank_TK.reshape(-1), logits_TE, logits_TE.softmax(dim=-1), T, E, 2)


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022): S = softmax(X W^T) over experts; each expert takes the
    C tokens with the highest score for it, C = min(T, ceil(T * top_k / E)). ``top_k`` plays the paper's
    capacity factor c (the mean number of experts per token; the paper's default c = 2 is top_k = 2), so the
    layer costs the same FLOPs as token-choice top-k and CapacityConfig (whose capacity is
    ceil(T * top_k / E * factor)) is a no-op for any factor >= 1. Gate = S[t, e]. A token may get zero or
    several experts; loads are perfectly balanced by construction. Not causal: which tokens an expert takes
    depends on every token of the batch, later ones included (``causal_safe = False``)."""

    causal_safe = False
    fixed_top_k = False

    @classmethod
    def config_problem(cls, cfg):
        return None  # top_k is the capacity factor c: any positive value

    def route(self, logits_TE: Tensor, **ctx) -> Routing:
        T, E = logits_TE.shape
        probs_TE = logits_TE.softmax(dim=-1)
        C = min(T, max(1, math.ceil(T * self.top_k / E)))
        token_EC = probs_TE.t().topk(C, dim=-1).indices
        expert_EC = torch.arange(E, device=logits_TE.device)[:, None].expand(E, C)
        token_N, expert_N = token_EC.reshape(-1), expert_EC.reshape(-1)
        weight_N = probs_TE[token_N, expert_N]
        rank_N = torch.zeros_like(token_N)
        return Routing(token_N, expert_N, weight_N, rank_N, logits_TE, probs_TE, T, E, self.top_k)


def sinkhorn(logits_TE: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp on exp(logits) (Cuturi 2013): alternately scale columns to mass T/E (every expert the
    same share) and rows to mass 1 (every token one unit); the row step comes last, so rows sum to 1 exactly
    and columns to T/E approximately (divide by T for the doubly-stochastic transport plan with marginals
    1/T, 1/E). Done in float64 log space: exp(logits) under- and overflows for confident routers."""
    T, E = logits_TE.shape
    if T == 0:
        return logits_TE.new_zeros(0, E)
    log_p = logits_TE.double()
    log_col = math.log(T / E)
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + log_col
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p.exp().to(logits_TE.dtype)


@register_router("sinkhorn")
class SinkhornRouter(SoftmaxTopKRouter):
    """Balanced assignment at train time (BASE layers, Lewis et al. 2021; Sinkhorn routing as in Clark et al.
    2022): experts are chosen by the top-k of the Sinkhorn-balanced matrix, gate weights are the router's
    softmax (renormalised) so gradients still flow through the router. Eval: plain softmax top-k."""

    def route(self, logits_TE: Tensor, **ctx) -> Routing:
        if not self.training:
            return super().route(logits_TE)
        T = logits_TE.shape[0]
        probs_TE = logits_TE.softmax(dim=-1)
        with torch.no_grad():
            balanced_TE = sinkhorn(logits_TE.detach(), self.cfg.sinkhorn_iters)
        token_N, expert_N, rank_N = topk_assignments(balanced_TE, self.top_k)
        weight_N = renormalize_per_token(probs_TE[token_N, expert_N], token_N, T)
        return Routing(token_N, expert_N, weight_N, rank_N, logits_TE, probs_TE, T, self.num_experts,
                       self.top_k, {"balanced_TE": balanced_TE})


@register_router("top_p")
class TopPRouter(Router):
    """Dynamic routing (Huang et al. 2024, "Harder tasks need more experts"): per token, the smallest set of
    experts, by descending probability, whose mass reaches top_p, at most top_k experts; weights renormalised
    over the kept set. ``MoEAux.experts_per_token`` reports the mean set size. Capacity (if any) is sized for
    top_k experts per token, the most a token can take."""

    fixed_top_k = False

    def route(self, logits_TE: Tensor, **ctx) -> Routing:
        T, E = logits_TE.shape
        probs_TE = logits_TE.softmax(dim=-1)
        k = self.top_k
        top = probs_TE.topk(k, dim=-1)
        mass_before_TK = top.values.cumsum(-1) - top.values
        keep_TK = mass_before_TK < self.cfg.top_p  # keep until the mass first reaches p (first always kept)
        token_TK, rank_TK = token_rank_TK(T, k, logits_TE.device)
        token_N, expert_N, rank_N = token_TK[keep_TK], top.indices[keep_TK], rank_TK[keep_TK]
        weight_N = renormalize_per_token(top.values[keep_TK], token_N, T)
        return Routing(token_N, expert_N, weight_N, rank_N, logits_TE, probs_TE, T, E, k)


@register_router("deepseek")
class DeepSeekRouter(Router):
    """DeepSeek-V2/V3 routing.

    s = sigmoid(logits) (V3) or softmax(logits) (V2). Selection uses s + b, where b is a per-expert bias
    that only steers selection (V3 aux-loss-free balancing, Wang et al. 2024). Group-limited routing: the
    E experts form n_groups groups; a group's score is the sum of its two best (s + b) (V3; V2's max for
    softmax scores; ``group_score`` picks either); only the best topk_groups groups are eligible. Gate weights are the chosen s,
    normalised to sum 1 when ``renormalize`` (V3 always for sigmoid), times routed_scaling_factor.

    ``update_bias(counts_E)``: b_i += gamma * sign(mean load - load_i), called after the optimizer step,
    outside autograd (b is a buffer, so it never receives gradients).
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("bias", torch.zeros(cfg.num_experts))

    @classmethod
    def config_problem(cls, cfg):
        r = cfg.router
        eligible = r.topk_groups * (cfg.num_experts // r.n_groups)
        if r.top_k > eligible:
            return ("top_k", r.top_k,
                    f"must be <= topk_groups * num_experts / n_groups = {eligible} (experts in the kept groups)")
        return super().config_problem(cfg)

    def route(self, logits_TE: Tensor, **ctx) -> Routing:
        T, E = logits_TE.shape
        c = self.cfg
        scores_TE = logits_TE.sigmoid() if c.score_func == "sigmoid" else logits_TE.softmax(dim=-1)
        select_TE = (logits_TE if c.select_on == "logits" else scores_TE) + self.bias.float()
        if c.n_groups > 1:
            select_TGe = select_TE.view(T, c.n_groups, E // c.n_groups)
            if c.group_score == "top2_sum" or (c.group_score == "auto" and c.score_func == "sigmoid"):
                group_TG = select_TGe.topk(min(2, E // c.n_groups), dim=-1).values.sum(-1)
            else:
                group_TG = select_TGe.max(dim=-1).values
            keep_groups = group_TG.topk(c.topk_groups, dim=-1).indices
            group_mask_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, keep_groups, True)
            expert_mask_TE = group_mask_TG.repeat_interleave(E // c.n_groups, dim=1)
            select_TE = select_TE.masked_fill(~expert_mask_TE, 0.0 if c.group_mask_fill == "zero" else float("-inf"))
        token_N, expert_N, rank_N = topk_assignments(select_TE, self.top_k)
        weight_N = scores_TE[token_N, expert_N]
        # V2 (softmax) skips normalising a single expert; V3 (sigmoid) always normalises, so top-1 gets 1
        if c.renormalize and (self.top_k > 1 or c.score_func == "sigmoid"):
            weight_N = renormalize_per_token(weight_N, token_N, T)
        weight_N = weight_N * c.routed_scaling_factor
        return Routing(token_N, expert_N, weight_N, rank_N, logits_TE, scores_TE, T, E, self.top_k)

    @torch.no_grad()
    def update_bias(self, counts_E: Tensor) -> None:
        if self.cfg.bias_update_rate <= 0:
            return
        load = counts_E.float().to(self.bias.device)
        self.bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)


@register_router("task")
class TaskRouter(Router):
    """Task-level routing (Kudugunta et al. 2021, "Beyond Distillation"): every token of a task goes to the
    task's fixed k experts, task t -> experts (t*k + j) mod E, equal weights 1/k. The gate still computes
    logits for statistics; the extractable sub-network per task is exactly its k experts."""

    def route(self, logits_TE: Tensor, *, task_ids_T: Tensor | None = None, **ctx) -> Routing:
        if task_ids_T is None:
            raise ValueError("RouterConfig.kind='task' needs task_ids (one id per sequence or per token)")
        T, E, k = logits_TE.shape[0], self.num_experts, self.top_k
        if T and (int(task_ids_T.min()) < 0 or int(task_ids_T.max()) >= self.cfg.num_tasks):
            raise ValueError(f"task_ids must lie in [0, num_tasks={self.cfg.num_tasks}), got "
                             f"[{int(task_ids_T.min())}, {int(task_ids_T.max())}]")
        expert_TK = (task_ids_T.long()[:, None] * k + torch.arange(k, device=logits_TE.device)) % E
        token_TK, rank_TK = token_rank_TK(T, k, logits_TE.device)
        weight_N = torch.full((T * k,), 1.0 / k, device=logits_TE.device)
        return Routing(token_TK.reshape(-1), expert_TK.reshape(-1), weight_N, rank_TK.reshape(-1), logits_TE,
                       logits_TE.softmax(-1), T, E, k)


@register_router("sequence")
class SequenceRouter(Router):
    """Learned sequence-level routing: the mean of a sequence's token vectors picks its top-k experts
    (softmax, renormalised) and every token of the sequence uses them. Not causal (the mean sees the
    whole sequence)."""

    causal_safe = False

    def forward(self, x_TD: Tensor, *, seq_len: int | None = None, **ctx) -> Routing:
        if seq_len is None:
            raise ValueError("RouterConfig.kind='sequence' needs input shaped [B, S, D]")
        T, D = x_TD.shape
        B = T // seq_len if seq_len else 0
        logits_BE = self.compute_logits(x_TD.view(B, seq_len, D).mean(1))
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            probs_BE = logits_BE.softmax(-1)
            top = probs_BE.topk(self.top_k, dim=-1)
            w_BK = top.values / top.values.sum(-1, keepdim=True)
            token_TK, rank_TK = token_rank_TK(T, self.top_k, x_TD.device)
            token_N, rank_N = token_TK.reshape(-1), rank_TK.reshape(-1)
            seq_N = token_N // max(seq_len, 1)
            logits_TE = logits_BE.repeat_interleave(seq_len, dim=0)
            return Routing(token_N, top.indices[seq_N, rank_N], w_BK[seq_N, rank_N], rank_N, logits_TE,
                           logits_TE.softmax(-1), T, self.num_experts, self.top_k)


def update_router_biases(model: nn.Module, moe_aux: list) -> None:
    """Aux-loss-free balancing step (DeepSeek-V3): call after ``optimizer.step()``, outside autograd.

    ``model`` is a decoder with ``moe_layers()`` (in forward order) or a single MoE layer; ``moe_aux`` holds
    the matching per-layer ``MoEAux`` records (``LMOutput.moe_aux``) or their ``counts_E`` tensors, e.g.
    summed over micro-batches and data-parallel ranks. Layers without a selection bias are skipped; a layer
    may implement ``update_bias(counts_E)`` itself (the hierarchical MoE forwards slices to its groups).
    """
    layers = model.moe_layers() if hasattr(model, "moe_layers") else [model]
    if len(layers) != len(moe_aux):
        raise ValueError(f"moe_aux must hold one record per MoE layer ({len(layers)}), got {len(moe_aux)}")
    with torch.no_grad():
        for layer, aux in zip(layers, moe_aux):
            counts_E = aux if torch.is_tensor(aux) else aux.counts_E
            router = getattr(layer, "router", None)
            update = getattr(layer, "update_bias", None) or getattr(router, "update_bias", None)
            if update is not None:
                update(counts_E.detach())




def build_router(cfg) -> Router:
    """The registered router for MoEConfig ``cfg`` (``cfg.router.kind``; validated by MoEConfig)."""
    return ROUTERS[cfg.router.kind](cfg)

