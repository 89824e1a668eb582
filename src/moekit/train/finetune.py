"""Fine-tuning recipes for MoE models: what to freeze, how much dropout, aux loss, token dropping.

Guidance from the papers, encoded in ``RECIPES``:
- ST-MoE (Zoph et al. 2022, sec. 4): sparse models overfit more easily than dense ones when
  fine-tuned; they prefer *smaller batches and higher learning rates* than their dense counterparts
  (dense models the opposite); updating only the non-MoE parameters works about as well as updating
  all of them (and updating only the MoE parameters is clearly worse); dropping 10-15% of tokens by a
  capacity limit during fine-tuning does not hurt and can regularise.
- Switch Transformer (Fedus et al. 2021, sec. 2.4 / table 4): "expert dropout" - a higher dropout
  inside the experts (0.4) than in the dense layers (0.1) - fine-tunes best.

Freeze policies (parameter groups as classified by ``MoETransformer.param_groups``):
  "none":    train everything;
  "moe":     freeze the MoE parameters (routed experts and routers), train the rest (ST-MoE's finding);
  "experts": freeze only the routed experts (routers keep adapting to the new data);
  "non_moe": freeze everything but the routed experts and routers.
Frozen parameters get requires_grad=False and are left out of the optimizer, so neither gradients
nor Adam moments (2 tensors per parameter) are ever allocated for them.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from moekit.config import ConfigError, ModelConfig, MoEConfig, TrainConfig, check, spec, validate
from moekit.deploy import moe_layers, replace_module
from moekit.deploy.layout import build_model, model_layout
from moekit.layers.moe import MoELayer
from moekit.models.decoder import MoETransformer
from moekit.train.data import TokenStream
from moekit.train.trainer import train

FREEZE_POLICIES = {"none": (), "moe": ("experts", "router"), "experts": ("experts",),
                   "non_moe": ("shared", "dense")}


@dataclass(kw_only=True)
class FinetuneRecipe:
    """A fine-tuning recipe; fields None keep what the model already has."""

    freeze: str = spec("none", choices=tuple(FREEZE_POLICIES))
    lr: float = spec(3e-4, gt=0)
    batch_size: int = spec(16, ge=1)
    steps: int = spec(200, ge=1)
    weight_decay: float = spec(0.0, ge=0)
    warmup_steps: int = spec(10, ge=0)
    dropout: float | None = spec(None, ge=0, lt=1)  # dense dropout (attention and FFN outputs on the residual stream)
    expert_dropout: float | None = spec(None, ge=0, lt=1)  # dropout inside routed experts
    aux_coef: float | None = spec(None, ge=0)  # load-balancing loss coefficient (0 = off)
    capacity_factor: float | None = spec(None, gt=0, note="or None for dropless")  # token dropping as regulariser

    def __post_init__(self) -> None:
        validate(self)


# The dense baseline and MoE variants relative to it: MoE gets half the batch and 3x the LR (ST-MoE
# sec. 4.3 direction; the exact factors are ours), expert dropout 0.4 vs dense 0.1 (Switch table 4),
# capacity factor 1.0 drops the overflow beyond a balanced share (ST-MoE sec. 4.4), aux loss kept on.
RECIPES: dict[str, FinetuneRecipe] = {
    "dense": FinetuneRecipe(freeze="none", lr=3e-4, batch_size=16, dropout=0.1, expert_dropout=0.1),
    "moe": FinetuneRecipe(freeze="moe", lr=1e-3, batch_size=8, dropout=0.1, expert_dropout=0.4,
                          aux_coef=0.01, capacity_factor=1.0),
    "moe_full": FinetuneRecipe(freeze="none", lr=1e-3, batch_size=8, dropout=0.1, expert_dropout=0.4,
                               aux_coef=0.01, capacity_factor=1.0),
    "moe_experts_only": FinetuneRecipe(freeze="non_moe", lr=1e-3, batch_size=8, dropout=0.1, expert_dropout=0.4,
                                       aux_coef=0.01, capacity_factor=1.0),
}


def get_recipe(name: str, **overrides) -> FinetuneRecipe:
    """A preset from RECIPES with some fields replaced (None values ignored)."""
    if name not in RECIPES:
        raise ConfigError(f"recipe={name!r}: must be one of {sorted(RECIPES)}")
    return dataclasses.replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


def apply_freeze(model: MoETransformer, policy: str) -> list[str]:
    """Set requires_grad per ``policy``; returns the frozen parameter names."""
    check(policy in FREEZE_POLICIES, "FinetuneRecipe", "freeze", policy, f"must be one of {list(FREEZE_POLICIES)}")
    groups = model.param_groups()
    frozen = {n for g in FREEZE_POLICIES[policy] for n in groups[g]}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return sorted(frozen)


def finetune_config(cfg: ModelConfig, recipe: FinetuneRecipe) -> ModelConfig:
    """The model config with the recipe's dropout, expert dropout, aux-loss coefficient and training
    capacity (evaluation stays as configured, dropless by default)."""
    if recipe.dropout is not None:
        cfg = dataclasses.replace(cfg, dropout=recipe.dropout)
    return cfg if cfg.moe is None else dataclasses.replace(cfg, moe=finetune_moe_config(cfg.moe, recipe))


def finetune_moe_config(m: MoEConfig, recipe: FinetuneRecipe) -> MoEConfig:
    """One MoE layer's config with the recipe's expert dropout, aux-loss coefficient and training capacity."""
    if recipe.expert_dropout is not None:
        m = dataclasses.replace(m, expert_dropout=recipe.expert_dropout)
    if recipe.aux_coef is not None:
        m = dataclasses.replace(m, loss=dataclasses.replace(m.loss, aux_coef=recipe.aux_coef))
    if recipe.capacity_factor is not None:
        m = dataclasses.replace(m, capacity=dataclasses.replace(m.capacity, capacity_factor=recipe.capacity_factor))
    return m


def prepare(model: nn.Module, recipe: FinetuneRecipe) -> nn.Module:
    """A copy of ``model`` rebuilt with ``finetune_config`` (dropout modules, capacity and loss settings
    live in the config; pruned / merged / int8 layers keep their structure) holding the same weights, with
    the freeze policy applied.

    Other models holding MoELayers (a patched transformers model, ``interop.patched_lm``) keep their own
    modules; only their MoE layers are rebuilt with ``finetune_moe_config`` (the dense ``dropout`` is theirs)."""
    if isinstance(model, MoETransformer):
        layout = {name: dict(spec, config=finetune_moe_config(MoEConfig.from_dict(spec["config"]), recipe).to_dict())
                  for name, spec in model_layout(model, model.cfg.to_dict()).items()}
        tuned = build_model(finetune_config(model.cfg, recipe).to_dict(), layout).to(next(model.parameters()).device)
        tuned.load_state_dict(model.state_dict())
    else:
        tuned = copy.deepcopy(model)
        for name, layer in moe_layers(tuned).items():
            with torch.device("meta"):
                new = MoELayer(finetune_moe_config(layer.cfg, recipe))
            new.load_state_dict(layer.state_dict(), assign=True)  # the layer's own tensors, dtypes and device
            tuned = replace_module(tuned, name, new)
    apply_freeze(tuned, recipe.freeze)
    return tuned


def train_config(recipe: FinetuneRecipe, **overrides) -> TrainConfig:
    """The trainer settings of a recipe (``overrides``: other TrainConfig fields, e.g. seq_len)."""
    return TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                       weight_decay=recipe.weight_decay, warmup_steps=min(recipe.warmup_steps, recipe.steps),
                       **overrides)


def finetune(model: MoETransformer, train_data: TokenStream, val_data: TokenStream | None, recipe: FinetuneRecipe,
             **train_kwargs) -> tuple[MoETransformer, list[dict], dict]:
    """Fine-tune a copy of ``model`` with ``recipe``. ``train_kwargs``: ``tcfg_overrides`` (dict of
    TrainConfig fields) and anything ``trainer.train`` accepts (out_dir, hooks, progress, device).
    Returns (fine-tuned model, trainer records, ``trainable_report``)."""
    tuned = prepare(model, recipe)
    tcfg = train_config(recipe, **train_kwargs.pop("tcfg_overrides", {}))
    records = train(tuned, train_data, val_data, tcfg, **train_kwargs)
    return tuned, records, trainable_report(tuned)


def trainable_report(model: MoETransformer) -> dict:
    """Parameter counts per group (trainable / frozen) and the training memory the freezing saves:
    a frozen parameter has no gradient (1x its bytes) and no Adam moments (2x its bytes)."""
    params = dict(model.named_parameters())
    by_group = {g: {"trainable": sum(params[n].numel() for n in names if params[n].requires_grad),
                    "frozen": sum(params[n].numel() for n in names if not params[n].requires_grad)}
                for g, names in model.param_groups().items()}
    frozen_bytes = sum(p.numel() * p.element_size() for p in params.values() if not p.requires_grad)
    all_bytes = sum(p.numel() * p.element_size() for p in params.values())
    return {
        "total_params": sum(p.numel() for p in params.values()),
        "trainable_params": sum(p.numel() for p in params.values() if p.requires_grad),
        "by_group": by_group,
        "grad_and_adam_bytes_full": 3 * all_bytes,
        "grad_and_adam_bytes_saved": 3 * frozen_bytes,
    }


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes actually held by the optimizer's per-parameter state (measured, after a step)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v) and v.dim() > 0)
