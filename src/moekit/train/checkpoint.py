"""Atomic checkpoints: safetensors weights + JSON config + optimizer/RNG/trainer state.

Layout of a run folder:
    run/ckpt-000200/{model.safetensors, config.json, trainer_state.pt}
    run/latest            (text file naming the newest complete checkpoint folder)
A checkpoint is written into a temporary folder beside its final name, every file fsynced, then the
folder is renamed (atomic on POSIX) and only then ``latest`` is replaced (os.replace, atomic). A crash
at any moment leaves ``latest`` pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moekit.config import ModelConfig
from moekit.errors import CheckpointError

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def model_tensors(model: torch.nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """state_dict (or the given one, e.g. gathered from expert-parallel ranks) with tied tensors stored once
    (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, t in (model.state_dict() if state_dict is None else state_dict).items():
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, model_cfg: ModelConfig,
                    trainer_state: dict | None = None, keep_last: int = 2,
                    state_dict: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=run_dir))
    try:
        save_file(model_tensors(model, state_dict), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model_cfg.to_dict(), indent=2))
        torch.save(dict(trainer_state or {}, step=step), tmp / "trainer_state.pt")
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step: move the old one aside first
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(run_dir)
    pointer_tmp = run_dir / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name)
    _fsync_file(pointer_tmp)
    os.replace(pointer_tmp, run_dir / LATEST)
    _fsync_dir(run_dir)
    for old in sorted(run_dir.glob("ckpt-*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder whose ``latest`` names one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} is not a moekit checkpoint (expected model.safetensors and "
                                f"config.json, or a run folder with a '{LATEST}' file)")
    return path


def tokenizer_path(path: str | Path) -> Path:
    """The tokenizer.json of a checkpoint: in the given folder, the checkpoint folder or its run folder."""
    ckpt = resolve_checkpoint(path)
    found = next((d / "tokenizer.json" for d in (Path(path), ckpt, ckpt.parent) if (d / "tokenizer.json").is_file()),
                 None)
    if found is None:
        raise CheckpointError(f"no tokenizer.json beside checkpoint {str(ckpt)!r}")
    return found


def load_checkpoint(path: str | Path, map_location: str = "cpu"):
    """-> (ModelConfig, model state dict, trainer state dict)."""
    ckpt = resolve_checkpoint(path)
    cfg = ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    tensors = load_file(str(ckpt / "model.safetensors"), device=map_location)
    state_file = ckpt / "trainer_state.pt"
    state = torch.load(state_file, map_location=map_location, weights_only=False) if state_file.is_file() else {}
    return cfg, tensors, state


def load_model(path: str | Path, map_location: str = "cpu"):
    """Build the model from a checkpoint's config and load its weights (tied weights re-tied)."""
    from moekit.models.decoder import MoETransformer

    cfg, tensors, _ = load_checkpoint(path, map_location)
    model = MoETransformer(cfg)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint {str(path)!r} does not match its config: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    return model
