"""Grammar backend on xgrammar: JSON schema, regex and EBNF constraints."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, List

import torch
import xgrammar as xgr

from radixserve.constrained.base import Constraint, GrammarBackend, GrammarMatcher

ANY_JSON = "$$ANY$$"  # json_schema value meaning "any JSON object" (response_format json_object)
# xgrammar's messages start with "[13:14:01] /project/cpp/regex_converter.cc:94: ":
# a time and a C++ source path that mean nothing to a client.
_SOURCE_PREFIX = re.compile(r"^\[[\d:.]+\]\s*\S+:\d+:\s*")


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class XGrammarBackend(GrammarBackend):
    def __init__(self, tokenizer: Any, vocab_size: int, any_whitespace: bool = True,
                 stop_token_ids: List[int] | None = None, cache_size: int = 256) -> None:
        self.vocab_size = vocab_size
        # None: xgrammar takes the tokenizer's own EOS as the grammar's stop token.
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=stop_token_ids or None)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self.any_whitespace = any_whitespace
        self._cached_compile = lru_cache(maxsize=cache_size)(self._compile)  # keyed by the constraint's text

    def compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        return self._cached_compile(constraint)

    def _compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        try:
            if constraint.kind == "json_schema":
                if constraint.spec == ANY_JSON:
                    return self.compiler.compile_builtin_json_grammar()
                json.loads(constraint.spec)  # a clearer message than the compiler's for bad JSON
                if self.any_whitespace:
                    return self.compiler.compile_json_schema(constraint.spec)
                return self.compiler.compile_json_schema(
                    constraint.spec, any_whitespace=False, separators=(",", ":"))
            if constraint.kind == "regex":
                return self.compiler.compile_regex(constraint.spec)
            return self.compiler.compile_grammar(constraint.spec)
        except Exception as e:  # noqa: BLE001 - any failure to compile user input is that input's fault
            raise ValueError(f"invalid {constraint.kind}: {clean_compiler_message(e)}") from None

    def new_matcher(self, compiled: xgr.CompiledGrammar) -> XGrammarMatcher:
        return XGrammarMatcher(compiled)

    def allocate_bitmask(self, batch_size: int) -> torch.Tensor:
        return xgr.allocate_token_bitmask(batch_size, self.vocab_size)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list) -> None:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size, indices=rows)


def warm_up_bitmask_kernel(device: torch.device, vocab_size: int) -> None:
    """Compile xgrammar's GPU mask kernel (Triton) for each class of row count
    it specialises on (1, a multiple of 16, any other), so that no constrained
    request waits for the compile."""
    for rows in (1, 2, 16):
        logits = torch.zeros(rows, vocab_size, dtype=torch.float32, device=device)
        bitmask = xgr.allocate_token_bitmask(rows, vocab_size).to(device)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size, indices=list(range(rows)))


def clean_compiler_message(error: Exception) -> str:
    """The compiler's message without its time and C++ source path: the first
    line only (later lines may hold a native stack trace), at most 500 characters."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return _SOURCE_PREFIX.sub("", lines[0])[:500]


def create_grammar_backend(name: str, tokenizer: Any, vocab_size: int, any_whitespace: bool,
                           stop_token_ids: List[int]) -> GrammarBackend | None:
    if name == "none":
        return None
    if name == "xgrammar":
        return XGrammarBackend(tokenizer, vocab_size, any_whitespace, stop_token_ids)
    raise ValueError(f"unknown grammar_backend {name!r}; supported: xgrammar, none")
