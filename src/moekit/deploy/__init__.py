"""Deployment: make trained MoE models smaller and cheaper to serve.

prune.py    drop least-used experts (by measured load), slice the router
merge.py    merge experts (frequency-weighted averages, similarity clusters), many-to-one router
extract.py  task sub-networks (keep experts a task uses) and the saved-model format
offload.py  experts on disk / CPU memory with an LRU cache of resident experts
quantize.py int8 weight-only experts (per-output-channel symmetric scales)
distill.py  MoE -> dense-twin knowledge distillation

Every transform works on any nn.Module that contains ``MoELayer``s and edits them in place.
"""

from __future__ import annotations

from torch import Tensor, nn

from moekit.layers.experts import GroupedExperts, compute_dtype
from moekit.layers.moe import MoELayer


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """Qualified name -> MoELayer for every MoE layer in ``model`` ("" if model is one)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model``; returns the (possibly new) root."""
    if name == "":
        return new
    model.set_submodule(name, new)
    return model


def tensor_bytes(model: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


class ComputedWeightsExperts(GroupedExperts):
    """GroupedExperts whose stacked weights are produced per forward (dequantised, fetched from an
    offload cache) instead of being parameters. Only the experts that receive rows are produced, and
    GroupedExperts.forward then runs unchanged on that subset, so every backend (grouped_mm, loop, bmm,
    blockwise) computes exactly what the resident experts compute.

    Subclasses implement ``weights_for(experts) -> (w_gate_XFD | None, w_up_XFD, w_down_XDF)`` for a
    list of expert indices (all experts if None).
    """

    def __init__(self, src: GroupedExperts):
        nn.Module.__init__(self)  # not GroupedExperts.__init__: it would allocate the float weights
        self.num_experts, self.d_model, self.hidden = src.num_experts, src.d_model, src.hidden
        self.activation, self.gated, self.act = src.activation, src.gated, src.act
        self.backend = src.backend
        self.dropout = src.dropout
        if getattr(src, "unit_mask_EF", None) is not None:
            raise ValueError("offloaded/quantised experts do not support heterogeneous expert sizes "
                             "(MoEConfig.expert_hidden_sizes) yet")
        if src.b_up_EF is not None:
            raise ValueError("offloaded/quantised experts do not support expert biases (MoEConfig.bias) yet")
        self.unit_mask_EF, self.hidden_sizes = None, src.hidden_sizes
        self.b_gate_EF = self.b_up_EF = self.b_down_ED = None
        self._active: tuple[Tensor | None, Tensor, Tensor] | None = None

    def weights_for(self, experts: list[int] | None) -> tuple[Tensor | None, Tensor, Tensor]:
        raise NotImplementedError

    def _on_used_experts(self, counts_E: Tensor, run, keep_all: bool = False):
        """run(counts) with only the experts that get rows produced (``keep_all``: every expert); None if no
        expert gets a row. Rows are sorted by expert: dropping empty experts keeps the row blocks aligned."""
        used = None if keep_all else (counts_E > 0).nonzero().flatten().tolist()
        if used is not None and len(used) == self.num_experts:
            used = None
        if used == []:
            return None
        self._active = self.weights_for(used)
        try:
            return run(counts_E if used is None else counts_E[used])
        finally:
            self._active = None

    def forward(self, x_RD: Tensor, counts_E: Tensor, uniform_rows: bool = False,
                scale_R: Tensor | None = None) -> Tensor:
        # the padded layout gives every expert the same C rows: keep them all so its bmm path still applies
        base = super().forward
        y_RD = self._on_used_experts(counts_E, lambda c: base(x_RD, c, uniform_rows, scale_R),
                                     keep_all=uniform_rows)
        return x_RD.new_zeros(0, self.d_model) if y_RD is None else y_RD

    def gathered(self, x_TD: Tensor, token_R: Tensor, weight_R: Tensor, counts_E: Tensor) -> Tensor:
        base = super().gathered
        y_TD = self._on_used_experts(counts_E, lambda c: base(x_TD, token_R, weight_R, c))
        return x_TD.new_zeros(x_TD.shape, dtype=compute_dtype(x_TD)) if y_TD is None else y_TD

    def _weight(self, i: int) -> Tensor | None:
        return (self._active or self.weights_for(None))[i]

    @property
    def w_gate_EFD(self) -> Tensor | None:
        return self._weight(0)

    @property
    def w_up_EFD(self) -> Tensor:
        return self._weight(1)

    @property
    def w_down_EDF(self) -> Tensor:
        return self._weight(2)
