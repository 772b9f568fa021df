"""BatchResult: a launched forward whose results the CPU has not read yet.

With the overlap scheduler the CPU launches batch N+1 before it reads batch N's
sampled ids, so N's results must not depend on the batch object, which the
scheduler keeps changing: the result keeps the requests and plans as they were
at launch, and the ids come back through a non-blocking device-to-host copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

if TYPE_CHECKING:
    from radixserve.layers.sampler import SamplerOutput
    from radixserve.managers.req import Req
    from radixserve.managers.schedule_batch import ExtendPlan, ScheduleBatch
    from radixserve.model_executor.model_runner import LogitsOutput


@dataclass
class BatchResult:
    batch: "ScheduleBatch"
    is_extend: bool
    reqs: List["Req"]  # the batch's requests at launch, in row order
    plans: List["ExtendPlan"]  # extend only
    logits: "LogitsOutput"  # an EmbeddingOutput on an embedding server
    sample: Optional["SamplerOutput"]  # None on an embedding server
    # A mixed batch's running requests, sampled from the same forward; their
    # tokens are processed before this (extend) part's.
    decode_part: Optional["BatchResult"] = None
    _host_ids: Optional[torch.Tensor] = field(default=None, repr=False)
    _copied: Optional["torch.cuda.Event"] = field(default=None, repr=False)

    @classmethod
    def launched(cls, batch: "ScheduleBatch", logits: "LogitsOutput",
                 sample: Optional["SamplerOutput"]) -> "BatchResult":
        result = cls(batch, batch.forward_mode.is_extend(), list(batch.reqs),
                     list(batch.plans) if batch.forward_mode.is_extend() else [], logits, sample)
        if sample is None:
            return result
        ids = sample.next_token_ids
        if ids.is_cuda:
            # Queued behind the forward on the same stream; the CPU goes on.
            result._host_ids = ids.to("cpu", non_blocking=True)
            result._copied = torch.cuda.Event()
            result._copied.record()
        return result

    def all_reqs(self) -> List["Req"]:
        return (self.decode_part.reqs if self.decode_part is not None else []) + self.reqs

    def next_token_ids(self) -> List[int]:
        """The sampled ids on the host; waits for the forward to finish."""
        if self._copied is None:
            return self.sample.next_token_ids.tolist()
        self._copied.synchronize()
        return self._host_ids.tolist()

    def host_logprobs(self) -> Tuple[Optional[list], Optional[list], Optional[list]]:
        sample = self.sample
        if sample.logprobs is None:
            return None, None, None
        vals = sample.top_logprobs_val.tolist() if sample.top_logprobs_val is not None else None
        ids = sample.top_logprobs_idx.tolist() if sample.top_logprobs_idx is not None else None
        return sample.logprobs.tolist(), vals, ids
