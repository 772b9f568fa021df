"""Process groups and collectives for tensor and expert parallelism."""

from radixserve.distributed.parallel_state import (
    GroupCoordinator,
    ParallelConfig,
    destroy_distributed,
    get_ep_group,
    get_parallel_config,
    get_tp_group,
    init_distributed,
)

__all__ = [
    "GroupCoordinator",
    "ParallelConfig",
    "destroy_distributed",
    "get_ep_group",
    "get_parallel_config",
    "get_tp_group",
    "init_distributed",
]
