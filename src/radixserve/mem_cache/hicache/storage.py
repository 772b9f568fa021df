"""The storage tier: a key-value store of KV pages, in the shape of SGLang's
HiCacheStorage (get/set/exists and their batch forms).

A key names one page of KV: the hash chain of the page's tokens and every
token before it, seeded with the model's identity and the rank (see
storage_keys.py), so equal keys mean equal KV. A value is the page's bytes
(every layer of its tokens, the host pool's page_first row order); backends
store bytes and need not know shapes.

Backends: `file` (one file per page in a folder that outlives the server),
`mooncake` (Mooncake's distributed store; mooncake_store.py) and `dynamic` (any
HiCacheStorage subclass named by module_path and class_name in the extra
config). Any backend may raise or hang: callers run it on a worker thread and
treat errors as misses.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch


@dataclass
class StorageConfig:
    """What a backend is told when it is built."""

    tp_rank: int
    tp_size: int
    model_identity: str  # model path, dtype, KV shape: pages of other models never match
    file_dir: str  # the file backend's folder (--hicache-file-backend-dir)
    extra_config: Dict[str, Any] = field(default_factory=dict)


class HiCacheStorage(ABC):
    """Values are flat uint8 tensors (one page's bytes)."""

    @abstractmethod
    def get(self, key: str) -> Optional[torch.Tensor]:
        """The page's bytes, or None when absent."""

    @abstractmethod
    def set(self, key: str, value: torch.Tensor) -> bool:
        """Store the page; True on success."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    def batch_get(self, keys: List[str]) -> List[Optional[torch.Tensor]]:
        return [self.get(k) for k in keys]

    def batch_set(self, keys: List[str], values: List[torch.Tensor]) -> List[bool]:
        return [self.set(k, v) for k, v in zip(keys, values)]

    def batch_exists(self, keys: List[str]) -> int:
        """How many leading keys exist (a prefix is only useful whole)."""
        for i, key in enumerate(keys):
            if not self.exists(key):
                return i
        return len(keys)

    def clear(self) -> None:
        """Forget every page (/flush_cache with flush_storage)."""


class FileStorage(HiCacheStorage):
    """One file per page, named by its key (keys include the model identity, so
    models can share a folder)."""

    def __init__(self, config: StorageConfig) -> None:
        self.dir = Path(config.file_dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.kv"

    def get(self, key: str) -> Optional[torch.Tensor]:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def set(self, key: str, value: torch.Tensor) -> bool:
        path = self._path(key)
        if path.exists():
            return True
        # Write then rename: a reader (or a restart after a crash) never sees half a page.
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(value.contiguous().view(torch.uint8).numpy().tobytes())
        os.replace(tmp, path)
        return True

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def clear(self) -> None:
        for path in self.dir.glob("*.kv"):
            path.unlink(missing_ok=True)


def make_storage(backend: str, config: StorageConfig) -> HiCacheStorage:
    if backend == "file":
        return FileStorage(config)
    if backend == "mooncake":
        from radixserve.mem_cache.hicache.mooncake_store import MooncakeStorage

        return MooncakeStorage(config)
    if backend == "dynamic":
        extra = config.extra_config
        module = importlib.import_module(extra["module_path"])
        cls = getattr(module, extra["class_name"])
        if not (isinstance(cls, type) and issubclass(cls, HiCacheStorage)):
            raise ValueError(f"{extra['module_path']}.{extra['class_name']} is not a HiCacheStorage subclass")
        return cls(config)
    raise ValueError(f"HiCache storage backend {backend!r} is not available")
