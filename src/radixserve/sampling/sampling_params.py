"""SamplingParams: SGLang's sampling parameter names, defaults and checks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Union

GREEDY_TEMPERATURE = 1e-6


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no limit
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: Union[str, List[str], None] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    logit_bias: Optional[Dict[Union[str, int], float]] = None
    sampling_seed: Optional[int] = None
    # Constrained decoding (grammar issue); stored only for now.
    json_schema: Optional[str] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None

    # Normalized forms, filled by normalize()
    stop_strs: List[str] = field(default_factory=list, repr=False)
    stop_token_set: Set[int] = field(default_factory=set, repr=False)
    max_stop_str_len: int = field(default=0, repr=False)

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "SamplingParams":
        d = dict(d or {})
        public = {f.name for f in dataclasses.fields(cls) if f.repr}
        unknown = sorted(set(d) - public)
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            raise ValueError(f"unknown sampling param {names}; known: {', '.join(sorted(public))}")
        return cls(**d)

    # ---- checks: the field name leads every message ----
    def verify(self, vocab_size: int) -> None:
        _int(self, "max_new_tokens", minimum=0)
        _int(self, "min_new_tokens", minimum=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )
        _num(self, "temperature", 0.0, math.inf)
        _num(self, "top_p", 0.0, 1.0, low_open=True)
        _int(self, "top_k", minimum=-1)
        _num(self, "min_p", 0.0, 1.0)
        _num(self, "frequency_penalty", -2.0, 2.0)
        _num(self, "presence_penalty", -2.0, 2.0)
        _num(self, "repetition_penalty", 0.0, 2.0, low_open=True)
        _int(self, "n", minimum=1)
        if self.sampling_seed is not None:
            _int(self, "sampling_seed", minimum=-(2**63))
        self._verify_stop()
        for tid in self.stop_token_ids or []:
            _token_id("stop_token_ids", tid, vocab_size)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError("logit_bias must be a dict of token id -> bias")
            for key, bias in self.logit_bias.items():
                _token_id("logit_bias", _as_int(key, "logit_bias"), vocab_size)
                if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
                    raise ValueError(f"logit_bias value for token {key} must be a finite number, got {bias!r}")

    def _verify_stop(self) -> None:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if stops is None:
            return
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")

    def normalize(self) -> None:
        if self.stop is None:
            self.stop_strs = []
        else:
            self.stop_strs = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        self.max_stop_str_len = max((len(s) for s in self.stop_strs), default=0)
        self.stop_token_set = set(self.stop_token_ids or [])
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


def _int(sp: SamplingParams, name: str, minimum: int) -> None:
    value = getattr(sp, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _num(sp: SamplingParams, name: str, low: float, high: float, low_open: bool = False) -> None:
    value = getattr(sp, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def _as_int(key: Any, name: str) -> int:
    try:
        if isinstance(key, bool):
            raise ValueError
        return int(key)
    except (TypeError, ValueError):
        raise ValueError(f"{name} key {key!r} is not a token id") from None


def _token_id(name: str, tid: Any, vocab_size: int) -> None:
    if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < vocab_size:
        raise ValueError(f"{name} has token id {tid!r} outside the vocabulary [0, {vocab_size})")
