"""The tiered radix tree: nodes on the device, in the host pool, or both; eviction
demotes to the host per write policy, host eviction is LRU, loads restore the KV,
and both pools' invariants hold throughout."""

from __future__ import annotations

import torch

from radixserve.mem_cache.allocator import KVPool, TokenAllocator
from radixserve.mem_cache.hicache.host_pool import HostKVPool, device_buffers
from radixserve.mem_cache.hicache.tiered_tree import TieredRadixTree

PAGE = 2
CPU = torch.device("cpu")


class Setup:
    def __init__(self, policy: str, device_tokens: int = 16, host_tokens: int = 32) -> None:
        self.alloc = TokenAllocator(device_tokens, PAGE, CPU)
        self.kv = KVPool(self.alloc.num_slots, num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32,
                         device=CPU)
        self.host = HostKVPool(self.kv, host_tokens, PAGE)
        self.tree = TieredRadixTree(self.alloc, self.host, policy)

    def put(self, tokens):
        """Compute 'KV' for tokens (a function of the token id) and insert it."""
        slots = self.alloc.alloc_extend([0], [len(tokens)], [0])
        for buf in device_buffers(self.kv):
            buf[slots] = torch.tensor(tokens, dtype=torch.float32)[:, None, None].expand(-1, 1, 4)
        dup = self.tree.insert(tokens, slots)
        if dup:
            self.alloc.free(slots[:dup])
        return slots

    def kv_of(self, slots):
        return device_buffers(self.kv)[0][slots][:, 0, 0].long().tolist()

    def check_invariants(self):
        t = self.tree
        assert self.alloc.total_tokens == self.alloc.available_size() + t.evictable_size() + t.protected_size()
        assert self.host.total_tokens == self.host.available_size() + t.host_size
        for node in t.nodes():  # device-resident nodes hang from the root
            if node.on_device and node.parent is not t.root:
                assert node.parent.on_device
            assert node.on_device or node.host_value is not None


def test_write_through_demotes_on_eviction_and_loads_back():
    s = Setup("write_through")
    a = list(range(100, 108))
    s.put(a)
    assert s.tree.host_size == 8  # copied to the host on insert
    s.check_invariants()
    assert s.tree.evict(16) == 8
    assert s.alloc.available_size() == 16 and s.tree.host_size == 8
    s.check_invariants()
    m = s.tree.match_tiers(a)
    assert m.values == [] and sum(len(n.key) for n in m.host_nodes) == 8
    loaded = s.tree.load(m)
    assert s.kv_of(torch.cat([n.value for n in loaded])) == a  # the KV came back
    assert s.tree.match_prefix(a)[0] and s.tree.evictable_size() == 8
    s.check_invariants()


def test_write_back_copies_only_at_eviction():
    s = Setup("write_back")
    s.put(list(range(10, 16)))
    assert s.tree.host_size == 0
    s.tree.evict(6)
    assert s.tree.host_size == 6 and s.alloc.available_size() == 16
    s.check_invariants()


def test_selective_backs_up_on_the_second_hit_and_drops_the_rest():
    s = Setup("write_through_selective")
    hot, cold = [1, 2, 3, 4], [7, 8, 9, 10]
    s.put(hot)
    s.put(cold)
    s.tree.match_tiers(hot)
    assert s.tree.host_size == 0
    s.tree.match_tiers(hot)
    assert s.tree.host_size == 4  # second hit
    s.tree.evict(16)
    assert s.tree.peek_len(hot) == 4 and s.tree.peek_len(cold) == 0  # cold had no host copy: gone
    s.check_invariants()


def test_host_pool_evicts_least_recently_used_host_only_leaves():
    s = Setup("write_through", device_tokens=8, host_tokens=8)
    first, second, third = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    s.put(first)
    s.put(second)
    s.tree.evict(8)  # both host-only now; the host pool is full
    s.tree.match_tiers(first)  # first is the more recently used
    s.put(third)  # its backup needs room: second goes
    assert s.tree.peek_len(first) == 4 and s.tree.peek_len(second) == 0
    assert s.tree.host_size == 8
    s.check_invariants()


def test_insert_adopts_host_only_nodes_and_reports_duplicates():
    s = Setup("write_through")
    a = [5, 6, 7, 8]
    s.put(a)
    s.tree.evict(4)
    # A request recomputed a (say the load did not fit) and a page more.
    slots = s.alloc.alloc_extend([0], [6], [0])
    assert s.tree.insert(a + [9, 9], slots) == 0  # nothing was on the device: no duplicates
    values, _ = s.tree.match_prefix(a + [9, 9])
    assert torch.equal(torch.cat(values), slots)
    s.check_invariants()
    more = s.alloc.alloc_extend([0], [8], [0])
    assert s.tree.insert(a + [9, 9, 4, 4], more) == 6  # the first six were on the device
    s.alloc.free(more[:6])
    s.check_invariants()


def test_load_keeps_the_matched_device_prefix_and_locked_nodes():
    s = Setup("write_through", device_tokens=8, host_tokens=16)
    base, tail = [1, 2], [3, 4, 5, 6]
    s.put(base + tail)
    s.tree.match_tiers(base)  # split: base is its own node
    s.tree.evict(4)  # the tail is demoted, base stays
    other = [9, 9, 9, 9]
    s.put(other)
    locked = s.tree.match_tiers(other).device_node
    s.tree.lock(locked)
    m = s.tree.match_tiers(base + tail)
    assert sum(len(v) for v in m.values) == 2 and len(m.host_nodes) == 1
    loaded = s.tree.load(m)  # needs 4 slots: 2 free, base locked, other locked: partial is impossible
    assert loaded == [] and s.tree.match_prefix(other)[0]
    s.tree.unlock(locked)
    loaded = s.tree.load(s.tree.match_tiers(base + tail))  # now other can be demoted
    assert s.kv_of(torch.cat(s.tree.match_prefix(base + tail)[0])) == base + tail
    s.check_invariants()
