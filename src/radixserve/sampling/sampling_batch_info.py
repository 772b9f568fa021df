"""SamplingBatchInfo: one batch's sampling parameters as device tensors.

Rebuilt when the set of requests in a batch changes (a loop over requests),
then updated each step by tensor ops only (`record`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Set

import torch


@dataclass
class SamplingBatchInfo:
    temperatures: torch.Tensor  # [bs] float32
    top_ps: torch.Tensor  # [bs] float32
    top_ks: torch.Tensor  # [bs] int64, vocab size where unlimited
    min_ps: torch.Tensor  # [bs] float32
    greedy: torch.Tensor  # [bs] bool
    seeds: torch.Tensor  # [bs] int64
    steps: torch.Tensor  # [bs] int64: output tokens so far = index of the token being sampled
    need_filter: bool  # some row uses top_k / top_p / min_p
    all_greedy: bool
    # Logprobs
    return_logprob: bool
    max_top_logprobs: int
    # Optional processors (None when no request in the batch uses them)
    frequency_penalties: Optional[torch.Tensor] = None  # [bs, 1]
    presence_penalties: Optional[torch.Tensor] = None  # [bs, 1]
    output_counts: Optional[torch.Tensor] = None  # [bs, vocab] float32
    repetition_penalties: Optional[torch.Tensor] = None  # [bs, 1]
    seen_mask: Optional[torch.Tensor] = None  # [bs, vocab] bool: in prompt or output
    logit_bias: Optional[torch.Tensor] = None  # [bs, vocab] float32
    min_new_tokens: Optional[torch.Tensor] = None  # [bs] int64
    stop_mask: Optional[torch.Tensor] = None  # [bs, vocab] bool: tokens min_new_tokens blocks

    @classmethod
    def from_reqs(cls, reqs: List[Any], vocab_size: int, device: Any, eos_token_ids: Set[int]) -> "SamplingBatchInfo":
        sps = [r.sampling_params for r in reqs]
        bs = len(reqs)

        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        top_ks = [sp.top_k if sp.top_k > 0 else vocab_size for sp in sps]
        info = cls(
            temperatures=col([max(sp.temperature, 1e-6) for sp in sps], torch.float32),
            top_ps=col([sp.top_p for sp in sps], torch.float32),
            top_ks=col(top_ks, torch.int64),
            min_ps=col([sp.min_p for sp in sps], torch.float32),
            greedy=col([sp.is_greedy for sp in sps], torch.bool),
            seeds=col([r.sampling_seed & ((1 << 63) - 1) for r in reqs], torch.int64),
            steps=col([len(r.output_ids) for r in reqs], torch.int64),
            need_filter=any(not sp.is_greedy and (k < vocab_size or sp.top_p < 1 or sp.min_p > 0)
                            for sp, k in zip(sps, top_ks)),
            all_greedy=all(sp.is_greedy for sp in sps),
            return_logprob=any(r.return_logprob for r in reqs),
            max_top_logprobs=max((r.top_logprobs_num for r in reqs), default=0),
        )
        if any(sp.frequency_penalty or sp.presence_penalty for sp in sps):
            info.frequency_penalties = col([[sp.frequency_penalty] for sp in sps], torch.float32)
            info.presence_penalties = col([[sp.presence_penalty] for sp in sps], torch.float32)
            info.output_counts = _token_matrix(reqs, vocab_size, device, lambda r: r.output_ids).float()
        if any(sp.repetition_penalty != 1.0 for sp in sps):
            info.repetition_penalties = col([[sp.repetition_penalty] for sp in sps], torch.float32)
            info.seen_mask = _token_matrix(reqs, vocab_size, device, lambda r: r.origin_input_ids + r.output_ids) > 0
        if any(sp.logit_bias for sp in sps):
            info.logit_bias = torch.zeros((bs, vocab_size), dtype=torch.float32, device=device)
            for row, sp in enumerate(sps):
                for tid, bias in (sp.logit_bias or {}).items():
                    info.logit_bias[row, int(tid)] = float(bias)
        if any(sp.min_new_tokens > 0 for sp in sps):
            info.min_new_tokens = col([sp.min_new_tokens for sp in sps], torch.int64)
            info.stop_mask = torch.zeros((bs, vocab_size), dtype=torch.bool, device=device)
            for row, sp in enumerate(sps):
                blocked = set(sp.stop_token_set) | (set() if sp.ignore_eos else set(eos_token_ids))
                if sp.min_new_tokens > 0 and blocked:
                    info.stop_mask[row, sorted(blocked)] = True
        return info

    def record(self, next_token_ids: torch.Tensor) -> None:
        """After a step: the sampled tokens join each request's history."""
        self.steps += 1
        rows = torch.arange(len(next_token_ids), device=next_token_ids.device)
        if self.output_counts is not None:
            self.output_counts[rows, next_token_ids] += 1
        if self.seen_mask is not None:
            self.seen_mask[rows, next_token_ids] = True


def _token_matrix(reqs: List[Any], vocab_size: int, device: Any, tokens_of) -> torch.Tensor:
    """[bs, vocab] counts of each request's tokens."""
    counts = torch.zeros((len(reqs), vocab_size), dtype=torch.int32, device=device)
    rows, ids = [], []
    for row, req in enumerate(reqs):
        toks = tokens_of(req)
        rows.extend([row] * len(toks))
        ids.extend(toks)
    if ids:
        index = torch.tensor(rows, device=device) * vocab_size + torch.tensor(ids, device=device)
        counts.view(-1).index_add_(0, index, torch.ones(len(ids), dtype=torch.int32, device=device))
    return counts
