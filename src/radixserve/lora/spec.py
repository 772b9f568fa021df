"""Adapter specs and target-module names, without torch (ServerArgs and the
front end use them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterable, List, Tuple, Union

# The projections an adapter may target, by their PEFT (Hugging Face) names.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Names SGLang also accepts for groups of them.
TARGET_ALIASES = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "all": TARGET_MODULES,
    "all-linear": TARGET_MODULES,
}


@dataclass(frozen=True)
class LoRASpec:
    """An adapter to load: its name in requests, its PEFT folder, and whether
    it keeps its device slot for good (pinned)."""

    name: str
    path: str
    pinned: bool = False


def normalize_targets(names: Iterable[str], field: str = "lora_target_modules") -> FrozenSet[str]:
    """PEFT target names (aliases expanded); ValueError naming an unknown one."""
    out = set()
    for name in names:
        if name in TARGET_ALIASES:
            out.update(TARGET_ALIASES[name])
        elif name in TARGET_MODULES:
            out.add(name)
        else:
            raise ValueError(f"{field}: unknown target module {name!r}; supported: "
                             f"{', '.join(TARGET_MODULES + tuple(TARGET_ALIASES))}")
    return frozenset(out)


def parse_lora_paths(entries: Union[List[Any], Dict[str, str], None]) -> List[LoRASpec]:
    """--lora-paths entries: "name=path", a bare path (named after its folder),
    or a dict {lora_name, lora_path, pinned}; or one dict name -> path (the
    forms SGLang's Engine accepts)."""
    if isinstance(entries, dict):
        entries = [f"{name}={path}" for name, path in entries.items()]
    specs: List[LoRASpec] = []
    for entry in entries or []:
        if isinstance(entry, dict):
            name, path = entry.get("lora_name"), entry.get("lora_path")
            if not isinstance(name, str) or not isinstance(path, str):
                raise ValueError(f"lora_paths: {entry!r} needs string 'lora_name' and 'lora_path'")
            specs.append(LoRASpec(name, path, bool(entry.get("pinned", False))))
        elif isinstance(entry, str):
            name, sep, path = entry.partition("=")
            if not sep:
                path, name = entry, os.path.basename(os.path.normpath(entry))
            specs.append(LoRASpec(name, path))
        else:
            raise ValueError(f"lora_paths: expected 'name=path', got {entry!r}")
    names = [s.name for s in specs]
    for spec in specs:
        check_lora_name(spec.name, "lora_paths")
        if names.count(spec.name) > 1:
            raise ValueError(f"lora_paths: adapter name {spec.name!r} appears more than once")
    return specs


def initial_lora_ids(specs: List[LoRASpec]) -> List[Tuple[int, LoRASpec]]:
    """The --lora-paths adapters' ids: 1, 2, ... in order, so the front end and
    the schedulers agree on them without a message (later loads count on)."""
    return list(enumerate(specs, 1))


def check_lora_name(name: Any, field: str = "lora_name") -> str:
    """A name that can be a request's lora_path and an OpenAI model suffix."""
    if not isinstance(name, str) or not name or ":" in name or name != name.strip():
        raise ValueError(f"{field}: adapter name {name!r} must be a non-empty string without ':' "
                         f"or surrounding spaces")
    return name
