"""Tokenizers for the benchmark tools, and the vocabulary slice random prompts draw from."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, List

# Below this many whole-word tokens the vocabulary is unusual (a byte-level or
# character tokenizer); random prompts then draw from every non-special id.
MIN_WORD_TOKENS = 256


@functools.lru_cache(maxsize=4)
def get_tokenizer(name_or_path: str) -> Any:
    """A tokenizer from a local folder (with or without config.json), a .gguf
    file, or a packaged model name such as SmolLM2-135M-Instruct. Nothing is
    downloaded."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    from radixserve.model_loader.source import resolve_model_source
    from radixserve.utils.hf_utils import load_tokenizer

    return load_tokenizer(resolve_model_source(name_or_path))


@functools.lru_cache(maxsize=4)
def word_token_ids(tokenizer: Any) -> List[int]:
    """Ids of tokens that are one space-led ASCII word (' the', '▁cat') and
    re-encode to themselves alone. Any sequence of them decodes to text that
    re-encodes to exactly the same ids, so a text prompt has exactly the drawn
    number of tokens, and a shared run of them is a shared token prefix."""
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    candidates = [
        i for i, p in enumerate(pieces)
        if i not in special and p and len(p) > 1 and p[0] in "Ġ▁" and p[1:].isascii() and p[1:].isalpha()
    ]
    words = tokenizer.batch_decode([[i] for i in candidates])
    encoded = tokenizer(words, add_special_tokens=False)["input_ids"]
    ids = [i for i, enc in zip(candidates, encoded) if enc == [i]]
    if len(ids) >= MIN_WORD_TOKENS:
        return ids
    return [i for i in range(len(tokenizer)) if i not in special]


def num_special_tokens(tokenizer: Any) -> int:
    """Tokens the tokenizer adds to every text (a BOS for Llama-style models)."""
    return len(tokenizer.encode("", add_special_tokens=True))
