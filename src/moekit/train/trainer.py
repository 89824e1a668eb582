"""The training loop, readable top to bottom (nanoGPT style):

    lr(step) -> [forward -> loss = LM loss + router losses -> backward] x grad_accum -> clip -> AdamW step
    -> hooks (router bias update, metrics) -> periodic eval and atomic checkpoint

Determinism: the batch at step i depends only on (seed, i); checkpoints hold weights, optimizer state
and RNG state, so ``resume=True`` reproduces an uninterrupted run's losses exactly.

Stopping: ``should_stop()`` is asked after every step (the CLI sets it from SIGINT/SIGTERM). When it says
yes, the step is finished, a checkpoint is saved (with ``out_dir``) and ``TrainingInterrupted`` is raised.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.analysis.routing_stats import imbalance
from moekit.config import ModelConfig, TrainConfig
from moekit.device import model_device, resolve_device
from moekit.distributed import dcp
from moekit.errors import UsageError
from moekit.models.decoder import lm_loss
from moekit.train.checkpoint import load_checkpoint, newest_intact, save_checkpoint
from moekit.train.data import TokenStream
from moekit.train.manifest import remove_stale_temps
from moekit.train.rng import resume_rng, rng_state

log = logging.getLogger(__name__)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at cfg.steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def train_flops_per_token(model, seq_len: int) -> float:
    """6 * (active non-embedding params + LM head) + 6 * n_layers * seq_len * d_attn  (Kaplan et al. 2020,
    C = 6N per token for forward + backward; attention scores counted without the causal halving)."""
    cfg: ModelConfig = model.cfg
    n = model.num_active_params(exclude_embeddings=True) + cfg.vocab_size * cfg.d_model
    return 6.0 * n + 6.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable params; no weight decay on vectors (norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("model has no trainable parameters (everything is frozen): unfreeze some (e.g. --freeze none)")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def evaluate(model, batches: list, bf16: bool = False) -> float:
    """Mean LM loss (no router losses) over fixed batches."""
    was_training = model.training
    model.eval()
    total = 0.0
    device = model_device(model)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(bf16, x.device):
            total += lm_loss(model(x).logits, y).item()
    model.train(was_training)
    return total / max(len(batches), 1)


def autocast(bf16: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class TrainingInterrupted(Exception):
    """``train`` stopped early because ``should_stop()`` said so; ``checkpoint`` holds step ``step``
    (None without ``out_dir``)."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"training stopped after step {step}"
                         + (f"; checkpoint {checkpoint}" if checkpoint else " (no out_dir: nothing saved)"))
        self.step, self.checkpoint = step, checkpoint


@dataclass
class StepContext:
    """What hooks see after each optimizer step."""

    model: torch.nn.Module
    step: int  # number of optimizer steps done
    counts_per_layer: list[torch.Tensor] = field(default_factory=list)  # expert loads summed over micro-batches
    record: dict | None = None  # the logged train record (on log steps)
    eval_record: dict | None = None


