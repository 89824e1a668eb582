"""Load and export Hugging Face checkpoints (config.json + safetensors, single file or sharded).

``load_hf(folder) -> MoETransformer`` and ``save_hf(model, folder, model_type)``; the per-family key maps
and config translations live in ``families.py``. Every error names the file, key or field at fault.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moekit.config import ModelConfig
from moekit.errors import CheckpointError, ConfigError, UsageError
from moekit.interop.config_reader import read_hf_config
from moekit.interop.families import COMMON, FAMILIES, LAYER_NORMS, SAME, Family, View
from moekit.models.decoder import MoETransformer


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} has no config.json (expected a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {e}") from None


def family_of(cfg: dict) -> Family:
    """The convert family of a full config (``read_hf_config``: model_type is the family it is read as)."""
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise ConfigError(f"config.json model_type={cfg.get('source_model_type', mt)!r}: not supported by "
                          f"convert; supported: {sorted(FAMILIES)}")
    return FAMILIES[mt]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint; every shard named by the index must exist."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{str(folder)!r}: shards listed in model.safetensors.index.json are missing: "
                                    f"{missing}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{str(folder)!r} has no model.safetensors or model.safetensors.index.json")


def inert_tensors(fam: Family, hf_cfg: dict, mcfg: ModelConfig) -> dict[str, tuple]:
    """HF keys (with shapes) that compute nothing under this config (Family.inert), for every MoE layer."""
    return {h.format(i=i): shape for i in range(mcfg.n_layers) if mcfg.is_moe_layer(i) for h, shape in fam.inert(hf_cfg)}


def zero_keys(fam: Family, mcfg: ModelConfig) -> list[str]:
    """moekit keys (Family.zero) the format cannot hold: zero on load, refused on export unless zero."""
    return [t.format(i=i) for i in range(mcfg.n_layers) if mcfg.is_moe_layer(i) for t in fam.zero]


def key_pairs(fam: Family, hf_cfg: dict, mcfg: ModelConfig) -> list[tuple[str, str, View]]:
    """Every (hf_key, moekit_key, view) of a model; moekit keys of stacked experts end in [e] with e filled in."""
    pairs = [(fam.prefix + h, m, SAME) for h, m in COMMON if not (m == "lm_head.weight" and mcfg.tie_embeddings)]
    E = mcfg.moe.num_experts if mcfg.moe else 0
    for i in range(mcfg.n_layers):
        templates = LAYER_NORMS + fam.attn(hf_cfg) + (fam.moe(hf_cfg) if mcfg.is_moe_layer(i) else fam.dense)
        for h, m, *rule in templates:
            view, h = rule[0] if rule else SAME, fam.prefix + h
            if "{e}" in h:
                pairs += [(h.format(i=i, e=e), m.format(i=i).replace("[e]", f"[{e}]"), view) for e in range(E)]
            else:
                pairs.append((h.format(i=i), m.format(i=i), view))
    return pairs


def _split_stacked(key: str) -> tuple[str, int | None]:
    m = re.match(r"^(.*)\[(\d+)\]$", key)
    return (m.group(1), int(m.group(2))) if m else (key, None)


def load_hf(folder: str | Path, dtype: torch.dtype = torch.float32) -> MoETransformer:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"HF checkpoint folder {str(folder)!r} does not exist")
    hf_cfg = read_hf_config(read_config(folder))
    fam = family_of(hf_cfg)
    mcfg = fam.to_moekit(hf_cfg)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MoETransformer(mcfg).state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
    state: dict[str, torch.Tensor] = {}
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    used = set(inert_tensors(fam, hf_cfg, mcfg))
    for hk, mk, view in key_pairs(fam, hf_cfg, mcfg):
        if hk not in tensors:
            raise CheckpointError(f"{str(folder)!r}: tensor {hk!r} is missing from the checkpoint")
        used.add(hk)
        base, e = _split_stacked(mk)
        t = tensors[hk].to(dtype)
        want = tuple(shapes[base][1:] if e is not None else shapes[base])
        if tuple(t.shape) != view.hf_shape(want):
            raise CheckpointError(f"{str(folder)!r}: tensor {hk!r} has shape {tuple(t.shape)}, expected "
                                  f"{view.hf_shape(want)} from config.json")
        t = view.view(t).reshape(want)
        if e is None:
            state[base] = t
        else:
            stacked.setdefault(base, {})[e] = t
    for base, parts in stacked.items():
        state[base] = torch.stack([parts[e] for e in range(len(parts))])
    state.update({k: torch.zeros(shapes[k], dtype=dtype) for k in zero_keys(fam, mcfg)})
    # MTP modules (DeepSeek-V3 layers >= num_hidden_layers) and rotary caches are not part of the model
    extra = [k for k in tensors if k not in used and not _ignorable(k.removeprefix(fam.prefix), mcfg.n_layers)
             and not (fam.skip and k.startswith(fam.skip))]
    if extra:
        raise CheckpointError(f"{str(folder)!r}: unexpected tensors not covered by the {fam.model_type} key map: "
                         f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
    model = MoETransformer(mcfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and mcfg.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"internal key map mismatch for {fam.model_type}: missing {missing}, unexpected {unexpected}")
    model.hf_model_type = fam.model_type
    return model.to(dtype)


def _ignorable(key: str, n_layers: int) -> bool:
    if "rotary_emb" in key:
        return True
    m = re.match(r"^model\.layers\.(\d+)\.", key)
    return bool(m and int(m.group(1)) >= n_layers)


MODEL_FIELDS = ("attn_windows", "rope_scaling", "rope_theta", "qk_norm", "norm_eps", "attn_sinks", "nope_layers",
                "attn_chunks", "nope_temp_scale", "nope_temp_floor")
ROUTER_FIELDS = ("kind", "top_k", "renormalize", "score_func", "n_groups", "topk_groups", "routed_scaling_factor",
                 "gate_bias")


def check_exportable(fam: Family, hf_cfg: dict, mcfg: ModelConfig, sd: dict, pairs: list[tuple[str, str]]) -> None:
    """Refuse models the family's format cannot hold instead of writing a checkpoint that computes something
    else: every tensor must have an HF key, and the routing/activation must survive the config round trip."""
    covered = {_split_stacked(mk)[0] for _, mk, _ in pairs}
    lacking = sorted(covered - set(sd))
    if lacking:
        raise UsageError(f"model_type={fam.model_type!r} needs tensors this model does not have (q/k norms, "
                         f"biases, ...): {lacking[:4]}{' ...' if len(lacking) > 4 else ''}; choose another "
                         f"--model-type")
    tied = {"lm_head.weight"} if mcfg.tie_embeddings else set()
    nonzero = [k for k in zero_keys(fam, mcfg) if sd[k].any()]
    if nonzero:
        raise UsageError(f"model_type={fam.model_type!r} has no place for {nonzero[:3]} (nonzero: e.g. a trained "
                         f"DeepSeek-V3 selection bias); choose another --model-type")
    tied |= set(zero_keys(fam, mcfg))
    left = sorted(k for k in sd if k not in covered | tied and not k.endswith("unit_mask_EF"))
    if left:
        raise UsageError(f"model_type={fam.model_type!r} cannot hold these moekit tensors (attention bias, q/k "
                         f"norms, dense layers, ...): {left[:6]}{' ...' if len(left) > 6 else ''}")
    back_model = fam.to_moekit(hf_cfg)
    lost = [(f, getattr(mcfg, f), getattr(back_model, f)) for f in MODEL_FIELDS
            if getattr(mcfg, f) != getattr(back_model, f)]
    lost += [("MoE layers", [i for i in range(mcfg.n_layers) if mcfg.is_moe_layer(i)],
              [i for i in range(mcfg.n_layers) if back_model.is_moe_layer(i)])]
    lost = [x for x in lost if x[1] != x[2]]
    if lost:
        raise UsageError(f"model_type={fam.model_type!r} cannot express this model: "
                         + ", ".join(f"ModelConfig.{n}={a!r} (the format implies {b!r})" for n, a, b in lost))
    back = back_model.moe
    if mcfg.moe is not None and back is not None:
        diff = [(f"router.{f}", getattr(mcfg.moe.router, f), getattr(back.router, f)) for f in ROUTER_FIELDS
                if getattr(mcfg.moe.router, f) != getattr(back.router, f)]
        diff += [(f, getattr(mcfg.moe, f), getattr(back, f)) for f in ("activation", "shared_gate", "bias", "gate_input")
                 if getattr(mcfg.moe, f) != getattr(back, f)]
        if diff:
            raise UsageError(f"model_type={fam.model_type!r} cannot express this MoE config: "
                             + ", ".join(f"MoEConfig.{n}={a!r} (the format implies {b!r})" for n, a, b in diff))


def save_hf(model: MoETransformer, folder: str | Path, model_type: str | None = None,
            max_shard_bytes: int | None = None) -> Path:
    """Write config.json + safetensors (sharded with an index above ``max_shard_bytes``) atomically."""
    model_type = model_type or getattr(model, "hf_model_type", None)
    if model_type not in FAMILIES:
        raise UsageError(f"model_type={model_type!r}: choose one of {sorted(FAMILIES)}")
    fam = FAMILIES[model_type]
    hf_cfg = fam.to_hf(model.cfg)
    full = read_hf_config(hf_cfg)
    sd = model.state_dict()
    pairs = key_pairs(fam, full, model.cfg)
    check_exportable(fam, full, model.cfg, sd, pairs)
    out: dict[str, torch.Tensor] = {}
    for hk, mk, view in pairs:
        base, e = _split_stacked(mk)
        t = (sd[base][e] if e is not None else sd[base]).detach().cpu()
        if hk not in out:
            out[hk] = torch.zeros(view.hf_shape(tuple(t.shape)), dtype=t.dtype)
        into = view.view(out[hk])
        into.copy_(t.reshape(into.shape))
    dtype = next(iter(out.values())).dtype
    out.update({hk: torch.zeros(shape, dtype=dtype) for hk, shape in inert_tensors(fam, full, model.cfg).items()})
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if max_shard_bytes is None:
            save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            _save_sharded(out, tmp, max_shard_bytes)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _save_sharded(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    n = len(shards)
    weight_map = {}
    for j, shard in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
