"""A trainer process for the weight-broadcast tests: only torch is imported,
so spawning it is quick."""

from __future__ import annotations

from typing import List

import torch


def broadcast_tensors(tensors: List[torch.Tensor], port: int, world_size: int, group_name: str) -> None:
    """Join the weight group as rank 0 and broadcast the tensors, in order."""
    import torch.distributed as dist

    from radixserve.model_executor.weight_sync import init_custom_process_group

    group = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", world_size, 0, group_name)
    for t in tensors:
        dist.broadcast(t.contiguous(), src=0, group=group)
    dist.destroy_process_group(group)
