"""Which device a command runs on: ``--device auto|cpu|cuda`` (``auto`` = the current CUDA device when one
is available, else the CPU)."""

from __future__ import annotations

import torch

from moekit.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise UsageError(f"--device={name!r}: expected one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device={name!r}: torch reports no CUDA device (torch {torch.__version__}); "
                         f"use --device cpu")
    return torch.device(name)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for a model without tensors."""
    t = next(model.parameters(), None)
    if t is None:
        t = next(model.buffers(), None)
    return t.device if t is not None else torch.device("cpu")
