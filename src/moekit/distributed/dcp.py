"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): every rank writes only its shards,
and a checkpoint loads at any world size and layout (4 ranks -> 2 ranks -> 1 process), because each
tensor is stored with its global shape and every shard's offset in it.

Layout of a run folder (the same ``latest`` pointer as single-process checkpoints):
    run/ckpt-000200/{.metadata, __<rank>_0.distcp, config.json, trainer_state.json}
    run/latest
Saving is atomic: the ranks write into a hidden temporary folder, then rank 0 adds the JSON files,
renames the folder and only then replaces ``latest``. With ``async_save`` the tensors are staged in
memory and written by a background thread (on its own gloo process group) while training goes on;
the folder is renamed once the write completes (``SaveHandle.wait``, at the latest before the next save).

Expert tensors: under expert parallelism a rank holds experts [ep_rank*L, (ep_rank+1)*L) of each layer,
FSDP-sharded over ``efsdp``. They are stored as DTensors over a (dp_replicate, ep, efsdp) view of the
mesh with placements (Replicate, Shard(0), Shard(0)): dim 0 split by ``ep`` first, then by ``efsdp``,
which is exactly where every rank's rows sit in the global [E, ...] tensor.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate, Shard

from moekit.errors import CheckpointError

LATEST = "latest"
METADATA = ".metadata"


def is_sharded(ckpt_dir: str | Path) -> bool:
    """Whether a checkpoint folder was written by DCP."""
    return (Path(ckpt_dir) / METADATA).is_file()


def _global_experts(sd: dict, plan, key_of) -> dict:
    """A copy of ``sd`` with every expert-shard tensor re-described as its global [E, ...] DTensor (same
    storage: loading into it writes into the parameter or optimizer state). ``key_of(path)`` names the
    parameter a (nested) entry belongs to, or None."""
    if plan is None:
        return sd
    mesh = plan.mesh.checkpoint_mesh

    def convert(path: tuple, v):
        if isinstance(v, dict):
            return {k: convert(path + (k,), x) for k, x in v.items()}
        key = key_of(path)
        if key not in plan.expert_keys or not isinstance(v, DTensor) or v.dim() == 0:
            return v
        shape = (plan.expert_keys[key], *v.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(v.to_local(), mesh, [Replicate(), Shard(0), Shard(0)], run_check=False,
                                  shape=torch.Size(shape), stride=stride)

    return convert((), sd)


def _key_of(path: tuple) -> str | None:
    """The parameter FQN of an entry: ("model", fqn) or ("optim", "state", fqn, "exp_avg")."""
    if path[:1] == ("model",) and len(path) == 2:
        return path[1]
    if path[:2] == ("optim", "state") and len(path) == 4:
        return path[2]
    return None


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None, plan) -> tuple[dict, dict]:
    """(state dict as torch's state_dict API gives it, the same with expert tensors in the global view)."""
    sd = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        sd["optim"] = get_optimizer_state_dict(model, optimizer)
    sd["rng"] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        sd["rng"]["cuda"] = torch.cuda.get_rng_state()
    return sd, _global_experts(sd, plan, _key_of)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class SaveHandle:
    """A save in flight (async) or done. ``wait()`` finishes it: the folder is renamed into place and
    ``latest`` points at it (rank 0); idempotent."""

    tmp: Path
    final: Path
    future: Future | None
    keep_last: int

    def wait(self) -> Path:
        if self.future is not None:
            self.future.result()
            self.future = None
            if _is_main():
                _publish(self.tmp, self.final, self.keep_last)
        return self.final


def _publish(tmp: Path, final: Path, keep_last: int) -> None:
    """Rename the complete folder into place, then point ``latest`` at it (both atomic on POSIX)."""
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # re-saving the same step: the old one goes first
        shutil.rmtree(final)
    os.rename(tmp, final)
    run_dir = final.parent
    _fsync(run_dir)
    pointer = run_dir / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    _fsync(pointer)
    os.replace(pointer, run_dir / LATEST)
    _fsync(run_dir)
    for old in sorted(run_dir.glob("ckpt-*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def save(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, plan,
         model_config: dict, trainer_state: dict, *, async_save: bool = False, keep_last: int = 2) -> SaveHandle:
    """Collective: every rank calls it. ``trainer_state`` must be JSON-serialisable (rank 0's is written).
    Returns a handle; with ``async_save`` call ``handle.wait()`` before relying on the files."""
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{step:06d}"
    tmp = run_dir / f".{final.name}.tmp"
    if _is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(model_config, indent=2))
        (tmp / "trainer_state.json").write_text(json.dumps(
            dict(trainer_state, step=step, python_rng=_python_rng_to_json()), indent=2))
    if dist.is_initialized():
        dist.barrier()
    _, sd = _state(model, optimizer, plan)
    if async_save:
        group = plan.mesh.checkpoint_group if plan is not None else None
        return SaveHandle(tmp, final, dcp.async_save(sd, checkpoint_id=str(tmp), process_group=group), keep_last)
    dcp.save(sd, checkpoint_id=str(tmp))
    if _is_main():
        _publish(tmp, final, keep_last)
    if dist.is_initialized():
        dist.barrier()  # nobody resumes from or lists the folder before it is in place
    return SaveHandle(tmp, final, None, keep_last)


def load(ckpt_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, plan) -> dict:
    """Load a DCP checkpoint saved at any world size into ``model`` (sharded by ``plan``, or whole when
    ``plan`` is None) and ``optimizer``; restores the RNG; returns the trainer state (with ``step``)."""
    ckpt_dir = Path(ckpt_dir)
    if not is_sharded(ckpt_dir):
        raise CheckpointError(f"{str(ckpt_dir)!r} is not a sharded (DCP) checkpoint: no {METADATA} file")
    sd, view = _state(model, optimizer, plan)
    dcp.load(view, checkpoint_id=str(ckpt_dir))
    # tensors were loaded in place (the views share storage); non-tensor entries only into ``view``
    set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        sd["optim"]["param_groups"] = view["optim"]["param_groups"]
        set_optimizer_state_dict(model, optimizer, sd["optim"])
    torch.set_rng_state(sd["rng"]["torch"])
    if "cuda" in sd["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(sd["rng"]["cuda"])
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    _python_rng_from_json(state.pop("python_rng"))
    return state


def load_full_model_state(ckpt_dir: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (single-process) state dict of a sharded checkpoint, read in one process into ``model``'s
    tensors (e.g. for ``moekit convert``)."""
    sd = {"model": model.state_dict()}
    dcp.load(sd, checkpoint_id=str(ckpt_dir))
    return sd["model"]


def _python_rng_to_json() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _python_rng_from_json(state: list) -> None:
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))
