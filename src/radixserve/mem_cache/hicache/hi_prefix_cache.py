"""HiPrefixCache: the prefix cache with a host tier and an optional storage tier,
behind PrefixCache's interface so the scheduler barely knows.

- match() finds the prefix in every tier: pages a storage prefetch brought
  become a host-only node, host-only nodes are loaded into fresh device pages
  (before the prefill that reads them), and the request sees one device prefix.
- on_arrival() starts the storage prefetch of the prompt's pages the tree
  lacks; prefetch_ready() tells admission whether to wait for it (the
  --hicache-storage-prefetch-policy).
- Pages that reach the host pool are written to storage in the background.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch

from radixserve.mem_cache.allocator import ReqToTokenPool, TokenAllocator
from radixserve.mem_cache.hicache.host_pool import HostKVPool
from radixserve.mem_cache.hicache.storage import StorageConfig, make_storage
from radixserve.mem_cache.hicache.storage_io import Prefetch, StorageIO
from radixserve.mem_cache.hicache.storage_keys import chain_seed, page_keys
from radixserve.mem_cache.hicache.tiered_tree import TierMatch, TieredNode, TieredRadixTree
from radixserve.mem_cache.prefix_cache import PrefixCache

if TYPE_CHECKING:
    from radixserve.managers.req import Req

MAX_PENDING_PREFETCHES = 4096  # prefetches of requests aborted while queued are dropped past this


@dataclass
class HiCacheConfig:
    host_tokens: int
    write_policy: str = "write_through"
    io_backend: str = "kernel"
    mem_layout: str = "page_first"
    storage_backend: Optional[str] = None
    prefetch_policy: str = "timeout"
    file_dir: str = "/tmp/radixserve_hicache"
    extra_config: Optional[Dict[str, Any]] = None

    def prefetch_timeout(self, num_tokens: int) -> float:
        """Seconds the timeout policy waits for a prefetch of num_tokens (SGLang's
        extra-config names); wait_complete waits up to prefetch_timeout_max."""
        extra = self.extra_config or {}
        if self.prefetch_policy == "wait_complete":
            return float(extra.get("prefetch_timeout_max", 60.0))
        return float(extra.get("prefetch_timeout_base", 1.0)) + \
            float(extra.get("prefetch_timeout_per_ki_token", 0.25)) * num_tokens / 1024


class HiPrefixCache(PrefixCache):
    def __init__(self, req_to_token_pool: ReqToTokenPool, allocator: TokenAllocator, kv_pool: Any,
                 config: HiCacheConfig, model_identity: str, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(req_to_token_pool, allocator, enabled=False)
        self.config = config
        self.host_pool = HostKVPool(kv_pool, config.host_tokens, self.page_size,
                                    config.mem_layout, config.io_backend)
        self.storage_io: Optional[StorageIO] = None
        if config.storage_backend is not None:
            storage = make_storage(config.storage_backend, StorageConfig(
                tp_rank, tp_size, model_identity, config.file_dir, dict(config.extra_config or {})))
            self.storage_io = StorageIO(storage)
        self.model_identity, self.tp_rank, self.tp_size = model_identity, tp_rank, tp_size
        self.seed = chain_seed(model_identity, tp_rank, tp_size)
        on_backup = self._write_to_storage if self.storage_io is not None else (lambda node: None)
        self.tree: TieredRadixTree = TieredRadixTree(allocator, self.host_pool, config.write_policy, on_backup)
        self.prefetches: "OrderedDict[str, Prefetch]" = OrderedDict()
        self.hit_tokens = {"device": 0, "host": 0, "storage": 0}

    # ---- admission ----
    def match(self, req: "Req") -> None:
        assert req.req_pool_idx is None
        key = req.fill_ids[:self.match_limit(req)]
        if self.follower is not None:  # (what the tree holds; a storage prefetch is attached below)
            key = key[:self.follower_keeps(req, self.tree.peek_len(key))]
        m = self.tree.match_tiers(key)
        if self.prefetch_ready(req):  # (a match for queue ordering must not cut a prefetch short)
            self._attach_prefetched(req, m, key)
        loaded = self.tree.load(m)
        values = m.values + [n.value for n in loaded]
        device = sum(len(v) for v in m.values)
        storage = sum(len(n.key) for n in loaded if n.from_storage)
        req.hit_tiers = (device, sum(len(n.key) for n in loaded) - storage, storage)
        for node in loaded:
            node.from_storage = False
        req.prefix_slots = torch.cat(values) if values else None
        req.prefix_len = device + req.hit_tiers[1] + storage
        req.kv_len = req.prefix_len
        req.last_node = loaded[-1] if loaded else m.device_node

    def cached_tokens_details(self, req: "Req") -> Optional[dict]:
        device, host, storage = req.hit_tiers or (0, 0, 0)
        details = {"device": device, "host": host, "storage": storage}
        for tier, tokens in details.items():
            self.hit_tokens[tier] += tokens
        return details

    # ---- storage ----
    def on_arrival(self, req: "Req") -> None:
        if self.storage_io is None:
            return
        P = self.page_size
        key = req.fill_ids[:self.match_limit(req) // P * P]
        have = self.tree.peek_len(key) // P
        if have * P >= len(key):
            return
        keys = page_keys(self.seed, key, P)[have:]
        timeout = self.config.prefetch_timeout(len(keys) * P)
        self.prefetches[req.rid] = self.storage_io.prefetch(keys, have, timeout)
        while len(self.prefetches) > MAX_PENDING_PREFETCHES:
            self.prefetches.popitem(last=False)[1].cancelled = True

    def prefetch_ready(self, req: "Req") -> bool:
        job = self.prefetches.get(req.rid)
        if job is None or job.done or self.config.prefetch_policy == "best_effort":
            return True
        return time.monotonic() >= job.deadline  # timeout (and wait_complete's cap)

    def _attach_prefetched(self, req: "Req", m: TierMatch, key: List[int]) -> None:
        """Pages the request's prefetch brought that extend the match become a
        host-only node at its end (whatever arrived; the fetch stops here)."""
        job = self.prefetches.pop(req.rid, None)
        if job is None:
            return
        job.cancelled = True
        P = self.page_size
        have = (sum(len(v) for v in m.values) + sum(len(n.key) for n in m.host_nodes)) // P
        skip = have - job.first_page  # pages the tree got meanwhile
        pages = self._valid_pages(list(job.pages)[max(skip, 0):]) if skip >= 0 else []
        pages = pages[: len(key) // P - have]
        if not pages:
            return
        slots = self.tree.alloc_host(len(pages) * P, keep=m.host_nodes)
        if slots is None:
            return
        self.host_pool.write_pages(slots, torch.cat(pages))
        tokens = key[have * P:(have + len(pages)) * P]
        m.host_nodes.append(self.tree.attach_host(m.end, tokens, slots, job.keys[skip:skip + len(pages)]))

    def _valid_pages(self, pages: List[torch.Tensor]) -> List[torch.Tensor]:
        """Flat bytes as `[page_size, buffers, heads, dim]`, up to the first page of the wrong size."""
        pool = self.host_pool
        shape = (self.page_size, pool.num_buffers) + pool.row_shape
        out = []
        for page in pages:
            if page.numel() != self.page_size * pool.bytes_per_token:
                break
            out.append(page.view(pool.data.dtype).view(shape))
        return out

    def _write_to_storage(self, node: TieredNode) -> None:
        if node.in_storage:
            return
        keys = self.tree.keys_of(node, self.seed, page_keys)
        data = self.host_pool.read_pages(node.host_value)
        P = self.page_size
        values = [data[i * P:(i + 1) * P].reshape(-1).view(torch.uint8) for i in range(len(keys))]

        def stored() -> None:
            node.in_storage = True

        self.storage_io.write(keys, values, stored)

    def on_weights_changed(self) -> None:
        """Storage pages of the old weights must never match again, in this
        process or a restarted one (which loads the original weights): pages
        written from now on chain from a seed of their own."""
        self.seed = chain_seed(f"{self.model_identity}|updated {uuid.uuid4().hex}", self.tp_rank, self.tp_size)
        for node in self.tree.nodes():
            node.page_keys, node.in_storage = None, False
        self._cancel_prefetches()  # they look for pages of the old weights

    def _cancel_prefetches(self) -> None:
        for job in self.prefetches.values():
            job.cancelled = True
        self.prefetches.clear()

    # ---- flush and stats ----
    def reset(self, flush_storage: bool = False) -> None:
        super().reset()
        self._cancel_prefetches()
        if flush_storage and self.storage_io is not None:
            self.storage_io.clear()

    def tier_stats(self) -> Optional[Dict[str, Any]]:
        pool, io = self.host_pool, self.storage_io
        return {
            "host_total_tokens": pool.total_tokens,
            "host_free_tokens": pool.available_size(),
            "host_cached_tokens": self.tree.host_size,
            "hit_tokens": dict(self.hit_tokens),
            "bytes_host_to_device": pool.bytes_to_device,
            "bytes_device_to_host": pool.bytes_to_host,
            "storage_pages_read": io.pages_read if io else 0,
            "storage_pages_written": io.pages_written if io else 0,
            "storage_errors": io.errors if io else 0,
        }
