"""The scheduler process's LoRA state: adapters in host memory, the device
slots, what admission may add to a batch, and each forward's row groups.

Adapters are known by an integer id the front end gives each load (a name
reloaded with other weights gets a new id, so nothing cached for the old one
is ever reused). The request's adapter id also names its radix-cache
namespace.
"""

from __future__ import annotations

import logging
from typing import Dict, FrozenSet, Iterable, List, Optional, Set

import torch
from torch import nn

from radixserve.layers.linear import Linear, MergedLinear, RowParallelLinear
from radixserve.lora.adapter import LoRAAdapter, load_adapter
from radixserve.lora.delta import LoRABatch, LoRATarget, TargetPart, group_rows, row_slots
from radixserve.lora.slots import SlotTable
from radixserve.lora.spec import TARGET_MODULES, LoRASpec, initial_lora_ids, normalize_targets, parse_lora_paths
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(self, args: ServerArgs, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        specs = parse_lora_paths(args.lora_paths)
        initial = [load_adapter(spec, args.max_lora_rank) for spec in specs]
        self.max_rank = args.max_lora_rank or max(a.rank for a in initial)
        if args.lora_target_modules:
            self.targets = normalize_targets(args.lora_target_modules)
        else:
            self.targets = frozenset().union(*(a.target_modules for a in initial))
        self.max_per_batch = args.max_loras_per_batch
        self.max_loaded = args.max_loaded_loras
        self.batch = LoRABatch()
        self.modules = attach_targets(model, self.targets, self.max_per_batch, self.max_rank, self.batch,
                                      device, dtype)
        self.device = device
        # The segmented Triton kernels on CUDA; the torch ops elsewhere.
        self.use_triton = args.lora_backend == "triton" and device.type == "cuda"
        self._graph_segments = None  # static decode segments, once CUDA graphs are captured
        self.slots = SlotTable(self.max_per_batch, args.lora_eviction_policy)
        self.adapters: Dict[int, LoRAAdapter] = {}
        self.pinned: Set[int] = set()
        for (lora_id, spec), adapter in zip(initial_lora_ids(specs), initial):
            self._add(lora_id, adapter, spec.pinned)
        logger.info("LoRA: %d adapter(s), rank up to %d, targets %s, %d slots", len(self.adapters),
                    self.max_rank, ",".join(sorted(self.targets)), self.max_per_batch)

    # ---- loading ----
    def load(self, lora_id: int, spec: LoRASpec) -> None:
        """Read, check and keep one adapter in host memory (pinned: in a slot for good)."""
        if self.max_loaded is not None and len(self.adapters) >= self.max_loaded:
            raise ValueError(f"cannot load LoRA adapter {spec.name!r}: max_loaded_loras "
                             f"({self.max_loaded}) adapters are loaded; unload one first")
        self._add(lora_id, load_adapter(spec, self.max_rank, self.targets), spec.pinned)

    def _add(self, lora_id: int, adapter: LoRAAdapter, pinned: bool) -> None:
        self._check_fits(adapter)
        if pinned and len(self.pinned) + 1 >= self.max_per_batch:
            raise ValueError(f"cannot pin LoRA adapter {adapter.name!r}: pinned adapters must leave at least "
                             f"one of the max_loras_per_batch ({self.max_per_batch}) slots to the others")
        self.adapters[lora_id] = adapter
        if pinned:
            self.pinned.add(lora_id)
            self._make_resident([lora_id])

    def _check_fits(self, adapter: LoRAAdapter) -> None:
        """Every weight must land on a projection of this model, in its shape."""
        where = {t.peft_path(p): (t, p) for t in self.modules for p in t.parts}
        for path, (a, b) in adapter.weights.items():
            if path not in where:
                raise ValueError(f"LoRA adapter {adapter.name!r}: {path} is not a projection of this model")
            target, part = where[path]
            fan_in, fan_out = target.full_shape(part)
            if a.shape[1] != fan_in or b.shape[0] != fan_out:
                raise ValueError(f"LoRA adapter {adapter.name!r}: {path} has A {tuple(a.shape)}, "
                                 f"B {tuple(b.shape)}; the model's projection is {fan_in} -> {fan_out}")

    def unload(self, lora_id: int) -> None:
        """Forget an adapter (the front end lets its requests finish first)."""
        if self.adapters.pop(lora_id, None) is None:
            raise ValueError(f"no LoRA adapter with id {lora_id} is loaded")
        self.pinned.discard(lora_id)
        self.slots.drop(lora_id)

    # ---- scheduling ----
    def admits(self, active: Set[Optional[int]], lora_id: Optional[int]) -> bool:
        """Can a request of lora_id join a batch whose requests use `active`
        adapters? At most max_loras_per_batch distinct ones, pinned included
        (they hold their slots)."""
        if lora_id is None or lora_id in active or lora_id in self.pinned:
            return True
        in_use = (set(active) - {None}) | self.pinned
        return len(in_use) + 1 <= self.max_per_batch

    def prepare(self, lora_ids: List[Optional[int]], tokens: List[int]) -> None:
        """Before a forward: this batch's adapters in slots, rows grouped by slot."""
        slots = self._slots_of(lora_ids)
        if self.use_triton:
            from radixserve.lora.triton_ops import segments_of  # (triton: CUDA only, imported when used)

            self.batch.set_segments(segments_of(slots, tokens, self.device))
        else:
            self.batch.set_groups(group_rows(slots, tokens, self.device), row_slots(slots, tokens, self.device))

    # ---- decode CUDA graphs (Triton backend) ----
    def capture_decode(self, bs: int, max_bs: int) -> None:
        """Before capturing the decode graph of bs rows: the batch reads static
        segments, one per slot (all empty while capturing), which replay refills."""
        from radixserve.lora.triton_ops import DecodeSegments

        if self._graph_segments is None or self._graph_segments.max_bs < max_bs:
            self._graph_segments = DecodeSegments(self.max_per_batch, max_bs, self.device)
        self.batch.set_segments(self._graph_segments.view(bs))

    def prepare_decode(self, lora_ids: List[Optional[int]], bs: int) -> None:
        """Before replaying the decode graph of bs rows (>= len(lora_ids), the
        rest padding): adapters into slots, the rows by slot into the static segments."""
        self._graph_segments.fill(self._slots_of(lora_ids) + [-1] * (bs - len(lora_ids)))
        self.batch.set_segments(self._graph_segments.view(bs))

    def _slots_of(self, lora_ids: List[Optional[int]]) -> List[int]:
        """Each request's slot (-1: the base model), its adapters made resident first."""
        self._make_resident([i for i in dict.fromkeys(lora_ids) if i is not None])
        return [-1 if i is None else self.slots.slot_of[i] for i in lora_ids]

    def _make_resident(self, lora_ids: Iterable[int]) -> None:
        ids = list(lora_ids)
        keep = set(ids) | self.pinned
        for lora_id in ids:
            if lora_id in self.slots.slot_of:
                self.slots.use(lora_id)
                continue
            adapter = self.adapters[lora_id]
            slot = self.slots.place(lora_id, keep)
            for target in self.modules:
                target.write(slot, adapter.weights, adapter.scaling)

    def info(self) -> dict:
        return {"loaded": {a.name: a.path for a in self.adapters.values()}, "max_lora_rank": self.max_rank,
                "target_modules": sorted(self.targets), "slot_loads": self.slots.num_loads}


def attach_targets(model: nn.Module, targets: FrozenSet[str], num_slots: int, max_rank: int, batch: LoRABatch,
                   device: torch.device, dtype: torch.dtype) -> List[LoRATarget]:
    """A LoRATarget on every linear layer holding a targeted projection; a
    merged layer's parts are named through the model's STACKED_PARAMS. Under
    tensor parallelism a merged (column-parallel) layer keeps its rows of B,
    a row-parallel one its columns of A."""
    merged_names: Dict[str, Dict[str, str]] = {}  # our module leaf -> shard -> PEFT name
    for peft_name, (module, shard) in getattr(model, "STACKED_PARAMS", {}).items():
        merged_names.setdefault(module, {})[shard] = peft_name
    out = []
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if not isinstance(module, Linear):
            continue
        in_columns = None
        if isinstance(module, MergedLinear) and leaf in merged_names:
            parts = [TargetPart(merged_names[leaf][shard], off, size, module.shard_sources[shard])
                     for shard, (off, size) in module.shard_offsets.items()]
        elif isinstance(module, RowParallelLinear) and leaf in TARGET_MODULES:
            parts = [TargetPart(leaf, 0, module.out_features)]
            in_columns = getattr(module.weight, "shard_slice", None)
        else:
            continue
        parts = [p for p in parts if p.peft_name in targets]
        if not parts:
            continue
        target = LoRATarget(path, parts, module.in_features, module.out_features, num_slots, max_rank, batch,
                            device, dtype, in_columns)
        module.lora = target
        out.append(target)
    if not out:
        raise ValueError(f"lora_target_modules {sorted(targets)} match no projection of "
                         f"{type(model).__name__}")
    return out
