"""Fine-tuning recipes: frozen parameters get no update, no grad, no optimizer state; KD loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ConfigError, MoEConfig, RouterConfig
from moekit.deploy.distill import gain_retained, kd_loss
from moekit.layers.moe import MoELayer
from moekit.train.finetune import (FREEZE_POLICIES, FinetuneRecipe, get_recipe, optimizer_state_bytes,
                                   param_groups, prepare, trainable_report)

V, D = 40, 16


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.drop = nn.Dropout(0.0)
        self.moe = nn.ModuleList(MoELayer(MoEConfig(d_model=D, num_experts=4, expert_hidden=24, num_shared_experts=1,
                                                    shared_gate=True, router=RouterConfig(top_k=2)))
                                 for _ in range(2))
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids):
        h = self.drop(self.embed(ids))
        aux = 0.0
        for layer in self.moe:
            out = layer(h)
            h, aux = h + out.y, aux + out.aux.loss
        return self.head(h), aux


def train_steps(model, opt, steps=3):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, V, (4, 10), generator=g)
        logits, aux = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1)) + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("policy", list(FREEZE_POLICIES))
def test_frozen_parameters_get_no_update_grad_or_state(policy):
    torch.manual_seed(0)
    model = TinyLM()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = prepare(model, FinetuneRecipe(freeze=policy, lr=1e-2, weight_decay=0.1))
    train_steps(model, opt)
    groups = param_groups(model)
    frozen = {n for g in FREEZE_POLICIES[policy] for n in groups[g]}
    state_ids = {id(p) for p in opt.state}
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), n
            assert p.grad is None and id(p) not in state_ids, n
        else:
            assert not torch.equal(p, before[n]), n
            assert id(p) in state_ids, n
    report = trainable_report(model)
    n_frozen = sum(p.numel() for n, p in model.named_parameters() if n in frozen)
    assert report["trainable_params"] == report["total_params"] - n_frozen
    assert report["grad_and_adam_bytes_saved"] == 3 * 4 * n_frozen
    # measured: Adam holds exactly two moment tensors per trainable parameter
    assert optimizer_state_bytes(opt) == 2 * 4 * report["trainable_params"]


def test_param_groups_classify_every_parameter():
    model = TinyLM()
    groups = param_groups(model)
    assert sorted(n for names in groups.values() for n in names) == sorted(n for n, _ in model.named_parameters())
    assert groups["router"] == ["moe.0.router.gate.weight", "moe.1.router.gate.weight"]
    assert set(groups["shared"]) >= {"moe.0.shared_gate.weight", "moe.0.shared.w_up.weight"}
    assert len(groups["experts"]) == 6 and set(groups["dense"]) == {"embed.weight", "head.weight"}


def test_recipe_regularisation_is_applied():
    torch.manual_seed(0)
    model = TinyLM()
    prepare(model, get_recipe("moe", capacity_factor=0.5))
    assert model.drop.p == 0.1
    for layer in model.moe:
        assert layer.experts.dropout.p == 0.4
        assert layer.cfg.loss.aux_coef == 0.01 and layer.cfg.capacity.capacity_factor == 0.5
    model.train()
    out = model.moe[0](torch.randn(2, 16, D))
    assert float(out.aux.dropped_fraction) > 0.0  # token dropping is active in training
    assert float(model.moe[0].eval()(torch.randn(2, 16, D)).aux.dropped_fraction) == 0.0
    prepare(model, FinetuneRecipe(aux_coef=0.0))
    assert float(model.moe[0](torch.randn(2, 16, D)).aux.loss) == 0.0
    with pytest.raises(ConfigError, match="freeze"):
        FinetuneRecipe(freeze="everything")
    with pytest.raises(ValueError, match="recipe="):
        get_recipe("fast")
    # the MoE presets follow ST-MoE: smaller batch, higher LR than the dense preset
    assert get_recipe("moe").lr > get_recipe("dense").lr and get_recipe("moe").batch_size < get_recipe("dense").batch_size


# ------------------------------------------------------------------------------------ distillation
def kd_reference64(s, t, y, alpha, tau):
    """Token loop in float64, from the formula."""
    total, n = 0.0, 0
    for i in range(s.shape[0]):
        if y[i] < 0:
            continue
        p_t = torch.softmax(t[i].double() / tau, -1)
        log_p_s = torch.log_softmax(s[i].double() / tau, -1)
        kl = float((p_t * (p_t.log() - log_p_s)).sum())
        ce = float(-torch.log_softmax(s[i].double(), -1)[y[i]])
        total += alpha * tau**2 * kl + (1 - alpha) * ce
        n += 1
    return total / n


@pytest.mark.parametrize("alpha,tau", [(0.0, 1.0), (0.5, 2.0), (1.0, 4.0), (0.9, 0.5)])
def test_kd_loss_matches_float64_formula(alpha, tau):
    g = torch.Generator().manual_seed(int(alpha * 10 + tau))
    s, t = torch.randn(12, V, generator=g) * 3, torch.randn(12, V, generator=g) * 3
    y = torch.randint(0, V, (12,), generator=g)
    y[[2, 7]] = -100
    got = kd_loss(s, t, y, alpha=alpha, temperature=tau)
    assert math.isclose(float(got), kd_reference64(s, t, y, alpha, tau), rel_tol=1e-5)
    assert float(kd_loss(t, t, y, alpha=1.0, temperature=tau)) == pytest.approx(0.0, abs=1e-5)
    s.requires_grad_(True)
    kd_loss(s, t, y, alpha=alpha, temperature=tau).backward()
    assert s.grad[[2, 7]].abs().max() == 0  # ignored positions get no gradient


def test_gain_retained():
    assert gain_retained(4.0, 3.5, 3.0) == 0.5
    assert gain_retained(4.0, 3.0, 3.0) == 1.0
    assert math.isnan(gain_retained(3.0, 3.0, 3.5))
