"""Router losses: pure functions of router outputs.

Shapes: T tokens, E experts, K top-k, N assignments, B sequences, S tokens per sequence.
Every function accepts an optional ``mask_T`` (1 = real token, 0 = padding) so padding never
changes a loss; tests check invariance to padding and to token order.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _masked_mean_T(v_TX: Tensor, mask_T: Tensor | None) -> Tensor:
    """Mean over the token dim of a [T, ...] tensor, counting only real tokens (0 when there are none)."""
    if mask_T is None:
        return v_TX.sum(0) / max(v_TX.shape[0], 1)
    m = mask_T.to(v_TX.dtype).reshape(-1, *([1] * (v_TX.dim() - 1)))
    return (v_TX * m).sum(0) / m.sum().clamp_min(1.0)


def assignment_fraction_E(expert_N: Tensor, token_N: Tensor, num_experts: int, num_tokens: int,
                          mask_T: Tensor | None = None) -> Tensor:
    """f_i: fraction of (real) assignments that chose expert i; sums to 1 (0 if none)."""
    w_N = torch.ones_like(expert_N, dtype=torch.float32)
    if mask_T is not None:
        w_N = mask_T.to(torch.float32)[token_N]
    counts_E = torch.zeros(num_experts, dtype=torch.float32, device=expert_N.device)
    counts_E.index_add_(0, expert_N, w_N)
    return counts_E / counts_E.sum().clamp_min(1.0)


def switch_aux_loss(probs_TE: Tensor, expert_N: Tensor, token_N: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Switch Transformer / GShard load-balancing loss  L = E * sum_i f_i * P_i.

    f_i = fraction of the router's assignments sent to expert i (before capacity), P_i = mean router
    probability of expert i over tokens (Fedus et al. 2021, eq. 4; Lepikhin et al. 2020).
    Equals 1 at perfect balance and E when everything goes to one expert. f is not differentiable;
    the gradient flows through P. HF transformers' Mixtral/OLMoE `load_balancing_loss_func` counts f per
    top-k slot and so returns K times this value.
    """
    T, E = probs_TE.shape
    f_E = assignment_fraction_E(expert_N, token_N, E, T, mask_T)
    P_E = _masked_mean_T(probs_TE.float(), mask_T)
    return E * (f_E * P_E).sum()


def seq_aux_loss(scores_TE: Tensor, expert_N: Tensor, token_N: Tensor, seq_len: int, top_k: int,
                 mask_T: Tensor | None = None) -> Tensor:
    """Sequence-level balance loss (DeepSeek-V2 eq. 17-19, DeepSeek-V3 eq. 17-20).

    Per sequence: f_i = E / (K * S) * sum_t 1[token t picks i],  P_i = 1/S * sum_t s'_{i,t} with
    s' the scores normalised to sum 1 per token; L = sum_i f_i P_i, averaged over sequences.
    Balanced routing gives 1. Tokens must be laid out as [B, S] flattened (T = B * S).
    """
    T, E = scores_TE.shape
    if T % seq_len:
        raise ValueError(f"seq_len={seq_len} must divide the number of tokens T={T}")
    B = T // seq_len
    s_TE = scores_TE.float() / scores_TE.float().sum(-1, keepdim=True).clamp_min(1e-20)
    w_N = torch.ones_like(expert_N, dtype=torch.float32) if mask_T is None else mask_T.float()[token_N]
    hits_BE = torch.zeros(B * E, dtype=torch.float32, device=scores_TE.device)
    hits_BE.index_add_(0, (token_N // seq_len) * E + expert_N, w_N)
    hits_BE = hits_BE.view(B, E)
    m_BS = torch.ones(B, seq_len, device=scores_TE.device) if mask_T is None else mask_T.float().view(B, seq_len)
    n_B = m_BS.sum(1).clamp_min(1.0)
    f_BE = hits_BE * E / (top_k * n_B[:, None])
    P_BE = (s_TE.view(B, seq_len, E) * m_BS[..., None]).sum(1) / n_B[:, None]
    per_seq_B = (f_BE * P_BE).sum(-1)
    has_tokens_B = (m_BS.sum(1) > 0).float()
    return (per_seq_B * has_tokens_B).sum() / has_tokens_B.sum().clamp_min(1.0)


def cv_squared(v: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation Var(v) / Mean(v)^2 (population variance); 0 for one element."""
    v = v.float()
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var(unbiased=False) / (v.mean() ** 2 + eps)


def importance_loss(gates_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Importance loss (Shazeer et al. 2017, eq. 6-7): CV(Importance)^2, Importance_i = sum_x G_i(x).

    ``gates_TE`` is the sparse gate matrix (0 for experts a token does not use).
    """
    if mask_T is not None:
        gates_TE = gates_TE * mask_T.to(gates_TE.dtype)[:, None]
    return cv_squared(gates_TE.sum(0))


def load_loss(load_prob_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Load loss (Shazeer et al. 2017, appendix A): CV(Load)^2, Load_i = sum_x P(x, i).

    P(x, i) = Phi((clean_i(x) - kth_excluding_i(H(x))) / noise_std_i(x)) is the smooth probability that
    expert i stays in the top-k under fresh noise; the noisy top-k router computes it.
    """
    if mask_T is not None:
        load_prob_TE = load_prob_TE * mask_T.to(load_prob_TE.dtype)[:, None]
    return cv_squared(load_prob_TE.sum(0))


def router_z_loss(logits_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean_t (logsumexp_i logits_ti)^2."""
    z_T = torch.logsumexp(logits_TE.float(), dim=-1) ** 2
    return _masked_mean_T(z_T, mask_T)


def router_losses(routing, cfg, seq_len: int | None = None, mask_T: Tensor | None = None
                  ) -> tuple[dict[str, Tensor], Tensor]:
    """The loss terms of one ``Routing`` (the router's intended assignments, before capacity) and their
    sum weighted by LossConfig ``cfg``: "aux" and "z" always (for logging), the others when their
    coefficient is on ("seq_aux" needs ``seq_len``, "load" a router that estimates it)."""
    terms: dict[str, Tensor] = {
        "aux": switch_aux_loss(routing.probs_TE, routing.expert_N, routing.token_N, mask_T),
        "z": router_z_loss(routing.logits_TE, mask_T),
    }
    if cfg.importance_coef > 0:
        terms["importance"] = importance_loss(routing.gates_TE(), mask_T)
    if cfg.load_coef > 0 and "load_prob_TE" in routing.extra:
        terms["load"] = load_loss(routing.extra["load_prob_TE"], mask_T)
    if cfg.seq_aux_coef > 0 and seq_len is not None:
        terms["seq_aux"] = seq_aux_loss(routing.probs_TE, routing.expert_N, routing.token_N, seq_len,
                                        routing.top_k, mask_T)
    coef = {"aux": cfg.aux_coef, "z": cfg.z_coef, "importance": cfg.importance_coef, "load": cfg.load_coef,
            "seq_aux": cfg.seq_aux_coef}
    total = sum((coef[k] * v for k, v in terms.items() if coef[k] > 0), routing.logits_TE.new_zeros(()))
    return terms, total
