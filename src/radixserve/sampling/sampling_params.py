"""SamplingParams: SGLang's sampling parameter names, defaults and checks.

Lifecycle: `from_dict` (reject unknown names) → `verify(vocab_size)` (reject
bad values, naming the field) → `normalize()` (fill the derived forms the
scheduler uses). The TokenizerManager does all three where the input enters.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Set, Union

from radixserve.managers.validation import INT64_MAX, SEED_RANGE, FieldError, check_int, check_text

# Below this temperature a request is greedy: dividing logits by ~0 would only
# overflow, and the limit of softmax(logits / T) as T -> 0 is the argmax.
GREEDY_TEMPERATURE = 1e-6
# SGLang's bounds for the OpenAI penalties and for repetition_penalty.
PENALTY_RANGE = (-2.0, 2.0)
MAX_REPETITION_PENALTY = 2.0

# stop_regex limits (SGLang's): patterns are searched on every new token.
MAX_STOP_REGEX_COUNT = 32
MAX_STOP_REGEX_BYTES = 256

_DERIVED = {"derived": True}  # field metadata: filled by normalize(), not a user param


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
    stop_regex: Union[str, List[str], None] = None  # stop when the output text matches
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

    # Derived by normalize(). They stay init fields so dataclasses.replace()
    # (used to fan out n > 1) copies them.
    stop_strs: List[str] = field(default_factory=list, repr=False, metadata=_DERIVED)
    stop_token_set: Set[int] = field(default_factory=set, repr=False, metadata=_DERIVED)
    max_stop_str_len: int = field(default=0, repr=False, metadata=_DERIVED)  # in characters
    stop_regex_strs: List[str] = field(default_factory=list, repr=False, metadata=_DERIVED)
    # The longest text any stop_regex can match, in characters; None: unbounded.
    max_stop_regex_len: Optional[int] = field(default=0, repr=False, metadata=_DERIVED)

    @classmethod
    def user_fields(cls) -> List[str]:
        """The names a user may pass."""
        return [f.name for f in fields(cls) if not f.metadata.get("derived")]

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "SamplingParams":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise FieldError("sampling_params", f"sampling_params must be a dict, got {type(d).__name__}")
        known = cls.user_fields()
        unknown = [k for k in d if k not in known]
        if unknown:
            raise FieldError(str(unknown[0]), _unknown_message(unknown, known))
        return cls(**d)

    # ---- checks: the field name leads every message ----
    def verify(self, vocab_size: Optional[int]) -> None:
        """Every value within its meaning and within the int64 / float32 tensors
        the scheduler builds from it. vocab_size None skips the vocabulary checks
        (an early check before the model is known)."""
        _check_int(self, "max_new_tokens", minimum=0)
        _check_int(self, "min_new_tokens", minimum=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise FieldError("min_new_tokens", f"min_new_tokens ({self.min_new_tokens}) must be <= "
                                               f"max_new_tokens ({self.max_new_tokens})")
        _check_number(self, "temperature", 0.0, math.inf)
        _check_number(self, "top_p", 0.0, 1.0, low_open=True)
        # -1 and 0 mean "no limit"; a larger k than the vocabulary means nothing.
        _check_int(self, "top_k", minimum=-1, maximum=vocab_size)
        _check_number(self, "min_p", 0.0, 1.0)
        _check_number(self, "frequency_penalty", *PENALTY_RANGE)
        _check_number(self, "presence_penalty", *PENALTY_RANGE)
        _check_number(self, "repetition_penalty", 0.0, MAX_REPETITION_PENALTY, low_open=True)
        _check_int(self, "n", minimum=1)
        if self.sampling_seed is not None:
            _check_int(self, "sampling_seed", *SEED_RANGE)
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                raise FieldError(name, f"{name} must be a boolean, got {getattr(self, name)!r}"[:300])
        for name in ("json_schema", "regex", "ebnf"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise FieldError(name, f"{name} must be a string, got {type(value).__name__}")
            if value is not None:
                check_text(name, value)
        self._verify_stop()
        self._verify_stop_regex()
        self._verify_stop_token_ids(vocab_size)
        self._verify_logit_bias(vocab_size)

    def _verify_stop(self) -> None:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if stops is None:
            return
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            message = f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}"
            raise FieldError("stop", message[:300])
        for s in stops:
            check_text("stop", s)

    def _verify_stop_regex(self) -> None:
        patterns = [self.stop_regex] if isinstance(self.stop_regex, str) else self.stop_regex
        if patterns is None:
            return
        if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
            message = f"stop_regex must be a non-empty string or a list of them, got {self.stop_regex!r}"
            raise FieldError("stop_regex", message[:300])
        # The scheduler runs these on every new token: keep them few and short.
        if len(patterns) > MAX_STOP_REGEX_COUNT:
            raise FieldError("stop_regex", f"stop_regex has {len(patterns)} patterns; at most "
                                           f"{MAX_STOP_REGEX_COUNT} are allowed")
        for pattern in patterns:
            check_text("stop_regex", pattern)
            if len(pattern.encode()) > MAX_STOP_REGEX_BYTES:
                raise FieldError("stop_regex", f"stop_regex pattern is {len(pattern.encode())} bytes; "
                                               f"at most {MAX_STOP_REGEX_BYTES} are allowed")
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as e:
                raise FieldError("stop_regex", f"stop_regex {pattern!r} is not a valid regex: {e}"[:300]) from None

    def _verify_stop_token_ids(self, vocab_size: Optional[int]) -> None:
        if self.stop_token_ids is None:
            return
        if not isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):
            message = f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}"
            raise FieldError("stop_token_ids", message[:300])
        for tid in self.stop_token_ids:
            _check_token_id("stop_token_ids", tid, vocab_size)

    def _verify_logit_bias(self, vocab_size: Optional[int]) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            message = f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}"
            raise FieldError("logit_bias", message[:300])
        for key, bias in self.logit_bias.items():
            _check_token_id("logit_bias", _parse_token_key(key), vocab_size)
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not _fits_float32(bias):
                message = f"logit_bias value for token {key!r} must be a finite number, got {bias!r}"
                raise FieldError("logit_bias", message[:300])

    def normalize(self) -> None:
        """Derived forms for the scheduler; idempotent. Call after verify()."""
        if self.stop is None:
            self.stop_strs = []
        else:
            self.stop_strs = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        # In characters: the detokenizer holds back this many minus one
        # characters of streamed text, since they could be a stop's prefix.
        self.max_stop_str_len = max((len(s) for s in self.stop_strs), default=0)
        if self.stop_regex is None:
            self.stop_regex_strs = []
        else:
            self.stop_regex_strs = [self.stop_regex] if isinstance(self.stop_regex, str) else list(self.stop_regex)
        widths = [regex_max_width(p) for p in self.stop_regex_strs]
        self.max_stop_regex_len = None if None in widths else max(widths, default=0)
        self.stop_token_set = set(self.stop_token_ids or ())
        if self.logit_bias:
            self.logit_bias = {_parse_token_key(k): float(v) for k, v in self.logit_bias.items()}

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


def regex_max_width(pattern: str) -> Optional[int]:
    """The longest text the pattern can match, in characters; None when a
    repetition is unbounded (`+`, `*`, `{n,}`). The scheduler decodes only that
    much of the output's tail to look for a match."""
    try:
        import re._parser as sre_parser  # the compiler's own parser: exact widths
    except ImportError:  # Python 3.10
        import sre_parse as sre_parser

    high = sre_parser.parse(pattern).getwidth()[1]
    return None if high >= sre_parser.MAXREPEAT - 1 else high


