"""Configs, tokenizers, EOS ids and context lengths from transformers, for every model source."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Set

from radixserve.model_loader.source import ModelSource, resolve_model_source

if TYPE_CHECKING:  # transformers takes seconds to import; only the functions below need it
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                       "max_sequence_length", "model_max_length")
DEFAULT_CONTEXT_LENGTH = 2048


def load_config(source: ModelSource) -> "PretrainedConfig":
    from transformers import AutoConfig

    if source.kind == "hf":
        return AutoConfig.from_pretrained(source.path)
    return cached_from_gguf(source.path, "config", AutoConfig.from_pretrained, lambda: _gguf_config(source))


def _gguf_config(source: ModelSource) -> "PretrainedConfig":
    """transformers' config of a GGUF, plus `gguf_block_types`: how the file's
    projections are quantized, which picks the CPU's default weight format
    (saved with the config, so only the first load pays the file's parse)."""
    from transformers import AutoConfig

    from radixserve.model_loader.gguf_weights import projection_block_types

    config = AutoConfig.from_pretrained(source.folder, gguf_file=source.path.name)
    config.gguf_block_types = projection_block_types(source.path)
    return config


def load_tokenizer(source: ModelSource, tokenizer_path: Optional[str] = None) -> "PreTrainedTokenizerBase":
    """The source's tokenizer; `tokenizer_path` (an HF folder, a .gguf file or a
    packaged model name) overrides where it comes from."""
    if tokenizer_path:
        if not Path(tokenizer_path).expanduser().is_dir():
            return load_tokenizer(resolve_model_source(tokenizer_path))
        return _auto_tokenizer(Path(tokenizer_path).expanduser())
    if source.kind == "hf":
        return _auto_tokenizer(source.path)
    return cached_from_gguf(source.path, "tokenizer", _auto_tokenizer,
                   lambda: _auto_tokenizer(source.folder, gguf_file=source.path.name))


def tokenizer_folder(source: ModelSource, tokenizer_path: Optional[str] = None) -> str:
    """A local folder holding the tokenizer in HF format, for clients that load
    it with transformers (SGLang's gateway and bench_serving). A GGUF's
    tokenizer is extracted once into the cache that load_tokenizer keeps."""
    if tokenizer_path:
        path = Path(tokenizer_path).expanduser()
        if path.is_dir():
            return str(path.resolve())
        source = resolve_model_source(tokenizer_path)
    if source.kind == "hf":
        return str(source.path)
    load_tokenizer(source)  # fills the cache folder unless the home is read-only
    cache = cache_dir(source.path, "tokenizer")
    return str(cache) if cache.is_dir() else str(source.path)


def _auto_tokenizer(path: Path, **kwargs: Any) -> "PreTrainedTokenizerBase":
    """AutoTokenizer with clean_up_tokenization_spaces=False. transformers' GGUF
    conversion (and many tokenizer_config.json files) set it True, and a BPE
    tokenizer then ignores it and warns at the first decode of every process;
    the cleanup (removing spaces before punctuation) would corrupt a language
    model's text anyway, so off is what the BPE tokenizers of every family we
    serve did already; now it is said once, explicitly."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, clean_up_tokenization_spaces=False, **kwargs)


def get_eos_token_ids(source: ModelSource, config: Any, tokenizer: Any) -> Set[int]:
    """Every id that ends generation: the config's, generation_config.json's
    (chat models often list their end-of-turn token only there) and the tokenizer's."""
    ids: Set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(config, "eos_token_id", None))
    gen_config = source.folder / "generation_config.json"
    if source.kind == "hf" and gen_config.is_file():
        add(json.loads(gen_config.read_text()).get("eos_token_id"))
    add(getattr(tokenizer, "eos_token_id", None))
    return ids


def get_context_length(config: Any) -> int:
    """The longest sequence the model was built for; multimodal configs keep it in text_config."""
    for cfg in (config, getattr(config, "text_config", None)):
        for key in CONTEXT_LENGTH_KEYS:
            value = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    logger.warning("config names no context length; assuming %d", DEFAULT_CONTEXT_LENGTH)
    return DEFAULT_CONTEXT_LENGTH


def cache_dir(gguf_path: Path, what: str) -> Path:
    """Where what a GGUF's first load derived is kept for later loads (`what`
    names it). Reading a GGUF's config or tokenizer parses its whole vocabulary
    with the gguf package (seconds); every process (scheduler, detokenizer,
    API) needs both, so the first one saves them in HF format for the others;
    also the file's tensor index and its quantized weights. The key changes
    when the file or the transformers version does."""
    import transformers

    stat = gguf_path.stat()
    # v2: configs carry gguf_block_types
    ident = f"v2:{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    key = hashlib.sha1(ident.encode()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "radixserve" / "gguf"
    return root / key / what


def cached_from_gguf(gguf_path: Path, what: str, load_saved: Callable[[Path], Any], build: Callable[[], Any]) -> Any:
    cache = cache_dir(gguf_path, what)
    if cache.is_dir():
        try:
            return load_saved(cache)
        except Exception as e:  # a broken cache is rebuilt below
            logger.warning("%s cache %s unreadable (%s); rebuilding", what, cache, e)
            shutil.rmtree(cache, ignore_errors=True)
    obj = build()
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    try:
        obj.save_pretrained(tmp)
        # Atomic: a reader never sees a half-written folder. Another process may
        # have won the race (replace onto a full folder fails): its copy is as good.
        os.replace(tmp, cache)
    except OSError as e:  # a read-only home just means no cache
        logger.debug("not caching %s in %s: %s", what, cache, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return obj
