"""Weights of a Hugging Face folder: one or sharded *.safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, List, Tuple

import torch
from safetensors import safe_open


def safetensors_files(folder: Path) -> List[Path]:
    """The checkpoint's files: those the index names, else every *.safetensors.

    Some repos (Mistral's) ship the same weights twice, as model-*.safetensors
    and as consolidated.safetensors in another naming scheme; without an index
    the model-* files win so no tensor is read twice.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    hf_named = [f for f in files if f.name.startswith("model")]
    files = hf_named or files
    if not files:
        raise ValueError(f"no *.safetensors weights in {folder}")
    return files


class HFWeights:
    """(name, tensor) pairs of a safetensors checkpoint, in file order, with a
    length read from the file headers only. Tensors keep their stored dtype:
    the model casts while copying, which saves a float32 copy of bf16 weights."""

    def __init__(self, folder: Path) -> None:
        self.files = safetensors_files(Path(folder))

    def __len__(self) -> int:
        total = 0
        for f in self.files:
            with safe_open(f, framework="pt") as sf:
                total += len(sf.keys())
        return total

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for f in self.files:
            with safe_open(f, framework="pt") as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name)


def iterate_hf_weights(folder: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    return iter(HFWeights(folder))
