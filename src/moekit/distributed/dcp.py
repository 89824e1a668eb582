"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): every rank writes only its shards,
and a checkpoint loads at any world size and layout (4 ranks -> 2 ranks -> 1 process), because each
tensor is stored with its global shape and every shard's offset in it.

Layout of a run folder (the same ``latest``, ``checkpoints.txt`` and rotation as single-process checkpoints):
    run/ckpt-000200/{.metadata, __<rank>_0.distcp, rng-<rank>.json, config.json, trainer_state.json,
                     tokenizer.json (the run folder's, if any), manifest.json}
    run/latest
Saving is atomic, with the single-process checkpoints' code (``train/manifest.py``): the ranks write into a
hidden temporary folder ``.ckpt-000200.tmp-dcp``; once every rank has finished, rank 0 writes the manifest
(sha256 of every file, checked on load like a single-process checkpoint's), renames the folder and only then
replaces ``latest``. With ``async_save`` the tensors are staged in memory and written by a background thread
(on its own gloo process group) while training goes on; the folder is published once the write completes
(``SaveHandle.wait``, at the latest before the next save).

RNG: every rank saves its own generators (``rng-<rank>.json``) and restores its own; see ``train/rng.py`` for
what a resume at another world size does.

Expert tensors: under expert parallelism a rank holds experts [ep_rank*L, (ep_rank+1)*L) of each layer,
FSDP-sharded over ``efsdp``. They are stored as DTensors over a (dp_replicate, ep, efsdp) view of the
mesh with placements (Replicate, Shard(0), Shard(0)): dim 0 split by ``ep`` first, then by ``efsdp``,
which is exactly where every rank's rows sit in the global [E, ...] tensor.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import shutil
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate, Shard

from moekit.errors import CheckpointError
from moekit.train.manifest import (
    move_into_place,
    read_json,
    record_checkpoint,
    remove_stale_temps,
    write_manifest,
)
from moekit.train.rng import resume_rng, rng_state
from moekit.train.tokenizer import FILE_NAME as TOKENIZER

log = logging.getLogger(__name__)

METADATA = ".metadata"
CONFIG, STATE = "config.json", "trainer_state.json"


def is_sharded(ckpt_dir: str | Path) -> bool:
    """Whether a checkpoint folder was written by DCP."""
    return (Path(ckpt_dir) / METADATA).is_file()


def is_shard_file(name: str) -> bool:
    """Whether a file of a sharded checkpoint folder is one that ``load`` reads (besides the JSON files)."""
    return name == METADATA or name.endswith(".distcp") or (name.startswith("rng-") and name.endswith(".json"))


def _rng_file(rank: int) -> str:
    return f"rng-{rank}.json"


# What a .metadata file written by torch.distributed.checkpoint refers to (module, name); nothing else is
# unpickled. Names are exact: pickle resolves dotted names attribute by attribute.
_METADATA_GLOBALS = {("pathlib", "PosixPath"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo")} | {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                      torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a DCP metadata file does not hold")


def _check_loadable(ckpt_dir: Path) -> None:
    """CheckpointError naming the file unless loading ``ckpt_dir`` with DCP unpickles nothing but plain data.

    NOTE: DCP's reader unpickles ``.metadata`` and its planner unpickles every non-tensor entry with
    ``torch.load(weights_only=False)``: either could run code from a checkpoint someone else wrote. Both are
    read here first, ``.metadata`` with an allow-list of DCP's own classes and each non-tensor entry with
    ``weights_only=True``; only then does DCP unpickle the same bytes."""
    file = ckpt_dir / METADATA
    try:
        with open(file, "rb") as f:
            md = _MetadataUnpickler(f).load()
        if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
            raise TypeError(f"holds a {type(md).__name__}")
        entries = [(index.fqn, info.relative_path, info.offset, info.length)
                   for index, info in md.storage_data.items()
                   if isinstance(md.state_dict_metadata.get(index.fqn), BytesStorageMetadata)]
        files = {info.relative_path for info in md.storage_data.values()}
    except Exception as e:  # anything unpickling or walking a damaged or foreign file raises
        raise CheckpointError(f"{file}: not a DCP metadata file moekit loads ({e})") from None
    for name in files:
        if not isinstance(name, str) or Path(name).name != name:
            raise CheckpointError(f"{file}: names {name!r}, not a file in {ckpt_dir}")
    for fqn, name, offset, length in entries:
        try:
            with open(ckpt_dir / name, "rb") as f:
                f.seek(offset)
                torch.load(io.BytesIO(f.read(length)), weights_only=True)
        except Exception as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{ckpt_dir / name}: entry {fqn!r} is not plain data ({why})") from None


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
    return sd, _global_experts(sd, plan, _key_of)


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
            if _rank() == 0:
                _publish(self.tmp, self.final, self.keep_last)
        return self.final


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _publish(tmp: Path, final: Path, keep_last: int) -> None:
    """Rank 0, once every rank's files are complete: DCP ends a save with a collective in which rank 0
    writes ``.metadata`` after gathering every rank's write results, so when rank 0's ``dcp.save`` (or its
    async future) returns, all shards (and the ``rng-<rank>.json`` each rank wrote before it) are on disk.
    Only then is the manifest computed, the folder renamed into place and ``latest`` pointed at it."""
    write_manifest(tmp, "moekit sharded checkpoint")
    move_into_place(tmp, final)
    record_checkpoint(final, keep_last)


def save(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, plan,
         model_config: dict, trainer_state: dict, *, async_save: bool = False, keep_last: int = 2) -> SaveHandle:
    """Collective: every rank calls it, after the previous save's ``wait()``. ``trainer_state`` must be
    JSON-serialisable (rank 0's is written). Returns a handle; with ``async_save`` call ``handle.wait()``
    before relying on the files."""
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{step:06d}"
    tmp = run_dir / f".{final.name}.tmp-dcp"  # the same name on every rank; a crash's leftover is removed below
    if _rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(run_dir)  # no save is in flight: the previous one was waited for
        tmp.mkdir()
        (tmp / CONFIG).write_text(json.dumps(model_config, indent=2))
        (tmp / STATE).write_text(json.dumps(dict(trainer_state, step=step, world_size=_world_size()), indent=2))
        if (run_dir / TOKENIZER).is_file():  # as in a single-process checkpoint: checksummed with the rest
            shutil.copyfile(run_dir / TOKENIZER, tmp / TOKENIZER)
    if dist.is_initialized():
        dist.barrier()
    (tmp / _rng_file(_rank())).write_text(json.dumps(rng_state()))
    _, sd = _state(model, optimizer, plan)
    if async_save:
        group = plan.mesh.checkpoint_group if plan is not None else None
        return SaveHandle(tmp, final, dcp.async_save(sd, checkpoint_id=str(tmp), process_group=group), keep_last)
    dcp.save(sd, checkpoint_id=str(tmp))
    if _rank() == 0:
        _publish(tmp, final, keep_last)
    if dist.is_initialized():
        dist.barrier()  # nobody resumes from or lists the folder before it is in place
    return SaveHandle(tmp, final, None, keep_last)


def load(ckpt_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, plan) -> dict:
    """Load a DCP checkpoint saved at any world size into ``model`` (sharded by ``plan``, or whole when
    ``plan`` is None) and ``optimizer``; restores this rank's RNG streams (``train/rng.py``); returns the trainer
    state (with ``step``)."""
    ckpt_dir = Path(ckpt_dir)
    if not is_sharded(ckpt_dir):
        raise CheckpointError(f"{str(ckpt_dir)!r} is not a sharded (DCP) checkpoint: no {METADATA} file")
    _check_loadable(ckpt_dir)
    sd, view = _state(model, optimizer, plan)
    dcp.load(view, checkpoint_id=str(ckpt_dir))
    # tensors were loaded in place (the views share storage); non-tensor entries only into ``view``
    set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        sd["optim"]["param_groups"] = view["optim"]["param_groups"]
        set_optimizer_state_dict(model, optimizer, sd["optim"])
    state = read_json(ckpt_dir / STATE)
    saved_ranks = state.pop("world_size")
    saved = read_json(ckpt_dir / _rng_file(_rank())) if _rank() < saved_ranks else None
    resume_rng(saved, state["step"], _rank(), saved_ranks, _world_size())
    return state


def load_full_model_state(ckpt_dir: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (single-process) state dict of a sharded checkpoint, read in one process into ``model``'s
    tensors (e.g. for ``moekit convert``)."""
    _check_loadable(Path(ckpt_dir))
    sd = {"model": model.state_dict()}
    dcp.load(sd, checkpoint_id=str(ckpt_dir))
    return sd["model"]