def train(model, train_data: TokenStream, val_data: TokenStream | None, cfg: TrainConfig, *,
          out_dir: str | Path | None = None, hooks: list = (), resume: bool | str | Path = False,
          progress=False, device: str | torch.device = "cpu", label: str = "train", parallel=None,
          loss_fn=None, should_stop=None, async_save: bool = False) -> list[dict]:
    """Train ``model`` in place; returns the logged records (train and eval).

    ``should_stop() -> bool``: asked after every step; True saves a checkpoint and raises
    ``TrainingInterrupted`` (see the module docstring).

    ``progress``: True shows a progress bar for this run; a tqdm bar shared by several runs is advanced
    (and labelled) instead, and left open.

    ``loss_fn(output, x, y) -> loss`` replaces the LM loss (e.g. knowledge distillation); router losses
    are still added.

    ``resume``: True continues from the newest intact checkpoint in ``out_dir`` (damaged newer ones are
    logged as warnings and skipped); a checkpoint path continues from that one (already checked by the caller).

    ``parallel``: the ``ParallelPlan`` returned by ``moekit.distributed.parallelize(model, mesh)``. Each rank
    then trains on its 1/W of every batch (``batch_size`` stays the global batch), FSDP reduces the
    gradients, logged values are global, and checkpoints are sharded (DCP: every rank writes its shards,
    ``async_save`` writes them in the background); they resume at any world size, and a single-process
    checkpoint resumes under a plan too.
    """
    device = resolve_device(device)
    model.to(device).train()
    opt = make_optimizer(model, cfg)
    start = 0
    if out_dir is not None:
        remove_stale_temps(out_dir)  # left by a save that was killed
    if resume:
        if out_dir is None:
            raise UsageError("resume=True needs out_dir (the run folder holding the checkpoints)")
        ckpt = resume
        if resume is True:
            ckpt, damaged = newest_intact(out_dir)
            for path, why in damaged:
                log.warning("checkpoint %s is damaged (%s); resuming from %s", path, why, ckpt)
        if dcp.is_sharded(ckpt):  # any world size, into this layout
            state = dcp.load(ckpt, model, opt, parallel)
        else:
            _, tensors, state = load_checkpoint(ckpt, verify=resume is True)
            if parallel is not None:  # a single-process checkpoint: this rank's experts and shards
                parallel.load_full_state_dict(tensors)
                opt.load_state_dict(parallel.shard_optimizer_state_dict(state["optimizer"], opt))
            else:
                model.load_state_dict(tensors, strict=False)
                opt.load_state_dict(state["optimizer"])
            # a single-process checkpoint holds one rank's streams: rank 0's under a plan
            rank, ranks = (parallel.mesh.rank, parallel.mesh.world_size) if parallel is not None else (0, 1)
            resume_rng(state["rng"] if rank == 0 else None, state["step"], rank, 1, ranks)
        start = state["step"]
        for hook in hooks:
            if hasattr(hook, "after_resume"):
                hook.after_resume(start)
    else:
        torch.manual_seed(cfg.seed)  # dropout / router noise; a resumed run restores the saved RNG instead
    flops_per_token = train_flops_per_token(model, cfg.seq_len)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    val_batches = val_data.eval_batches(cfg.eval_batches, cfg.batch_size, cfg.seq_len) if val_data else []
    records: list[dict] = []
    bar, own_bar = _progress_bar(progress, start, cfg.steps, label)
    t_last, tokens_since = time.perf_counter(), 0
    saving = None  # the sharded save in flight

    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        lm_total = aux_total = 0.0
        counts: list[torch.Tensor] = []
        dropped = []
        for micro in range(cfg.grad_accum):
            x, y = train_data.batch(step * cfg.grad_accum + micro, cfg.batch_size, cfg.seq_len, cfg.seed)
            if parallel is not None:
                x, y = parallel.local_batch(x), parallel.local_batch(y)
            x, y = x.to(device), y.to(device)
            with autocast(cfg.bf16, device):
                out = model(x)
                loss = lm_loss(out.logits, y) if loss_fn is None else loss_fn(out, x, y)
            ((loss + out.aux_loss) / cfg.grad_accum).backward()
            lm_total += loss.item() / cfg.grad_accum
            aux_total += out.aux_loss.item() / cfg.grad_accum
            layer_counts = [a.counts_E.detach() for a in out.moe_aux]
            counts = layer_counts if not counts else [c + d for c, d in zip(counts, layer_counts)]
            dropped += [float(a.dropped_fraction) for a in out.moe_aux]
        stop = float(should_stop is not None and should_stop())
        if parallel is not None:
            # the stop request rides on this all-reduce: every rank stops after the same step, no extra collective
            lm_total, aux_total, stop, *dropped = parallel.mean_over_ranks([lm_total, aux_total, stop, *dropped])
            counts = parallel.sum_over_ranks(counts)  # global loads: replicated router biases stay identical
        clip = parallel.clip_grad_norm_ if parallel is not None else functools.partial(
            torch.nn.utils.clip_grad_norm_, [p for p in model.parameters() if p.requires_grad])
        grad_norm = clip(cfg.grad_clip).item() if cfg.grad_clip > 0 else float("nan")
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_since += tokens_per_step
        done = step + 1

        ctx = StepContext(model, done, counts)
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.perf_counter()
            imb = [imbalance(c) for c in counts]
            ctx.record = {"split": "train", "step": done, "loss": lm_total, "aux_loss": aux_total, "lr": lr,
                          "grad_norm": grad_norm, "tokens": done * tokens_per_step,
                          "flops": done * tokens_per_step * flops_per_token,
                          "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
                          "imbalance": sum(imb) / len(imb) if imb else 1.0,
                          "dropped": sum(dropped) / len(dropped) if dropped else 0.0}
            records.append(ctx.record)
            t_last, tokens_since = now, 0
            if bar is not None:
                bar.set_postfix(loss=f"{lm_total:.3f}", tok_s=f"{ctx.record['tokens_per_s']:.0f}",
                                imb=f"{ctx.record['imbalance']:.2f}")
        for hook in hooks:
            if hasattr(hook, "after_step"):
                hook.after_step(ctx)

        if val_batches and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            val_loss = evaluate(model, val_batches, cfg.bf16)
            ctx.eval_record = {"split": "val", "step": done, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
                               "tokens": done * tokens_per_step, "flops": done * tokens_per_step * flops_per_token}
            records.append(ctx.eval_record)
            for hook in hooks:
                if hasattr(hook, "after_eval"):
                    hook.after_eval(ctx)
        saved = None
        if out_dir is not None and ((cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps or stop):
            if parallel is None:
                saved = save_checkpoint(out_dir, done, model, model.cfg,
                                        {"optimizer": opt.state_dict(), "rng": rng_state(), "train_config": vars(cfg)})
            else:  # collective: every rank writes its shards
                if saving is not None:
                    saving.wait()
                saving = dcp.save(out_dir, done, model, opt, parallel, model.cfg.to_dict(),
                                  {"train_config": vars(cfg)}, async_save=async_save)
                saved = saving.final
        if bar is not None:
            bar.update(1)
        if stop and done < cfg.steps:
            if saving is not None:
                saving.wait()
            if own_bar:
                bar.close()
            raise TrainingInterrupted(done, saved)
    if saving is not None:
        saving.wait()
    if own_bar:
        bar.close()
    return records


def _progress_bar(progress, start: int, total: int, label: str):
    """-> (bar or None, whether this run owns it)."""
    if isinstance(progress, bool) or progress is None:
        if not progress:
            return None, False
        from tqdm import tqdm

        return tqdm(total=total, initial=start, desc=label, dynamic_ncols=True, leave=True), True
    progress.set_description(label)
    return progress, False
