"""FSDP2 + expert parallelism on a DeviceMesh (launch with torchrun); the torchtitan recipe.

``parallelize(model, mesh)``, on every rank, after building the full model and before the optimizer:

1. makes the replicas identical (everything broadcast from rank 0: ranks may have built from other seeds);
2. keeps, in each MoELayer, only this rank's experts [ep_rank*L, (ep_rank+1)*L), L = E / ep, and plugs in
   the all-to-all dispatcher over the ``ep`` dimension;
3. ``fully_shard``s each MoELayer's local experts over (dp_replicate, efsdp), each transformer block and
   then the root over (dp_replicate, dp_shard) (FSDP2: parameters become DTensor shards, gathered around
   each forward/backward; gradients are reduce-scattered in backward, no hand-written all-reduce).

Each rank trains on its own 1/W of every batch and the objective is the mean of the W per-rank losses,
so every gradient is divided by W. FSDP averages dense gradients over all W ranks by itself. An expert
shard's gradient sums the tokens of its whole ``ep`` group (the all-to-all's backward brings them home):
the dispatcher divides it by ``ep`` (the mean over the group's ranks), and FSDP averages it over the
(dp_replicate, efsdp) ranks that hold the same shard.

Differences from one process on the concatenated batch, by design: capacity is applied to each rank's
own tokens (GShard's per-group capacity), and the load-balancing loss is computed on each rank's
micro-batch (its f_i P_i product is not linear in the batch); the z-loss and the task loss are token
means and match exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from moekit.distributed.ep_dispatch import AllToAllDispatcher
from moekit.distributed.mesh import ParallelMesh
from moekit.errors import UsageError
from moekit.layers.experts import GroupedExperts
from moekit.layers.moe import MoELayer


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block before the other ranks do (e.g. to fill an on-disk cache they then read).
    A no-op without a process group."""
    others_wait = dist.is_initialized() and dist.get_rank() != 0
    if others_wait:
        dist.barrier()
    yield
    if dist.is_initialized() and not others_wait:
        dist.barrier()


