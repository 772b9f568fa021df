"""The grammar-backend interface: compile a constraint once, then one matcher
per request that masks the vocabulary and advances with each accepted token."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import torch

CONSTRAINT_KINDS = ("json_schema", "regex", "ebnf")


@dataclass(frozen=True)
class Constraint:
    kind: str  # json_schema | regex | ebnf
    spec: str  # the schema (JSON text; "$$ANY$$" for any JSON object), regex or EBNF grammar


def constraint_of(sampling_params: Any) -> Optional[Constraint]:
    """The request's one constraint, or None; more than one is a ValueError."""
    given = [k for k in CONSTRAINT_KINDS if getattr(sampling_params, k, None) is not None]
    if len(given) > 1:
        raise ValueError(f"at most one of json_schema, regex, ebnf may be given, got {', '.join(given)}")
    return Constraint(given[0], getattr(sampling_params, given[0])) if given else None


class GrammarMatcher(ABC):
    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Set row `row` of the packed allowed-token bitmask."""

    @abstractmethod
    def accept_token(self, token: int) -> bool:
        """Advance; False if the token was not allowed (it never should be)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar reached its end (its stop token was accepted)."""


class GrammarBackend(ABC):
    @abstractmethod
    def compile(self, constraint: Constraint) -> Any:
        """Compiled grammar (cached); ValueError with a clear message when invalid."""

    @abstractmethod
    def new_matcher(self, compiled: Any) -> GrammarMatcher:
        pass

    @abstractmethod
    def allocate_bitmask(self, batch_size: int) -> torch.Tensor:
        pass

    @abstractmethod
    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list) -> None:
        """Set the logits of disallowed tokens to -inf, in place, for these rows."""
