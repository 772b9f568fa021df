"""Which adapter sits in which device slot, and which one leaves for a newcomer."""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Set


class SlotTable:
    """num_slots device slots holding adapters (by id). A newcomer takes a free
    slot, else the slot of an adapter that this batch does not use and that is
    not pinned: least recently used (lru) or loaded first (fifo)."""

    def __init__(self, num_slots: int, policy: str) -> None:
        assert policy in ("lru", "fifo")
        self.policy = policy
        self.owner: List[Optional[int]] = [None] * num_slots
        self.stamp = [0] * num_slots  # last use (lru) or load (fifo)
        self.slot_of: Dict[int, int] = {}
        self._clock = itertools.count(1)
        self.num_loads = 0  # adapters written into a slot, ever

    def use(self, lora_id: int) -> None:
        """Mark a resident adapter used by this batch (lru order)."""
        if self.policy == "lru":
            self.stamp[self.slot_of[lora_id]] = next(self._clock)

    def place(self, lora_id: int, keep: Set[int]) -> int:
        """A slot for a non-resident adapter; keep: ids that must stay (this
        batch's and the pinned). The caller writes the weights."""
        assert lora_id not in self.slot_of
        free = [s for s, o in enumerate(self.owner) if o is None]
        if free:
            slot = free[0]
        else:
            candidates = [s for s, o in enumerate(self.owner) if o not in keep]
            assert candidates, "admission lets no more adapters into a batch than there are slots"
            slot = min(candidates, key=lambda s: self.stamp[s])
            del self.slot_of[self.owner[slot]]
        self.owner[slot], self.slot_of[lora_id] = lora_id, slot
        self.stamp[slot] = next(self._clock)
        self.num_loads += 1
        return slot

    def drop(self, lora_id: int) -> None:
        slot = self.slot_of.pop(lora_id, None)
        if slot is not None:
            self.owner[slot] = None
