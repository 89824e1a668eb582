"""Distillation MoE -> dense: the dense twin (same attention, one FFN of the active width) learns from
the MoE teacher's soft targets.

Loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"):
    L = alpha * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)) + (1 - alpha) * CE(z_s, y)
The tau^2 factor keeps the soft-target gradients on the scale of the hard-target ones as tau grows
(the soft gradients shrink as 1/tau^2). Switch Transformer (Fedus et al. 2021, sec. 5) distils sparse
models into dense ones this way and keeps ~30% of the sparse model's quality gain.

Gain retained, how much of the MoE's improvement over a dense model trained from scratch with the
same budget the student keeps:  (L_dense_scratch - L_student) / (L_dense_scratch - L_moe).

Legend: T tokens, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.config import TrainConfig
from moekit.errors import UsageError
from moekit.models.decoder import MoETransformer
from moekit.train.data import TokenStream
from moekit.train.trainer import evaluate, train


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, *, alpha: float = 0.5,
            temperature: float = 2.0, ignore_index: int = -100) -> Tensor:
    """The Hinton KD loss above, averaged over tokens whose target is not ``ignore_index``.
    Logits [..., V], targets [...]; the teacher is treated as a constant."""
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"alpha={alpha!r}: must be in [0, 1] (weight of the soft-target term)")
    if not temperature > 0:
        raise UsageError(f"temperature={temperature!r}: must be > 0")
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != targets.shape:
        raise ValueError(f"student/teacher logits must have shape [..., V] and targets [...]: got "
                         f"{tuple(student_logits.shape)}, {tuple(teacher_logits.shape)}, {tuple(targets.shape)}")
    V = student_logits.shape[-1]
    s_TV, t_TV, y_T = student_logits.reshape(-1, V).float(), teacher_logits.reshape(-1, V).float(), targets.reshape(-1)
    mask_T = y_T != ignore_index
    n = mask_T.sum().clamp_min(1)
    log_p_s = F.log_softmax(s_TV / temperature, dim=-1)
    log_p_t = F.log_softmax(t_TV.detach() / temperature, dim=-1)
    kl_T = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    soft = (kl_T * mask_T).sum() / n * temperature**2
    hard = F.cross_entropy(s_TV, y_T, ignore_index=ignore_index, reduction="sum") / n
    return alpha * soft + (1.0 - alpha) * hard


def gain_retained(loss_dense_scratch: float, loss_student: float, loss_moe: float) -> float:
    """(L_dense_scratch - L_student) / (L_dense_scratch - L_moe): 1 = the student matches the MoE,
    0 = no better than training the dense model directly. NaN if the MoE has no gain."""
    gain = loss_dense_scratch - loss_moe
    return (loss_dense_scratch - loss_student) / gain if gain > 0 else float("nan")


def kd_loss_fn(teacher: MoETransformer, *, alpha: float = 0.5, temperature: float = 2.0):
    """A trainer ``loss_fn(out, x, y)``: ``kd_loss`` against the teacher's logits on the same batch (no grad)."""
    def loss_fn(out, x, y):
        with torch.no_grad():
            t = teacher(x).logits
        return kd_loss(out.logits, t, y, alpha=alpha, temperature=temperature)

    return loss_fn


def distill(teacher: MoETransformer, train_data: TokenStream, val_data: TokenStream | None, tcfg: TrainConfig, *,
            alpha: float = 0.5, temperature: float = 2.0, **train_kwargs) -> tuple[MoETransformer, list[dict]]:
    """Train the teacher's dense twin (``ModelConfig.dense_twin()``) from scratch on ``kd_loss`` against
    the frozen teacher's logits on the same batches; ``train_kwargs`` go to ``trainer.train``.
    Returns (student, trainer records)."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(tcfg.seed)
    student = MoETransformer(teacher.cfg.dense_twin())
    loss_fn = kd_loss_fn(teacher, alpha=alpha, temperature=temperature)
    records = train(student, train_data, val_data, tcfg, loss_fn=loss_fn, **train_kwargs)
    return student, records


@dataclass
class DistillReport:
    """The KD student, the from-scratch dense twin (same seed, steps and batches; None if skipped), their
    validation losses next to the teacher's, the gain retained and the training seconds of each."""

    student: MoETransformer
    scratch: MoETransformer | None
    loss_teacher: float
    loss_student: float
    loss_scratch: float | None
    seconds_student: float
    seconds_scratch: float | None

    @property
    def gain_retained(self) -> float:
        return float("nan") if self.loss_scratch is None else gain_retained(self.loss_scratch, self.loss_student,
                                                                            self.loss_teacher)


def distill_vs_scratch(teacher: MoETransformer, train_data: TokenStream, val_batches: list, tcfg: TrainConfig, *,
                       alpha: float = 0.5, temperature: float = 2.0, scratch: bool = True,
                       out_dir: str | Path | None = None, **train_kwargs) -> DistillReport:
    """Distil ``teacher`` into its dense twin and train the same dense twin from scratch on the same seed,
    steps and batches (the baseline the gain is measured against); evaluate all three on ``val_batches``.
    ``out_dir``: checkpoints go to out_dir/student and out_dir/scratch; ``train_kwargs`` go to ``train``."""
    runs = {}
    for name in ("student", "scratch") if scratch else ("student",):
        kw = dict(train_kwargs, out_dir=Path(out_dir) / name if out_dir is not None else None, label=name)
        t0 = time.perf_counter()
        if name == "student":
            model, _ = distill(teacher, train_data, None, tcfg, alpha=alpha, temperature=temperature, **kw)
        else:
            torch.manual_seed(tcfg.seed)
            model = MoETransformer(teacher.cfg.dense_twin())
            train(model, train_data, None, tcfg, **kw)
        runs[name] = (model.eval(), time.perf_counter() - t0, evaluate(model, val_batches))
    sc = runs.get("scratch", (None, None, None))
    return DistillReport(runs["student"][0], sc[0], evaluate(teacher, val_batches), runs["student"][2], sc[2],
                         runs["student"][1], sc[1])
