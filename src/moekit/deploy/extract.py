"""Task sub-network extraction.

Extraction: run the model on a task's data, keep in every MoE layer only the experts whose load share
is >= a threshold (``prune.select_experts``), drop the rest. Task-specific expert usage is skewed
(Chen et al. 2023 "Task-Specific Expert Pruning for Sparse Mixture-of-Experts"; Kudugunta et al. 2021
"Beyond Distillation: Task-level Mixture-of-Experts"), so a small sub-network often keeps the task's
quality at a fraction of the size.

The result is saved like every model: ``moekit.train.checkpoint.save_model`` (layers.json records the
experts kept per layer) and read back by ``moekit.train.checkpoint.load_model``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor, nn

from moekit.deploy.prune import measure_loads, prune_model


def extract_task(model: nn.Module, task_batches: Iterable, min_share: float = 0.05,
                 forward: Callable | None = None) -> tuple[nn.Module, dict[str, list[int]], dict[str, Tensor]]:
    """Keep the experts with load share >= ``min_share`` on ``task_batches``; edits ``model`` in place.
    Returns (model, kept experts per layer, measured loads)."""
    loads = measure_loads(model, task_batches, forward)
    model, kept = prune_model(model, loads, min_share=min_share)
    return model, kept, loads
