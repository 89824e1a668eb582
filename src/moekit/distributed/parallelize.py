"""Expert parallelism (EP) + data parallelism (DP) for any model that holds MoELayers.

Layout: W ranks, EP size P divides W. EP groups are blocks of consecutive ranks {g*P, ..., g*P + P-1}
(consecutive so that on GPUs an EP group stays inside a node, where all-to-all is cheapest). The rank
with EP index r keeps the experts [r*L, (r+1)*L), L = E / P, of every MoE layer. The W/P ranks with
the same EP index hold the same experts: they form that shard's expert-DP group. Everything else
(attention, embeddings, routers, shared experts) is replicated on all W ranks.

Gradient scaling. Training minimises the mean of the per-rank losses, J = (1/W) sum_s L_s, where every
rank holds B/W of the batch (equal token counts: then J is the loss of the concatenated batch).
- Replicated parameter: rank s's backward gives dL_s/dw, so dJ/dw = (1/W) * all_reduce_sum over the world.
- Expert shard: the all-to-all backward returns to its owner the gradient from every token it served, so
  the owner holds sum_{s in its EP group} dL_s/dw; dJ/dw = (1/W) * all_reduce_sum over the expert-DP group.
Both are "sum, then divide by W"; only the group differs.

Why an explicit reduction instead of DDP: DDP broadcasts every parameter from rank 0 when it wraps the
model and all-reduces every gradient over its one group. Expert shards differ per rank and need another
group, so they would have to be hidden from DDP through a private API and reduced separately anyway,
and DDP's bucket hooks expect every parameter to get a gradient in every step (a rank whose experts
receive no tokens is normal here). ``reduce_gradients()`` after backward is two flat all-reduces (one per
group kind), deterministic, the same on gloo and NCCL, and composes with gradient accumulation (call it
once before ``optimizer.step()``). The cost is no overlap of gradient communication with backward.

What does not match a single process on the concatenated batch, by design: capacity is applied to each
rank's own tokens (GShard's per-group capacity), and the load-balancing loss is computed on each rank's
micro-batch (its f_i P_i product is not linear in the batch); the z-loss and the task loss are token means
and match exactly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.distributed.ep_dispatch import AllToAllDispatcher
from moekit.layers.experts import GroupedExperts
from moekit.layers.moe import MoELayer


@dataclass
class ParallelGroups:
    rank: int
    world_size: int
    ep_size: int  # P: ranks that split the experts
    ep_rank: int  # this rank's index in its EP group = which expert shard it holds
    dp_size: int  # W / P: replicas of each expert shard
    ep_group: dist.ProcessGroup
    expert_dp_group: dist.ProcessGroup

    @property
    def shard_source(self) -> int:
        """Global rank whose copy of this rank's expert shard is authoritative (EP group 0)."""
        return self.ep_rank


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); NCCL with one GPU per process (LOCAL_RANK) on CUDA, gloo on CPU. Returns the device."""
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"expert parallelism needs a torchrun launch (environment lacks {missing}), "
                             f"e.g. torchrun --nproc-per-node 2 -m moekit train --expert-parallel 2 ...")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def build_groups(ep_size: int) -> ParallelGroups:
    """Create the EP and expert-DP process groups (every rank must call this, in the same order)."""
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: launch with torchrun (or call "
                         "init_process_group) before parallelize()")
    W, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(ep_size, int) or ep_size < 1 or W % ep_size != 0:
        raise ValueError(f"ep_size={ep_size!r}: must be a positive integer dividing the world size {W}")
    ep_group = dp_group = None
    # new_group is collective: all ranks create all groups, each keeps the ones it belongs to
    for g in range(W // ep_size):
        ranks = list(range(g * ep_size, (g + 1) * ep_size))
        group = dist.new_group(ranks)
        ep_group = group if rank in ranks else ep_group
    for r in range(ep_size):
        ranks = list(range(r, W, ep_size))
        group = dist.new_group(ranks)
        dp_group = group if rank in ranks else dp_group
    return ParallelGroups(rank=rank, world_size=W, ep_size=ep_size, ep_rank=rank % ep_size,
                          dp_size=W // ep_size, ep_group=ep_group, expert_dp_group=dp_group)


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


class ExpertParallel:
    """The result of ``parallelize``: the groups, which state-dict keys are expert shards, and the
    gradient / clipping / checkpoint helpers that must know about the sharding."""

    def __init__(self, model: nn.Module, groups: ParallelGroups, expert_keys: dict[str, int]):
        self.model, self.groups = model, groups
        self.expert_keys = expert_keys  # state-dict key -> global number of experts E (dim 0 when full)
        expert_ids = {id(p) for k, p in model.named_parameters() if k in expert_keys}
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.expert_params = [p for p in trainable if id(p) in expert_ids]
        self.dense_params = [p for p in trainable if id(p) not in expert_ids]

    def sync_parameters(self) -> None:
        """Make replicas identical: replicated tensors from rank 0, each expert shard from its copy in EP
        group 0. A no-op when every rank built the model from the same seed; required otherwise."""
        g = self.groups
        # expert buffers (e.g. unit masks) are per shard and derived from the config: not broadcast
        sharded = {id(b) for m in self.model.modules() if isinstance(m, GroupedExperts) for b in m.buffers()}
        buffers = [b for b in self.model.buffers() if id(b) not in sharded]
        dense = [p.data for p in self.dense_params] + buffers
        if g.world_size > 1 and dense:
            _coalesced(dense, lambda flat: dist.broadcast(flat, src=0))
        if g.dp_size > 1 and self.expert_params:
            _coalesced([p.data for p in self.expert_params],
                       lambda flat: dist.broadcast(flat, src=g.shard_source, group=g.expert_dp_group))

    def reduce_gradients(self) -> None:
        """After backward, before the optimizer step: gradients of J = mean of the per-rank losses."""
        g = self.groups
        for params, group, size in ((self.dense_params, None, g.world_size),
                                    (self.expert_params, g.expert_dp_group, g.dp_size)):
            for p in params:
                if p.grad is None:  # every rank must contribute the same buffer layout
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            if size > 1 and grads:
                _coalesced(grads, lambda flat: dist.all_reduce(flat, group=group))
            for grad in grads:
                grad.div_(g.world_size)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` (2-norm) over the whole model: the expert shards of an EP group
        together hold every expert once, so their squared norms are summed over the EP group."""
        def sq(params):
            # accumulate in at least float32 (bf16 grads), in float64 when the grads are float64
            return sum((p.grad.detach().to(torch.promote_types(p.grad.dtype, torch.float32)).pow(2).sum()
                        for p in params if p.grad is not None),
                       torch.zeros((), device=next(self.model.parameters()).device))
        expert_sq = sq(self.expert_params)
        if self.groups.ep_size > 1:
            dist.all_reduce(expert_sq, group=self.groups.ep_group)
        total = (sq(self.dense_params) + expert_sq).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in self.dense_params + self.expert_params:
            if p.grad is not None:
                p.grad.detach().mul_(coef.to(p.grad.dtype))
        return total

    def gather_experts(self, local: Tensor) -> Tensor:
        """Concatenate an expert-sharded tensor (dim 0) over the EP group (collective)."""
        local = local.contiguous()
        shards = [torch.empty_like(local) for _ in range(self.groups.ep_size)]
        dist.all_gather(shards, local, group=self.groups.ep_group)
        return torch.cat(shards)

    def slice_experts(self, full: Tensor) -> Tensor:
        """This rank's experts of a full tensor (dim 0)."""
        L = full.shape[0] // self.groups.ep_size
        return full[self.groups.ep_rank * L:(self.groups.ep_rank + 1) * L]

    def full_state_dict(self) -> dict[str, Tensor]:
        """The single-process state dict: expert shards gathered over the EP group (collective; every
        rank gets the full dict, rank 0 saves it). Loads into the unsharded model unchanged."""
        sd = dict(self.model.state_dict())
        for key in self.expert_keys:
            sd[key] = self.gather_experts(sd[key])
        return sd

    def shard_state_dict(self, full: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's slice of a single-process state dict (no communication)."""
        sd = dict(full)
        for key, E in self.expert_keys.items():
            if key not in full or full[key].shape[0] != E:
                got = tuple(full[key].shape) if key in full else "missing"
                raise ValueError(f"state dict key {key!r}: expected a full expert tensor with {E} experts "
                                 f"in dim 0, got {got}")
            sd[key] = self.slice_experts(full[key])
        return sd

    def _expert_slots(self, optimizer: torch.optim.Optimizer) -> list[tuple[int, Tensor]]:
        """(index in ``optimizer.state_dict()['state']``, parameter) of every expert shard it updates."""
        expert_ids = {id(p) for p in self.expert_params}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return [(i, p) for i, p in enumerate(params) if id(p) in expert_ids]

    def full_optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """The single-process optimizer state: per-parameter state tensors of expert shards (Adam's moments,
        same shape as the shard) gathered over the EP group. Parameter order is the model's, unchanged by
        sharding, so the result loads into the optimizer of the unsharded model (collective)."""
        sd = optimizer.state_dict()
        state = {i: dict(s) for i, s in sd["state"].items()}
        for i, p in self._expert_slots(optimizer):
            for k, v in sorted(state.get(i, {}).items()):
                if torch.is_tensor(v) and v.shape == p.shape:
                    state[i][k] = self.gather_experts(v)
        return {**sd, "state": state}

    def shard_optimizer_state_dict(self, full: dict, optimizer: torch.optim.Optimizer) -> dict:
        """This rank's slice of a single-process optimizer state dict, for ``optimizer.load_state_dict``."""
        state = {i: dict(s) for i, s in full["state"].items()}
        for i, p in self._expert_slots(optimizer):
            for k, v in state.get(i, {}).items():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == p.shape[0] * self.groups.ep_size:
                    state[i][k] = self.slice_experts(v)
        return {**full, "state": state}

    def load_full_state_dict(self, full: dict[str, Tensor]) -> None:
        self.model.load_state_dict(self.shard_state_dict(full))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes checkpoints."""
        return self.groups.rank == 0

    def sum_over_ranks(self, tensors: list[Tensor]) -> list[Tensor]:
        """Element-wise sums over all W ranks (e.g. per-layer expert loads of the global batch)."""
        out = [t.detach().clone() for t in tensors]
        if self.groups.world_size > 1 and out:
            _coalesced(out, lambda flat: dist.all_reduce(flat))
        return out

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        """Means over all W ranks of per-rank scalars (with equal shares: the full-batch value)."""
        t = torch.tensor(values, dtype=torch.float64, device=next(self.model.parameters()).device)
        return (self.sum_over_ranks([t])[0] / self.groups.world_size).tolist()

    def local_batch(self, batch_B: Tensor) -> Tensor:
        """This rank's contiguous 1/W of a global batch (dim 0). Equal shares keep J = full-batch loss."""
        B, W = batch_B.shape[0], self.groups.world_size
        if B % W != 0:
            raise ValueError(f"batch size {B} must be divisible by the world size {W} for data parallelism")
        n = B // W
        return batch_B[self.groups.rank * n:(self.groups.rank + 1) * n]


def parallelize(model: nn.Module, ep_size: int, num_chunks: int = 1) -> ExpertParallel:
    """Shard every MoELayer's experts over EP groups of ``ep_size`` ranks and swap in the all-to-all
    dispatcher (``num_chunks`` > 1: pipelined comm/compute overlap). Call on every rank after building
    the full model (same seed or not: replicas are synchronised) and before creating the optimizer.
    Then call ``reduce_gradients()`` after each backward."""
    groups = build_groups(ep_size)
    expert_keys: dict[str, int] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, MoELayer):
            continue
        experts = layer.experts
        if not isinstance(experts, GroupedExperts):
            raise ValueError(f"{name or 'model'}.experts is a {type(experts).__name__}: expert parallelism "
                             f"needs stacked-weight GroupedExperts")
        E = experts.num_experts
        if E % ep_size != 0:
            raise ValueError(f"ep_size={ep_size}: must divide num_experts={E} of MoE layer "
                             f"{name or 'model'!r}")
        prefix = f"{name}.experts." if name else "experts."
        expert_keys.update({prefix + k: E for k, _ in experts.named_parameters(recurse=False)})
        if ep_size > 1:
            shard_experts(experts, groups.ep_rank, ep_size)
            layer.dispatcher = AllToAllDispatcher(E, groups.ep_group, num_chunks)
    plan = ExpertParallel(model, groups, expert_keys)
    plan.sync_parameters()
    return plan