def _unknown_message(unknown: List[Any], known: List[str]) -> str:
    plural = "s" if len(unknown) > 1 else ""
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown sampling param{plural} {', '.join(parts)}"


def _check_int(sp: SamplingParams, name: str, minimum: Optional[int], maximum: Optional[int] = INT64_MAX) -> None:
    # bool is an int subclass and 3.0 is a float: neither is a count.
    check_int(name, getattr(sp, name), minimum, INT64_MAX if maximum is None else maximum)


# float32 is what the sampling tensors hold; a larger finite float becomes inf there.
_FLOAT32_MAX = 3.4028234663852886e38


def _fits_float32(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= _FLOAT32_MAX


def _check_number(sp: SamplingParams, name: str, low: float, high: float, low_open: bool = False) -> None:
    value = getattr(sp, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _fits_float32(value):
        raise FieldError(name, f"{name} must be a finite number, got {value!r}"[:300])
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise FieldError(name, f"{name} must be in {interval}, got {value}")


def _parse_token_key(key: Any) -> Any:
    """logit_bias keys arrive as strings from JSON ("42") or as ints; anything
    else (floats, "1.5", "abc") is returned unchanged and rejected by the id check."""
    if isinstance(key, str) and len(key) <= 20:  # int() of a huge digit string is slow
        try:
            return int(key)
        except ValueError:
            pass
    return key


def _check_token_id(name: str, tid: Any, vocab_size: Optional[int]) -> None:
    if isinstance(tid, bool) or not isinstance(tid, int):
        raise FieldError(name, f"{name} has {tid!r}, which is not a token id"[:300])
    if not 0 <= tid < (INT64_MAX if vocab_size is None else vocab_size):
        raise FieldError(name, f"{name} has token id {tid} outside the vocabulary [0, {vocab_size})")
