"""Checkpoints that store a layer's experts fused (GPT-OSS).

`experts.gate_up_proj` [E, hidden, 2I] holds gate and up interleaved on the
last axis (gate at even columns, up at odd ones), `gate_up_proj_bias` [E, 2I]
interleaved alike, `down_proj` [E, I, hidden] and `down_proj_bias` [E, hidden].
They are split into FusedMoE's per-expert shards at load, and rebuilt in this
layout when a caller reads one back by name. MXFP4 checkpoints reach here
already dequantized (mxfp4.py).
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch
from torch import nn

from radixserve.layers.sharding import materialize

_FUSED_EXPERTS = re.compile(r"^(?P<owner>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)(?P<bias>_bias)?$")


def match_fused_experts(name: str) -> Optional[re.Match]:
    return _FUSED_EXPERTS.match(name)


def split_fused_experts(weights: Iterable[Tuple[str, torch.Tensor]]) -> Iterator[Tuple[str, torch.Tensor]]:
    """The stream with each fused expert tensor replaced by per-expert ones under
    the names FusedMoE loads (`experts.3.gate_proj.weight` [I, hidden], ...):
    views, so nothing is copied before the model copies into its own layout."""
    for name, tensor in weights:
        match = _FUSED_EXPERTS.match(name)
        if match is None:
            yield name, tensor
            continue
        owner, kind = match["owner"], "bias" if match["bias"] else "weight"
        tensor = materialize(tensor)  # a lazy slice read in full: one layer's experts at a time
        for e in range(tensor.shape[0]):
            expert = tensor[e]
            if match["proj"] == "down_proj":
                yield f"{owner}.{e}.down_proj.{kind}", expert if kind == "bias" else expert.t()
                continue
            gate, up = expert[..., ::2], expert[..., 1::2]
            if kind == "weight":  # [hidden, I] -> [I, hidden]
                gate, up = gate.t(), up.t()
            yield f"{owner}.{e}.gate_proj.{kind}", gate
            yield f"{owner}.{e}.up_proj.{kind}", up


def fused_expert_weight(modules: Dict[str, nn.Module], name: str) -> torch.Tensor:
    """A copy of a fused expert tensor (`...experts.gate_up_proj`) rebuilt in
    the checkpoint's layout from the FusedMoE module that holds it."""
    match = _FUSED_EXPERTS.match(name)
    experts = modules.get(match["owner"]) if match else None
    if experts is None:
        raise ValueError(f"unknown weight name {name!r}")
    inter = experts.intermediate_size
    if match["proj"] == "down_proj":
        return experts.w2_bias.data.clone() if match["bias"] else experts.w2.data.transpose(1, 2).clone()
    fused = experts.w13_bias.data if match["bias"] else experts.w13.data.transpose(1, 2)  # [..., 2I] gate|up
    out = torch.empty_like(fused)
    out[..., ::2], out[..., 1::2] = fused[..., :inter], fused[..., inter:]
    return out
