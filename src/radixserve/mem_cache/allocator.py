"""KV memory: the request-to-token table, the per-layer KV pool, and the slot allocator.

Slot 0 of the KV pool is never handed out: padded positions (CUDA-graph
padding later) write their K/V there harmlessly.
"""

from __future__ import annotations

import math
import mmap
from typing import List, Optional

import torch

from radixserve.mem_cache.kv_dtype import to_cache_dtype


class ReqToTokenPool:
    """Row r maps position i of the request in row r to its KV slot."""

    def __init__(self, size: int, max_context_len: int, device: torch.device) -> None:
        self.size = size
        self.max_context_len = max_context_len
        # One extra row, never handed out and all zeros (the reserved slot 0):
        # padded rows of a CUDA-graph batch read their "KV" through it.
        self.req_to_token = torch.zeros((size + 1, max_context_len), dtype=torch.int64, device=device)
        self.padding_row = size
        self.free_rows: List[int] = list(range(size))

    def available_size(self) -> int:
        return len(self.free_rows)

    def alloc(self) -> Optional[int]:
        return self.free_rows.pop() if self.free_rows else None

    def free(self, row: int) -> None:
        self.free_rows.append(row)


def zeroed_buffer(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros, except on the CPU: there the memory is an anonymous mmap,
    which the OS zeroes page by page on first touch, so a pool of gigabytes
    costs nothing at start-up (torch.zeros writes every byte: seconds). Not
    calloc: once glibc has freed a large block its mmap threshold rises, and a
    calloc of a pool released and resumed would come from the heap and be
    zeroed by hand, making all of it resident at once. The tensor holds the
    mmap, which is unmapped (given back to the OS) when the tensor is freed."""
    numel = math.prod(shape)
    if device.type != "cpu" or numel == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    memory = mmap.mmap(-1, numel * dtype.itemsize)
    return torch.frombuffer(memory, dtype=dtype, count=numel).view(shape)


class KVPool:
    """Per layer K and V buffers `[num_slots, kv_heads, head_dim]`."""

    def __init__(
        self, num_slots: int, num_layers: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        shape = (num_slots, num_kv_heads, head_dim)
        self.k_buffers = [zeroed_buffer(shape, dtype, device) for _ in range(num_layers)]
        self.v_buffers = [zeroed_buffer(shape, dtype, device) for _ in range(num_layers)]

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, kv_heads, head_dim] for the slots in loc."""
        k_buf, v_buf = self.k_buffers[layer_id], self.v_buffers[layer_id]
        if k_buf.is_cuda and k.stride(-1) == 1 and k.stride(-2) == k.shape[-1] and v.stride(-2) == v.shape[-1]:
            from radixserve.layers.fused_kernels import store_kv

            store_kv(k, v, loc, k_buf, v_buf)
            return
        k_buf[loc] = to_cache_dtype(k, k_buf.dtype)
        v_buf[loc] = to_cache_dtype(v, v_buf.dtype)

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every layer's K and V at slots src copied to slots dst (all read
        before any is written, so the two may overlap): a speculative tree's
        accepted nodes moved to their positions' slots when pages must stay whole."""
        for buf in self.k_buffers + self.v_buffers:
            buf[dst] = buf[src]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


