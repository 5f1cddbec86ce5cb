"""Expert parallelism over torch.distributed: experts sharded over an EP group, everything else data parallel.

The layer package never imports torch.distributed; this package swaps each MoE layer's dispatcher for one that
reaches the experts on every rank by all-to-all, and its experts for this rank's slice (`shard_experts`), lays
ranks out on a DeviceMesh (`init_parallel`), and reduces gradients over the right groups (`grads`).
"""

from .exchange import all_to_all, exchange_counts
from .expert_parallel import ExpertParallelDispatcher, shard_experts

__all__ = ["ExpertParallelDispatcher", "all_to_all", "exchange_counts", "shard_experts"]
