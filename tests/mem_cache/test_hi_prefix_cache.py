"""HiPrefixCache without an engine: a match loads host-resident KV back and says
which tier each token came from; a storage prefetch brings a prefix back into an
empty cache; after a weight update the old pages never match."""

from __future__ import annotations

import time

import torch

from radixserve.managers import io_struct as io
from radixserve.managers.req import Req
from radixserve.mem_cache.allocator import KVPool, ReqToTokenPool, TokenAllocator
from radixserve.mem_cache.hicache.hi_prefix_cache import HiCacheConfig, HiPrefixCache
from radixserve.sampling.sampling_params import SamplingParams

PAGE = 2
CPU = torch.device("cpu")


def make_cache(storage_dir=None) -> HiPrefixCache:
    alloc = TokenAllocator(16, PAGE, CPU)
    kv = KVPool(alloc.num_slots, num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, device=CPU)
    config = HiCacheConfig(host_tokens=32, storage_backend="file" if storage_dir else None,
                           prefetch_policy="wait_complete", file_dir=str(storage_dir or ""))
    return HiPrefixCache(ReqToTokenPool(4, 64, CPU), alloc, kv, config, "test-model")


def request(tokens, rid="r") -> Req:
    return Req(io.TokenizedGenerateReqInput(rid, list(tokens), SamplingParams()), 0)


def finish(cache: HiPrefixCache, tokens) -> None:
    """Run a request's whole prompt through the cache: slots, 'KV' equal to the token ids, then cache it."""
    req = request(tokens)
    cache.match(req)
    req.req_pool_idx = cache.req_pool.alloc()
    row = cache.table[req.req_pool_idx]
    if req.prefix_len:
        row[:req.prefix_len] = req.prefix_slots
    slots = cache.allocator.alloc_extend([req.prefix_len], [len(tokens)], [0])
    row[req.prefix_len:len(tokens)] = slots
    for buf in cache.host_pool.device_buffers:
        buf[slots] = torch.tensor(tokens[req.prefix_len:], dtype=torch.float32)[:, None, None]
    req.kv_len = len(tokens)
    cache.cache_finished(req)


def kv_tokens(cache: HiPrefixCache, req: Req):
    return cache.host_pool.device_buffers[0][req.prefix_slots][:, 0, 0].long().tolist()


def test_match_loads_host_kv_and_reports_tiers():
    cache = make_cache()
    prompt = list(range(20, 32))
    finish(cache, prompt)
    cache.tree.evict(16)  # demoted to the host
    req = request(prompt + [1])
    cache.match(req)
    assert req.prefix_len == 12 and req.hit_tiers == (0, 12, 0)
    assert kv_tokens(cache, req) == prompt
    assert cache.cached_tokens_details(req) == {"device": 0, "host": 12, "storage": 0}
    again = request(prompt + [2])
    cache.match(again)
    assert again.hit_tiers == (12, 0, 0)


def wait_for(condition) -> None:
    for _ in range(500):  # bounded: background storage I/O
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_prefetch_brings_a_prefix_back_from_storage_until_the_weights_change(tmp_path):
    writer = make_cache(tmp_path)
    prompt = list(range(40, 50))
    finish(writer, prompt)
    wait_for(lambda: writer.storage_io.pages_written == 5)
    fresh = make_cache(tmp_path)  # a restarted server
    req = request(prompt + [7])
    fresh.on_arrival(req)
    wait_for(lambda: fresh.prefetch_ready(req))
    fresh.match(req)
    assert req.hit_tiers == (0, 0, 10) and kv_tokens(fresh, req) == prompt
    fresh.on_weights_changed()
    fresh.reset()
    later = request(prompt + [8], rid="later")
    fresh.on_arrival(later)
    wait_for(lambda: fresh.prefetch_ready(later))
    fresh.match(later)
    assert later.prefix_len == 0  # the old weights' pages are not served