def _coalesced(tensors: list[Tensor], collective: Callable[[Tensor], None]) -> None:
    """Run ``collective`` once per dtype on a flat copy of ``tensors`` and copy the result back."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        for t, v in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(v.view_as(t))


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a plain tensor is its own shard)."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_experts(experts: GroupedExperts, ep_rank: int, ep_size: int) -> None:
    """Keep only experts [ep_rank*L, (ep_rank+1)*L) of a stacked-weight expert module, in place: every
    per-expert parameter and buffer (dim 0 = E, e.g. the heterogeneous-size unit mask), ``hidden_sizes``."""
    E = experts.num_experts
    L = E // ep_size
    mine = slice(ep_rank * L, (ep_rank + 1) * L)
    for name, p in list(experts.named_parameters(recurse=False)):
        setattr(experts, name, nn.Parameter(p.detach()[mine].clone(), requires_grad=p.requires_grad))
    for name, b in list(experts.named_buffers(recurse=False)):
        if b.dim() > 0 and b.shape[0] == E:
            setattr(experts, name, b[mine].clone())
    if getattr(experts, "hidden_sizes", None) is not None:
        experts.hidden_sizes = tuple(experts.hidden_sizes[mine])
    experts.num_experts = L


class ParallelPlan:
    """What ``parallelize`` did: the mesh, which parameters are expert shards (FQN -> global E), and the
    helpers that must know the layout (global-norm clipping, batch split, loading single-process state)."""

    def __init__(self, model: nn.Module, mesh: ParallelMesh, expert_keys: dict[str, int]):
        self.model, self.mesh, self.expert_keys = model, mesh, expert_keys
        named = dict(model.named_parameters())
        self.expert_params = [p for k, p in named.items() if k in expert_keys and p.requires_grad]
        self.dense_params = [p for k, p in named.items() if k not in expert_keys and p.requires_grad]

    @property
    def is_main(self) -> bool:
        return self.mesh.is_main

    @property
    def world_size(self) -> int:
        return self.mesh.world_size

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` (2-norm) over the whole model. Every parameter is split over
        ``dp_shard`` exactly once (dense ones by FSDP, experts by ep x efsdp) and replicated over
        ``dp_replicate``, so the squared norm is the sum over ``dp_shard`` of the local shards'."""
        grads = [local(p.grad) for p in self.dense_params + self.expert_params if p.grad is not None]
        device = next(self.model.parameters()).device
        # accumulate in at least float32 (bf16 grads), in float64 when the grads are float64
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        sq = sum((g.detach().to(dtype).pow(2).sum() for g in grads), torch.zeros((), dtype=dtype, device=device))
        dist.all_reduce(sq, group=self.mesh.mesh.get_group("dp_shard"))
        total = sq.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.detach().mul_(coef.to(g.dtype))
        return total

    def local_batch(self, batch_B: Tensor) -> Tensor:
        """This rank's contiguous 1/W of a global batch (dim 0). Equal shares keep J = full-batch loss."""
        B, W = batch_B.shape[0], self.world_size
        if B % W != 0:
            raise UsageError(f"batch size {B} must be divisible by the world size {W} for data parallelism")
        n = B // W
        return batch_B[self.mesh.rank * n:(self.mesh.rank + 1) * n]

    def sum_over_ranks(self, tensors: list[Tensor]) -> list[Tensor]:
        """Element-wise sums over all W ranks (e.g. per-layer expert loads of the global batch)."""
        out = [t.detach().clone() for t in tensors]
        if self.world_size > 1 and out:
            _coalesced(out, lambda flat: dist.all_reduce(flat))
        return out

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        """Means over all W ranks of per-rank scalars (with equal shares: the full-batch value)."""
        t = torch.tensor(values, dtype=torch.float64, device=next(self.model.parameters()).device)
        return (self.sum_over_ranks([t])[0] / self.world_size).tolist()

    def shard_like(self, key: str, full: Tensor, like: Tensor) -> Tensor:
        """This rank's part of a single-process tensor for state key ``key``, laid out like ``like`` (a
        parameter or its optimizer state): its expert slice, then its FSDP shard (no communication)."""
        if key in self.expert_keys:
            E = self.expert_keys[key]
            if full.shape[0] != E:
                raise UsageError(f"state key {key!r}: expected a full expert tensor with {E} experts in dim 0, "
                                 f"got shape {tuple(full.shape)}")
            L = E // self.mesh.ep_size
            full = full[self.mesh.ep_rank * L:(self.mesh.ep_rank + 1) * L]
        full = full.to(device=like.device, dtype=like.dtype)
        if isinstance(like, DTensor):
            return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
        return full

    @torch.no_grad()
    def load_full_state_dict(self, full: dict[str, Tensor]) -> None:
        """Load a single-process state dict (e.g. a safetensors checkpoint) into the sharded model."""
        for key, t in self.model.state_dict().items():
            if key not in full:
                continue
            local(t).copy_(local(self.shard_like(key, full[key], t)))

    def shard_optimizer_state_dict(self, full: dict, optimizer: torch.optim.Optimizer) -> dict:
        """A single-process ``optimizer.state_dict()`` (parameters in the model's order, unchanged by
        sharding) as this rank's, for ``optimizer.load_state_dict``."""
        names = {id(p): k for k, p in self.model.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = {}
        for i, s in full["state"].items():
            p = params[int(i)]
            state[i] = {k: self.shard_like(names[id(p)], v, p) if torch.is_tensor(v) and v.dim() > 0 else v
                        for k, v in s.items()}
        return {**full, "state": state}


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward (memory for ~1/3 more compute)."""
    for block in model.layers:
        block.checkpoint_activations = True


def apply_compile(model: nn.Module, fullgraph: bool = False, backend: str = "inductor") -> None:
    """``torch.compile`` each transformer block in place (parameter names unchanged). Blocks repeat, so
    one compiled graph serves them all; apply before ``parallelize`` (FSDP's hooks stay outside)."""
    # the loop experts backend splits rows by per-expert counts: traced as data-dependent sizes, not a break
    torch._dynamo.config.capture_scalar_outputs = True
    for block in model.layers:
        block.compile(fullgraph=fullgraph, backend=backend)


def _moe_layers(model: nn.Module, ep: int) -> list[tuple[str, MoELayer]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    for name, layer in layers:
        where = name or "model"
        if not isinstance(layer.experts, GroupedExperts):
            raise UsageError(f"{where}.experts is a {type(layer.experts).__name__}: expert parallelism needs "
                             f"stacked-weight GroupedExperts")
        if layer.experts.num_experts % ep != 0:
            raise UsageError(f"ep={ep}: must divide num_experts={layer.experts.num_experts} of MoE layer {where!r}")
    return layers


def parallelize(model: nn.Module, mesh: ParallelMesh, num_chunks: int = 1) -> ParallelPlan:
    """Shard ``model`` over ``mesh`` in place (see the module docstring); ``num_chunks`` > 1 pipelines the
    token exchange with the expert compute. Returns the plan the trainer uses."""
    layers = _moe_layers(model, mesh.ep_size)
    with torch.no_grad():
        _coalesced([t.data for t in list(model.parameters()) + list(model.buffers())],
                   lambda flat: dist.broadcast(flat, src=0))
    expert_keys: dict[str, int] = {}
    fsdp_kwargs = {"reshard_after_forward": True}
    for name, layer in layers:
        experts = layer.experts
        E = experts.num_experts
        prefix = f"{name}.experts." if name else "experts."
        expert_keys.update({prefix + k: E for k, _ in experts.named_parameters(recurse=False)})
        if mesh.ep_size > 1:
            shard_experts(experts, mesh.ep_rank, mesh.ep_size)
            layer.dispatcher = AllToAllDispatcher(E, mesh.ep_group, num_chunks)
        fully_shard(experts, mesh=mesh.expert_mesh, **fsdp_kwargs)
        # the local dispatcher calls the fused method, not forward: FSDP must gather around it too
        register_fsdp_forward_method(experts, "gathered")
        _sum_then_divide(experts)
    dense = [*getattr(model, "layers", []), model]
    for module in dense:
        fully_shard(module, mesh=mesh.dense_mesh, **fsdp_kwargs)
        _sum_then_divide(module)
    return ParallelPlan(model, mesh, expert_keys)


def _sum_then_divide(module: FSDPModule) -> None:
    """Gradients: plain sums over the shard (and replica) groups, then a division (gloo has neither AVG nor
    pre-multiplied sums)."""
    module.set_force_sum_reduction_for_comms(True)
    # experts or a router may get no gradient on one rank: all ranks still reduce the same buffers
    module.set_reduce_scatter_unused_params(True, recurse=False)
