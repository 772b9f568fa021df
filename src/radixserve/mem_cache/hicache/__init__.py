"""The hierarchical KV cache (HiCache): device pool -> host pool -> storage.

`make_prefix_cache` builds the plain PrefixCache, or HiPrefixCache when
--enable-hierarchical-cache is on; everything else talks to the result
through PrefixCache's interface.
"""

from __future__ import annotations

from typing import Any

from radixserve.mem_cache.allocator import ReqToTokenPool, TokenAllocator
from radixserve.mem_cache.prefix_cache import PrefixCache


def host_pool_tokens(args: Any, device_tokens: int, bytes_per_token: int) -> int:
    """--hicache-size (GB, 1e9 bytes as SGLang counts) or --hicache-ratio times
    the device pool, in whole pages; never less than the device pool."""
    page = args.resolved_page_size()
    if args.hicache_size > 0:
        tokens = int(args.hicache_size * 1e9 // bytes_per_token)
    else:
        tokens = int(args.hicache_ratio * device_tokens)
    tokens = tokens // page * page
    if tokens < device_tokens:
        raise ValueError(f"the HiCache host pool ({tokens} tokens) must be at least the device pool "
                         f"({device_tokens} tokens); raise --hicache-size or --hicache-ratio")
    return tokens


def make_prefix_cache(args: Any, req_to_token_pool: ReqToTokenPool, allocator: TokenAllocator, kv_pool: Any,
                      bytes_per_token: int, model_identity: str, tp_rank: int = 0) -> PrefixCache:
    if not args.enable_hierarchical_cache:
        return PrefixCache(req_to_token_pool, allocator, enabled=not args.disable_radix_cache)
    from radixserve.mem_cache.hicache.hi_prefix_cache import HiCacheConfig, HiPrefixCache

    config = HiCacheConfig(
        host_tokens=host_pool_tokens(args, allocator.total_tokens, bytes_per_token),
        write_policy=args.hicache_write_policy, io_backend=args.hicache_io_backend,
        mem_layout=args.hicache_mem_layout, storage_backend=args.hicache_storage_backend,
        prefetch_policy=args.hicache_storage_prefetch_policy, file_dir=args.hicache_file_backend_dir,
        extra_config=args.hicache_storage_extra_config())
    return HiPrefixCache(req_to_token_pool, allocator, kv_pool, config, model_identity, tp_rank, args.tp_size)
