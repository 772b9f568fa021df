"""A PEFT LoRA adapter read from its folder into host memory, and checked.

PEFT saves `adapter_config.json` (r, lora_alpha, use_rslora, target_modules)
and `adapter_model.safetensors` with, per targeted projection,
`base_model.model.<module path>.lora_A.weight` [r, in] and `.lora_B.weight`
[out, r]. The output of a targeted projection W becomes x W^T + scaling *
x A^T B^T with scaling = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

import torch

from radixserve.lora.spec import TARGET_MODULES, LoRASpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_WEIGHT_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoRAAdapter:
    """One adapter in host memory. weights: PEFT module path (e.g.
    "model.layers.0.self_attn.q_proj") -> (A [r, in], B [out, r]), float32."""

    name: str
    path: str
    rank: int
    scaling: float
    target_modules: FrozenSet[str]
    weights: Dict[str, Tuple[torch.Tensor, torch.Tensor]]


def load_adapter(spec: LoRASpec, max_rank: Optional[int] = None,
                 allowed_targets: Optional[FrozenSet[str]] = None) -> LoRAAdapter:
    """Read and check one adapter folder. ValueError, naming the adapter and
    what is wrong, for a missing file, an unsupported option, a rank above
    max_rank or a target outside allowed_targets."""
    what = f"LoRA adapter {spec.name!r} ({spec.path})"
    config = _read_config(spec.path, what)
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{what}: 'r' must be a positive integer, got {rank!r}")
    if max_rank is not None and rank > max_rank:
        raise ValueError(f"{what}: rank {rank} is larger than max_lora_rank ({max_rank})")
    for option in ("rank_pattern", "alpha_pattern"):
        if config.get(option):
            raise ValueError(f"{what}: per-module ranks ({option}) are not supported")
    if config.get("use_dora"):
        raise ValueError(f"{what}: DoRA adapters (use_dora) are not supported")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise ValueError(f"{what}: only LoRA weights are supported (no bias or modules_to_save)")
    weights = _read_weights(spec.path, what, rank)
    targets = frozenset(path.rsplit(".", 1)[-1] for path in weights)
    unknown = sorted(targets - set(TARGET_MODULES))
    if unknown:
        raise ValueError(f"{what}: unsupported target module(s) {', '.join(unknown)}; "
                         f"supported: {', '.join(TARGET_MODULES)}")
    if allowed_targets is not None and not targets <= allowed_targets:
        raise ValueError(f"{what}: target module(s) {', '.join(sorted(targets - allowed_targets))} are not "
                         f"in lora_target_modules ({', '.join(sorted(allowed_targets))})")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoRAAdapter(spec.name, spec.path, rank, float(scaling), targets, weights)


def _read_config(path: str, what: str) -> dict:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"{what}: no {CONFIG_FILE} there")
    with open(file) as f:
        config = json.load(f)
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise ValueError(f"{what}: peft_type {kind!r} is not LORA")
    return config


def _read_weights(path: str, what: str, rank: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file

    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"{what}: no {WEIGHTS_FILE} there")
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(file).items():
        match = _WEIGHT_NAME.match(name)
        if match is None:
            raise ValueError(f"{what}: unexpected tensor {name!r} (only lora_A/lora_B weights are supported)")
        parts.setdefault(match["module"], {})[match["ab"]] = tensor.float()
    weights = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{what}: {module} has lora_{'A' if 'A' not in ab else 'B'} missing")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{what}: {module} has shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                             f"expected rank {rank}")
        weights[module] = (a, b)
    if not weights:
        raise ValueError(f"{what}: {WEIGHTS_FILE} holds no LoRA weights")
    return weights
