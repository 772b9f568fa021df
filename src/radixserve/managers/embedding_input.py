"""EmbeddingReqInput: an embedding call (native /encode, /v1/embeddings,
Engine.encode), checked where it enters, and the vectors it gets back.

An embedding runs as a prefill-only generate request (max_new_tokens 0) on a
server started with --is-embedding: the scheduler pools the prompt's hidden
states instead of sampling (managers/scheduler/results.py), so embeddings are
batched, chunked and prefix-cached like any prompt.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import torch

from radixserve.layers.pooler import normalize
from radixserve.managers.generate_input import GenerateReqInput
from radixserve.managers.validation import FieldError, check_int

if TYPE_CHECKING:
    from radixserve.managers.tokenizer_manager import TokenizerManager

ENCODING_FORMATS = ("float", "base64")


@dataclass
class EmbeddingReqInput:
    """text: a string or a list of them; input_ids: token ids or a list of
    id lists. input_field: what the caller calls the input, for errors
    (`input` in OpenAI's API, `text`/`input_ids` in SGLang's /encode)."""

    text: Union[str, List[str], None] = None
    input_ids: Union[List[int], List[List[int]], None] = None
    rid: Union[str, List[str], None] = None
    dimensions: Optional[int] = None
    input_field: Optional[str] = None

    @classmethod
    def from_openai_input(cls, value: Any, dimensions: Optional[int] = None) -> "EmbeddingReqInput":
        """OpenAI's `input`: a string, a list of strings, token ids, or a list of id lists."""
        if isinstance(value, list) and value and all(isinstance(v, (int, list)) and not isinstance(v, bool)
                                                     for v in value):
            return cls(input_ids=value, dimensions=dimensions, input_field="input")
        return cls(text=value, dimensions=dimensions, input_field="input")

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return isinstance(self.input_ids, list) and bool(self.input_ids) and isinstance(self.input_ids[0], list)

    def to_generate(self) -> GenerateReqInput:
        """The prefill-only generate request that computes it; empty input is a FieldError."""
        if (self.text is None) == (self.input_ids is None):
            raise FieldError(self.input_field or "text", "give exactly one of 'text' and 'input_ids'")
        field = self.input_field or ("text" if self.text is not None else "input_ids")
        value = self.text if self.text is not None else self.input_ids
        if isinstance(value, (str, list)) and not value:
            raise FieldError(field, f"'{field}' is empty: give at least one non-empty input")
        items = value if self.is_batch else [value]
        for i, item in enumerate(items):
            if isinstance(item, (str, list)) and not item:
                raise FieldError(field, f"'{field}[{i}]' is empty: every input needs at least one token")
        num = len(items)
        return GenerateReqInput(prompt=self.text, input_ids=self.input_ids, rid=self.rid,
                                sampling_params=[{"max_new_tokens": 0}] * num if self.is_batch
                                else {"max_new_tokens": 0})


def check_dimensions(dimensions: Any, hidden_size: int, allowed: Optional[List[int]]) -> Optional[int]:
    """`dimensions` (a matryoshka truncation) against what the checkpoint declares."""
    if dimensions is None:
        return None
    if allowed is None:
        raise FieldError("dimensions", "this model does not support 'dimensions': its config.json declares no "
                                       "matryoshka_dimensions")
    dims = check_int("dimensions", dimensions, minimum=1, maximum=hidden_size)
    if allowed and dims not in allowed:
        raise FieldError("dimensions", f"dimensions must be one of {allowed}, got {dims}")
    return dims


def truncated(vector: List[float], dimensions: Optional[int]) -> List[float]:
    """A matryoshka vector's first `dimensions` values, L2-normalized again."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    return normalize(torch.tensor(vector[:dimensions])).tolist()


def encode_base64(vector: List[float]) -> str:
    """OpenAI's encoding_format=base64: little-endian float32 bytes."""
    return base64.b64encode(torch.tensor(vector, dtype=torch.float32).numpy().astype("<f4").tobytes()).decode()


async def encode_request(tm: "TokenizerManager", obj: EmbeddingReqInput) -> List[Dict[str, Any]]:
    """One {"embedding", "meta_info"} per input, in order."""
    if not tm.server_args.is_embedding:
        raise FieldError("model", "this server generates text; embeddings need a server started with "
                                  "--is-embedding (and an embedding model)")
    dims = check_dimensions(obj.dimensions, tm.ready.hidden_size, tm.ready.matryoshka_dimensions)
    gen = obj.to_generate()
    try:
        prepared = await tm.prepare(gen, embedding=True)
    except FieldError as e:
        field = obj.input_field or ("text" if obj.text is not None else "input_ids")
        raise (e.renamed(field) if e.field in ("prompt", "input_ids") else e) from None
    results = [r async for r in tm.generate_request(gen, prepared)]
    return [{"embedding": truncated(r["embedding"], dims), "meta_info": r["meta_info"]} for r in results]
