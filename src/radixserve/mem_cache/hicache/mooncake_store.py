"""The Mooncake store as a HiCache storage backend (`--hicache-storage-backend mooncake`).

Mooncake's store keeps objects in memory segments that its clients contribute,
indexed by a master (`mooncake_master`). This client contributes
`global_segment_size` bytes and talks TCP unless told otherwise. It needs the
`mooncake-transfer-engine-non-cuda` package (or a CUDA build) and, from
Debian, libibverbs1, librdmacm1 and libnuma1.

Settings come from --hicache-storage-backend-extra-config:
  master_server_address (required): "host:port" of mooncake_master's RPC
  metadata_server: "http://host:port/metadata" (the master's HTTP metadata
      server) or "P2PHANDSHAKE" (the default)
  local_hostname ("127.0.0.1"), protocol ("tcp"), device_name (""),
  global_segment_size (bytes, 512 MiB), local_buffer_size (bytes, 64 MiB)
"""

from __future__ import annotations

from typing import List, Optional

import torch

from radixserve.mem_cache.hicache.storage import HiCacheStorage, StorageConfig


class MooncakeStorage(HiCacheStorage):
    def __init__(self, config: StorageConfig) -> None:
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as e:
            raise ImportError("--hicache-storage-backend mooncake needs the mooncake-transfer-engine-non-cuda "
                              "package (or a CUDA build of it)") from e
        extra = config.extra_config
        self.store = MooncakeDistributedStore()
        rc = self.store.setup(
            str(extra.get("local_hostname", "127.0.0.1")), str(extra.get("metadata_server", "P2PHANDSHAKE")),
            int(extra.get("global_segment_size", 512 << 20)), int(extra.get("local_buffer_size", 64 << 20)),
            str(extra.get("protocol", "tcp")), str(extra.get("device_name", "")),
            str(extra["master_server_address"]))
        if rc != 0:
            raise RuntimeError(f"Mooncake store setup failed (code {rc}); is mooncake_master running at "
                               f"{extra['master_server_address']}?")

    def get(self, key: str) -> Optional[torch.Tensor]:
        return self.batch_get([key])[0]

    def set(self, key: str, value: torch.Tensor) -> bool:
        return self.batch_set([key], [value])[0]

    def exists(self, key: str) -> bool:
        return bool(self.store.is_exist(key) == 1)

    def batch_get(self, keys: List[str]) -> List[Optional[torch.Tensor]]:
        # an absent key comes back empty
        return [torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None
                for data in self.store.get_batch(keys)]

    def batch_set(self, keys: List[str], values: List[torch.Tensor]) -> List[bool]:
        buffers = [v.contiguous().view(torch.uint8).numpy().tobytes() for v in values]
        ok = self.store.put_batch(keys, buffers) == 0
        return [ok] * len(keys)

    def batch_exists(self, keys: List[str]) -> int:
        found = self.store.batch_is_exist(keys)
        return next((i for i, hit in enumerate(found) if hit != 1), len(keys))

    def clear(self) -> None:
        """Every object in the store (the store is assumed to be this server's own)."""
        self.store.remove_all(True)
