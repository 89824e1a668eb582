"""Autoregressive generation with a KV cache: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.errors import UsageError


def sample_next(logits_BV: Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Greedy when temperature == 0; otherwise sample from softmax(logits / T) restricted to the smallest
    set of tokens whose probability mass reaches top_p (Holtzman et al. 2020)."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise UsageError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    if temperature == 0:
        return logits_BV.argmax(-1)
    probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)  # keep the first token always
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, use_cache: bool = True) -> Tensor:
    """prompt_ids [B, S0] -> [B, S0 + max_new_tokens]. Without the cache every step recomputes the whole
    prefix (the reference the cached path is tested against)."""
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    total = prompt_ids.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise UsageError(f"prompt ({prompt_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len={model.cfg.max_seq_len}")
    was_training = model.training
    model.eval()
    ids = prompt_ids
    cache = model.new_cache(ids.shape[0], total) if use_cache else None
    pos = 0
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model(ids[:, pos:], cache=cache, start_pos=pos).logits[:, -1]
            pos = ids.shape[1]
        else:  # model(ids) alone: any model with moekit's forward interface (a patched HF model too)
            logits = model(ids).logits[:, -1]
        ids = torch.cat([ids, sample_next(logits, temperature, top_p, generator)[:, None]], dim=1)
    model.train(was_training)
    return ids
