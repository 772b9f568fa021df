"""The LoRA delta of one base projection for a whole batch.

A LoRATarget is attached to a linear layer (`linear.lora`); the layer adds
`add_delta(x, out)` to its own product, so model files stay model math. It
holds every device slot's weights for that projection:
A [slots, parts * R, in] and B [slots, out, parts * R], R = --max-lora-rank.
A merged projection (q|k|v, gate|up) has one part per projection: A stacks
the parts' A, and B is block-diagonal (part p's rows read only part p's
rank columns), so one shrink and one expand cover all parts. A rank below R
and an untargeted part are zeros, which add exactly nothing. B is stored
pre-multiplied by the adapter's scaling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

import torch

if TYPE_CHECKING:
    from radixserve.lora.triton_ops import Segments

Rows = Union[slice, torch.Tensor]


@dataclass
class LoRABatch:
    """This forward's rows by adapter slot, set once per forward by the LoRA
    manager and read by every target; rows without an adapter are in none.
    torch backend: groups, (slot, rows) per adapter present. Triton backend
    (CUDA): segments, runs of rows with one slot, for the segmented kernels."""

    groups: List[Tuple[int, Rows]] = field(default_factory=list)
    segments: Optional["Segments"] = None


@dataclass(frozen=True)
class TargetPart:
    """One projection inside a (possibly merged) linear layer."""

    peft_name: str  # q_proj, ..., as PEFT names it
    offset: int  # first output row in the layer
    size: int  # output rows


class LoRATarget:
    def __init__(self, module_path: str, parts: List[TargetPart], in_features: int, out_features: int,
                 num_slots: int, max_rank: int, batch: LoRABatch, device: torch.device, dtype: torch.dtype) -> None:
        self.module_path = module_path  # our module path, e.g. model.layers.0.self_attn.qkv_proj
        self.parts, self.max_rank, self.batch = parts, max_rank, batch
        width = len(parts) * max_rank
        self.A = torch.zeros(num_slots, width, in_features, device=device, dtype=dtype)
        self.B = torch.zeros(num_slots, out_features, width, device=device, dtype=dtype)

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
            rank = a.shape[0]
            self.A[slot, p * R:p * R + rank].copy_(a)
            self.B[slot, part.offset:part.offset + part.size, p * R:p * R + rank].copy_(b * scaling)

    def add_delta(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + each row's adapter delta: per adapter present, shrink its rows
        (x A^T, rank-wide) and expand them (@ B^T) into its rows of out."""
        if self.batch.segments is not None:
            from radixserve.lora.triton_ops import segmented_lora

            return segmented_lora(x.contiguous(), self.A, self.B, out, self.batch.segments)
        for slot, rows in self.batch.groups:
            delta = (x[rows] @ self.A[slot].T) @ self.B[slot].T
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


def _merge(spans: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    out: List[Tuple[int, int]] = []
    for a, b in spans:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
