"""Experts: E FFNs with stacked weights, computed by a backend chosen by name from one registry.

Weights are stacked 3-D tensors in nn.Linear layout (out, in): w_gate_EFD (gated activations only),
w_up_EFD, w_down_EDF; optional biases b_gate_EF, b_up_EF, b_down_ED (``MoEConfig.bias``). The FFN itself
is ffn.py's, for every backend.

The experts side of the dispatcher protocol (dispatch.py):
  experts(x_RD, counts_E, uniform_rows=False, scale_R=None) -> y_RD
      rows already moved into contiguous per-expert blocks (block e: counts_E[e] rows); ``scale_R``:
      optional per-row factors (gate weights) on the outputs.
  experts.gathered(x_TD, token_R, weight_R, counts_E) -> y_TD
      gather token rows, FFN, gate-weight and scatter-add back to tokens (rows sorted by expert).

Backends (``EXPERTS_BACKENDS``; ``register_experts_backend`` adds one):
  "loop":       a Python loop over experts, the readable reference;
  "grouped_mm": one ``torch._grouped_mm`` per projection (CPU and CUDA);
  "bmm":        batched matmul when every expert has the same row count (the padded layout);
  "blockwise":  gather, FFN and scatter-add fused per expert block (layers/blockwise.py);
  "auto":       blockwise on CPU (each expert block stays in cache: benchmarks/bench_layer.py), bmm for
                uniform (padded) rows, else grouped_mm where the kernel supports the dtype, else loop.
A backend implements ``rows``; it may also implement ``gathered`` (the fused path), which otherwise is
the composition gather -> rows -> scatter-add.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.layers.blockwise import blockwise_ffn
from moekit.layers.dispatch import gather_rows, scatter_rows
from moekit.layers.ffn import ACTIVATIONS, FFNWeights, ffn


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype experts compute in: autocast's, else the input's. _grouped_mm and the blockwise path are not
    on autocast's op lists, so every backend casts explicitly and computes alike."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def grouped_mm_supported(x: Tensor, *dims: int) -> bool:
    """torch._grouped_mm runs on CPU for all float dtypes, on CUDA it wants bf16 (sm90+ kernels);
    both need every row stride (the feature dims ``dims``) to be a multiple of 16 bytes. Its fake-tensor
    kernel (what torch.compile traces with) accepts only bf16: compiled graphs in other dtypes use the loop."""
    if not hasattr(torch, "_grouped_mm") or (torch.compiler.is_compiling() and x.dtype != torch.bfloat16):
        return False
    aligned = all(d * x.element_size() % 16 == 0 for d in dims)
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if x.device.type == "cpu" else (torch.bfloat16,)
    return aligned and x.dtype in dtypes  # float64 is rejected by the kernel: the loop backend serves it


class ExpertsBackend:
    """How the experts compute. ``rows``: y_RD from rows in per-expert blocks; ``gathered``: y_TD from
    token rows (override it to fuse the gather and the scatter-add into the expert loop)."""

    uniform_rows_only = False  # True: needs every block to have the same row count (padded layout)

    def rows(self, experts: GroupedExperts, x_RD: Tensor, counts_E: Tensor, scale_R: Tensor | None = None
             ) -> Tensor:
        raise NotImplementedError

    def gathered(self, experts: GroupedExperts, x_TD: Tensor, token_R: Tensor, weight_R: Tensor,
                 counts_E: Tensor) -> Tensor:
        y_RD = self.rows(experts, gather_rows(x_TD, token_R), counts_E, weight_R)
        return scatter_rows(y_RD, token_R, x_TD.shape[0])


class LoopBackend(ExpertsBackend):
    def rows(self, experts, x_RD, counts_E, scale_R=None):
        # NOTE: host sync because the per-expert loop needs each block's row count as a Python int (free on the
        # CPU; on a GPU the grouped_mm backend has no sync). Under torch.compile the counts become unbacked
        # sizes (dynamo's capture_scalar_outputs, set by moekit.distributed.parallelize.apply_compile); the
        # checks tell the compiler they are valid split sizes, so the loop compiles with fullgraph=True.
        sizes = counts_E.tolist()
        for s in sizes:
            torch._check(s >= 0)
        torch._check(sum(sizes) == x_RD.shape[0])
        x_blocks = torch.split(x_RD, sizes)
        s_blocks = torch.split(scale_R, sizes) if scale_R is not None else [None] * len(sizes)
        w = experts.weights(x_RD.dtype)
        return torch.cat([ffn(x, w_e, experts.act, scale=s, dropout=experts.dropout, fused=False)
                          for x, s, w_e in zip(x_blocks, s_blocks, w.unbind())] + [x_RD.new_zeros(0, experts.d_model)])


class GroupedMMBackend(ExpertsBackend):
    def rows(self, experts, x_RD, counts_E, scale_R=None):
        if not grouped_mm_supported(x_RD, experts.d_model, experts.hidden):
            return EXPERTS_BACKENDS["loop"].rows(experts, x_RD, counts_E, scale_R)
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        expert_R = None

        def linear(x_RI: Tensor, w_EOI: Tensor, b_EO: Tensor | None) -> Tensor:
            nonlocal expert_R
            y = torch._grouped_mm(x_RI, w_EOI.transpose(-2, -1), offs=offs_E)
            if y.requires_grad:  # _grouped_mm's backward rejects broadcast (stride-0) grads, e.g. from y.sum()
                y.register_hook(lambda g: g.contiguous())
            if b_EO is None:
                return y
            if expert_R is None:
                expert_R = torch.repeat_interleave(torch.arange(counts_E.numel(), device=x_RI.device), counts_E,
                                                   output_size=x_RI.shape[0])
            return y + b_EO.index_select(0, expert_R)

        return ffn(x_RD, experts.weights(x_RD.dtype), experts.act, linear, scale_R, experts.dropout)


class BmmBackend(ExpertsBackend):
    uniform_rows_only = True

    def rows(self, experts, x_RD, counts_E, scale_R=None):
        E, D = counts_E.numel(), experts.d_model

        def linear(x_ECI: Tensor, w_EOI: Tensor, b_EO: Tensor | None) -> Tensor:
            if b_EO is None:
                return torch.bmm(x_ECI, w_EOI.transpose(-2, -1))
            return torch.baddbmm(b_EO[:, None, :], x_ECI, w_EOI.transpose(-2, -1))

        scale_EC = scale_R.view(E, -1) if scale_R is not None else None
        y = ffn(x_RD.view(E, -1, D), experts.weights(x_RD.dtype), experts.act, linear, scale_EC, experts.dropout)
        return y.reshape(-1, D)


class BlockwiseBackend(ExpertsBackend):
    def gathered(self, experts, x_TD, token_R, weight_R, counts_E):
        dtype = x_TD.dtype
        keep_RF = None
        p = experts.dropout.p if isinstance(experts.dropout, nn.Dropout) else 0.0
        if experts.training and p > 0:  # the same mask nn.Dropout draws: keep with 1-p, scale by 1/(1-p)
            keep_RF = torch.empty(token_R.shape[0], experts.hidden, dtype=dtype, device=x_TD.device)
            keep_RF.bernoulli_(1 - p).div_(1 - p)
        # heterogeneous experts use their own first hidden_sizes[e] units (no masked compute)
        return blockwise_ffn(x_TD, experts.weights(dtype, masked=False), weight_R.to(dtype), token_R, counts_E,
                             list(experts.hidden_sizes), experts.act, keep_RF)

    def rows(self, experts, x_RD, counts_E, scale_R=None):
        # already-moved rows (expert parallelism, the padded layout) run the same blocks, row r being its own
        # "token": the per-block cache residency outweighs the extra row copy (W2: 7% faster than grouped_mm)
        rows_R = torch.arange(x_RD.shape[0], device=x_RD.device)
        scale_R = scale_R if scale_R is not None else x_RD.new_ones(x_RD.shape[0])
        return self.gathered(experts, x_RD, rows_R, scale_R, counts_E)


EXPERTS_BACKENDS: dict[str, ExpertsBackend] = {}


def register_experts_backend(name: str, backend: ExpertsBackend) -> None:
    """Make ``MoEConfig(experts=name)`` (and ``GroupedExperts(backend=name)``) compute with ``backend``."""
    EXPERTS_BACKENDS[name] = backend


register_experts_backend("loop", LoopBackend())
register_experts_backend("grouped_mm", GroupedMMBackend())
register_experts_backend("bmm", BmmBackend())
register_experts_backend("blockwise", BlockwiseBackend())


class GroupedExperts(nn.Module):
    """E FFN experts with stacked weights (ffn.py: gated activations use down(act(gate x) * up x)).

    ``expert_dropout`` is dropout on the expert hidden activations (ST-MoE, Zoph et al. 2022,
    recommends a higher rate inside experts than in the dense layers when fine-tuning).
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str = "swiglu",
                 expert_dropout: float = 0.0, backend: str = "auto", hidden_sizes: tuple[int, ...] | None = None,
                 bias: bool = False):
        super().__init__()
        if backend != "auto" and backend not in EXPERTS_BACKENDS:
            raise ValueError(f"backend={backend!r}: must be 'auto' or one of {sorted(EXPERTS_BACKENDS)}")
        # heterogeneous experts: stacked at the largest hidden size; units beyond expert e's own size are
        # masked out of the weights (zero output, zero gradient). One dispatch pass serves all sizes, at the
        # cost of computing max(hidden_sizes) units for every expert (blockwise computes each expert's own).
        if hidden_sizes is not None and len(set(hidden_sizes)) > 1:
            hidden = max(hidden_sizes)
            mask_EF = (torch.arange(hidden)[None, :] < torch.tensor(hidden_sizes)[:, None]).float()
            self.register_buffer("unit_mask_EF", mask_EF, persistent=False)
        else:
            self.unit_mask_EF = None
        self.hidden_sizes = tuple(hidden_sizes) if hidden_sizes is not None else (hidden,) * num_experts
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.gated = self.act.gated
        self.backend = backend
        self.dropout = nn.Dropout(expert_dropout) if expert_dropout > 0 else nn.Identity()
        E, D, F_ = num_experts, d_model, hidden
        self.w_gate_EFD = nn.Parameter(torch.empty(E, F_, D)) if self.gated else None
        self.w_up_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.w_down_EDF = nn.Parameter(torch.empty(E, D, F_))
        self.b_gate_EF = nn.Parameter(torch.empty(E, F_)) if bias and self.gated else None
        self.b_up_EF = nn.Parameter(torch.empty(E, F_)) if bias else None
        self.b_down_ED = nn.Parameter(torch.empty(E, D)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """Each expert initialised like an nn.Linear (kaiming-uniform bound 1/sqrt(fan_in), biases too), or
        weights N(0, std) and biases 0."""
        for w, b in ((self.w_gate_EFD, self.b_gate_EF), (self.w_up_EFD, self.b_up_EF),
                     (self.w_down_EDF, self.b_down_ED)):
            if w is None:
                continue
            if std is None:
                bound = 1.0 / math.sqrt(w.shape[-1])
                for t in (w, b):
                    if t is not None:
                        nn.init.uniform_(t, -bound, bound)
            else:
                nn.init.normal_(w, 0.0, std)
                if b is not None:
                    nn.init.zeros_(b)

    def weights(self, dtype: torch.dtype, masked: bool = True) -> FFNWeights:
        """The stacks in ``dtype``; ``masked``: units beyond a heterogeneous expert's own size zeroed."""
        w = FFNWeights(self.w_gate_EFD, self.w_up_EFD, self.w_down_EDF, self.b_gate_EF, self.b_up_EF,
                       self.b_down_ED).map(lambda t: t.to(dtype))
        if not masked or self.unit_mask_EF is None:
            return w
        m_EF = self.unit_mask_EF.to(dtype)
        return FFNWeights(None if w.gate is None else w.gate * m_EF[:, :, None], w.up * m_EF[:, :, None],
                          w.down * m_EF[:, None, :], None if w.b_gate is None else w.b_gate * m_EF,
                          None if w.b_up is None else w.b_up * m_EF, w.b_down)

    def backend_for(self, x: Tensor, uniform_rows: bool = False) -> str:
        """The backend that computes rows like ``x``: the configured one, or the "auto" choice."""
        if self.backend != "auto":
            return self.backend
        if uniform_rows:
            return "bmm"
        if x.device.type == "cpu":
            return "blockwise"
        # on CUDA one grouped_mm kernel per projection beats a Python loop over expert blocks
        return "grouped_mm" if grouped_mm_supported(x, self.d_model, self.hidden) else "loop"

    def _backend(self, x: Tensor, uniform_rows: bool) -> ExpertsBackend:
        name = self.backend_for(x, uniform_rows)
        backend = EXPERTS_BACKENDS[name]
        if backend.uniform_rows_only and not uniform_rows:
            raise ValueError(f"experts backend {name!r} needs equal-size expert blocks (dispatcher='padded')")
        return backend

    def forward(self, x_RD: Tensor, counts_E: Tensor, uniform_rows: bool = False,
                scale_R: Tensor | None = None) -> Tensor:
        x_RD = x_RD.to(compute_dtype(x_RD))
        return self._backend(x_RD, uniform_rows).rows(self, x_RD, counts_E, scale_R)

    def gathered(self, x_TD: Tensor, token_R: Tensor, weight_R: Tensor, counts_E: Tensor) -> Tensor:
        x_TD = x_TD.to(compute_dtype(x_TD))
        return self._backend(x_TD, False).gathered(self, x_TD, token_R, weight_R, counts_E)


class MLP(nn.Module):
    """A dense FFN (ffn.py); used for shared experts and dense twins."""

    def __init__(self, d_model: int, hidden: int, activation: str = "swiglu", dropout: float = 0.0,
                 bias: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.w_gate = nn.Linear(d_model, hidden, bias=bias) if self.act.gated else None
        self.w_up = nn.Linear(d_model, hidden, bias=bias)
        self.w_down = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        """x [..., D] -> [..., D]; ``scale`` [...]: per-row factors on the output (a shared expert's gate)."""
        w = FFNWeights(*(None if m is None else m.weight for m in (self.w_gate, self.w_up, self.w_down)),
                       *(None if m is None else m.bias for m in (self.w_gate, self.w_up, self.w_down)))
        return ffn(x, w, self.act, scale=scale, dropout=self.dropout)
