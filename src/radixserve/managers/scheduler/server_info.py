"""What the scheduler reports to /get_server_info: its limits, counters,
memory, and each tensor-parallel rank's own view."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List

from radixserve.distributed.rank_sync import gather_objects

if TYPE_CHECKING:
    from radixserve.managers.scheduler.core import Scheduler


def server_info(self: "Scheduler") -> Dict[str, Any]:
    """/get_server_info's scheduler part (one replica's)."""
    runner, tree = self.runner, self.prefix_cache.tree
    return {
        "max_total_num_tokens": runner.max_total_num_tokens,
        "max_running_requests": runner.max_running_requests,
        "context_length": runner.context_len,
        "chunked_prefill_size": self.admission.chunk_size,
        "page_size": self.allocator.page_size,
        "num_running_reqs": len(self.kv_holders()),
        "num_waiting_reqs": len(self.admission.waiting),
        "num_retractions": self.running.num_retractions,
        "num_overlapped_batches": self.num_overlapped_batches,
        "num_failed_batches": self.num_failed_batches,
        "num_mixed_batches": self.num_mixed_batches,
        "speculative": self.spec.info() if self.spec is not None else None,
        "num_prefill_tokens": self.admission.num_prefill_tokens,
        "num_evictions": tree.num_evicted_nodes if tree else 0,
        "weight_version": self.weights.version,
        "pending_weight_updates": len(self.weights.pending),
        "paused": self.weights.paused,
        "kv_cache": self.kv_cache_stats(),
        "hicache": self.prefix_cache.tier_stats(),
        "device": str(self.device),
        "dtype": str(runner.dtype).removeprefix("torch."),
        # the weight format in effect (a 4-bit GGUF on the CPU is int4 by default)
        "weight_format": runner.weight_format.name if runner.weight_format else None,
        # Triton kernels compiled since serving began: 0 unless the start-up warm-up missed one
        "kernel_compiles_while_serving": self.jit_watch.count,
        "tp_size": self.server_args.tp_size,
        "ep_size": self.server_args.ep_size,
        "dp_size": self.server_args.dp_size,
        "dp_rank": self.dp_rank,
        "lora": self.runner.lora_manager.info() if getattr(self.runner, "lora_manager", None) else None,
        "disaggregation": self.pd.report(),
        "tp_ranks": rank_states(self),  # (internal_states is per data-parallel replica, as in SGLang)
    }

def rank_states(self: "Scheduler") -> List[Dict[str, Any]]:
    """Each rank's own view, in rank order (a collective: every rank answers
    the same GetServerInfoReq at the same point of its loop). Scheduling is
    replicated, so the ranks' KV counts must agree; the tests check it."""
    mine = {"tp_rank": self.tp_rank, "pid": os.getpid(), "max_total_num_tokens": self.runner.max_total_num_tokens,
            "num_running_reqs": len(self.kv_holders()), "kv_cache": self.kv_cache_stats(),
            "hicache": self.prefix_cache.tier_stats()}
    return gather_objects(mine)
