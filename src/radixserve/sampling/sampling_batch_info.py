"""SamplingBatchInfo: one batch's sampling parameters as device tensors.

Rebuilt when the set of requests in a batch changes (a loop over requests),
then advanced each step by tensor ops only (`record`). The optional
processor tensors exist only when some request in the batch needs them, so a
plain batch pays nothing for penalties, biases or min_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

_INT64_WRAP = 1 << 64


@dataclass
class SamplingBatchInfo:
    temperatures: torch.Tensor  # [bs] float32; 1.0 on greedy rows (they take the argmax)
    top_ps: torch.Tensor  # [bs] float32
    top_ks: torch.Tensor  # [bs] int64; vocab size where unlimited
    min_ps: torch.Tensor  # [bs] float32
    greedy: torch.Tensor  # [bs] bool
    seeds: torch.Tensor  # [bs] int64: the request's 64-bit seed, two's complement
    steps: torch.Tensor  # [bs] int64: output tokens so far = index of the token being sampled
    rows: torch.Tensor  # [bs] int64: arange, kept to index [bs, vocab] tensors in record()
    vocab_size: int
    # Host-side flags, so the sampler branches without reading device memory.
    all_greedy: bool
    any_greedy: bool
    need_filter: bool  # some sampled row uses top_k / top_p / min_p
    return_logprob: bool
    max_top_logprobs: int
    # Optional processors (None when no request in the batch uses them).
    frequency_penalties: Optional[torch.Tensor] = None  # [bs, 1] float32
    presence_penalties: Optional[torch.Tensor] = None  # [bs, 1] float32
    output_counts: Optional[torch.Tensor] = None  # [bs, vocab] float32: times each token was output
    repetition_penalties: Optional[torch.Tensor] = None  # [bs, 1] float32
    seen_mask: Optional[torch.Tensor] = None  # [bs, vocab] bool: token in prompt or output
    logit_bias: Optional[torch.Tensor] = None  # [bs, vocab] float32
    min_new_tokens: Optional[torch.Tensor] = None  # [bs] int64
    stop_mask: Optional[torch.Tensor] = None  # [bs, vocab] bool: tokens min_new_tokens blocks
    # Grammar constraints, set per step by the scheduler: (backend, packed bitmask, rows).
    grammar_mask: Optional[Tuple[Any, torch.Tensor, List[int]]] = None

    @property
    def batch_size(self) -> int:
        return self.temperatures.shape[0]

    @property
    def has_logit_processors(self) -> bool:
        return any(t is not None for t in (self.output_counts, self.seen_mask, self.logit_bias, self.stop_mask))

    @classmethod
    def from_reqs(cls, reqs: Sequence[Any], vocab_size: int, device: Any, eos_token_ids: Set[int]) -> "SamplingBatchInfo":
        sps = [r.sampling_params for r in reqs]
        bs = len(reqs)

        def column(values: List[Any], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [sp.is_greedy for sp in sps]
        top_ks = [sp.top_k if sp.top_k > 0 else vocab_size for sp in sps]
        info = cls(
            temperatures=column([1.0 if g else sp.temperature for sp, g in zip(sps, greedy)], torch.float32),
            top_ps=column([sp.top_p for sp in sps], torch.float32),
            top_ks=column(top_ks, torch.int64),
            min_ps=column([sp.min_p for sp in sps], torch.float32),
            greedy=column(greedy, torch.bool),
            seeds=column([_as_int64(r.sampling_seed) for r in reqs], torch.int64),
            steps=column([len(r.output_ids) for r in reqs], torch.int64),
            rows=torch.arange(bs, dtype=torch.int64, device=device),
            vocab_size=vocab_size,
            **_host_flags(reqs, vocab_size),
        )
        if any(sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0 for sp in sps):
            info.frequency_penalties = column([[sp.frequency_penalty] for sp in sps], torch.float32)
            info.presence_penalties = column([[sp.presence_penalty] for sp in sps], torch.float32)
            info.output_counts = _token_counts(reqs, vocab_size, device, lambda r: (r.output_ids,))
        if any(sp.repetition_penalty != 1.0 for sp in sps):
            info.repetition_penalties = column([[sp.repetition_penalty] for sp in sps], torch.float32)
            # Repetition penalty (HF semantics) looks at the prompt too.
            info.seen_mask = _token_mask(reqs, vocab_size, device, lambda r: (r.origin_input_ids, r.output_ids))
        if any(sp.logit_bias for sp in sps):
            entries = [(row, tid, bias) for row, sp in enumerate(sps) for tid, bias in (sp.logit_bias or {}).items()
                       if 0 <= int(tid) < vocab_size]
            info.logit_bias = _dense(entries, bs, vocab_size, device, torch.float32)
        if any(sp.min_new_tokens > 0 for sp in sps):
            info.min_new_tokens = column([sp.min_new_tokens for sp in sps], torch.int64)
            entries = []
            for row, sp in enumerate(sps):
                if sp.min_new_tokens == 0:
                    continue
                blocked = set(sp.stop_token_set) | (set() if sp.ignore_eos else set(eos_token_ids))
                entries.extend((row, tid, True) for tid in blocked if 0 <= tid < vocab_size)
            info.stop_mask = _dense(entries, bs, vocab_size, device, torch.bool)
        return info

    def filter(self, keep: torch.Tensor, reqs: Sequence[Any]) -> None:
        """Keep the rows at `keep` (device indices); `reqs` are the kept requests.
        Device state (steps, token counts) carries over, so a step still in
        flight on the GPU stays counted."""
        for name in _ROW_TENSORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[keep])
        self.rows = torch.arange(len(reqs), dtype=torch.int64, device=self.rows.device)
        self.__dict__.update(_host_flags(reqs, self.vocab_size))

    def merge(self, other: "SamplingBatchInfo", reqs: Sequence[Any]) -> None:
        """Append other's rows; `reqs` are the requests of both, in order. A
        processor only one side uses gets neutral rows on the other side."""
        my_rows, their_rows = self.batch_size, other.batch_size  # before temperatures grow
        for name in _ROW_TENSORS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is None and theirs is None:
                continue
            if mine is None:
                mine = _neutral_like(name, theirs, my_rows)
            elif theirs is None:
                theirs = _neutral_like(name, mine, their_rows)
            setattr(self, name, torch.cat([mine, theirs]))
        self.rows = torch.arange(len(reqs), dtype=torch.int64, device=self.rows.device)
        self.__dict__.update(_host_flags(reqs, self.vocab_size))

    def record(self, next_token_ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """After a decode step: the sampled tokens join each request's history.
        Tensor ops only; next_token_ids [bs] int64 on the batch's device.
        mask ([bs] bool): only these rows' tokens count (a verify step's rows
        whose draft chain was already rejected sample nothing more)."""
        if mask is None:
            self.steps += 1
        else:
            self.steps += mask.to(self.steps.dtype)
        if self.output_counts is not None:
            ones = torch.ones_like(next_token_ids, dtype=self.output_counts.dtype)
            if mask is not None:
                ones = ones * mask
            # Each row receives one token, so (row, token) pairs never repeat.
            self.output_counts.index_put_((self.rows, next_token_ids), ones, accumulate=True)
        if self.seen_mask is not None:
            seen = True if mask is None else self.seen_mask[self.rows, next_token_ids] | mask
            self.seen_mask[self.rows, next_token_ids] = seen


# Per-row tensors (axis 0 is the batch), filtered and merged row by row.
_ROW_TENSORS = (
    "temperatures", "top_ps", "top_ks", "min_ps", "greedy", "seeds", "steps",
    "frequency_penalties", "presence_penalties", "output_counts", "repetition_penalties",
    "seen_mask", "logit_bias", "min_new_tokens", "stop_mask",
)


def _neutral_like(name: str, like: torch.Tensor, rows: int) -> torch.Tensor:
    """Rows that leave logits unchanged: zero penalties, counts and bias; a
    repetition penalty of 1."""
    fill = 1.0 if name == "repetition_penalties" else 0
    return torch.full((rows, *like.shape[1:]), fill, dtype=like.dtype, device=like.device)


def _host_flags(reqs: Sequence[Any], vocab_size: int) -> dict:
    """The host-side flags of a set of requests (no device reads)."""
    sps = [r.sampling_params for r in reqs]
    greedy = [sp.is_greedy for sp in sps]
    return dict(
        all_greedy=all(greedy),
        any_greedy=any(greedy),
        need_filter=any(
            not g and (0 < sp.top_k < vocab_size or sp.top_p < 1.0 or sp.min_p > 0.0)
            for sp, g in zip(sps, greedy)
        ),
        return_logprob=any(r.return_logprob for r in reqs),
        max_top_logprobs=max((r.top_logprobs_num for r in reqs if r.return_logprob), default=0),
    )


def _as_int64(seed: int) -> int:
    """Any Python int seed, wrapped to the int64 with the same low 64 bits, so
    the full 64-bit seed space reaches the hash and large seeds never overflow."""
    seed %= _INT64_WRAP
    return seed - _INT64_WRAP if seed >= 1 << 63 else seed


def _flat_tokens(reqs: Sequence[Any], vocab_size: int, device: Any,
                 tokens_of: Callable[[Any], Sequence[Sequence[int]]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows, ids) of every token of every request, on the device. Built with
    numpy on the host (a Python list of ints is ~10x slower to turn into a
    tensor); ids outside the logits' vocabulary are dropped there too, since
    on a CUDA device they would be an out-of-bounds write, and filtering them
    on the device would cost a sync."""
    per_req = [np.concatenate([np.asarray(part, dtype=np.int64) for part in tokens_of(r)]) for r in reqs]
    ids = np.concatenate(per_req) if per_req else np.zeros(0, dtype=np.int64)
    rows = np.repeat(np.arange(len(reqs), dtype=np.int64), [len(t) for t in per_req])
    valid = (ids >= 0) & (ids < vocab_size)
    return torch.from_numpy(rows[valid]).to(device), torch.from_numpy(ids[valid]).to(device)


