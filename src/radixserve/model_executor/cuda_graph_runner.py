"""CUDA graphs for decode: capture the model's decode forward once per batch
size at start-up, then replay it, so a step costs one launch instead of
hundreds of kernel launches from Python.

A graph replays fixed memory addresses, so every input lives in a static
buffer that replay overwrites; a batch is padded up to the nearest captured
size. Padded rows read and write only the reserved KV slot 0 (through the
request table's padding row), so they never touch a real request's cache.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Tuple

import torch
from tqdm import tqdm

from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from radixserve.model_executor.logits_output import LogitsOutput

if TYPE_CHECKING:
    from radixserve.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_bs: int) -> List[int]:
    """1, 2, 4, 8, then every 16 up to max_bs (and max_bs itself): padding wastes
    at most 15 rows, and the number of graphs stays small."""
    sizes = [bs for bs in (1, 2, 4, 8) if bs <= max_bs]
    sizes += list(range(16, max_bs + 1, 16))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


def capture_graph(forward: Callable[[], torch.Tensor], pool, stream: torch.cuda.Stream
                  ) -> Tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """forward run twice on `stream` (lazy initialisation and Triton autotuning
    happen outside the graph), then captured into a graph on memory pool
    `pool`. Returns the graph and the output tensor its replays overwrite."""
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        output = forward()
    return graph, output


class CudaGraphRunner:
    def __init__(self, runner: "ModelRunner", max_bs: int) -> None:
        self.runner = runner
        self.batch_sizes = capture_batch_sizes(max_bs)
        self.max_bs = self.batch_sizes[-1]
        dev = runner.device
        pools = runner.pools
        self.padding_row = pools.req_to_token_pool.padding_row
        zeros = lambda: torch.zeros(self.max_bs, dtype=torch.int64, device=dev)  # noqa: E731
        self.input_ids, self.positions, self.out_cache_loc = zeros(), zeros(), zeros()
        self.req_pool_indices = torch.full((self.max_bs,), self.padding_row, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int64, device=dev)
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: Dict[int, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_seconds = self._capture_all()

    # ---- capture ----
    def _forward_batch(self, bs: int) -> ForwardBatch:
        pools = self.runner.pools
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=bs,
            input_ids=self.input_ids[:bs], positions=self.positions[:bs],
            req_pool_indices=self.req_pool_indices[:bs], seq_lens=self.seq_lens[:bs],
            out_cache_loc=self.out_cache_loc[:bs], seq_lens_cpu=[1] * bs,
            req_to_token_pool=pools.req_to_token_pool, kv_pool=pools.kv_pool,
            attn_backend=self.runner.attn_backend,
        )

    def _run(self, fb: ForwardBatch) -> torch.Tensor:
        fb.attn_backend.init_forward_metadata(fb)
        hidden = self.runner.model(fb.input_ids, fb.positions, fb)
        return self.runner.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> float:
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        # Largest first: the smaller graphs then fit in the memory pool it reserved.
        for bs in tqdm(reversed(self.batch_sizes), total=len(self.batch_sizes), desc="Capturing CUDA graphs"):
            fb = self._forward_batch(bs)
            if self.runner.lora_manager is not None:
                self.runner.lora_manager.capture_decode(bs, self.max_bs)
            self.graphs[bs], self.logits[bs] = capture_graph(lambda: self._run(fb), self.pool, stream)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        logger.info("CUDA graphs: captured %d batch sizes (1..%d) in %.1f s",
                    len(self.batch_sizes), self.max_bs, seconds)
        return seconds

    # ---- replay ----
    def can_run(self, forward_batch: ForwardBatch) -> bool:
        return forward_batch.forward_mode.is_decode() and forward_batch.batch_size <= self.max_bs

    def replay(self, forward_batch: ForwardBatch) -> LogitsOutput:
        """One decode step's logits ([batch_size, vocab])."""
        fb = forward_batch
        raw = fb.batch_size
        bs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, raw)]
        self.input_ids[:raw].copy_(fb.input_ids)
        self.positions[:raw].copy_(fb.positions)
        self.req_pool_indices[:raw].copy_(fb.req_pool_indices)
        self.seq_lens[:raw].copy_(fb.seq_lens)
        self.out_cache_loc[:raw].copy_(fb.out_cache_loc)
        if bs > raw:  # rows a larger batch left behind become padding again
            self.input_ids[raw:bs].zero_()
            self.positions[raw:bs].zero_()
            self.req_pool_indices[raw:bs].fill_(self.padding_row)
            self.seq_lens[raw:bs].fill_(1)
            self.out_cache_loc[raw:bs].zero_()
        if self.runner.lora_manager is not None:
            self.runner.lora_manager.prepare_decode(fb.lora_ids or [None] * raw, bs)
        self.graphs[bs].replay()
        return LogitsOutput(self.logits[bs][:raw], None)
