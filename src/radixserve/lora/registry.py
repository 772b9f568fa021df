"""The front end's adapters: name -> id, and how many requests of each are in flight.

Unloading follows SGLang: the name goes at once (new requests naming it get
a 400), then the unload waits until the adapter's last running request has
finished before the scheduler drops its weights, so no running request is
disturbed. Torch-free: the TokenizerManager runs in the caller's process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

from radixserve.lora.spec import LoRASpec, check_lora_name, initial_lora_ids
from radixserve.managers.validation import FieldError


@dataclass(frozen=True)
class LoRARef:
    """One load of an adapter: its id is new for every load."""

    name: str
    path: str
    lora_id: int
    pinned: bool = False


class LoRARegistry:
    def __init__(self, initial: List[LoRASpec]) -> None:
        self.by_name: Dict[str, LoRARef] = {
            s.name: LoRARef(s.name, s.path, i, s.pinned) for i, s in initial_lora_ids(initial)}
        self._last_id = len(initial)
        self._loading: set = set()  # names with a load under way
        self._in_flight: Dict[int, int] = {}
        self._idle: Dict[int, asyncio.Event] = {}

    def adapters(self) -> List[LoRARef]:
        return list(self.by_name.values())

    # ---- requests ----
    def resolve(self, name: Optional[str], field: str = "lora_path") -> Optional[int]:
        """The id of the adapter a request names (None: the base model)."""
        if name is None:
            return None
        ref = self.by_name.get(name)
        if ref is None:
            known = ", ".join(sorted(self.by_name)) or "none"
            raise FieldError(field, f"{field}: unknown LoRA adapter {name!r} (loaded: {known})")
        return ref.lora_id

    def acquire(self, lora_ids: Iterable[Optional[int]]) -> None:
        for lora_id in lora_ids:
            if lora_id is not None:
                self._in_flight[lora_id] = self._in_flight.get(lora_id, 0) + 1

    def release(self, lora_ids: Iterable[Optional[int]]) -> None:
        for lora_id in lora_ids:
            if lora_id is None:
                continue
            self._in_flight[lora_id] -= 1
            if not self._in_flight[lora_id]:
                del self._in_flight[lora_id]
                if lora_id in self._idle:
                    self._idle.pop(lora_id).set()

    # ---- load / unload ----
    def begin_load(self, name: str) -> int:
        """Reserve the name for a load; returns the new id. ValueError if taken."""
        check_lora_name(name)
        if name in self.by_name or name in self._loading:
            raise FieldError("lora_name", f"a LoRA adapter named {name!r} is already loaded")
        self._loading.add(name)
        self._last_id += 1
        return self._last_id

    def end_load(self, ref: Optional[LoRARef], name: str) -> None:
        """The load finished: ref is the loaded adapter, or None if it failed."""
        self._loading.discard(name)
        if ref is not None:
            self.by_name[name] = ref

    def remove(self, name: str) -> LoRARef:
        """Take the name away (new requests cannot use it any more)."""
        ref = self.by_name.pop(name, None)
        if ref is None:
            raise FieldError("lora_name", f"no LoRA adapter named {name!r} is loaded")
        return ref

    async def wait_idle(self, lora_id: int) -> None:
        """Until no request of this adapter is in flight."""
        if self._in_flight.get(lora_id):
            event = self._idle.setdefault(lora_id, asyncio.Event())
            await event.wait()