def _token_counts(reqs: Sequence[Any], vocab_size: int, device: Any,
                  tokens_of: Callable[[Any], Sequence[Sequence[int]]]) -> torch.Tensor:
    """[bs, vocab] float32: how often each token occurs in each request's tokens."""
    rows, ids = _flat_tokens(reqs, vocab_size, device, tokens_of)
    counts = torch.zeros((len(reqs), vocab_size), dtype=torch.float32, device=device)
    counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
    return counts


def _token_mask(reqs: Sequence[Any], vocab_size: int, device: Any,
                tokens_of: Callable[[Any], Sequence[Sequence[int]]]) -> torch.Tensor:
    """[bs, vocab] bool: which tokens occur in each request's tokens."""
    rows, ids = _flat_tokens(reqs, vocab_size, device, tokens_of)
    mask = torch.zeros((len(reqs), vocab_size), dtype=torch.bool, device=device)
    mask[rows, ids] = True  # repeats all write True, so no accumulation is needed
    return mask


def _dense(entries: List[tuple], bs: int, vocab_size: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """A [bs, vocab] tensor, zero except at the given (row, token, value) entries."""
    out = torch.zeros((bs, vocab_size), dtype=dtype, device=device)
    if entries:
        rows, cols, values = zip(*entries)
        out[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = torch.tensor(
            values, dtype=dtype, device=device
        )
    return out
