"""The parallel layout as a DeviceMesh with named dimensions (the torchtitan layout).

    world = dp_replicate x dp_shard,   dp_shard = efsdp x ep

- ``ep``: ranks that split each MoE layer's experts (token dispatch is an all-to-all over this dim); adjacent
  ranks, so that on a GPU cluster the all-to-all stays inside a node.
- ``efsdp``: the rest of ``dp_shard``: FSDP shards each rank's local experts over it.
- ``dp_shard`` (= efsdp x ep, flattened): FSDP shards the non-expert parameters over it.
- ``dp_replicate``: full replicas (HSDP: gradients all-reduced across it). ``dp_shard`` = 1 with
  ``dp_replicate`` = world is plain data parallelism (DDP) as a degenerate mesh.

Every dimension is data parallel for the batch: each of the W ranks trains on its own 1/W of every batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moekit.errors import UsageError

DIMS = ("dp_replicate", "efsdp", "ep")


@dataclass
class ParallelMesh:
    mesh: DeviceMesh  # 3-D: DIMS
    checkpoint_mesh: DeviceMesh  # the same ranks as (dp_replicate, ep, efsdp): see distributed/dcp.py
    checkpoint_group: dist.ProcessGroup  # gloo, for asynchronous checkpoint writes beside training

    @property
    def device_type(self) -> str:
        return self.mesh.device_type

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return self.mesh.size()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes the non-sharded files."""
        return self.rank == 0

    def size(self, dim: str) -> int:
        return self.mesh.size(DIMS.index(dim))

    def coordinate(self, dim: str) -> int:
        return self.mesh.get_local_rank(dim)

    @property
    def ep_size(self) -> int:
        return self.size("ep")

    @property
    def ep_rank(self) -> int:
        return self.coordinate("ep")

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def dense_mesh(self) -> DeviceMesh:
        """FSDP mesh of the non-expert parameters: (dp_replicate, dp_shard)."""
        return self.mesh["dp_replicate", "dp_shard"]

    @property
    def expert_mesh(self) -> DeviceMesh:
        """FSDP mesh of this rank's local experts: (dp_replicate, efsdp)."""
        return self.mesh["dp_replicate", "efsdp"]


def build_mesh(ep: int = 1, dp_replicate: int = 1, device_type: str = "cpu") -> ParallelMesh:
    """The mesh over the default process group (collective: every rank calls it). ``ep`` must divide
    world / dp_replicate."""
    if not dist.is_initialized():
        raise UsageError("torch.distributed is not initialised: launch with torchrun (or call "
                         "init_distributed) before building a mesh")
    W = dist.get_world_size()
    for name, v in (("ep", ep), ("dp_replicate", dp_replicate)):
        if not isinstance(v, int) or v < 1:
            raise UsageError(f"{name}={v!r}: must be a positive integer")
    if W % dp_replicate != 0 or (W // dp_replicate) % ep != 0:
        raise UsageError(f"ep={ep} x dp_replicate={dp_replicate} must divide the world size {W} "
                         f"(world = dp_replicate x efsdp x ep)")
    mesh = init_device_mesh(device_type, (dp_replicate, W // dp_replicate // ep, ep), mesh_dim_names=DIMS)
    # flattened views are registered on the root mesh; slicing by name finds them afterwards
    mesh["efsdp", "ep"]._flatten("dp_shard")
    checkpoint_mesh = DeviceMesh(device_type, mesh.mesh.permute(0, 2, 1).contiguous(),
                                 mesh_dim_names=("dp_replicate", "ep", "efsdp"))
    return ParallelMesh(mesh, checkpoint_mesh, dist.new_group(backend="gloo"))


def init_distributed(device: str | torch.device = "auto") -> torch.device:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT): NCCL with one GPU per process (LOCAL_RANK) on CUDA, gloo on the CPU. Returns the device
    collectives and the model use."""
    from moekit.device import resolve_device

    device = resolve_device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UsageError(f"distributed training needs a torchrun launch (environment lacks {missing}), "
                             f"e.g. torchrun --nproc-per-node 2 -m moekit train --expert-parallel 2 ...")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return device
