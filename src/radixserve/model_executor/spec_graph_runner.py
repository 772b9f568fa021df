"""CUDA graphs for speculative decoding's small forwards: the target's
verify step (each request's last token and its drafts) and a draft model's
steps (its catch-up extend and its one-token steps).

Why: these forwards carry a few tokens per request, so eagerly they are
bound by the host. On the H200 a verify step of the default model spent
34.7 ms launching about 340 kernels from Python for 0.61 ms of GPU work.

Each graph is captured for a batch-size bucket with `width` token slots per
request: request i's tokens go to rows [i * width, i * width + n_i). The
extend kernel reads every request's prefix and new-token lengths from device
tensors the replay overwrites, so a request may bring fewer than `width`
tokens; its spare rows are padding (token 0 at position 0 writing the
reserved KV slot 0) that no real query attends to, and padded requests use
the request table's padding row. Every other layer works row by row. The
outputs are gathered back to the caller's compact layout after the replay.
A verify graph for draft trees (`tree=True`) also captures the tree-mask
input of the extend kernel (speculative/tree.py); a batch of chains replays
it with the causal masks, which attend exactly as the plain kernel does.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch

from radixserve.model_executor.cuda_graph_runner import capture_batch_sizes, capture_graph
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from radixserve.model_executor.logits_output import LogitsOutput
from radixserve.model_executor.prefill_graph_runner import EagerReplay
from radixserve.speculative.tree import causal_row_masks

if TYPE_CHECKING:
    from radixserve.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpecGraphShape:
    """What one set of graphs accepts."""

    width: int  # new tokens per request at most (1: a DECODE forward)
    max_bs: int
    aux_layers: Optional[Tuple[int, ...]] = None  # a target read by an EAGLE-3 head: the layers it captures
    spec_hidden_dim: int = 0  # a draft head: the width of its input features (0: none)
    tree: bool = False  # a verify step whose drafts may branch: the extend reads per-token tree masks


class SpecGraphRunner:
    def __init__(self, runner: "ModelRunner", shape: SpecGraphShape, capture: bool = True) -> None:
        """capture=False runs each bucket eagerly on the static buffers (no
        CUDA): what the graph would replay, for tests on the CPU."""
        self.runner, self.shape, self.width = runner, shape, shape.width
        self.mode = ForwardMode.DECODE if shape.width == 1 else ForwardMode.EXTEND
        self.batch_sizes = capture_batch_sizes(shape.max_bs)
        self.max_bs = self.batch_sizes[-1]
        self.padding_row = runner.pools.req_to_token_pool.padding_row
        dev, rows = runner.device, self.max_bs * shape.width

        def ints(n: int, value: int = 0) -> torch.Tensor:
            return torch.full((n,), value, dtype=torch.int64, device=dev)

        self.input_ids, self.positions, self.out_cache_loc = ints(rows), ints(rows), ints(rows)
        self.req_pool_indices = ints(self.max_bs, self.padding_row)
        self.seq_lens, self.extend_lens = ints(self.max_bs, 1), ints(self.max_bs, 1)
        self.prefix_lens = ints(self.max_bs)
        self.start_loc = torch.arange(self.max_bs, device=dev) * shape.width
        self.spec_hidden = (torch.zeros(rows, shape.spec_hidden_dim, dtype=runner.dtype, device=dev)
                            if shape.spec_hidden_dim else None)
        # Every request's rows start as a chain's: row j sees rows 0..j.
        self.causal_masks = (torch.tensor(causal_row_masks(shape.width), dtype=torch.int64, device=dev)
                             .repeat(self.max_bs) if shape.tree else None)
        self.tree_mask = self.causal_masks.clone() if shape.tree else None
        self.graphs: Dict[int, object] = {}
        self.replays = 0  # (get_server_info shows them: which forwards took a graph)
        self.outputs: Dict[int, Tuple[torch.Tensor, ...]] = {}
        self.capture_seconds = self._capture_all(capture)

    # ---- capture ----
    def _forward_batch(self, bs: int) -> ForwardBatch:
        """A bucket's batch: every request with `width` new tokens on the host
        side (the attention backend sizes its grid from them); the device
        tensors change per replay."""
        pools, rows = self.runner.pools, bs * self.width
        fb = ForwardBatch(
            forward_mode=self.mode, batch_size=bs, input_ids=self.input_ids[:rows], positions=self.positions[:rows],
            req_pool_indices=self.req_pool_indices[:bs], seq_lens=self.seq_lens[:bs],
            out_cache_loc=self.out_cache_loc[:rows], seq_lens_cpu=[self.width] * bs,
            req_to_token_pool=pools.req_to_token_pool, kv_pool=pools.kv_pool, attn_backend=self.runner.attn_backend,
            capture_aux_layers=self.shape.aux_layers,
            spec_hidden=None if self.spec_hidden is None else self.spec_hidden[:rows],
            spec_tree_mask=None if self.tree_mask is None else self.tree_mask[:rows],
        )
        if self.mode == ForwardMode.EXTEND:
            fb.extend_prefix_lens, fb.extend_seq_lens = self.prefix_lens[:bs], self.extend_lens[:bs]
            fb.extend_start_loc = self.start_loc[:bs]
            fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu = [0] * bs, [self.width] * bs
        return fb

    def _run(self, fb: ForwardBatch) -> Tuple[torch.Tensor, ...]:
        """(logits, hidden states[, captured layers]) of every row."""
        fb.attn_backend.init_forward_metadata(fb)
        hidden = self.runner.model(fb.input_ids, fb.positions, fb)
        outputs = (self.runner.model.compute_logits(hidden), hidden)
        return outputs + (fb.aux_hidden,) if self.shape.aux_layers else outputs

    @torch.inference_mode()
    def _capture_all(self, capture: bool) -> float:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if capture else None
        stream = torch.cuda.Stream() if capture else None
        for bs in reversed(self.batch_sizes):  # largest first: the smaller ones fit in its memory pool
            fb = self._forward_batch(bs)
            if capture:
                self.graphs[bs], self.outputs[bs] = capture_graph(lambda: self._run(fb), pool, stream)
            else:
                self.graphs[bs] = graph = EagerReplay(lambda fb=fb: self._run(fb))
                self.outputs[bs] = graph.output
        if capture:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        logger.info("CUDA graphs: captured %d speculative batch sizes (1..%d, %d tokens each) in %.1f s",
                    len(self.batch_sizes), self.max_bs, self.width, seconds)
        return seconds

    # ---- replay ----
    def can_run(self, fb: ForwardBatch) -> bool:
        """A batch of the captured kind: at most as many requests as the largest bucket,
        each with at most `width` new tokens, the same captured layers and
        draft features, no images (speculation refuses adapters at start-up)."""
        if fb.forward_mode != self.mode or fb.batch_size > self.max_bs:
            return False
        if fb.mm_items or fb.mrope_positions is not None:
            return False
        if fb.capture_aux_layers != self.shape.aux_layers or (fb.spec_hidden is None) != (self.spec_hidden is None):
            return False
        if fb.spec_tree_mask is not None and not self.shape.tree:
            return False
        return self.mode == ForwardMode.DECODE or max(fb.extend_seq_lens_cpu) <= self.width

    @torch.inference_mode()
    def replay(self, fb: ForwardBatch) -> LogitsOutput:
        """The LogitsOutput the eager forward gives for fb."""
        raw = fb.batch_size
        bs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, raw)]
        lens = [1] * raw if self.mode == ForwardMode.DECODE else fb.extend_seq_lens_cpu
        # fb's token k of request i -> static row i * width + (its index within the request)
        rows = torch.tensor([i * self.width + j for i, n in enumerate(lens) for j in range(n)],
                            device=fb.input_ids.device)
        used = bs * self.width
        for static, given in ((self.input_ids, fb.input_ids), (self.positions, fb.positions),
                              (self.out_cache_loc, fb.out_cache_loc)):
            static[:used].zero_()  # padding: token 0 at position 0 into slot 0
            static.index_copy_(0, rows, given)
        if self.spec_hidden is not None:
            self.spec_hidden.index_copy_(0, rows, fb.spec_hidden.to(self.spec_hidden.dtype))
        if self.tree_mask is not None:
            self.tree_mask[:used].copy_(self.causal_masks[:used])  # chains, and the padding rows
            if fb.spec_tree_mask is not None:
                self.tree_mask.index_copy_(0, rows, fb.spec_tree_mask)
        self._copy_requests(fb, raw, bs)
        self.graphs[bs].replay()
        self.replays += 1
        return self._outputs(fb, self.outputs[bs], rows)

    def _copy_requests(self, fb: ForwardBatch, raw: int, bs: int) -> None:
        """The requests' rows and lengths; the bucket's spare requests become
        one-token extends on the padding row."""
        self.req_pool_indices[:raw].copy_(fb.req_pool_indices)
        self.req_pool_indices[raw:bs].fill_(self.padding_row)
        self.seq_lens[:raw].copy_(fb.seq_lens)
        self.seq_lens[raw:bs].fill_(1)
        if self.mode == ForwardMode.EXTEND:
            self.prefix_lens[:raw].copy_(fb.extend_prefix_lens)
            self.extend_lens[:raw].copy_(fb.extend_seq_lens)
            self.prefix_lens[raw:bs].zero_()
            self.extend_lens[raw:bs].fill_(1)

    def _outputs(self, fb: ForwardBatch, outputs: Tuple[torch.Tensor, ...], rows: torch.Tensor) -> LogitsOutput:
        """The static outputs at fb's own rows, picked as the eager forward picks them."""
        logits = outputs[0][rows]
        hidden = outputs[1][rows] if fb.return_hidden else None
        if self.mode == ForwardMode.DECODE:
            out = LogitsOutput(logits, None)
        else:
            logits = logits[fb.logits_indices]
            next_token_logits = logits[fb.last_logit_rows]
            if hidden is not None:
                hidden = hidden[fb.logits_indices][fb.last_logit_rows]
            out = LogitsOutput(next_token_logits, logits if logits.shape[0] > next_token_logits.shape[0] else None)
        out.aux_hidden = outputs[2][rows] if self.shape.aux_layers else None
        out.hidden = hidden
        return out


def spec_graph_support(runner: "ModelRunner") -> Optional[str]:
    """Why `runner` cannot take speculative graphs (None: it can)."""
    if runner.device.type != "cuda":
        return "no CUDA"
    if runner.server_args.resolved_attention_backend() != "triton":
        return "they need --attention-backend triton"
    from radixserve.mem_cache.kv_layout import MLAKVLayout

    if isinstance(runner.kv_layout, MLAKVLayout):
        return "MLA picks its attention form from host-side lengths"
    return None
