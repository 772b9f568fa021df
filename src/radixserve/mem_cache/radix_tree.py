"""A radix tree over token ids whose nodes hold the KV slots of their tokens.

Keys are compared in whole pages (page_size tokens), so every node boundary is
page-aligned and a node's slots free as whole pages. Nodes in use by running
requests are locked (lock_ref > 0) and never evicted; unlocked leaves are
evicted least recently used first, fewest hits breaking ties.

A namespace (a LoRA adapter's id) gets its own empty, permanently locked
node under the root, so KV computed under one adapter never matches a
request of another adapter or of the base model (namespace None: the root).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Dict, List, Optional, Tuple

import torch


class TreeNode:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access", "hits")

    def __init__(self, key: List[int], value: Optional[torch.Tensor], parent: Optional["TreeNode"]) -> None:
        self.children: Dict[tuple, TreeNode] = {}
        self.parent = parent
        self.key = key
        self.value = value  # KV slot of each token of key
        self.lock_ref = 0
        self.last_access = 0
        self.hits = 0

    @property
    def is_leaf(self) -> bool:
        return not self.children


class RadixTree:
    node_cls = TreeNode  # a subclass may keep more per node (the tiered tree does)

    def __init__(self, page_size: int, free_slots: Callable[[torch.Tensor], None]) -> None:
        self.page_size = page_size
        self.free_slots = free_slots
        self._clock = itertools.count(1)
        self.num_evicted_nodes = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything (the caller frees the slots wholesale)."""
        self.root = self.node_cls([], None, None)
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable = 0
        self._protected = 0

    # ---- sizes, in tokens ----
    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    # ---- lookup ----
    def _child_key(self, key: List[int]) -> tuple:
        return tuple(key[: self.page_size])

    def _common_len(self, a: List[int], b: List[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n // self.page_size * self.page_size

    def _namespace_root(self, namespace: Optional[int]) -> TreeNode:
        """The root of a namespace's subtree; its child key cannot collide with
        a page of token ids (those are tuples of ints)."""
        if namespace is None:
            return self.root
        key = ("namespace", namespace)
        node = self.root.children.get(key)
        if node is None:
            node = self.root.children[key] = TreeNode([], self.root.value, self.root)
            node.lock_ref = 1  # like the root: never evicted, holds no tokens
        return node

    def match_prefix(self, key: List[int], namespace: Optional[int] = None) -> Tuple[List[torch.Tensor], TreeNode]:
        """The longest cached page-aligned prefix of key: its slot tensors (one per
        node on the path) and the deepest node, split so it ends exactly there."""
        key = key[: len(key) // self.page_size * self.page_size]
        node, values, now = self._namespace_root(namespace), [], next(self._clock)
        while key:
            child = self._matching_child(node, key, now)
            if child is None:
                break
            values.append(child.value)
            node, key = child, key[len(child.key):]
        return values, node

    def peek_len(self, key: List[int], namespace: Optional[int] = None) -> int:
        """Tokens of key the tree holds (in any tier, for the tiered tree); changes
        nothing: no split, no access time or hit count."""
        node = self.root if namespace is None else self.root.children.get(("namespace", namespace))
        done = 0
        while node is not None and done < len(key):
            child = node.children.get(self._child_key(key[done:]))
            if child is None:
                break
            common = self._common_len(child.key, key[done:])
            done += common
            if common < len(child.key):
                break
            node = child
        return done

    def _matching_child(self, node: TreeNode, key: List[int], now: int) -> Optional[TreeNode]:
        """The child of node sharing a page-aligned prefix with key, split to end
        where the shared part does, its access time and hit count updated; None
        when no child shares a page."""
        child = node.children.get(self._child_key(key))
        if child is None:
            return None
        common = self._common_len(child.key, key)
        if common == 0:
            return None
        if common < len(child.key):
            child = self._split(child, common)
        child.last_access, child.hits = now, child.hits + 1
        return child

    def _split(self, node: TreeNode, at: int) -> TreeNode:
        """Cut node after `at` tokens; returns the new upper part."""
        upper = TreeNode(node.key[:at], node.value[:at], node.parent)
        upper.lock_ref, upper.last_access, upper.hits = node.lock_ref, node.last_access, node.hits
        node.parent.children[self._child_key(node.key)] = upper
        node.key, node.value, node.parent = node.key[at:], node.value[at:], upper
        upper.children[self._child_key(node.key)] = node
        return upper

    # ---- insert ----
    def insert(self, key: List[int], value: torch.Tensor, namespace: Optional[int] = None) -> int:
        """Add key (page-aligned length) with its slots. Returns how many leading
        tokens were cached already: the caller's slots for those are duplicates."""
        assert len(key) % self.page_size == 0 and len(key) == len(value)
        node, done, now = self._namespace_root(namespace), 0, next(self._clock)
        while done < len(key):
            rest = key[done:]
            child = node.children.get(self._child_key(rest))
            if child is None:
                leaf = TreeNode(list(rest), value[done:].clone(), node)
                leaf.last_access = now
                node.children[self._child_key(rest)] = leaf
                self._evictable += len(rest)
                return done
            common = self._common_len(child.key, rest)
            if common < len(child.key):
                child = self._split(child, common)
            child.last_access = now
            node, done = child, done + common
        return done

    # ---- locks ----
    def lock(self, node: TreeNode) -> int:
        """Lock node and its ancestors; returns tokens that stopped being evictable."""
        delta = 0
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
                delta += len(node.key)
            node.lock_ref += 1
            node = node.parent
        return delta

    def unlock(self, node: TreeNode) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "unlock of an unlocked node"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node = node.parent

    # ---- eviction ----
    def evict(self, num_tokens: int) -> int:
        """Free unlocked leaves, least recently used first, until num_tokens are
        freed or nothing is evictable. Returns tokens freed."""
        heap = [(n.last_access, n.hits, id(n), n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_tokens:
            _, _, _, node = heapq.heappop(heap)
            self.free_slots(node.value)
            freed += len(node.key)
            self._evictable -= len(node.key)
            self.num_evicted_nodes += 1
            parent = node.parent
            del parent.children[self._child_key(node.key)]
            if parent is not self.root and parent.is_leaf and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.hits, id(parent), parent))
        return freed

    def _leaves(self) -> List[TreeNode]:
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.is_leaf and node is not self.root:
                leaves.append(node)
            stack.extend(node.children.values())
        return leaves

    def total_size(self) -> int:
        return self._evictable + self._protected
