"""Routers: x_TD -> Routing, a sparse assignment list (token_N, expert_N, weight_N) + router logits.

Router math runs in float32 even under bf16 autocast: the softmax over experts and top-k choice are
sensitive to rounding (Fedus et al. 2021, "selective precision").

Legend: T tokens, D model dim, E experts, K top-k, N assignments.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig, RouterConfig


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

    @property
    def num_assignments(self) -> int:
        return self.token_N.numel()

    def select(self, keep_N: Tensor) -> "Routing":
        """Keep only the assignments where ``keep_N`` is True."""
        return replace(self, token_N=self.token_N[keep_N], expert_N=self.expert_N[keep_N],
                       weight_N=self.weight_N[keep_N], rank_N=self.rank_N[keep_N])

    def counts_E(self) -> Tensor:
        return torch.bincount(self.expert_N, minlength=self.num_experts)

    def gates_TE(self) -> Tensor:
        """Dense [T, E] gate matrix (0 where a token does not use an expert)."""
        g = self.logits_TE.new_zeros(self.num_tokens, self.num_experts)
        return g.index_put((self.token_N, self.expert_N), self.weight_N, accumulate=True)


def topk_assignments(select_TE: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k per token of a [T, E] score -> (token_N, expert_N, rank_N), N = T*k, token-major order."""
    T = select_TE.shape[0]
    expert_TK = select_TE.topk(k, dim=-1).indices
    token_TK = torch.arange(T, device=select_TE.device)[:, None].expand(T, k)
    rank_TK = torch.arange(k, device=select_TE.device)[None, :].expand(T, k)
    return token_TK.reshape(-1), expert_TK.reshape(-1), rank_TK.reshape(-1)


def renormalize_per_token(weight_N: Tensor, token_N: Tensor, num_tokens: int, eps: float = 1e-20) -> Tensor:
    """Divide each assignment's weight by the sum of its token's weights."""
    sum_T = weight_N.new_zeros(num_tokens).index_add_(0, token_N, weight_N)
    return weight_N / sum_T[token_N].clamp_min(eps)


def check_finite_logits(logits_TE: Tensor) -> None:
    if not torch.isfinite(logits_TE).all():
        raise FloatingPointError(
            "router logits contain NaN or Inf: the MoE input or router weights are not finite "
            "(check the learning rate / loss scale; router math already runs in float32)")


class Router(nn.Module):
    """Base: a learned linear gate ``gate`` [E, D] evaluated in float32. Subclasses implement ``route``."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg: RouterConfig = cfg.router
        self.num_experts = cfg.num_experts
        self.top_k = cfg.router.top_k
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x32_TD = x_TD.float()
            if self.training and self.cfg.jitter_eps > 0:
                eps = self.cfg.jitter_eps
                x32_TD = x32_TD * torch.empty_like(x32_TD).uniform_(1.0 - eps, 1.0 + eps)
            logits_TE = F.linear(x32_TD, self.gate.weight.float())
        check_finite_logits(logits_TE)
        return logits_TE

    def forward(self, x_TD: Tensor, *, seq_len: int | None = None, task_ids_T: Tensor | None = None) -> Routing:
        logits_TE = self.compute_logits(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self.route(logits_TE, seq_len=seq_len, task_ids_T=task_ids_T)

    def route(self, logits_TE: Tensor, **ctx) -> Routing:
        raise NotImplementedError


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


class SwitchRouter(SoftmaxTopKRouter):
    """Switch Transformer top-1 (Fedus et al. 2021): gate = softmax probability of the chosen expert."""

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.cfg = replace(cfg.router, renormalize=False)


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, eq. 3-5).

    H(x)_i = (x W_g)_i + N(0,1) * softplus((x W_noise)_i);  G(x) = softmax(KeepTopK(H(x), k)).
    Noise is only added in training. ``extra['load_prob_TE']`` is the smooth load estimate
    P(x, i) = Phi((clean_i - kth_excluding_i) / noise_std_i) used by the load loss (appendix A).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.noise = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        nn.init.zeros_(self.noise.weight)  # start noise at softplus(0) = 0.69 * noise_std, as the paper's zero init

    def forward(self, x_TD: Tensor, **ctx) -> Routing:
        clean_TE = self.compute_logits(x_TD)
        T, E, k = clean_TE.shape[0], self.num_experts, self.top_k
        extra: dict[str, Tensor] = {}
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            if self.training and self.cfg.noise_std > 0:
                std_TE = F.softplus(F.linear(x_TD.float(), self.noise.weight.float())) * self.cfg.noise_std + 1e-9
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


class GShardTop2Router(Router):
    """GShard top-2 (Lepikhin et al. 2020, Algorithm 1): g1, g2 = top-2 softmax gates renormalised to
    g1 + g2 = 1; the second expert is kept only with probability min(1, 2 * g2) during training
    ("random routing"), which skips second experts with small weight. In eval both are kept."""

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


ROUTERS: dict[str, type[Router]] = {
    "softmax_topk": SoftmaxTopKRouter,
    "switch": SwitchRouter,
    "noisy_topk": NoisyTopKRouter,
    "gshard": GShardTop2Router,
}


def build_router(cfg: MoEConfig) -> Router:
    try:
        cls = ROUTERS[cfg.router.kind]
    except KeyError:
        raise ValueError(f"RouterConfig.kind={cfg.router.kind!r}: no router registered; "
                         f"available: {sorted(ROUTERS)}") from None
    return cls(cfg)

