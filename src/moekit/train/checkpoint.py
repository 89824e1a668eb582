"""The one model format: every folder moekit writes (training checkpoints, finetune / distill runs, prune /
merge / extract / upcycle / convert outputs) is read by ``load_model``, and so is a Hugging Face model folder
(config.json with a ``model_type``, as ``save_pretrained`` writes it): transformers loads it and its MoE blocks
are patched with moekit's layers (``interop.patched_lm``), so every command that takes a model takes one.

A model folder holds
    model.safetensors      parameters and buffers (tied tensors once)
    config.json            the ModelConfig the (untransformed) model is built from
    layers.json            optional: MoE layers the config alone does not describe (pruned, merged, int8)
    trainer_state.json     optional: step, RNG states, optimizer hyper-parameters, notes (JSON, never pickle)
    optimizer.safetensors  optional: the optimizer's tensors (AdamW moments)
    tokenizer.json         optional: the tokenizer the model was trained with
    manifest.json          size and sha256 of every other file, written last; checked on load
Nothing in a folder is unpickled, so loading one cannot run code.

A run folder holds model folders ``ckpt-NNNNNN`` (single-process, or sharded: see ``distributed/dcp.py``),
``checkpoints.txt`` (their names in the order they were written), ``latest`` (the newest) and the run's
tokenizer and metrics. Every folder is written into a temporary folder beside its final name, every file
fsynced, then renamed (atomic on POSIX); ``latest`` is replaced (os.replace, atomic) only after that, so a
crash at any moment leaves ``latest`` naming a complete checkpoint. Temporary folders left by a crash are
removed at the next save (and when training starts). ``train/manifest.py`` does all of this, for both kinds.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from moekit.config import ModelConfig
from moekit.deploy.layout import build_model, build_transformer, model_layout
from moekit.errors import CheckpointError, ConfigError, UsageError
from moekit.train.manifest import (
    LATEST,
    history,
    move_into_place,
    read_json,
    record_checkpoint,
    remove_stale_temps,
    verify_manifest,
    write_manifest,
)
from moekit.train.tokenizer import FILE_NAME as TOKENIZER

log = logging.getLogger(__name__)

WEIGHTS, CONFIG, LAYERS, STATE, OPTIMIZER = ("model.safetensors", "config.json", "layers.json", "trainer_state.json",
                                             "optimizer.safetensors")


# ----------------------------------------------------------------------------- optimizer state as JSON
def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors for safetensors, JSON rest). State keys keep their type in JSON."""
    keys = list(sd["state"])
    tensors = {f"{i}/{k}": v.detach().contiguous().cpu() for i, key in enumerate(keys)
               for k, v in sd["state"][key].items() if torch.is_tensor(v)}
    scalars = [{k: v for k, v in sd["state"][key].items() if not torch.is_tensor(v)} for key in keys]
    return tensors, {"state_keys": keys, "state_scalars": scalars, "param_groups": sd["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {key: dict(scalars) for key, scalars in zip(meta["state_keys"], meta["state_scalars"])}
    for name, t in tensors.items():
        i, k = name.split("/", 1)
        state[meta["state_keys"][int(i)]][k] = t
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}  # betas
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- writing
def model_tensors(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
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


def save_model(path: str | Path, model: nn.Module, *, config: dict | None = None, state: dict | None = None,
               optimizer: dict | None = None, tokenizer: str | Path | None = None,
               state_dict: dict | None = None) -> Path:
    """Write ``model`` (possibly pruned / merged / int8) as a model folder at ``path``, atomically.

    ``config``: the dict the untransformed model is built from (default ``model.cfg.to_dict()``);
    ``state``: JSON-ready trainer state or notes; ``optimizer``: an optimizer state dict;
    ``tokenizer``: a tokenizer.json to copy in; ``state_dict``: tensors to save instead of the model's."""
    path = Path(path)
    tmp = _new_folder(path)
    try:
        save_file(model_tensors(model, state_dict), str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = config_dict(model) if config is None else config
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        layout = model_layout(model, config)
        if layout:
            (tmp / LAYERS).write_text(json.dumps(layout, indent=1))
        state = dict(state or {})
        if optimizer is not None:
            tensors, state["optimizer"] = _split_optimizer(optimizer)
            save_file(tensors, str(tmp / OPTIMIZER))
        if state:
            (tmp / STATE).write_text(json.dumps(state, indent=1))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
        write_manifest(tmp, "moekit model folder")
        move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _new_folder(path: Path) -> Path:
    """A temporary folder beside ``path`` to write it in (``move_into_place`` renames it); refuses to replace
    anything but a model folder."""
    if path.exists() and not (_is_model_folder(path) or is_hf_folder(path)) and (not path.is_dir()
                                                                                  or any(path.iterdir())):
        raise UsageError(f"{path}: exists and is not a model folder; give a new or empty folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def save_deployed(path: str | Path, model: nn.Module, *, state: dict, tokenizer: str | Path) -> str:
    """Write a pruned / merged / extracted model. A patched HF model goes back to an HF model folder
    (``save_pretrained`` of ``interop.patched_lm.to_hf``: transformers loads it, with its tokenizer files and
    ``state`` as trainer_state.json) when its family's config can describe it; otherwise, and for moekit's own
    models, a moekit model folder (``save_model``). Returns what was written, and why for the fallback."""
    from moekit.interop.patched_lm import PatchedLM, to_hf

    path = Path(path)
    if not isinstance(model, PatchedLM):
        save_model(path, model, state=state, tokenizer=tokenizer)
        return "a moekit model folder (moekit generate / inspect / finetune take it)"
    hf, why = to_hf(model)
    if hf is None:
        save_model(path, model, state=state, tokenizer=tokenizer)
        return (f"a moekit model folder holding the HF config (moekit commands read it, transformers does not: "
                f"{why})")
    tmp = _new_folder(path)
    try:
        hf.save_pretrained(tmp)
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        for f in (TOKENIZER, "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(tokenizer).parent / f).is_file():
                shutil.copyfile(Path(tokenizer).parent / f, tmp / f)
        move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return f"an HF model folder ({why}; transformers and moekit commands load it)"


def config_dict(model: nn.Module, cfg: ModelConfig | None = None) -> dict:
    """What a model folder's config.json holds: the config the untransformed model is built from. A patched
    HF model's ``cfg`` is only nominal (FLOPs, the dense twin): its HF config is saved instead, and
    ``deploy.layout.build_model`` rebuilds it through transformers."""
    from moekit.interop.patched_lm import PatchedLM, hf_base_config

    if isinstance(model, PatchedLM):
        return hf_base_config(model)
    return (model.cfg if cfg is None else cfg).to_dict()


def is_hf_folder(path: str | Path) -> bool:
    """A folder transformers loads: config.json with a model_type (moekit's config.json has none). A damaged
    config.json is not an HF folder's: moekit's loader then reports it against the manifest."""
    try:
        config = json.loads((Path(path) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and "model_type" in config


def _is_model_folder(path: Path) -> bool:
    from moekit.distributed.dcp import is_sharded  # a sharded checkpoint written by several ranks

    return ((path / WEIGHTS).is_file() or is_sharded(path)) and (path / CONFIG).is_file()


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, model_cfg: ModelConfig,
                    trainer_state: dict | None = None, keep_last: int = 2, state_dict: dict | None = None) -> Path:
    """Write ``run_dir/ckpt-<step>`` and point ``latest`` at it; keep the ``keep_last`` most recently written
    checkpoints (0 = all). ``trainer_state``: JSON-ready values, except "optimizer" (an optimizer state
    dict, its tensors go to optimizer.safetensors). The run folder's tokenizer.json is copied in.
    ``model_cfg`` is what config.json holds, except for a patched HF model (``config_dict``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run_dir)
    state = dict(trainer_state or {}, step=step)
    optimizer = state.pop("optimizer", None)
    tokenizer = run_dir / TOKENIZER
    final = save_model(run_dir / f"ckpt-{step:06d}", model, config=config_dict(model, model_cfg), state=state,
                       optimizer=optimizer, tokenizer=tokenizer if tokenizer.is_file() else None,
                       state_dict=state_dict)
    record_checkpoint(final, keep_last)
    return final


# ----------------------------------------------------------------------------- finding and checking
def resolve_checkpoint(path: str | Path) -> Path:
    """A model folder, or a run folder whose ``latest`` names one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist (expected a model folder or a run folder)")
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text(errors="replace").strip()
        if not name or Path(name).name != name or not (path / name).is_dir():
            raise CheckpointError(f"{path / LATEST}: names {name!r}, which is not a checkpoint folder in {path}")
        path = path / name
    if _is_model_folder(path) or is_hf_folder(path):
        return path
    inside = sorted(p for p in path.iterdir() if (p / LATEST).is_file() or (p / CONFIG).is_file()) \
        if path.is_dir() else []
    if inside:  # e.g. a demo / compare folder holding moe/ and dense/
        raise CheckpointError(f"{path} holds {len(inside)} models; pass one of them: "
                              + ", ".join(str(p) for p in inside))
    raise CheckpointError(f"{path} is not a moekit model folder (expected {WEIGHTS} and {CONFIG}, or a run "
                          f"folder with a '{LATEST}' file)")


def verify_checkpoint(folder: str | Path) -> None:
    """Check every file of a model folder (single-process or sharded) against its manifest; CheckpointError
    naming the first bad file."""
    from moekit.distributed.dcp import is_shard_file

    folder = Path(folder)
    read = [f.name for f in folder.iterdir() if f.name in (WEIGHTS, CONFIG, LAYERS, STATE, OPTIMIZER, TOKENIZER)
            or is_shard_file(f.name)]
    verify_manifest(folder, read)


def newest_intact(run_dir: str | Path, verify: bool = True) -> tuple[Path, list[tuple[Path, str]]]:
    """The checkpoint ``latest`` names or, if it fails ``verify_checkpoint``, the newest earlier one that passes;
    and the ones that failed, each with the reason (``verify=False``: the one ``latest`` names). CheckpointError
    if none is intact."""
    run_dir = Path(run_dir)
    if not verify:
        return resolve_checkpoint(run_dir), []
    damaged, order = [], history(run_dir)
    latest = (run_dir / LATEST).read_text(errors="replace").strip() if (run_dir / LATEST).is_file() else None
    if latest in order:  # start from what ``latest`` names (it may have been pointed back by hand)
        order = order[:order.index(latest) + 1]
    for name in reversed(order):
        try:
            verify_checkpoint(run_dir / name)
            return run_dir / name, damaged
        except CheckpointError as e:
            damaged.append((run_dir / name, str(e)))
    if not damaged:
        resolve_checkpoint(run_dir)  # raises the "not a model folder" error
    raise CheckpointError(f"{run_dir}: no intact checkpoint (" + "; ".join(r for _, r in damaged) + ")")


def _read_tensors(file: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file), device=device)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def load_tokenizer(path: str | Path):
    """The tokenizer of a model (``tokenizer_path``). An HF model (its folder, or a moekit folder holding its
    config) separates documents by its own end-of-text token (eos_token_id), not moekit's separator token."""
    from moekit.train.tokenizer import Tokenizer

    ckpt = resolve_checkpoint(path)
    config = read_json(ckpt / CONFIG)
    eos = (config if is_hf_folder(ckpt) else config.get("hf_config", {})).get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return Tokenizer.load(tokenizer_path(path), eos_id=None if eos is None else int(eos))


def tokenizer_path(path: str | Path) -> Path:
    """The tokenizer.json of a model: in the model folder, the given folder or the run folder."""
    ckpt = resolve_checkpoint(path)
    found = next((d / TOKENIZER for d in (ckpt, Path(path), ckpt.parent) if (d / TOKENIZER).is_file()), None)
    if found is None:
        raise CheckpointError(f"{ckpt}: no {TOKENIZER} in it or its run folder (the tokenizer the model was "
                              f"trained with is needed to turn text into token ids; copy it there)")
    return found


# ----------------------------------------------------------------------------- loading
def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a model folder (unchecked; errors name config.json)."""
    return _config(resolve_checkpoint(path), ModelConfig.from_dict)


def read_state(path: str | Path) -> dict:
    """The JSON trainer state / notes of a model folder (unchecked; {} if it has none): e.g. the step, or the
    HF family a converted model came from."""
    file = resolve_checkpoint(path) / STATE
    state = read_json(file) if file.is_file() else {}
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return state


def load_checkpoint(path: str | Path, map_location: str = "cpu", verify: bool = True):
    """-> (ModelConfig, model tensors, trainer state with "optimizer" rebuilt as an optimizer state dict)."""
    ckpt = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(ckpt)
    from moekit.distributed import dcp

    if dcp.is_sharded(ckpt):  # written by several ranks: read whole, here
        return _config(ckpt, ModelConfig.from_dict), dcp.load_full_model_state(ckpt, build_transformer(
            read_json(ckpt / CONFIG))), read_state(ckpt)
    cfg = _config(ckpt, ModelConfig.from_dict)
    tensors = _read_tensors(ckpt / WEIGHTS, map_location)
    state = read_state(ckpt)
    if "optimizer" in state:
        try:
            state["optimizer"] = _join_optimizer(_read_tensors(ckpt / OPTIMIZER, map_location), state["optimizer"])
        except (KeyError, ValueError, IndexError, TypeError) as e:
            raise CheckpointError(f"{ckpt / STATE}: optimizer entry does not match {OPTIMIZER} ({e!r})") from None
    return cfg, tensors, state


def _config(ckpt: Path, parse: Callable):
    try:
        return parse(read_json(ckpt / CONFIG))
    except ConfigError as e:
        raise CheckpointError(f"{ckpt / CONFIG}: {e}") from None


def load_model(path: str | Path, *, verify: bool = True,
               build: Callable[[dict], nn.Module] | None = None) -> nn.Module:
    """The model of any folder moekit writes (run folder, checkpoint, prune/merge/extract/upcycle/convert
    output) or of an HF model folder of a patchable family (``interop.patched_lm.load_patched``; it has no
    manifest to verify), in eval mode. ``build(config dict)`` makes the untransformed model (default:
    ``deploy.layout.default_build``); the MoE layers listed in layers.json are rebuilt, then the tensors are
    loaded strictly."""
    ckpt = resolve_checkpoint(path)
    if is_hf_folder(ckpt):
        from moekit.interop.patched_lm import load_patched

        return load_patched(ckpt)
    if verify:
        verify_checkpoint(ckpt)
    layout = read_json(ckpt / LAYERS) if (ckpt / LAYERS).is_file() else {}
    model = _config(ckpt, lambda config: build_model(config, layout, build))
    from moekit.distributed import dcp

    if dcp.is_sharded(ckpt):  # read whole into the model's tensors
        dcp.load_full_model_state(ckpt, model)
        return model.eval()
    tensors = _read_tensors(ckpt / WEIGHTS, "cpu")
    _check_tensors(model, tensors, ckpt / WEIGHTS)
    model.load_state_dict(tensors, strict=False)
    return model.eval()


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """One-line CheckpointError unless ``tensors`` fill every entry of the model's state dict with the right
    shape (an entry may be absent if it shares storage with one present: tied embeddings)."""
    own = model.state_dict()
    present = {own[k].data_ptr() for k in tensors if k in own}
    missing = [k for k, t in own.items() if k not in tensors and t.data_ptr() not in present]
    unexpected = [k for k in tensors if k not in own]
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in tensors
             if k in own and tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{file}: does not match {CONFIG}: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, wrong shape {wrong[:3]}")
