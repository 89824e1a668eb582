"""Expert parallelism + data parallelism on torch.distributed (launch with torchrun).

``parallelize(model, ep_size)`` shards each MoELayer's experts over expert-parallel groups and swaps in
the ``AllToAllDispatcher``; the returned ``ExpertParallel`` reduces gradients, clips the global norm and
converts between sharded and single-process checkpoints.
"""

from moekit.distributed.all_to_all import CommStats, all_to_all, exchange_counts
from moekit.distributed.ep_dispatch import AllToAllDispatcher
from moekit.distributed.parallelize import (
                                            ExpertParallel,
                                            ParallelGroups,
                                            build_groups,
                                            init_distributed,
                                            parallelize,
                                            rank_zero_first,
)

__all__ = ["AllToAllDispatcher", "CommStats", "ExpertParallel", "ParallelGroups", "all_to_all",
           "build_groups", "exchange_counts", "init_distributed", "parallelize", "rank_zero_first"]
