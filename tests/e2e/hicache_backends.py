"""Storage backends that fail, for the hierarchical cache's degradation tests
(loaded by the engine's scheduler process through the dynamic backend)."""

from __future__ import annotations

import time
from typing import Optional

import torch

from radixserve.mem_cache.hicache.storage import HiCacheStorage, StorageConfig


class RaisingStorage(HiCacheStorage):
    """Claims every page and fails every read and write."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config

    def exists(self, key: str) -> bool:
        return True

    def get(self, key: str) -> Optional[torch.Tensor]:
        raise RuntimeError("storage read failed (test backend)")

    def set(self, key: str, value: torch.Tensor) -> bool:
        raise RuntimeError("storage write failed (test backend)")


class HangingStorage(RaisingStorage):
    """Claims every page; a read never returns (within the test)."""

    def get(self, key: str) -> Optional[torch.Tensor]:
        time.sleep(3600)
        return None

    def set(self, key: str, value: torch.Tensor) -> bool:
        return True
