"""Release and resume the memory an idle engine occupies (RL: the trainer
uses the accelerator between rollouts).

The KV pool's buffers are freed and later recreated as zeros: nothing in them
is worth keeping, because the prefix cache is emptied on release. On CUDA the
weights also leave device memory: each parameter's data moves to (pinned) host
memory and comes back on resume, so a weight update while released writes the
host copy and is kept. Parameters stay the same Parameter objects, so the
model's own references (tied embeddings, merged projections) stay valid.

The pool is walked generically: every attribute that is a list of tensors
(K and V buffers, MLA's latent buffers, ...) is released, so a new pool class
needs no code here. Buffers are swapped inside their lists, so whoever holds
the list sees the new tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch

from radixserve.mem_cache.allocator import zeroed_buffer
from radixserve.utils.cpu_malloc import give_back_freed_memory


@dataclass(frozen=True)
class TensorSpec:
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


@dataclass
class ReleasedMemory:
    """What a release took away, to be given back by resume_memory."""

    kv_specs: Dict[str, List[TensorSpec]] = field(default_factory=dict)  # pool attribute -> its buffers
    # (parameter, its device) for each parameter moved to host memory
    offloaded: List[Tuple[torch.nn.Parameter, torch.device]] = field(default_factory=list)
    kv_bytes: int = 0
    weight_bytes: int = 0

    @property
    def num_bytes(self) -> int:
        return self.kv_bytes + self.weight_bytes


def tensor_lists(pool: Any) -> Dict[str, List[torch.Tensor]]:
    """The pool's attributes that are non-empty lists of tensors, each list once
    (two attributes naming one list would otherwise release it twice).
    Derived views belong in properties (as MLAKVPool.v_buffers): a stored list
    of views would keep the old storage alive and miss the new one."""
    lists: Dict[str, List[torch.Tensor]] = {}
    for name, value in vars(pool).items():
        if (isinstance(value, list) and value and all(isinstance(t, torch.Tensor) for t in value)
                and all(value is not seen for seen in lists.values())):
            lists[name] = value
    return lists


def release_kv_pool(pool: Any, released: ReleasedMemory) -> None:
    for name, buffers in tensor_lists(pool).items():
        released.kv_specs[name] = [TensorSpec(b.shape, b.dtype, b.device) for b in buffers]
        released.kv_bytes += sum(b.numel() * b.element_size() for b in buffers)
        for i, b in enumerate(buffers):
            buffers[i] = torch.empty(0, dtype=b.dtype, device=b.device)


def resume_kv_pool(pool: Any, released: ReleasedMemory) -> None:
    for name, specs in released.kv_specs.items():
        buffers = getattr(pool, name)
        for i, spec in enumerate(specs):
            buffers[i] = zeroed_buffer(spec.shape, spec.dtype, spec.device)


def offload_weights(model: torch.nn.Module, released: ReleasedMemory) -> None:
    """Parameters to host memory (CUDA only: on CPU there is nothing to free)."""
    for p in model.parameters():
        if p.device.type != "cuda":
            continue
        released.offloaded.append((p, p.device))
        host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=True)
        host.copy_(p.data)
        released.weight_bytes += p.numel() * p.element_size()
        p.data = host


def onload_weights(released: ReleasedMemory) -> None:
    for p, device in released.offloaded:
        p.data = p.data.to(device)


def release_memory(model: torch.nn.Module, kv_pool: Any, device: torch.device) -> ReleasedMemory:
    released = ReleasedMemory()
    release_kv_pool(kv_pool, released)
    offload_weights(model, released)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # hand the freed blocks back to the driver, for the trainer
    else:
        give_back_freed_memory()  # the heap's free pages too (the pool, an mmap, is unmapped when freed)
    return released


def resume_memory(kv_pool: Any, released: ReleasedMemory) -> None:
    onload_weights(released)
    resume_kv_pool(kv_pool, released)
