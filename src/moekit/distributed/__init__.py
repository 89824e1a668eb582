"""Scale on the PyTorch distributed stack (launch with torchrun).

``build_mesh(ep, dp_replicate)`` lays the ranks out on a DeviceMesh with named dimensions;
``parallelize(model, mesh)`` shards the experts over ``ep`` and everything with FSDP2 (``fully_shard``);
``moekit.distributed.dcp`` saves and loads sharded, reshardable checkpoints.
"""

from moekit.distributed.all_to_all import CommStats, all_to_all, exchange_counts
from moekit.distributed.ep_dispatch import AllToAllDispatcher
from moekit.distributed.mesh import ParallelMesh, build_mesh, init_distributed
from moekit.distributed.parallelize import ParallelPlan, parallelize, rank_zero_first

__all__ = ["AllToAllDispatcher", "CommStats", "ParallelMesh", "ParallelPlan", "all_to_all", "build_mesh",
           "exchange_counts", "init_distributed", "parallelize", "rank_zero_first"]
