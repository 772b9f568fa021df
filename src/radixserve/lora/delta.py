"""The LoRA delta of one base projection for a whole batch.

A LoRATarget is attached to a linear layer (`linear.lora`); the layer adds
`add_delta(x, out)` to its own product, so model files stay model math. It
holds every device slot's weights for that projection:
A [slots, W, in] and B [slots, W, out] with W = parts * R, R = --max-lora-rank.
A merged projection (q|k|v, gate|up) has one part per projection: A stacks
the parts' A, and B is block-diagonal (part p's rank rows feed only part p's
output columns), so one shrink and one expand cover all parts. A rank below R
and an untargeted part are zeros, which add exactly nothing. B is stored
transposed (rank-major, so its slots view as one [slots * W, out] matrix) and
pre-multiplied by the adapter's scaling.

The torch path: with one adapter in the batch, its rows alone (a slice when
they are one run); with several, every row is shrunk against all slots at
once, the columns of other slots' ranks are zeroed, and one matmul expands:
three ops per projection whatever the number of adapters, instead of a
gather, two matmuls and a scatter per adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

import torch

from radixserve.layers.sharding import ShardSlice

if TYPE_CHECKING:
    from radixserve.lora.triton_ops import Segments

Rows = Union[slice, torch.Tensor]


@dataclass
class LoRABatch:
    """This forward's rows by adapter slot, set once per forward by the LoRA
    manager and read by every target; rows without an adapter are in none.
    torch backend: groups, (slot, rows) per adapter present, and each row's
    slot (-1: none). Triton backend (CUDA): segments, runs of rows with one
    slot, for the segmented kernels."""

    groups: List[Tuple[int, Rows]] = field(default_factory=list)
    row_slots: Optional[torch.Tensor] = None  # [rows] int64
    segments: Optional["Segments"] = None
    _masks: Dict[Tuple[int, int, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def set_groups(self, groups: List[Tuple[int, Rows]], row_slots: torch.Tensor) -> None:
        self.groups, self.row_slots, self.segments, self._masks = groups, row_slots, None, {}

    def set_segments(self, segments: "Segments") -> None:
        self.groups, self.row_slots, self.segments, self._masks = [], None, segments, {}

    def rank_mask(self, num_slots: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[rows, num_slots * width]: 1 where the column belongs to the row's slot
        (built once per forward and width, shared by the targets)."""
        key = (num_slots, width, dtype)
        if key not in self._masks:
            column_slot = torch.arange(num_slots * width, device=self.row_slots.device) // width
            self._masks[key] = (self.row_slots[:, None] == column_slot[None, :]).to(dtype)
        return self._masks[key]


@dataclass(frozen=True)
class TargetPart:
    """One projection inside a (possibly merged) linear layer."""

    peft_name: str  # q_proj, ..., as PEFT names it
    offset: int  # first output row in the layer
    size: int  # output rows (this tensor-parallel rank's)
    # Under tensor parallelism, the rows of the adapter's full B this rank
    # keeps (a column-parallel layer's heads or columns); None: all of them.
    rows: Optional[ShardSlice] = None


class LoRATarget:
    def __init__(self, module_path: str, parts: List[TargetPart], in_features: int, out_features: int,
                 num_slots: int, max_rank: int, batch: LoRABatch, device: torch.device, dtype: torch.dtype,
                 in_columns: Optional[ShardSlice] = None) -> None:
        """in_columns: a row-parallel layer's input columns on this rank: A is
        sliced alike and B kept whole, so each rank's delta is a partial sum
        that the layer's all-reduce completes."""
        self.module_path = module_path  # our module path, e.g. model.layers.0.self_attn.qkv_proj
        self.parts, self.max_rank, self.batch = parts, max_rank, batch
        self.in_columns = in_columns
        width = len(parts) * max_rank
        self.A = torch.zeros(num_slots, width, in_features, device=device, dtype=dtype)
        self.B = torch.zeros(num_slots, width, out_features, device=device, dtype=dtype)

    def full_shape(self, part: TargetPart) -> Tuple[int, int]:
        """(in, out) of the whole projection, as the adapter file holds it."""
        in_full = self.in_columns.full if self.in_columns is not None else self.A.shape[2]
        return in_full, part.rows.full if part.rows is not None else part.size

    def peft_path(self, part: TargetPart) -> str:
        """Where the adapter file keeps this part: the layer's path with its own projection name."""
        return self.module_path.rsplit(".", 1)[0] + "." + part.peft_name

    def write(self, slot: int, weights: dict, scaling: float) -> None:
        """Copy one adapter's A/B (host, float32) into a slot; what it does not target stays zero."""
        self.A[slot].zero_()
        self.B[slot].zero_()
        R = self.max_rank
        for p, part in enumerate(self.parts):
            ab = weights.get(self.peft_path(part))
            if ab is None:
                continue
            a, b = ab
            if self.in_columns is not None:
                a = self.in_columns.take(a)
            if part.rows is not None:
                b = part.rows.take(b)
            rank = a.shape[0]
            self.A[slot, p * R:p * R + rank].copy_(a)
            self.B[slot, p * R:p * R + rank, part.offset:part.offset + part.size].copy_((b * scaling).T)

    def add_delta(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + each row's adapter delta: shrink (x A^T, rank-wide), expand (@ B)."""
        batch = self.batch
        if batch.segments is not None:
            from radixserve.lora.triton_ops import segmented_lora

            return segmented_lora(x.contiguous(), self.A, self.B, out, batch.segments)
        if len(batch.groups) > 1:
            # Slots up to the highest one present (a view: free slots are filled lowest first).
            slots, width = max(slot for slot, _ in batch.groups) + 1, self.A.shape[1]
            shrunk = (x @ self.A[:slots].view(slots * width, -1).T) * batch.rank_mask(slots, width, x.dtype)
            return out.addmm_(shrunk, self.B[:slots].view(slots * width, -1))
        for slot, rows in batch.groups:
            delta = (x[rows] @ self.A[slot].T) @ self.B[slot]
            if isinstance(rows, slice):
                out[rows] += delta
            else:
                out.index_add_(0, rows, delta)
        return out


def group_rows(slots: List[int], tokens: List[int], device: torch.device) -> List[Tuple[int, Rows]]:
    """Rows of each slot from the requests' slots (-1: no adapter) and their
    token counts, in order. A slot whose rows are one run gets a slice (no
    gather); otherwise an index tensor."""
    runs: dict = {}
    start = 0
    for slot, n in zip(slots, tokens):
        if slot >= 0 and n:
            runs.setdefault(slot, []).append((start, start + n))
        start += n
    groups: List[Tuple[int, Rows]] = []
    for slot, spans in runs.items():
        merged = _merge(spans)
        if len(merged) == 1:
            groups.append((slot, slice(*merged[0])))
        else:
            idx = torch.cat([torch.arange(a, b) for a, b in merged]).to(device)
            groups.append((slot, idx))
    return groups


def row_slots(slots: List[int], tokens: List[int], device: torch.device) -> torch.Tensor:
    """Each row's slot (-1: no adapter)."""
    return torch.repeat_interleave(torch.tensor(slots, dtype=torch.int64), torch.tensor(tokens)).to(device)


def _merge(spans: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    out: List[Tuple[int, int]] = []
    for a, b in spans:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
