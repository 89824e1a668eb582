"""Experts: (x_RD, counts_E) -> y_RD over contiguous per-expert row blocks.

Weights are stacked 3-D tensors in nn.Linear layout (out, in): w_gate_EFD, w_up_EFD, w_down_EDF.
Backends compute the same function:
  "grouped": one ``torch._grouped_mm`` per projection (CPU and CUDA);
  "loop":    a per-expert matmul loop (the readable reference, and often fastest on CPU);
  "bmm":     batched matmul when every expert has the same row count (padded GShard layout);
  "blockwise": gather, FFN and scatter-add fused per expert block (``forward_blockwise``, layers/blockwise.py),
             taking token rows x_TD instead of x_RD; "auto" on CPU (the LocalDispatcher calls it with token
             rows; ``forward`` with already-gathered rows uses it with row r = token r).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.blockwise import blockwise_ffn

GATED = {"swiglu": F.silu, "geglu": F.gelu}
PLAIN = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
# each activation's derivative as aten's backward kernel: grad_in = f(grad_out, pre_activation)
ACT_BACKWARD = {
    F.silu: torch.ops.aten.silu_backward,
    F.gelu: lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="none"),
    F.relu: lambda g, x: torch.ops.aten.threshold_backward(g, x, 0.0),
}


def activation_fn(name: str):
    return GATED.get(name) or PLAIN[name]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype experts compute in: autocast's, else the input's. _grouped_mm and the blockwise path are not
    on autocast's op lists, so every backend casts explicitly and computes alike."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def grouped_mm_supported(x: Tensor, *dims: int) -> bool:
    """torch._grouped_mm runs on CPU for all float dtypes, on CUDA it wants bf16 (sm90+ kernels);
    both need every row stride (the feature dims ``dims``) to be a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    aligned = all(d * x.element_size() % 16 == 0 for d in dims)
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if x.device.type == "cpu" else (torch.bfloat16,)
    return aligned and x.dtype in dtypes  # float64 is rejected by the kernel: the loop backend serves it


def grouped_linear(x_RI: Tensor, w_EOI: Tensor, counts_E: Tensor, backend: str) -> Tensor:
    """y_RO: row block e of x times w[e]^T (per-expert nn.Linear without bias)."""
    if backend == "grouped":
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        y = torch._grouped_mm(x_RI, w_EOI.transpose(-2, -1), offs=offs_E)
        if y.requires_grad:  # _grouped_mm's backward rejects broadcast (stride-0) grads, e.g. from y.sum()
            y.register_hook(lambda g: g.contiguous())
        return y
    if backend == "bmm":
        E = w_EOI.shape[0]
        return torch.bmm(x_RI.view(E, -1, x_RI.shape[-1]), w_EOI.transpose(-2, -1)).view(-1, w_EOI.shape[1])
    blocks = torch.split(x_RI, counts_E.tolist())
    # unbind (not w[e]): its backward stacks the E grads once instead of E full-size zero-filled copies
    return torch.cat([xb @ w_OI.t() for xb, w_OI in zip(blocks, w_EOI.unbind(0))] +
                     [x_RI.new_zeros(0, w_EOI.shape[1])])


