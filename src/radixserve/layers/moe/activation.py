"""The gated activations of expert MLPs: act(gate) * up on the two halves of
the gate|up projection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ExpertActivation:
    kind: str = "silu"  # "silu": silu(gate) * up; "swiglu_oai": GPT-OSS's clamped variant
    alpha: float = 1.702  # swiglu_oai: gate * sigmoid(alpha * gate)
    limit: Optional[float] = None  # swiglu_oai: gate clamped above, up clamped to [-limit, limit]


def apply_activation(gate_up: torch.Tensor, act: ExpertActivation) -> torch.Tensor:
    """[N, 2I] -> [N, I], computed in float32 and rounded to the input dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    if act.kind == "silu":
        out = torch.nn.functional.silu(gate) * up
    elif act.kind == "swiglu_oai":
        if act.limit is not None:
            gate = gate.clamp(max=act.limit)
            up = up.clamp(min=-act.limit, max=act.limit)
        out = (up + 1) * (gate * torch.sigmoid(gate * act.alpha))
    else:
        raise ValueError(f"unknown expert activation {act.kind!r}")
    return out.to(gate_up.dtype)
