"""Weights of a Hugging Face folder: one or sharded *.safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, List, Tuple

import torch
from safetensors import safe_open


def safetensors_files(folder: Path) -> List[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {folder}")
    return files


def count_hf_tensors(folder: Path) -> int:
    total = 0
    for f in safetensors_files(folder):
        with safe_open(f, framework="pt") as sf:
            total += len(sf.keys())
    return total


def iterate_hf_weights(folder: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    for f in safetensors_files(folder):
        with safe_open(f, framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name)
