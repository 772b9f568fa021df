"""MemoryPools: the bundle of KV memory one scheduler owns and every batch shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from radixserve.mem_cache.allocator import KVPool, ReqToTokenPool, TokenAllocator

if TYPE_CHECKING:
    from radixserve.mem_cache.prefix_cache import PrefixCache


@dataclass
class MemoryPools:
    req_to_token_pool: ReqToTokenPool  # request row, position -> KV slot
    allocator: TokenAllocator  # free KV slots (page-granular)
    kv_pool: KVPool  # the K/V (or MLA latent) buffers the slots index
    prefix_cache: "PrefixCache"  # the radix tree over slots that finished requests left behind
