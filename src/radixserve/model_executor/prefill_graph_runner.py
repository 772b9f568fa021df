"""CUDA graphs for short prefills: one request's extend of up to
--prefill-cuda-graph-max-tokens new tokens replays a graph captured at
start-up for the nearest token bucket at or above its length.

Why: an eager prefill of a short prompt is bound by the host, not the GPU. On
the Llama-3.1-8B shape a 128-token prefill spent about 12 ms launching its
32 layers' kernels from Python for about 5 ms of GPU work, most of a lone
request's time to first token. A graph launches them all in one call.

The bucket's tail tokens are padding: token 0 at position 0, writing the
reserved KV slot 0. The extend kernel stops at the request's real length
(extend_seq_lens, a tensor the replay overwrites), so padding is never a key
of a real token; every other layer works row by row, and the logits are
taken at the last real token. Only that plain shape takes a graph (one
request, its next-token logits only, no LoRA, images or speculative
features); the model runner runs everything else eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Tuple, Union

import torch
from tqdm import tqdm

from radixserve.model_executor.cuda_graph_runner import capture_graph
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from radixserve.model_executor.logits_output import LogitsOutput

if TYPE_CHECKING:
    from radixserve.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

SMALLEST_BUCKET = 16


def prefill_token_buckets(max_tokens: int) -> List[int]:
    """16, 32, 64, 96, 128, 192, 256, 384, ... up to max_tokens, and
    max_tokens itself: from 64 on a bucket is at most 1.5x the one below, so
    padding adds at most half the tokens; fewer than 16 tokens take the 16."""
    if max_tokens < 1:
        return []
    sizes, p = [], SMALLEST_BUCKET
    while p < max_tokens:
        sizes.append(p)
        if p >= 64 and p * 3 // 2 < max_tokens:
            sizes.append(p * 3 // 2)
        p *= 2
    return sizes + [max_tokens]


class EagerReplay:
    """Stands in for a CUDA graph where there is none (the CPU tests): replay
    reruns the same forward on the same static buffers into the same output."""

    def __init__(self, forward: Callable[[], Union[torch.Tensor, Tuple[torch.Tensor, ...]]]) -> None:
        self.forward = forward
        self.output = forward()

    @torch.inference_mode()
    def replay(self) -> None:
        new = self.forward()
        if isinstance(new, torch.Tensor):
            self.output.copy_(new)
            return
        for static, value in zip(self.output, new):
            static.copy_(value)


class PrefillGraphRunner:
    def __init__(self, runner: "ModelRunner", max_tokens: int, capture: bool = True) -> None:
        """capture=False runs each bucket eagerly on the static buffers (no
        CUDA): what the graph would replay, for tests on the CPU."""
        self.runner = runner
        self.buckets = prefill_token_buckets(min(max_tokens, runner.context_len))
        self.max_tokens = self.buckets[-1]
        dev = runner.device

        def ints(n: int, value: int = 0) -> torch.Tensor:
            return torch.full((n,), value, dtype=torch.int64, device=dev)

        self.input_ids, self.positions, self.out_cache_loc = ints(self.max_tokens), ints(self.max_tokens), ints(
            self.max_tokens)
        # The request's tensors; at capture they describe a request of the
        # bucket's length on the padding row (every key is slot 0).
        self.req_pool_index = ints(1, runner.pools.req_to_token_pool.padding_row)
        self.seq_len, self.prefix_len, self.extend_len = ints(1), ints(1), ints(1)
        self.start_loc, self.logits_index = ints(1), ints(1)
        self.graphs: Dict[int, object] = {}
        self.logits: Dict[int, torch.Tensor] = {}
        self.capture_seconds = self._capture_all(capture)

    # ---- capture ----
    def _forward_batch(self, tokens: int) -> ForwardBatch:
        """A bucket's batch: the host-side lengths are the bucket's (the attention
        backend sizes its grid from them); the device tensors change per replay."""
        pools = self.runner.pools
        return ForwardBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=1,
            input_ids=self.input_ids[:tokens], positions=self.positions[:tokens],
            req_pool_indices=self.req_pool_index, seq_lens=self.seq_len,
            out_cache_loc=self.out_cache_loc[:tokens], seq_lens_cpu=[tokens],
            extend_prefix_lens=self.prefix_len, extend_seq_lens=self.extend_len, extend_start_loc=self.start_loc,
            extend_prefix_lens_cpu=[0], extend_seq_lens_cpu=[tokens],
            logits_indices=self.logits_index,
            req_to_token_pool=pools.req_to_token_pool, kv_pool=pools.kv_pool,
            attn_backend=self.runner.attn_backend,
        )

    def _run(self, fb: ForwardBatch) -> torch.Tensor:
        fb.attn_backend.init_forward_metadata(fb)
        hidden = self.runner.model(fb.input_ids, fb.positions, fb)
        return self.runner.model.compute_logits(hidden[fb.logits_indices])

    @torch.inference_mode()
    def _capture_all(self, capture: bool) -> float:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if capture else None
        stream = torch.cuda.Stream() if capture else None
        # Largest first: the smaller graphs then fit in the memory pool it reserved.
        for tokens in tqdm(reversed(self.buckets), total=len(self.buckets), desc="Capturing prefill CUDA graphs"):
            fb = self._forward_batch(tokens)
            self.seq_len.fill_(tokens)  # (the kernels' grids are sized for this many queries)
            self.extend_len.fill_(tokens)
            if not capture:
                self.graphs[tokens] = graph = EagerReplay(lambda fb=fb: self._run(fb))
                self.logits[tokens] = graph.output
                continue
            self.graphs[tokens], self.logits[tokens] = capture_graph(lambda: self._run(fb), pool, stream)
        if capture:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        logger.info("CUDA graphs: captured %d prefill sizes (%d..%d tokens) in %.1f s",
                    len(self.buckets), self.buckets[0], self.max_tokens, seconds)
        return seconds

    # ---- replay ----
    def can_run(self, fb: ForwardBatch) -> bool:
        """One request's plain extend that fits a bucket: its next-token logits
        only (no input logprobs), no images, no speculative inputs or outputs."""
        return (fb.forward_mode == ForwardMode.EXTEND and fb.batch_size == 1
                and fb.input_ids.shape[0] <= self.max_tokens and fb.logits_indices.shape[0] == 1
                and not fb.mm_items and fb.mrope_positions is None and fb.capture_aux_layers is None
                and fb.spec_hidden is None and not fb.return_hidden and fb.spec_tree_mask is None)

    @torch.inference_mode()
    def replay(self, fb: ForwardBatch) -> LogitsOutput:
        """The request's next-token logits ([1, vocab])."""
        n = fb.input_ids.shape[0]
        tokens = self.buckets[bisect.bisect_left(self.buckets, n)]
        for static, given in ((self.input_ids, fb.input_ids), (self.positions, fb.positions),
                              (self.out_cache_loc, fb.out_cache_loc)):
            static[:n].copy_(given)
            static[n:tokens].zero_()  # padding: token 0 at position 0 into slot 0
        self.req_pool_index.copy_(fb.req_pool_indices)
        self.seq_len.copy_(fb.seq_lens)
        self.prefix_len.copy_(fb.extend_prefix_lens)
        self.extend_len.copy_(fb.extend_seq_lens)
        self.logits_index.copy_(fb.logits_indices)
        self.graphs[tokens].replay()
        return LogitsOutput(self.logits[tokens], None)
