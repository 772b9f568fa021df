"""The host KV pool: the second tier of the KV cache, in (pinned) host memory.

It mirrors the device pool's buffers (K and V per layer, or the MLA latent per
layer): every buffer row is one token's `[heads, head_dim]`, so a token's KV
is `num_buffers` such rows. Two layouts (SGLang's names):

- page_first (and page_first_direct, the same here): `[slots, buffers, heads,
  dim]`, so one page of tokens, every layer, is one contiguous block: what
  storage reads and writes whole, and what a copy moves in one piece.
- layer_first: `[buffers, slots, heads, dim]`, one block per layer like the
  device pool.

Copies move whole pages. The io backend decides how many copies: `kernel`
gathers every page of a transfer into one staging tensor and, on the CPU, moves
it with one indexed copy; on CUDA, where asynchronous copies need contiguous
pinned memory, with one copy per run of consecutive host pages (a page size of
16 or more keeps runs long). `direct` copies page by page. On CUDA they run on
a side stream: a load makes the compute stream wait on it (no
host sync), and device slots that a backup still reads are fenced before reuse.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from radixserve.mem_cache.allocator import zeroed_buffer


def device_buffers(kv_pool) -> List[torch.Tensor]:
    """The device pool's per-token buffers, in a fixed order: K then V per layer
    (MHA), or the latent rows per layer (MLA)."""
    latent = getattr(kv_pool, "latent_buffers", None)
    if latent is not None:
        return list(latent)
    return list(kv_pool.k_buffers) + list(kv_pool.v_buffers)


class HostKVPool:
    def __init__(self, kv_pool, num_tokens: int, page_size: int,
                 layout: str = "page_first", io_backend: str = "kernel") -> None:
        """kv_pool: the device KVPool or MLAKVPool this pool backs."""
        self.kv_pool = kv_pool
        buffers = self.device_buffers
        self.page_size = page_size
        self.num_pages = num_tokens // page_size
        self.total_tokens = self.num_pages * page_size
        self.layout = "layer_first" if layout == "layer_first" else "page_first"
        self.merge_runs = io_backend != "direct"
        first = buffers[0]
        self.row_shape = tuple(first.shape[1:])
        self.num_buffers = len(buffers)
        self.device = first.device
        shape = ((self.num_buffers, self.total_tokens) if self.layout == "layer_first"
                 else (self.total_tokens, self.num_buffers)) + self.row_shape
        if first.is_cuda:  # pinned pages let copies run asynchronously
            self.data = torch.zeros(shape, dtype=first.dtype, pin_memory=True)
        else:  # an anonymous mmap: gigabytes cost nothing until touched
            self.data = zeroed_buffer(shape, first.dtype, torch.device("cpu"))
        self.stream = torch.cuda.Stream(device=self.device) if first.is_cuda else None
        self.bytes_per_token = self.num_buffers * first[0].numel() * first.element_size()
        self.bytes_to_host = 0
        self.bytes_to_device = 0
        self.clear()

    @property
    def device_buffers(self) -> List[torch.Tensor]:
        """Looked up on every use: releasing and resuming memory replaces the pool's tensors."""
        return device_buffers(self.kv_pool)

    # ---- allocation (page-granular; pages numbered from 0) ----
    def clear(self) -> None:
        self.free_pages = torch.arange(self.num_pages, dtype=torch.int64)

    def available_size(self) -> int:
        return len(self.free_pages) * self.page_size

    def alloc(self, num_tokens: int) -> Optional[torch.Tensor]:
        """Slots for num_tokens (a multiple of the page size), or None."""
        n = num_tokens // self.page_size
        if n > len(self.free_pages):
            return None
        pages, self.free_pages = self.free_pages[:n], self.free_pages[n:]
        offsets = torch.arange(self.page_size)
        return (pages[:, None] * self.page_size + offsets).flatten()

    def free(self, slots: torch.Tensor) -> None:
        if len(slots):
            self.free_pages = torch.cat([self.free_pages, slots[:: self.page_size] // self.page_size])

    # ---- copies ----
    def backup(self, device_slots: torch.Tensor, host_slots: torch.Tensor) -> None:
        """Device -> host for these slots (same length, page-aligned)."""
        with self._side_stream():
            staged = self._gather_device(device_slots)
            if self._one_op():
                self.data.index_copy_(self._slot_dim, host_slots, self._swap(staged))
            else:
                for start, length, offset in self._runs(host_slots):
                    self._host_region(start, length).copy_(
                        self._swap(staged[offset:offset + length]), non_blocking=True)
        self.bytes_to_host += len(host_slots) * self.bytes_per_token

    def load(self, host_slots: torch.Tensor, device_slots: torch.Tensor) -> None:
        """Host -> device; on CUDA the compute stream waits for it (no host sync)."""
        with self._side_stream():
            if self._one_op():
                staged = self._swap(self.data.index_select(self._slot_dim, host_slots))
            else:
                parts = [self._swap(self._host_region(start, length)).to(self.device, non_blocking=True)
                         for start, length, _ in self._runs(host_slots)]
                staged = torch.cat(parts) if len(parts) > 1 else parts[0]
            index = device_slots.to(self.device)
            for b, buf in enumerate(self.device_buffers):
                buf[index] = staged[:, b]
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.bytes_to_device += len(host_slots) * self.bytes_per_token

    def fence(self) -> None:
        """Before device slots that a backup read are reused: the compute stream
        waits for the side stream (no host sync)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def read_pages(self, host_slots: torch.Tensor) -> torch.Tensor:
        """A copy of these slots' KV as `[tokens, buffers, heads, dim]` (for storage)."""
        if self.stream is not None:
            self.stream.synchronize()  # backups into these slots may still be in flight
        return self._swap(self.data.index_select(self._slot_dim, host_slots)).contiguous()

    def write_pages(self, host_slots: torch.Tensor, values: torch.Tensor) -> None:
        """Fill these slots from `[tokens, buffers, heads, dim]` (from storage)."""
        self.data.index_copy_(self._slot_dim, host_slots, self._swap(values))

    # ---- helpers ----
    def _side_stream(self):
        if self.stream is None:
            return torch.no_grad()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the KV was written there
        return torch.cuda.stream(self.stream)

    def _one_op(self) -> bool:
        """The kernel backend on the CPU: one indexed copy for the whole transfer
        (on CUDA, asynchronous copies need contiguous pinned runs instead)."""
        return self.stream is None and self.merge_runs

    @property
    def _slot_dim(self) -> int:
        return 1 if self.layout == "layer_first" else 0

    def _gather_device(self, device_slots: torch.Tensor) -> torch.Tensor:
        index = device_slots.to(self.device)
        return torch.stack([buf.index_select(0, index) for buf in self.device_buffers], dim=1)

    def _runs(self, host_slots: torch.Tensor) -> List[Tuple[int, int, int]]:
        """(first slot, length, offset in the transfer) of each copy: whole pages,
        consecutive pages merged unless the io backend is direct."""
        P = self.page_size
        starts = host_slots[::P].tolist()
        runs: List[Tuple[int, int, int]] = []
        for i, start in enumerate(starts):
            if self.merge_runs and runs and runs[-1][0] + runs[-1][1] == start:
                first, length, offset = runs[-1]
                runs[-1] = (first, length + P, offset)
            else:
                runs.append((start, P, i * P))
        return runs

    def _host_region(self, start: int, length: int) -> torch.Tensor:
        return self.data.narrow(self._slot_dim, start, length)

    def _swap(self, t: torch.Tensor) -> torch.Tensor:
        """`[tokens, buffers, ...]` <-> the host layout's axis order (its own inverse)."""
        return t if self.layout == "page_first" else t.transpose(0, 1)