class TokenAllocator:
    """Hands out KV slots, page-granular. Pages are numbered from 1 (page 0 is
    the reserved padding page); page p covers slots [p*P, (p+1)*P).

    Counts are in tokens (pages times page size) so callers never see pages."""

    def __init__(self, num_tokens: int, page_size: int, device: torch.device) -> None:
        self.page_size = page_size
        self.num_pages = num_tokens // page_size
        self.device = device
        self.total_tokens = self.num_pages * page_size
        # +1 for the reserved page 0.
        self.num_slots = (self.num_pages + 1) * page_size
        self.clear()

    def clear(self) -> None:
        if self.device.type == "cpu":
            # A stack: the free pages, next to be handed out last, are
            # _stack[:_num_free]. Taking and freeing touch only the pages
            # concerned; a list rebuilt with torch.cat on every free copied all
            # the free pages (a speculative cycle frees a few draft slots of a
            # pool of hundreds of thousands).
            self._stack = torch.arange(self.num_pages, 0, -1, dtype=torch.int64)
            self._num_free = self.num_pages
        else:
            self._queue = torch.arange(1, self.num_pages + 1, dtype=torch.int64, device=self.device)

    @property
    def free_pages(self) -> torch.Tensor:
        """The free pages, in the order they will be handed out."""
        if self.device.type == "cpu":
            return self._stack[:self._num_free].flip(0)
        return self._queue

    def _num_free_pages(self) -> int:
        return self._num_free if self.device.type == "cpu" else len(self._queue)

    def available_size(self) -> int:
        return self._num_free_pages() * self.page_size

    def _take_pages(self, n: int) -> Optional[torch.Tensor]:
        if n > self._num_free_pages():
            return None
        if self.device.type == "cpu":
            self._num_free -= n
            return self._stack[self._num_free:self._num_free + n].flip(0)  # (a copy: the stack's rows are reused)
        pages, self._queue = self._queue[:n], self._queue[n:]
        return pages

    def alloc_extend(
        self, prefix_lens: List[int], seq_lens: List[int], last_locs: List[int]
    ) -> Optional[torch.Tensor]:
        """Slots for positions [prefix_len, seq_len) of each request, concatenated.
        last_locs[i] is the slot of position prefix_len-1 (unused when prefix_len is
        page-aligned). Returns None, allocating nothing, when memory is short."""
        P = self.page_size
        if P == 1:
            n = sum(s - p for p, s in zip(prefix_lens, seq_lens))
            return self._take_pages(n)
        need = [-(-s // P) - (-(-p // P)) for p, s in zip(prefix_lens, seq_lens)]
        pages = self._take_pages(sum(need))
        if pages is None:
            return None
        offsets = torch.arange(P, device=self.device)
        out, start = [], 0
        for prefix, seq, last, n in zip(prefix_lens, seq_lens, last_locs, need):
            # First fill the rest of the prefix's partly filled last page ...
            tail = min(seq - prefix, (P - prefix % P) % P)
            if tail:
                out.append(torch.arange(last + 1, last + 1 + tail, device=self.device))
            # ... then whole new pages, the last one possibly partly used.
            if n:
                slots = (pages[start:start + n, None] * P + offsets).flatten()
                out.append(slots[: seq - prefix - tail])
            start += n
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=self.device)

    def alloc_decode(
        self, seq_lens: torch.Tensor, last_locs: torch.Tensor, seq_lens_cpu: Optional[torch.Tensor] = None
    ) -> Optional[torch.Tensor]:
        """One slot per request for position seq_len (its length before this step).
        seq_lens_cpu, a host copy of seq_lens, lets the page count be found
        without reading device memory (a sync the overlap schedule avoids)."""
        P = self.page_size
        if P == 1:
            return self._take_pages(len(seq_lens))
        host = seq_lens_cpu if seq_lens_cpu is not None else seq_lens.cpu()
        pages = self._take_pages(int((host % P == 0).sum()))
        if pages is None:
            return None
        if len(pages) == 0:
            return last_locs + 1
        needs_page = seq_lens % P == 0
        # Requests that need a page get them in row order; the rest continue their page.
        page_of_row = (torch.cumsum(needs_page, 0) - 1).clamp(min=0)
        return torch.where(needs_page, pages[page_of_row] * P, last_locs + 1)

    def free(self, slots: torch.Tensor) -> None:
        """Free the pages of a request's slots (positions 0..n-1 of one request,
        so every page starts at a multiple of the page size)."""
        if len(slots) == 0:
            return
        pages = slots[:: self.page_size].to(self.device) // self.page_size
        # On the CPU freed pages are handed out again first: the pool's memory
        # is zeroed by the OS page by page on first touch (zeroed_buffer), and
        # taking pages in order through the whole pool faulted in fresh memory
        # for every new request (a default-model prefill of 32 x 128 tokens
        # spent 347 of 1,080 ms storing K and V); reused pages are also the
        # ones still in cache. On CUDA the order is kept (first freed, first reused).
        if self.device.type == "cpu":
            if self._num_free + len(pages) > self.num_pages:
                raise RuntimeError(f"{len(pages)} pages freed while {self._num_free} of {self.num_pages} are free: "
                                   f"a page freed twice")
            self._stack[self._num_free:self._num_free + len(pages)] = pages.flip(0)
            self._num_free += len(pages)
        else:
            self._queue = torch.cat([self._queue, pages])
