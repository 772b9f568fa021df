"""The host KV pool: page-granular allocation, and device <-> host copies that
keep every layer's K/V (or MLA latent) of each token, in both layouts."""

from __future__ import annotations

import pytest
import torch

from radixserve.mem_cache.allocator import KVPool
from radixserve.mem_cache.hicache.host_pool import HostKVPool, device_buffers
from radixserve.mem_cache.mla_pool import MLAKVPool

PAGE = 4


def filled(pool) -> None:
    """Every row of every buffer gets distinct values, so a misplaced copy shows."""
    for b, buf in enumerate(device_buffers(pool)):
        buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(b)))


def make_pools(kind: str, layout: str, io_backend: str):
    if kind == "mha":
        dev = KVPool(64, num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float32, device=torch.device("cpu"))
    else:
        dev = MLAKVPool(64, num_layers=2, kv_lora_rank=16, rope_dim=4, dtype=torch.float32,
                        device=torch.device("cpu"))
    filled(dev)
    return dev, HostKVPool(dev, 32, PAGE, layout, io_backend)


def test_alloc_is_page_granular_and_counted():
    _, host = make_pools("mha", "page_first", "kernel")
    assert host.total_tokens == host.available_size() == 32
    a = host.alloc(8)
    assert a.tolist() == list(range(8))
    assert host.alloc(28) is None and host.available_size() == 24  # a refusal takes nothing
    b = host.alloc(24)
    assert host.available_size() == 0 and sorted(torch.cat([a, b]).tolist()) == list(range(32))
    host.free(a)
    assert host.available_size() == 8
    host.clear()
    assert host.available_size() == 32


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("layout,io_backend", [("page_first", "kernel"), ("page_first_direct", "direct"),
                                               ("layer_first", "kernel"), ("layer_first", "direct")])
def test_backup_then_load_restores_every_buffer(kind, layout, io_backend):
    dev, host = make_pools(kind, layout, io_backend)
    src = torch.tensor([8, 9, 10, 11, 20, 21, 22, 23])  # two device pages
    before = [buf[src].clone() for buf in device_buffers(dev)]
    # host pages 2 then 0: not in order, not contiguous
    host_slots = torch.tensor([8, 9, 10, 11, 0, 1, 2, 3])
    host.backup(src, host_slots)
    dst = torch.tensor([40, 41, 42, 43, 44, 45, 46, 47])
    host.load(host_slots, dst)
    for buf, want in zip(device_buffers(dev), before):
        assert torch.equal(buf[dst], want)
    assert host.bytes_to_host == host.bytes_to_device == 8 * host.bytes_per_token


def test_kernel_merges_consecutive_pages_direct_copies_each():
    _, kernel = make_pools("mha", "page_first", "kernel")
    _, direct = make_pools("mha", "page_first", "direct")
    slots = torch.arange(4, 16)  # pages 1, 2, 3
    assert kernel._runs(slots) == [(4, 12, 0)]
    assert direct._runs(slots) == [(4, 4, 0), (8, 4, 4), (12, 4, 8)]


@pytest.mark.parametrize("layout", ["page_first", "layer_first"])
def test_pages_for_storage_roundtrip(layout):
    dev, host = make_pools("mha", layout, "kernel")
    host.backup(torch.arange(4, 8), torch.arange(12, 16))
    page = host.read_pages(torch.arange(12, 16))
    assert page.shape == (PAGE, 6, 2, 8)  # tokens, buffers (3 layers x K, V), heads, dim
    host.write_pages(torch.arange(0, 4), page)
    host.load(torch.arange(0, 4), torch.arange(50, 54))
    for buf in device_buffers(dev):
        assert torch.equal(buf[50:54], buf[4:8])


def test_loads_reach_the_device_pool_after_its_memory_is_released_and_resumed():
    from radixserve.model_executor.memory_saver import ReleasedMemory, release_kv_pool, resume_kv_pool

    dev, host = make_pools("mha", "page_first", "kernel")
    src = torch.arange(4, 8)
    want = [buf[src].clone() for buf in device_buffers(dev)]
    host.backup(src, torch.arange(0, 4))
    released = ReleasedMemory()
    release_kv_pool(dev, released)  # the pool's tensors are replaced, not resized
    resume_kv_pool(dev, released)
    host.load(torch.arange(0, 4), src)
    for buf, expected in zip(device_buffers(dev), want):
        assert torch.equal(buf[src], expected)
