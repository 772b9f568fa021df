"""Checks shared by every entry point: the error that names its field, integer
ranges the scheduler's tensors can hold, valid Unicode, and bounded nesting.

Bad input is refused where it enters (HTTP route, protocol model,
GenerateReqInput, SamplingParams), so the scheduler never sees it.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Tuple

# The scheduler builds int64 tensors from request integers (top_k, seeds,
# min_new_tokens, ...): a larger Python int would overflow there.
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
# Seeds are taken modulo 2**64 (signed or unsigned 64-bit values both work).
SEED_RANGE = (INT64_MIN, (1 << 64) - 1)
# JSON bodies nest at most this deep (a tool's parameter schema nests a few
# levels; nothing a client sends needs more). Python's own parser would raise
# RecursionError near 1000.
MAX_JSON_DEPTH = 64


class FieldError(ValueError):
    """Bad input in one field: a ValueError (HTTP 400) whose `field` names it
    (the `param` of the OpenAI error body)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def renamed(self, field: str) -> "FieldError":
        """The same error under the name the caller used (e.g. OpenAI's
        `max_tokens` for our `max_new_tokens`)."""
        message = str(self)
        if message.startswith(self.field):
            message = field + message[len(self.field):]
        return FieldError(field, message.replace(f"'{self.field}'", f"'{field}'"))


def check_int(field: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = INT64_MAX,
              what: str = "an integer") -> int:
    """value is an int (not a bool, not 3.0) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(field, f"{field} must be {what}, got {value!r}"[:300])
    if minimum is not None and value < minimum:
        raise FieldError(field, f"{field} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise FieldError(field, f"{field} must be <= {maximum}, got {value}")
    return value


def check_bool(field: str, value: Any) -> bool:
    """A real JSON boolean: 1, "true" or -1e308 are not booleans."""
    if not isinstance(value, bool):
        raise FieldError(field, f"{field} must be a boolean, got {value!r}"[:300])
    return value


def check_text(field: str, text: str) -> None:
    """A string that UTF-8 can encode: JSON may carry a lone surrogate
    ("\\ud800"), which no tokenizer accepts."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FieldError(field, f"{field} is not valid Unicode: lone surrogate at character {e.start}") from None


def check_json_value(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Every string valid Unicode and containers nested at most max_depth deep,
    in one iterative walk (no recursion, so deep input cannot overflow it)."""
    for item, path, depth in _walk(value):
        if isinstance(item, str):
            check_text(_path_name(path), item)
        elif depth > max_depth:
            raise FieldError(_path_name(path[:1]) or "body",
                             f"the JSON body nests deeper than {max_depth} levels")


Path = Tuple[Any, ...]


def _walk(value: Any) -> Iterator[Tuple[Any, Path, int]]:
    """(item, path, depth) for every string and container; dict keys count as strings."""
    stack: List[Tuple[Any, Path, int]] = [(value, (), 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            yield item, path, depth
        elif isinstance(item, dict):
            yield item, path, depth + 1
            for key, child in item.items():
                if isinstance(key, str):
                    yield key, path + (key,), depth
                if isinstance(child, (str, dict, list)):
                    stack.append((child, path + (key,), depth + 1))
        elif isinstance(item, list):
            yield item, path, depth + 1
            for i, child in enumerate(item):
                if isinstance(child, (str, dict, list)):  # ints (token ids) need no check
                    stack.append((child, path + (i,), depth + 1))


def _path_name(path: Path) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name
