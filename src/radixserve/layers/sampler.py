"""Batched sampling: logit processors, then greedy or seeded Gumbel-max sampling.

The random noise of request r at step s for token t is a hash of
(seed_r, s, t), so a seeded request samples the same tokens whatever else is
in the batch, and no global RNG state is involved. All tensor ops, no loop
over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from radixserve.sampling.sampling_batch_info import SamplingBatchInfo

MASK32 = 0xFFFFFFFF


@dataclass
class SamplerOutput:
    next_token_ids: torch.Tensor  # [bs] int64
    logprobs: Optional[torch.Tensor] = None  # [bs] float32, of the raw logits
    top_logprobs_val: Optional[torch.Tensor] = None  # [bs, K]
    top_logprobs_idx: Optional[torch.Tensor] = None  # [bs, K]


def apply_logit_processors(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Penalties, logit bias and the min_new_tokens block, on a copy of logits."""
    logits = logits.clone()
    if info.repetition_penalties is not None:
        # HF semantics over prompt and output tokens: shrink toward zero.
        penalized = torch.where(logits > 0, logits / info.repetition_penalties, logits * info.repetition_penalties)
        logits = torch.where(info.seen_mask, penalized, logits)
    if info.output_counts is not None:
        # OpenAI semantics over output tokens.
        logits -= info.frequency_penalties * info.output_counts
        logits -= info.presence_penalties * (info.output_counts > 0).float()
    if info.logit_bias is not None:
        logits += info.logit_bias
    if info.stop_mask is not None:
        blocking = (info.steps < info.min_new_tokens)[:, None] & info.stop_mask
        logits = logits.masked_fill(blocking, float("-inf"))
    return logits


def filter_logits(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Temperature-scaled logits with tokens outside top_k / top_p / min_p set to -inf."""
    logits = logits / info.temperatures[:, None]
    if not info.need_filter:
        return logits
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = rank >= info.top_ks[:, None]
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    drop |= (mass_before >= info.top_ps[:, None]) & (info.top_ps[:, None] < 1.0)
    drop |= sorted_probs < info.min_ps[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False  # the most likely token always stays
    mask = torch.zeros_like(drop).scatter(1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash; products stay below 2**63 so int64 never overflows."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x


def seeded_gumbel(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[bs, vocab] Gumbel noise, a pure function of (seed, step, token)."""
    row = _mix32(_mix32(seeds & MASK32) ^ _mix32((seeds >> 32) & MASK32) ^ _mix32(steps & MASK32))
    tokens = _mix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) + 0x9E3779B)
    bits = _mix32(row[:, None] ^ tokens[None, :])
    uniform = ((bits >> 8).float() + 0.5) / float(1 << 24)  # strictly inside (0, 1)
    return -torch.log(-torch.log(uniform))


class Sampler:
    def forward(self, logits: torch.Tensor, info: SamplingBatchInfo) -> SamplerOutput:
        out = SamplerOutput(next_token_ids=torch.empty(0))
        if info.return_logprob:
            raw = torch.log_softmax(logits.float(), dim=-1)
            if info.max_top_logprobs > 0:
                top = raw.topk(info.max_top_logprobs, dim=-1)
                out.top_logprobs_val, out.top_logprobs_idx = top.values, top.indices
        processed = apply_logit_processors(logits.float(), info)
        greedy_ids = processed.argmax(dim=-1)
        if info.all_greedy:
            next_ids = greedy_ids
        else:
            scores = filter_logits(processed, info) + seeded_gumbel(info.seeds, info.steps, logits.shape[-1])
            next_ids = torch.where(info.greedy, greedy_ids, scores.argmax(dim=-1))
        out.next_token_ids = next_ids
        if info.return_logprob:
            out.logprobs = raw.gather(1, next_ids[:, None])[:, 0]
        return out
