"""Fine-tuning recipes: frozen parameters get no update, no grad, no optimizer state; KD loss."""

import math

import pytest
import torch

from moekit.config import ConfigError, LossConfig, ModelConfig, MoEConfig, RouterConfig, TrainConfig
from moekit.deploy.distill import gain_retained, kd_loss
from moekit.models.decoder import MoETransformer, lm_loss
from moekit.train.data import TokenStream
from moekit.train.finetune import (
    FREEZE_POLICIES,
    FinetuneRecipe,
    apply_freeze,
    finetune,
    get_recipe,
    optimizer_state_bytes,
    prepare,
    trainable_report,
)
from moekit.train.trainer import make_optimizer

V, D = 64, 32


def tiny_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    moe = MoEConfig(d_model=D, num_experts=4, expert_hidden=32, num_shared_experts=1, shared_gate=True,
                    router=RouterConfig(top_k=2), loss=LossConfig(aux_coef=0.01))
    return MoETransformer(ModelConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=2, max_seq_len=32,
                                      dense_hidden=64, moe=moe, dropout=dropout))


def train_steps(model, opt, steps=3):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, V, (4, 10), generator=g)
        out = model(ids[:, :-1])
        loss = lm_loss(out.logits, ids[:, 1:]) + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("policy", list(FREEZE_POLICIES))
def test_frozen_parameters_get_no_update_grad_or_state(policy):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = set(apply_freeze(model, policy))
    groups = model.param_groups()
    assert frozen == {n for g in FREEZE_POLICIES[policy] for n in groups[g]}
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))  # the trainer's optimizer
    train_steps(model, opt)
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


def test_finetune_with_the_trainer_keeps_frozen_experts():
    model = tiny_model()
    data = TokenStream(torch.randint(0, V, (2000,), generator=torch.Generator().manual_seed(1)))
    recipe = get_recipe("moe", steps=4, batch_size=4)
    tuned, records, report = finetune(model, data, data, recipe, tcfg_overrides={"seq_len": 16, "eval_batches": 1})
    before = dict(model.named_parameters())
    for n, p in tuned.named_parameters():
        is_moe = ".experts." in n or ".router." in n
        assert torch.equal(p, before[n]) == is_moe, n
    assert records[-1]["split"] == "val" and math.isfinite(records[-1]["val_loss"])
    assert report["by_group"]["experts"]["trainable"] == 0 and report["by_group"]["dense"]["frozen"] == 0


def test_recipe_regularisation_is_applied():
    """Whatever the preset's values are, the prepared model's modules carry them (the tiny model has none)."""
    model = tiny_model()
    recipe = get_recipe("moe", capacity_factor=0.5)
    assert model.cfg.dropout != recipe.dropout and model.cfg.moe.expert_dropout != recipe.expert_dropout
    tuned = prepare(model, recipe)
    assert tuned.cfg.dropout == recipe.dropout
    assert [blk.drop.p for blk in tuned.layers] == [recipe.dropout] * len(tuned.layers)  # one per block
    for layer in tuned.moe_layers():
        assert layer.experts.dropout.p == recipe.expert_dropout
        assert layer.cfg.loss.aux_coef == recipe.aux_coef and layer.cfg.capacity.capacity_factor == 0.5
    tuned.train()
    ids = torch.randint(0, V, (2, 16))
    assert float(tuned(ids).moe_aux[0].dropped_fraction) > 0.0  # token dropping is active in training
    tuned.eval()
    assert float(tuned(ids).moe_aux[0].dropped_fraction) == 0.0
    torch.testing.assert_close(tuned(ids).logits, model.eval()(ids).logits)  # same weights, eval dropless
    with torch.no_grad():  # aux loss off (z_coef is 0 in this model): no router loss at all
        assert float(model.train()(ids).aux_loss) > 0
        assert float(prepare(model, FinetuneRecipe(aux_coef=0.0)).train()(ids).aux_loss) == 0.0
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
