"""Batched sampling: logit processors, then greedy or seeded Gumbel-max sampling.

The random noise of request r at step s for token t is an integer hash of
(seed_r, s, t), so a seeded request samples the same tokens whatever else is
in the batch, on every run, and no global RNG state is read or advanced.
All tensor ops, no loop over the batch, and no host sync: the caller's
`.tolist()` of the ids is the only one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from radixserve.distributed.rank_sync import broadcast_tensor_from_first
from radixserve.layers import cpu_kernels
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo

MASK32 = 0xFFFFFFFF
# Odd multiplier of a well-tested 32-bit xorshift-multiply hash. It is below
# 2**27, so a 32-bit value times it stays below 2**59: int64 never overflows.
_HASH_MUL = 0x45D9F3B
_SEED_SALT = 0x243F6A88  # digits of pi: only needs to be a fixed, non-zero constant
_TOKEN_SALT = 0x9E3779B9  # the golden-ratio constant, same reason


@dataclass
class SamplerOutput:
    next_token_ids: torch.Tensor  # [bs] int64
    logprobs: Optional[torch.Tensor] = None  # [bs] float32, of the raw logits at the chosen ids
    top_logprobs_val: Optional[torch.Tensor] = None  # [bs, K] float32, K = max top_logprobs_num
    top_logprobs_idx: Optional[torch.Tensor] = None  # [bs, K] int64


def apply_logit_processors(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Grammar masks, penalties, logit bias and the min_new_tokens block. Never
    modifies `logits`; returns it unchanged when the batch uses none of them."""
    if info.grammar_mask is not None:
        backend, bitmask, rows = info.grammar_mask
        logits = logits.clone()
        backend.apply_bitmask(logits, bitmask, rows)
    if info.seen_mask is not None:
        # HF repetition penalty over prompt and output: shrink toward zero, so
        # a seen token becomes less likely whatever the sign of its logit.
        rp = info.repetition_penalties
        penalized = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(info.seen_mask, penalized, logits)
    if info.output_counts is not None:
        # OpenAI semantics over output tokens only: frequency scales with the
        # count, presence is paid once.
        counts = info.output_counts
        logits = logits - info.frequency_penalties * counts - info.presence_penalties * (counts > 0).float()
    if info.logit_bias is not None:
        logits = logits + info.logit_bias
    if info.stop_mask is not None:
        blocking = (info.steps < info.min_new_tokens)[:, None] & info.stop_mask
        logits = logits.masked_fill(blocking, float("-inf"))
    return logits


def filter_logits(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Temperature-scaled logits with tokens outside top_k / top_p / min_p set
    to -inf. All three filters judge the same temperature-scaled distribution;
    the most likely token always survives."""
    logits = logits / info.temperatures[:, None]
    if not info.need_filter:
        return logits
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = rank >= info.top_ks[:, None]
    # top_p keeps the smallest prefix whose mass reaches top_p: a token stays
    # iff the mass before it is still short of top_p. Rows with top_p == 1
    # skip this, since rounding in cumsum could otherwise cut the tail.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    top_p = info.top_ps[:, None]
    drop |= (mass_before >= top_p) & (top_p < 1.0)
    drop |= sorted_probs < info.min_ps[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False
    mask = torch.zeros_like(drop).scatter(1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash on int64 tensors holding values in [0, 2**32)."""
    x = ((x >> 16) ^ x) * _HASH_MUL & MASK32
    x = ((x >> 16) ^ x) * _HASH_MUL & MASK32
    return (x >> 16) ^ x


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[bs, vocab] float32 in (0, 1), a pure function of (seed, step, token).

    The row key chains the seed's two halves and the step through the hash
    (not a symmetric XOR of them, which would give seed a at step b the same
    noise as seed b at step a). Each token's own hash is then mixed with the
    row key, so only one hash per [bs, vocab] element is computed.
    """
    key = _mix32((seeds & MASK32) ^ _SEED_SALT)
    key = _mix32(key ^ ((seeds >> 32) & MASK32))  # arithmetic shift, then mask: the high half
    key = _mix32(key ^ (steps & MASK32))
    tokens = _mix32(torch.arange(vocab_size, dtype=torch.int64, device=seeds.device) ^ _TOKEN_SALT)
    bits = _mix32(key[:, None] ^ tokens[None, :])
    # 23 bits: k + 0.5 must be exact in float32 (24 significant bits), so u
    # stays strictly inside (0, 1). With 24 bits, 2**24 - 0.5 rounds up to
    # 2**24, u hits 1.0, the Gumbel noise is +inf, and a masked (-inf) or
    # unlikely token can win.
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


def row_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest value (the first on a tie, as argmax).
    On the CPU through the C++ kernel (cpu_kernels.row_argmax: 4 x 49,152
    float32 logits in about a fifth of torch's 0.16 ms on a 2-core Zen 4),
    else max(): its kernel ran 2.7x faster than argmax's over the default
    model's vocabulary (32 x 49,152 float32: 415 against 1,109 us, 2-core AMX
    Xeon), and a greedy batch-32 decode step spent 1.1 ms in it."""
    if logits.device.type == "cpu":
        picked = cpu_kernels.row_argmax(logits) if logits.dim() == 2 else None
        return picked if picked is not None else logits.max(dim=-1).indices
    return logits.argmax(dim=-1)


def seeded_gumbel(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[bs, vocab] standard Gumbel noise: argmax(logits + noise) ~ softmax(logits)."""
    return -torch.log(-torch.log(seeded_uniform(seeds, steps, vocab_size)))


class Sampler:
    def forward(self, logits: torch.Tensor, info: SamplingBatchInfo) -> SamplerOutput:
        """logits: [bs, vocab] of the last position of each request."""
        logits = logits.float()
        next_token_ids = self._choose(apply_logit_processors(logits, info), info)
        if not info.all_greedy or info.grammar_mask is not None:
            # Tensor parallelism replicates scheduling, so one rank choosing a
            # different token would desynchronise the ranks for good (other
            # finish decisions, other KV allocations, a grammar in another
            # state). Greedy rows agree by construction (the logits are equal
            # on every rank after the gather); sampled rows depend on filters
            # whose ties a kernel may break differently, and a grammar's mask
            # must advance from the very same token: so take rank 0's ids. A
            # [bs] int tensor, and no-op with one rank.
            next_token_ids = broadcast_tensor_from_first(next_token_ids.contiguous())
        out = SamplerOutput(next_token_ids=next_token_ids)
        if info.return_logprob:
            # Logprobs describe the model, before any processing (SGLang's default).
            raw = torch.log_softmax(logits, dim=-1)
            out.logprobs = raw.gather(1, out.next_token_ids[:, None])[:, 0]
            if info.max_top_logprobs > 0:
                k = min(info.max_top_logprobs, raw.shape[-1])
                out.top_logprobs_val, out.top_logprobs_idx = raw.topk(k, dim=-1)
        return out

    __call__ = forward

    @staticmethod
    def _choose(processed: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        if info.all_greedy:
            return row_argmax(processed)
        sampled = None if info.need_filter else cpu_kernels.gumbel_argmax(processed, info.temperatures, info.seeds,
                                                                          info.steps)
        if sampled is None:
            noise = seeded_gumbel(info.seeds, info.steps, processed.shape[-1])
            sampled = row_argmax(filter_logits(processed, info) + noise)
        if not info.any_greedy:
            return sampled
        return torch.where(info.greedy, row_argmax(processed), sampled)
