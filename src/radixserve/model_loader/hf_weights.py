"""Weights of a Hugging Face folder: one or sharded *.safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, List, Tuple

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


class CheckpointSlice:
    """A safetensors entry not yet read: `narrow` reads only one slice of it
    from the file (a tensor-parallel rank's rows or columns), `materialize`
    all of it. Valid while its file is open, i.e. while the stream that
    yielded it has not moved on."""

    def __init__(self, handle: Any, name: str) -> None:
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())

    def narrow(self, dim: int, start: int, size: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, start + size),)
        return self._slice[index]

    def materialize(self) -> torch.Tensor:
        return self._slice[:]


class HFWeights:
    """(name, tensor) pairs of a safetensors checkpoint, in file order, with a
    length read from the file headers only. Tensors keep their stored dtype:
    the model casts while copying, which saves a float32 copy of bf16 weights.

    lazy: yield CheckpointSlice entries instead of tensors, so a
    tensor-parallel rank reads only its shard of each tensor."""

    def __init__(self, folder: Path, lazy: bool = False) -> None:
        self.files = safetensors_files(Path(folder))
        self.lazy = lazy

    def __len__(self) -> int:
        total = 0
        for f in self.files:
            with safe_open(f, framework="pt") as sf:
                total += len(sf.keys())
        return total

    def __iter__(self) -> Iterator[Tuple[str, Any]]:
        for f in self.files:
            with safe_open(f, framework="pt") as sf:
                for name in sf.keys():
                    yield name, CheckpointSlice(sf, name) if self.lazy else sf.get_tensor(name)


def iterate_hf_weights(folder: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    return iter(HFWeights(folder))
