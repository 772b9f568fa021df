"""Configs, tokenizers and EOS ids from transformers, for every model source."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Set

from radixserve.model_loader.source import ModelSource

logger = logging.getLogger(__name__)


def load_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    if source.kind == "gguf":
        return AutoConfig.from_pretrained(source.folder, gguf_file=source.path.name)
    return AutoConfig.from_pretrained(source.path)


def get_context_length(config: Any) -> int:
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return 2048


def _tokenizer_cache_dir(gguf_path: Path) -> Path:
    """Converting a GGUF vocabulary to a fast tokenizer takes seconds; every
    process needs it, so the first one saves the result for the others."""
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "radixserve" / "tokenizers"
    return root / key


def load_tokenizer(source: ModelSource, tokenizer_path: Optional[str] = None) -> Any:
    from transformers import AutoTokenizer

    if tokenizer_path:
        return AutoTokenizer.from_pretrained(tokenizer_path)
    if source.kind == "hf":
        return AutoTokenizer.from_pretrained(source.path)
    cache = _tokenizer_cache_dir(source.path)
    if (cache / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(cache)
        except Exception:  # a broken cache is rebuilt below
            logger.warning("tokenizer cache %s unreadable; rebuilding", cache)
    tok = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.path.name)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:
        tok.save_pretrained(tmp)
        os.replace(tmp, cache) if not cache.exists() else None
    except OSError as e:  # a read-only home just means no cache
        logger.info("not caching tokenizer: %s", e)
    return tok


def get_eos_token_ids(source: ModelSource, config: Any, tokenizer: Any) -> Set[int]:
    ids: Set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(config, "eos_token_id", None))
    gen_config = source.folder / "generation_config.json" if source.kind == "hf" else None
    if gen_config is not None and gen_config.is_file():
        add(json.loads(gen_config.read_text()).get("eos_token_id"))
    add(getattr(tokenizer, "eos_token_id", None))
    return ids
