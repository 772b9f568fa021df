"""A radix tree whose nodes know where their KV lives: on the device (`value`,
device slots), in the host pool (`host_value`, host slots), or both; and
whether their pages are in storage too.

Invariant: the device-resident nodes form a subtree hanging from the root (a
node on the device has its parent on the device), so a match is a device part
followed by a host-only part, and the device part is always usable as is.
Device eviction therefore takes nodes with no device-resident child; it
demotes a node that has a host copy (value dropped, host copy kept) and
drops one that has none, with its host-only subtree. Host eviction removes
host-only leaves, least recently used first.

Write policies decide when a node gets its host copy: write_through when it
enters the tree, write_through_selective once it is hit `selective_threshold`
times, write_back when it is evicted from the device.

Sizes: `evictable_size`/`protected_size` count device tokens only (the
device pool's invariant); `host_size` counts host tokens the tree holds (the
host pool's invariant: total = free + host_size).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Set

import torch

from radixserve.mem_cache.allocator import TokenAllocator
from radixserve.mem_cache.hicache.host_pool import HostKVPool
from radixserve.mem_cache.radix_tree import RadixTree, TreeNode

SELECTIVE_THRESHOLD = 2  # write_through_selective: a node is backed up on its second hit


class TieredNode(TreeNode):
    __slots__ = ("host_value", "page_keys", "in_storage", "from_storage")

    def __init__(self, key: List[int], value: Optional[torch.Tensor], parent: Optional["TieredNode"]) -> None:
        super().__init__(key, value, parent)
        self.host_value: Optional[torch.Tensor] = None
        self.page_keys: Optional[List[str]] = None  # storage keys of its pages, computed when needed
        self.in_storage = False
        self.from_storage = False  # fetched from storage and not yet loaded to the device

    @property
    def on_device(self) -> bool:
        return self.value is not None


@dataclass
class TierMatch:
    values: List[torch.Tensor]  # device slots of the device-resident part
    device_node: TieredNode  # its deepest node (the root when none)
    host_nodes: List[TieredNode] = field(default_factory=list)  # the host-only part after it

    @property
    def end(self) -> TieredNode:
        return self.host_nodes[-1] if self.host_nodes else self.device_node


class TieredRadixTree(RadixTree):
    node_cls = TieredNode

    def __init__(self, allocator: TokenAllocator, host_pool: HostKVPool, write_policy: str,
                 on_backup: Callable[[TieredNode], None] = lambda node: None) -> None:
        self.allocator = allocator
        self.host_pool = host_pool
        self.write_policy = write_policy
        self.on_backup = on_backup  # the storage tier's hook: a node just got its host copy
        self.host_size = 0
        self._pinned: Set[int] = set()  # host-only nodes being loaded: not host-evictable
        super().__init__(allocator.page_size, allocator.free)

    def reset(self) -> None:
        super().reset()
        self.host_size = 0
        if hasattr(self, "host_pool"):
            self.host_pool.clear()

    # ---- lookup ----
    def match_prefix(self, key: List[int], namespace: Optional[int] = None):
        """The device-resident part only (what the base interface promises).
        No LoRA namespaces here: ServerArgs refuses HiCache with LoRA."""
        assert namespace is None, "the tiered tree has no adapter namespaces"
        m = self.match_tiers(key)
        return m.values, m.device_node

    def match_tiers(self, key: List[int]) -> TierMatch:
        key = key[: len(key) // self.page_size * self.page_size]
        node, now = self.root, next(self._clock)
        m = TierMatch([], self.root)
        while key:
            child = self._matching_child(node, key, now)
            if child is None:
                break
            if child.on_device:
                m.values.append(child.value)
                m.device_node = child
                if (self.write_policy == "write_through_selective" and child.host_value is None
                        and child.hits >= SELECTIVE_THRESHOLD):
                    self._backup(child)
            else:
                m.host_nodes.append(child)
            node, key = child, key[len(child.key):]
        return m

    def _split(self, node: TieredNode, at: int) -> TieredNode:
        upper = TieredNode(node.key[:at], None if node.value is None else node.value[:at], node.parent)
        upper.lock_ref, upper.last_access, upper.hits = node.lock_ref, node.last_access, node.hits
        upper.in_storage, upper.from_storage = node.in_storage, node.from_storage
        if node.host_value is not None:
            upper.host_value, node.host_value = node.host_value[:at], node.host_value[at:]
        if node.page_keys is not None:
            pages = at // self.page_size
            upper.page_keys, node.page_keys = node.page_keys[:pages], node.page_keys[pages:]
        node.parent.children[self._child_key(node.key)] = upper
        node.key, node.parent = node.key[at:], upper
        if node.value is not None:
            node.value = node.value[at:]
        upper.children[self._child_key(node.key)] = node
        return upper

    # ---- insert ----
    def insert(self, key: List[int], value: torch.Tensor, namespace: Optional[int] = None) -> int:
        """Add key with its device slots. Host-only nodes on the way adopt the
        caller's slots (they are on the device again). Returns how many leading
        tokens the tree already held on the device: the caller's duplicates."""
        assert namespace is None, "the tiered tree has no adapter namespaces"
        assert len(key) % self.page_size == 0 and len(key) == len(value)
        node, done, now = self.root, 0, next(self._clock)
        duplicates: Optional[int] = None
        while done < len(key):
            rest = key[done:]
            child = node.children.get(self._child_key(rest))
            if child is None:
                leaf = TieredNode(list(rest), value[done:].clone(), node)
                leaf.last_access = now
                node.children[self._child_key(rest)] = leaf
                self._evictable += len(rest)
                if self.write_policy == "write_through":
                    self._backup(leaf)
                return done if duplicates is None else duplicates
            common = self._common_len(child.key, rest)
            if common < len(child.key):
                child = self._split(child, common)
            child.last_access = now
            if not child.on_device:
                child.value = value[done:done + common].clone()
                child.from_storage = False
                self._evictable += common
                if duplicates is None:
                    duplicates = done
            node, done = child, done + common
        return done if duplicates is None else duplicates

    def lock(self, node: TieredNode) -> int:
        assert node is self.root or node.on_device, "only device-resident prefixes are locked"
        return super().lock(node)

    # ---- host <-> device ----
    def load(self, m: TierMatch) -> List[TieredNode]:
        """Bring the match's host-only nodes back to the device, as many whole
        nodes as fit (evicting other device KV). Returns the nodes loaded."""
        if not m.host_nodes:
            return []
        self._pinned = {id(n) for n in m.host_nodes}
        self.lock(m.device_node)  # the device part must survive the eviction below
        try:
            need = sum(len(n.key) for n in m.host_nodes)
            short = need - self.allocator.available_size()
            if short > 0:
                self.evict(short)
            room, fit = self.allocator.available_size(), []
            for node in m.host_nodes:
                if len(node.key) > room:
                    break
                fit.append(node)
                room -= len(node.key)
            if fit:
                total = sum(len(n.key) for n in fit)
                slots = self.allocator.alloc_extend([0], [total], [0])
                self.host_pool.load(torch.cat([n.host_value for n in fit]), slots)
                start = 0
                for node in fit:
                    node.value = slots[start:start + len(node.key)]
                    start += len(node.key)
                    self._evictable += len(node.key)
        finally:
            self.unlock(m.device_node)
            self._pinned = set()
        return fit

    def attach_host(self, parent: TieredNode, key: List[int], host_slots: torch.Tensor,
                    page_keys: List[str]) -> TieredNode:
        """A host-only child of parent for KV that came from storage."""
        node = TieredNode(list(key), None, parent)
        node.host_value, node.page_keys = host_slots, page_keys
        node.in_storage = node.from_storage = True
        node.last_access = next(self._clock)
        parent.children[self._child_key(key)] = node
        self.host_size += len(key)
        return node

    def alloc_host(self, num_tokens: int, keep: Sequence[TieredNode] = ()) -> Optional[torch.Tensor]:
        """Host slots, evicting host-only leaves (never those in keep) if needed."""
        slots = self.host_pool.alloc(num_tokens)
        if slots is None:
            pinned = self._pinned
            self._pinned = pinned | {id(n) for n in keep}
            try:
                self.evict_host(num_tokens - self.host_pool.available_size())
            finally:
                self._pinned = pinned
            slots = self.host_pool.alloc(num_tokens)
        return slots

    def _backup(self, node: TieredNode) -> bool:
        """Give a device node its host copy; False when the host pool is full."""
        if node.host_value is not None:
            return True
        slots = self.alloc_host(len(node.key))
        if slots is None:
            return False
        self.host_pool.backup(node.value, slots)
        node.host_value = slots
        self.host_size += len(node.key)
        self.on_backup(node)
        return True

    # ---- eviction ----
    def evict(self, num_tokens: int) -> int:
        """Free device tokens: demote nodes that have (or, with write_back, get)
        a host copy; drop the rest. Returns device tokens freed."""
        heap = [(n.last_access, n.hits, id(n), n) for n in self._device_leaves()]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_tokens:
            _, _, _, node = heapq.heappop(heap)
            if self.write_policy == "write_back":
                self._backup(node)
            freed += len(node.key)
            self._evictable -= len(node.key)
            self.num_evicted_nodes += 1
            parent = node.parent
            if node.host_value is not None:
                self.host_pool.fence()  # a backup may still read these slots
                self.free_slots(node.value)
                node.value = None
            else:
                self.free_slots(node.value)
                self._drop(node)
            if parent is not self.root and parent.lock_ref == 0 and self._is_device_leaf(parent):
                heapq.heappush(heap, (parent.last_access, parent.hits, id(parent), parent))
        return freed

    def evict_host(self, num_tokens: int) -> int:
        """Remove host-only leaves, least recently used first. Returns host tokens freed."""
        heap = [(n.last_access, n.hits, id(n), n) for n in self._host_leaves()]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_tokens:
            _, _, _, node = heapq.heappop(heap)
            freed += len(node.key)
            parent = node.parent
            self._drop(node)
            if (parent is not self.root and not parent.on_device and parent.is_leaf
                    and id(parent) not in self._pinned):
                heapq.heappush(heap, (parent.last_access, parent.hits, id(parent), parent))
        return freed

    def _drop(self, node: TieredNode) -> None:
        """Remove node and its (host-only) subtree from the tree, freeing their host copies."""
        stack = [node]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if n.host_value is not None:
                self.host_pool.free(n.host_value)
                self.host_size -= len(n.key)
        del node.parent.children[self._child_key(node.key)]

    def _is_device_leaf(self, node: TieredNode) -> bool:
        return node.on_device and not any(c.on_device for c in node.children.values())

    def _device_leaves(self) -> List[TieredNode]:
        """Unlocked device nodes without device children; host-only subtrees are
        not walked (nothing below a host-only node is on the device)."""
        out, stack = [], [c for c in self.root.children.values() if c.on_device]
        while stack:
            node = stack.pop()
            on_device = [c for c in node.children.values() if c.on_device]
            if not on_device and node.lock_ref == 0:
                out.append(node)
            stack.extend(on_device)
        return out

    def _host_leaves(self) -> List[TieredNode]:
        return [n for n in self.nodes() if not n.on_device and n.is_leaf and id(n) not in self._pinned]

    def nodes(self) -> List[TieredNode]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    # ---- storage keys ----
    def keys_of(self, node: TieredNode, seed: str, key_fn) -> List[str]:
        """The storage keys of node's pages (computed from its ancestors' once)."""
        if node.page_keys is None:
            parent = node.parent
            previous = seed if parent is self.root else self.keys_of(parent, seed, key_fn)[-1]
            node.page_keys = key_fn(previous, node.key, self.page_size)
        return node.page_keys
