"""Expert offloading for inference: routed experts live on disk (a memory-mapped safetensors file) or
in CPU memory, and each MoE layer keeps an LRU cache of at most ``cache_size`` experts resident on the
compute device.

Why LRU per layer: routing is skewed and temporally correlated (consecutive tokens of a text reuse
experts), so a small cache catches most lookups (Eliseev & Mazur 2023, "Fast Inference of
Mixture-of-Experts Language Models with Offloading"). A miss reads one expert's three matrices:
``safe_open(...).get_slice(name)[e]`` touches only that expert's bytes of the stacked tensor.

The computation is GroupedExperts.forward on the used experts' weights, so logits equal the resident
model's. Dense parts (attention, embeddings, router, shared experts) stay resident.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from moekit.deploy import ComputedWeightsExperts, moe_layers, tensor_bytes
from moekit.layers.experts import GroupedExperts

WEIGHT_NAMES = ("w_gate_EFD", "w_up_EFD", "w_down_EDF")
SOURCES = ("disk", "cpu")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)


class DiskExperts:
    """One layer's stacked expert tensors in a safetensors file, read one expert at a time."""

    def __init__(self, path: str, prefix: str):
        self.handle = safe_open(path, framework="pt", device="cpu")
        self.prefix = prefix
        keys = set(self.handle.keys())
        self.names = [n for n in WEIGHT_NAMES if prefix + n in keys]

    def get(self, e: int) -> dict[str, Tensor]:
        return {n: self.handle.get_slice(self.prefix + n)[e] for n in self.names}


class MemoryExperts:
    """One layer's stacked expert tensors kept in CPU memory."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.tensors = {n: t.detach().to("cpu") for n, t in tensors.items()}

    def get(self, e: int) -> dict[str, Tensor]:
        return {n: t[e] for n, t in self.tensors.items()}


class OffloadedExperts(ComputedWeightsExperts):
    """Experts fetched from a store through an LRU cache of ``cache_size`` resident experts."""

    def __init__(self, src: GroupedExperts, store, cache_size: int):
        super().__init__(src)
        if not (isinstance(cache_size, int) and cache_size >= 1):
            raise ValueError(f"cache_size={cache_size!r}: must be a positive integer (experts per layer)")
        self.store = store
        self.cache_size = cache_size
        self.cache: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self.stats = CacheStats()
        self.device = src.w_up_EFD.device

    def fetch(self, e: int) -> dict[str, Tensor]:
        if e in self.cache:
            self.stats.hits += 1
            self.cache.move_to_end(e)
            return self.cache[e]
        self.stats.misses += 1
        w = {n: t.to(self.device, non_blocking=True) for n, t in self.store.get(e).items()}
        self.cache[e] = w
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return w

    def weights_for(self, experts: list[int] | None) -> tuple[Tensor | None, Tensor, Tensor]:
        ws = [self.fetch(e) for e in (range(self.num_experts) if experts is None else experts)]
        return tuple(torch.stack([w[n] for w in ws]) if n in ws[0] else None for n in WEIGHT_NAMES)

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.cache.values() for t in w.values())


def save_experts(model: nn.Module, path: str) -> None:
    """Write every MoE layer's stacked expert weights to one safetensors file (keys ``<layer>.experts.<w>``)."""
    tensors = {}
    for name, layer in moe_layers(model).items():
        for n in WEIGHT_NAMES:
            w = getattr(layer.experts, n)
            if w is not None:
                tensors[_key(name, n)] = w.detach().to("cpu").contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path)


def _key(layer_name: str, weight: str) -> str:
    return f"{layer_name}.experts.{weight}" if layer_name else f"experts.{weight}"


def offload_experts(model: nn.Module, cache_size: int, *, source: str = "disk", path: str | None = None
                    ) -> nn.Module:
    """Move every MoE layer's experts off the device, in place: ``source="disk"`` writes them to the
    safetensors file ``path`` and memory-maps it; ``"cpu"`` keeps them in CPU memory. Returns ``model``."""
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: must be one of {list(SOURCES)}")
    if source == "disk":
        if not path:
            raise ValueError("path: a .safetensors file path is required for source='disk'")
        save_experts(model, path)
    for name, layer in moe_layers(model).items():
        ex = layer.experts
        if isinstance(ex, ComputedWeightsExperts):
            raise ValueError(f"experts are already {type(ex).__name__}; offload the float model")
        if source == "disk":
            store = DiskExperts(path, _key(name, ""))
        else:
            store = MemoryExperts({n: getattr(ex, n) for n in WEIGHT_NAMES if getattr(ex, n) is not None})
        layer.experts = OffloadedExperts(ex, store, cache_size)
    return model


def cache_stats(model: nn.Module) -> CacheStats:
    """Hits and misses summed over all offloaded layers."""
    total = CacheStats()
    for layer in moe_layers(model).values():
        if isinstance(layer.experts, OffloadedExperts):
            total.hits += layer.experts.stats.hits
            total.misses += layer.experts.stats.misses
    return total


def resident_bytes(model: nn.Module) -> int:
    """Bytes resident for inference: parameters and buffers plus the offload caches' contents."""
    return tensor_bytes(model) + sum(layer.experts.resident_bytes() for layer in moe_layers(model).values()
                                     if isinstance(layer.experts, OffloadedExperts))
