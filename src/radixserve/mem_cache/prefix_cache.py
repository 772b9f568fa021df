"""Request-level prefix caching on top of the radix tree (or none at all).

Ownership of a request's KV slots: positions [0, prefix_len) belong to the tree
(locked while the request runs), positions [prefix_len, kv_len) to the request.
When a request ends, its tokens go into the tree and the request's locks are
released; with the cache disabled its slots are simply freed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Protocol

import torch

from radixserve.mem_cache.allocator import ReqToTokenPool, TokenAllocator
from radixserve.mem_cache.radix_tree import RadixTree

if TYPE_CHECKING:
    from radixserve.managers.req import Req


class PrefixFollower(Protocol):
    def target_limit(self, tokens: List[int], namespace: Optional[int], matched: int) -> int:
        """How many of `matched` cached leading tokens the target may take."""

    def reset(self) -> None:
        """The target's cache was emptied (no request holds KV)."""

    def finish(self, req: "Req") -> None:
        """A request ended and its KV joined the target's cache."""

    def release(self, rid: str) -> None:
        """A request let its KV go (retracted or aborted)."""


class PrefixCache:
    def __init__(self, req_to_token_pool: ReqToTokenPool, allocator: TokenAllocator, enabled: bool) -> None:
        self.req_pool = req_to_token_pool
        self.table = req_to_token_pool.req_to_token
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.tree: Optional[RadixTree] = RadixTree(self.page_size, allocator.free) if enabled else None
        # A second cache kept in step with this one: an EAGLE head's draft KV
        # (speculative/draft_prefix.py). It may ask for part of a match to be
        # recomputed, and it is emptied with this one.
        self.follower: Optional[PrefixFollower] = None

    # ---- sizes ----
    def evictable_size(self) -> int:
        return self.tree.evictable_size() if self.tree else 0

    def protected_size(self) -> int:
        return self.tree.protected_size() if self.tree else 0

    def owned_tokens(self, req: "Req") -> int:
        """Slots the request holds itself (whole pages)."""
        if req.req_pool_idx is None:
            return 0
        return -(-req.kv_len // self.page_size) * self.page_size - req.prefix_len

    # ---- admission ----
    def match(self, req: "Req") -> None:
        """Find the cached prefix of a request that holds no KV. At least one
        token is left to compute, so the request gets logits to sample from."""
        assert req.req_pool_idx is None
        req.prefix_len, req.prefix_slots = 0, None
        if self.tree is None:
            return
        key = req.fill_ids[:self.match_limit(req)]
        values, node = self.tree.match_prefix(key, req.lora_id)
        matched = sum(map(len, values))
        keep = self.follower_keeps(req, matched)
        if keep < matched:
            values, node = self.tree.match_prefix(key[:keep], req.lora_id)
        if values:
            req.prefix_slots = torch.cat(values)
            req.prefix_len = len(req.prefix_slots)
        req.kv_len = req.prefix_len
        req.last_node = node

    @staticmethod
    def match_limit(req: "Req") -> int:
        """How many leading tokens may come from the cache."""
        limit = len(req.fill_ids) - 1
        pooled = getattr(req, "pooled", None)
        if pooled is not None and pooled.config.needs_every_token:
            return 0  # mean pooling needs every token's hidden state computed
        if not req.input_logprobs_done:
            # Input logprobs need logits from position logprob_start_len - 1 on.
            limit = min(limit, max(req.logprob_start_len - 1, 0))
        return limit

    def follower_keeps(self, req: "Req", matched: int) -> int:
        """How many of a request's `matched` cached tokens to take."""
        if self.follower is None:
            return matched
        return self.follower.target_limit(req.fill_ids, req.lora_id, matched)

    # ---- tiers (the hierarchical cache overrides these) ----
    def on_arrival(self, req: "Req") -> None:
        """A request joined the queue (the hierarchical cache starts a storage prefetch)."""

    def on_weights_changed(self) -> None:
        """The weights were updated: KV kept outside this process (storage) is stale."""

    def prefetch_ready(self, req: "Req") -> bool:
        """False while the request should wait for its prefix from storage."""
        return True

    def cached_tokens_details(self, req: "Req") -> Optional[dict]:
        """{device, host, storage} tokens of the request's cached prefix; None without tiers."""
        return None

    def tier_stats(self) -> Optional[dict]:
        """Host pool and storage counters (server info, /metrics); None without tiers."""
        return None

    def lock(self, req: "Req") -> int:
        """Pin the request's prefix; returns tokens that stopped being evictable."""
        return self.tree.lock(req.last_node) if self.tree and req.last_node is not None else 0

    def unlock(self, req: "Req") -> None:
        if self.tree and req.last_node is not None:
            self.tree.unlock(req.last_node)
        req.last_node = None

    def make_room(self, num_tokens: int) -> bool:
        short = num_tokens - self.allocator.available_size()
        if short > 0 and self.tree:
            self.tree.evict(short)
        return self.allocator.available_size() >= num_tokens

    # ---- after a chunk, at the end ----
    def cache_unfinished(self, req: "Req") -> None:
        """After a prefill chunk: the finished part joins the tree, so a long
        prompt's progress is shared and never lost."""
        if self.tree is None:
            return
        aligned = self._insert(req)
        values, node = self.tree.match_prefix(req.fill_ids[:aligned], req.lora_id)
        slots = torch.cat(values) if values else self.table.new_empty(0)
        # The request now reads the tree's copy of every cached position.
        self.table[req.req_pool_idx, req.prefix_len:aligned] = slots[req.prefix_len:]
        self.tree.unlock(req.last_node)
        self.tree.lock(node)
        req.last_node, req.prefix_len = node, aligned

    def cache_finished(self, req: "Req") -> None:
        if self.tree is None:
            self.release(req)
            return
        aligned = self._insert(req)
        row = self.table[req.req_pool_idx]
        if req.kv_len > aligned:  # a partly filled last page stays out of the tree
            self.allocator.free(row[aligned:req.kv_len])
        self._drop_row(req)
        if self.follower is not None:  # whatever step the request ended in (a plain one too)
            self.follower.finish(req)

    def release(self, req: "Req") -> None:
        """Retract or abort: free the request's own slots, keep the tree's."""
        if self.follower is not None:
            self.follower.release(req.rid)
        if req.req_pool_idx is not None:
            self.allocator.free(self.table[req.req_pool_idx, req.prefix_len:req.kv_len])
            self._drop_row(req)
        self.unlock(req)
        req.prefix_len, req.prefix_slots = 0, None

    def _insert(self, req: "Req") -> int:
        """Insert the request's page-aligned KV; free its duplicates of what the
        tree already held. Returns the aligned length."""
        aligned = req.kv_len // self.page_size * self.page_size
        slots = self.table[req.req_pool_idx, :aligned]
        cached = self.tree.insert(req.fill_ids[:aligned], slots, req.lora_id)
        if cached > req.prefix_len:
            self.allocator.free(slots[req.prefix_len:cached])
        return aligned

    def _drop_row(self, req: "Req") -> None:
        self.unlock(req)
        self.req_pool.free(req.req_pool_idx)
        req.req_pool_idx = None

    def reset(self, flush_storage: bool = False) -> None:
        """Empty the tree; only when no request holds KV (the caller checks).
        flush_storage: also the storage tier's pages (the hierarchical cache)."""
        if self.tree is not None:
            self.tree.reset()
        self.allocator.clear()
        if self.follower is not None:
            self.follower.reset()