class GroupedExperts(nn.Module):
    """E FFN experts with stacked weights. Gated activations (SwiGLU, GeGLU) use
    down(act(gate x) * up x) (Shazeer 2020); plain ones use down(act(up x)).

    ``expert_dropout`` is dropout on the expert hidden activations (ST-MoE, Zoph et al. 2022,
    recommends a higher rate inside experts than in the dense layers when fine-tuning).
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str = "swiglu",
                 expert_dropout: float = 0.0, backend: str = "auto", hidden_sizes: tuple[int, ...] | None = None):
        super().__init__()
        # heterogeneous experts: stacked at the largest hidden size; units beyond expert e's own size are
        # masked out of the weights (zero output, zero gradient). One dispatch pass serves all sizes, at the
        # cost of computing max(hidden_sizes) units for every expert.
        if hidden_sizes is not None and len(set(hidden_sizes)) > 1:
            hidden = max(hidden_sizes)
            mask_EF = (torch.arange(hidden)[None, :] < torch.tensor(hidden_sizes)[:, None]).float()
            self.register_buffer("unit_mask_EF", mask_EF, persistent=False)
        else:
            self.unit_mask_EF = None
        self.hidden_sizes = tuple(hidden_sizes) if hidden_sizes is not None else (hidden,) * num_experts
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.activation = activation
        self.gated = activation in GATED
        self.act = activation_fn(activation)
        self.backend = backend
        self.dropout = nn.Dropout(expert_dropout) if expert_dropout > 0 else nn.Identity()
        E, D, F_ = num_experts, d_model, hidden
        self.w_gate_EFD = nn.Parameter(torch.empty(E, F_, D)) if self.gated else None
        self.w_up_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.w_down_EDF = nn.Parameter(torch.empty(E, D, F_))
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """Each expert initialised like an nn.Linear (kaiming-uniform bound 1/sqrt(fan_in)), or N(0, std)."""
        for w in (self.w_gate_EFD, self.w_up_EFD, self.w_down_EDF):
            if w is None:
                continue
            if std is None:
                bound = 1.0 / math.sqrt(w.shape[-1])
                nn.init.uniform_(w, -bound, bound)
            else:
                nn.init.normal_(w, 0.0, std)

    def use_blockwise(self, x_TD: Tensor) -> bool:
        """Whether the layer should call ``forward_blockwise``: asked for, or "auto" on CPU, where keeping each
        expert block in cache beats the grouped path (benchmarks/bench_layer.py). On CUDA one grouped_mm
        kernel beats a Python loop over experts, so "auto" keeps the grouped path there."""
        return self.backend == "blockwise" or (self.backend == "auto" and x_TD.device.type == "cpu")

    def pick_backend(self, x_RD: Tensor, counts_E: Tensor, uniform_rows: bool) -> str:
        if self.backend not in ("auto", "blockwise"):
            return self.backend
        if uniform_rows and self.backend == "auto":
            return "bmm"
        # already-gathered rows (expert parallelism, plugged-in dispatchers) run blockwise too on CPU: the
        # per-block cache residency outweighs the extra row copy (W2 shapes: 7% faster than grouped_mm)
        if self.use_blockwise(x_RD):
            return "blockwise"
        return "grouped" if grouped_mm_supported(x_RD, self.d_model, self.hidden) else "loop"

    def forward(self, x_RD: Tensor, counts_E: Tensor, uniform_rows: bool = False,
                scale_R: Tensor | None = None) -> Tensor:
        """``scale_R``: optional per-row factors (the gate weights) applied to the hidden activations before
        the down projection; the projection is linear, so this equals scaling the output rows."""
        backend = self.pick_backend(x_RD, counts_E, uniform_rows)
        if backend == "blockwise":  # row r is its own "token": the scatter-add writes each output row once
            rows_R = torch.arange(x_RD.shape[0], device=x_RD.device)
            scale_R = scale_R if scale_R is not None else x_RD.new_ones(x_RD.shape[0])
            # GroupedExperts' own method: subclasses that override it expect token rows and all experts' counts
            return GroupedExperts.forward_blockwise(self, x_RD, rows_R, scale_R, counts_E)
        if backend == "grouped" and not grouped_mm_supported(x_RD, self.d_model, self.hidden):
            backend = "loop"
        dtype = compute_dtype(x_RD)
        x_RD = x_RD.to(dtype)
        w = [p.to(dtype) if p is not None else None for p in (self.w_gate_EFD, self.w_up_EFD, self.w_down_EDF)]
        if self.unit_mask_EF is not None:
            m = self.unit_mask_EF.to(dtype)
            w = [w[0] * m[:, :, None] if w[0] is not None else None, w[1] * m[:, :, None], w[2] * m[:, None, :]]
        up_RF = grouped_linear(x_RD, w[1], counts_E, backend)
        if self.gated:
            h_RF = self.act(grouped_linear(x_RD, w[0], counts_E, backend)) * up_RF
        else:
            h_RF = self.act(up_RF)
        if scale_R is not None:
            h_RF = h_RF * scale_R.to(dtype)[:, None]
        return grouped_linear(self.dropout(h_RF), w[2], counts_E, backend)

    def forward_blockwise(self, x_TD: Tensor, token_R: Tensor, weight_R: Tensor, counts_E: Tensor) -> Tensor:
        """y_TD = sum over routed rows r of weight_R[r] * expert(x_TD[token_R[r]]), rows sorted by expert
        (``counts_E`` rows each): dispatch, experts and combine in one pass, expert block by block."""
        dtype = compute_dtype(x_TD)
        w = [p.to(dtype) if p is not None else None for p in (self.w_gate_EFD, self.w_up_EFD, self.w_down_EDF)]
        keep_RF = None
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        if self.training and p > 0:  # the same mask nn.Dropout draws: keep with 1-p, scale by 1/(1-p)
            keep_RF = torch.empty(token_R.shape[0], self.hidden, dtype=dtype, device=x_TD.device)
            keep_RF.bernoulli_(1 - p).div_(1 - p)
        # heterogeneous experts use their own first hidden_sizes[e] units (no masked compute)
        return blockwise_ffn(x_TD.to(dtype), *w, weight_R.to(dtype), token_R, counts_E, list(self.hidden_sizes),
                             self.act, ACT_BACKWARD[self.act], keep_RF)


class LoopExperts(GroupedExperts):
    """The readable reference: a Python loop over experts, always the per-expert matmul backend."""

    def __init__(self, *args, **kwargs):
        kwargs["backend"] = "loop"
        super().__init__(*args, **kwargs)


class MLP(nn.Module):
    """A dense FFN with the same activation conventions; used for shared experts and dense twins."""

    def __init__(self, d_model: int, hidden: int, activation: str = "swiglu", dropout: float = 0.0):
        super().__init__()
        self.gated = activation in GATED
        self.act = activation_fn(activation)
        self.w_gate = nn.Linear(d_model, hidden, bias=False) if self.gated else None
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.w_gate(x)) * self.w_up(x) if self.gated else self.act(self.w_up(x))
        return self.w_down(self.dropout(h))
