"""Start-up warm-up: run every kernel variant a request can reach before serving.

Triton compiles a kernel once per specialisation: per set of constexpr values
(the fused MoE kernel's tiles and its alignment kernel's chunk, chosen from
the token count; a decode kernel's split count, chosen from the batch size),
and per alignment of the pointers it gets (a mixed batch's extend half starts
at an odd or even row). A variant first met inside a request compiles there:
hundreds of milliseconds per kernel, seconds for a MoE model's first prefill
of a new size. So before serving, the runner does forwards whose shapes reach
every variant: prefills of every power-of-two token count up to the largest
one forward takes (each MoE tile bucket and chunk size), a prefill on top of a
cached prefix (MLA's absorbed and expanded forms), decode steps of every
power-of-two batch size (each split count), with --enable-mixed-chunk,
mixed batches of odd and even decode counts and, with draft trees (NGRAM, or
a draft model with --speculative-eagle-topk > 1), an
extend with tree masks (speculative/tree.py). The forwards run eagerly: the
CUDA graphs compiled their own shapes when they were captured. Integer
arguments that vary with the batch (token and pair counts) are not
specialised by the kernels themselves (do_not_specialize), so their values
need no warm-up. With --enable-lora every warm-up forward runs its rows
through an adapter loaded at start-up (--lora-paths), so the segmented LoRA
kernels compile here too (a server started with no adapter compiles them on
its first LoRA request). Triton keeps what it compiled in its on-disk cache
(~/.triton/cache, or TRITON_CACHE_DIR), so a restart loads instead of compiling.
On the CPU nothing compiles; two forwards make the quantized weights' copies
instead (cpu_warmup_plan).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
from tqdm import tqdm

from radixserve.managers.schedule_batch import set_extend_lens
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from radixserve.speculative.spec_args import draft_trees

if TYPE_CHECKING:
    from radixserve.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

DECODE_CONTEXT = 8  # earlier tokens of each warm-up request taking a decode step
MIXED_NEW_TOKENS = 16  # the prefill part of a warm-up mixed batch
# Prefills on a cached prefix, in the two shapes MLA attends differently: a few
# new tokens on a long prefix (absorbed: FEW_NEW after LONG_PREFIX) and as many
# new tokens as cached ones (expanded over the gathered prefix: EVEN_PREFIX each).
LONG_PREFIX, FEW_NEW = 1024, 4
EVEN_PREFIX = 64


@dataclass(frozen=True)
class WarmupShape:
    """One warm-up forward: `num_decode` requests taking a decode step and,
    when num_new > 0, a prefill of num_new tokens: one request after
    `prefix_len` cached tokens, continued by more requests where it would be
    longer than max_request_len (the context length)."""

    num_decode: int = 0
    num_new: int = 0
    prefix_len: int = 0
    max_request_len: int = 1 << 62
    tree: bool = False  # a speculative verify of draft trees: the extend reads tree masks (causal ones here)

    @property
    def mode(self) -> ForwardMode:
        if self.num_new == 0:
            return ForwardMode.DECODE
        return ForwardMode.MIXED if self.num_decode else ForwardMode.EXTEND

    def requests(self) -> List[Tuple[int, int]]:
        """(cached tokens, new tokens) of each request, decode steps first."""
        reqs = [(DECODE_CONTEXT, 1)] * self.num_decode
        if self.num_new:
            first = min(self.num_new, self.max_request_len - self.prefix_len)
            reqs.append((self.prefix_len, first))
            for start in range(first, self.num_new, self.max_request_len):
                reqs.append((0, min(self.max_request_len, self.num_new - start)))
        return reqs


def powers_of_two_up_to(limit: int) -> List[int]:
    """1, 2, 4, ... up to limit, and limit itself."""
    values, n = [], 1
    while n < limit:
        values.append(n)
        n *= 2
    return values + [limit] if limit >= 1 else values


def warmup_shapes(max_new_tokens: int, max_decode: int, context_len: int, mixed: bool) -> List[WarmupShape]:
    """The forwards that reach every kernel variant of a server whose largest
    prefill forward has max_new_tokens tokens and whose largest decode batch
    has max_decode requests."""
    # A mixed forward carries up to max_decode decode rows beside a full chunk.
    most_tokens = max_new_tokens + (max_decode if mixed else 0)
    shapes = [WarmupShape(num_new=n, max_request_len=context_len) for n in powers_of_two_up_to(most_tokens)]
    long_prefix = max(0, min(LONG_PREFIX, context_len - FEW_NEW))
    even_prefix = max(0, min(EVEN_PREFIX, context_len - EVEN_PREFIX))
    shapes += [WarmupShape(num_new=FEW_NEW, prefix_len=long_prefix, max_request_len=context_len),
               WarmupShape(num_new=EVEN_PREFIX, prefix_len=even_prefix, max_request_len=context_len)]
    decode_sizes = powers_of_two_up_to(max_decode)
    shapes += [WarmupShape(num_decode=n) for n in decode_sizes]
    if mixed:
        shapes += [WarmupShape(num_decode=n, num_new=MIXED_NEW_TOKENS) for n in decode_sizes]
    return shapes


def warmup_plan(runner: "ModelRunner") -> List[WarmupShape]:
    """The warm-up forwards of this runner's server."""
    args = runner.server_args
    max_new = args.resolved_chunked_prefill_size() or args.max_prefill_tokens
    shapes = warmup_shapes(min(max_new, runner.max_total_num_tokens // 2), runner.max_running_requests,
                           runner.context_len, args.enable_mixed_chunk)
    if getattr(runner, "pooling", None) is not None:  # an embedding server only prefills
        shapes = [s for s in shapes if s.mode == ForwardMode.EXTEND]
    if draft_trees(args):  # verify steps of draft trees: the extend kernel's tree variant
        shapes.append(WarmupShape(num_new=FEW_NEW, prefix_len=DECODE_CONTEXT, tree=True))
    return shapes


def warm_up_kernels(runner: "ModelRunner") -> int:
    """Run the warm-up forwards on the runner's pools (every slot and row is
    given back). Returns how many ran; a shape the KV pool cannot hold is skipped."""
    shapes = warmup_plan(runner)
    start, ran = time.perf_counter(), 0
    for shape in tqdm(shapes, desc="Compiling kernels", disable=runner.tp_rank != 0):
        ran += run_warmup_forward(runner, shape)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    logger.info("kernel warm-up: %d forwards in %.1f s", ran, time.perf_counter() - start)
    return ran


def cpu_warmup_plan(context_len: int) -> List[WarmupShape]:
    """A CPU runner's start-up forwards. Nothing compiles on the CPU, but a
    quantized linear makes copies of its weight on first use: the dense copy
    prefills multiply by (a prefill of INT8_DEQUANTIZE_FROM_ROWS tokens or
    more) and the kernels' packed copies (a decode step of 8 rows or more: AMX,
    or without it AVX-512 BF16 and, for int8 weights, VNNI).
    Made inside the first requests, they cost the default model's first long
    prompt 0.42 s and its first batch of 8 decodes 0.22 s (2-core Xeon)."""
    from radixserve.layers.cpu_quantized_paths import AMX_INT4_DECODE_ROWS, AMX_INT8_DECODE_ROWS, INT8_DEQUANTIZE_FROM_ROWS

    decode_rows = max(AMX_INT4_DECODE_ROWS.start, AMX_INT8_DECODE_ROWS.start)
    return [WarmupShape(num_new=INT8_DEQUANTIZE_FROM_ROWS, max_request_len=context_len),
            WarmupShape(num_decode=decode_rows)]


def warm_up_cpu_weights(runner: "ModelRunner") -> int:
    """Run cpu_warmup_plan's forwards (the pools given back; an embedding
    runner only prefills). Returns how many ran."""
    shapes = cpu_warmup_plan(runner.context_len)
    if getattr(runner, "pooling", None) is not None:
        shapes = [s for s in shapes if s.mode == ForwardMode.EXTEND]
    start = time.perf_counter()
    ran = sum(run_warmup_forward(runner, shape) for shape in shapes)
    logger.info("weight copies made by %d warm-up forwards in %.1f s", ran, time.perf_counter() - start)
    return ran


@torch.inference_mode()
def run_warmup_forward(runner: "ModelRunner", shape: WarmupShape) -> bool:
    """One forward of `shape` over freshly taken rows and slots, given back
    afterwards. False (nothing run) when the pools cannot hold it."""
    pools = runner.pools
    taken: List[Tuple[int, torch.Tensor]] = []
    try:
        for cached, new in shape.requests():
            row = pools.req_to_token_pool.alloc()
            slots = pools.allocator.alloc_extend([0], [cached + new], [0]) if row is not None else None
            if slots is None:
                if row is not None:
                    pools.req_to_token_pool.free(row)
                return False
            taken.append((row, slots))
            pools.req_to_token_pool.req_to_token[row, :cached + new] = slots
        # Eager even where a CUDA graph would take the shape: a request the
        # graphs do not take (input logprobs, a batch) runs these kernels.
        runner.forward_eager(_forward_batch(runner, shape, taken))
        return True
    finally:
        for row, slots in taken:
            pools.allocator.free(slots)
            pools.req_to_token_pool.free(row)


def _forward_batch(runner: "ModelRunner", shape: WarmupShape, taken: List[Tuple[int, torch.Tensor]]) -> ForwardBatch:
    dev, pools = runner.device, runner.pools
    reqs = shape.requests()
    prefix_lens = [cached for cached, _ in reqs]
    new_lens = [new for _, new in reqs]
    seq_lens = [c + n for c, n in reqs]
    total_new = sum(new_lens)
    fb = ForwardBatch(
        forward_mode=shape.mode,
        batch_size=len(reqs),
        input_ids=torch.zeros(total_new, dtype=torch.int64, device=dev),
        positions=torch.cat([torch.arange(c, c + n, device=dev) for c, n in reqs]),
        req_pool_indices=torch.tensor([row for row, _ in taken], dtype=torch.int64, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=dev),
        out_cache_loc=torch.cat([slots[c:] for (_, slots), (c, _) in zip(taken, reqs)]),
        seq_lens_cpu=seq_lens,
        req_to_token_pool=pools.req_to_token_pool,
        kv_pool=pools.kv_pool,
        lora_ids=warmup_lora_ids(runner, len(reqs)),
    )
    if shape.mode.is_extend():
        ends = torch.cumsum(torch.tensor(new_lens, device=dev), 0)
        fb.logits_indices = ends - 1
        fb.last_logit_rows = torch.arange(len(reqs), device=dev)
        fb.num_decode_rows = shape.num_decode if shape.mode.is_mixed() else 0
        set_extend_lens(fb, prefix_lens, new_lens, dev)
    if shape.tree:
        from radixserve.speculative.tree import causal_row_masks

        fb.spec_tree_mask = torch.tensor([m for n in new_lens for m in causal_row_masks(n)], device=dev)
    return fb



def warmup_lora_ids(runner: "ModelRunner", batch_size: int) -> Optional[List[Optional[int]]]:
    """Every row on one start-up adapter (the LoRA kernels skip base-model rows,
    so those alone would compile nothing), or None without one."""
    manager = runner.lora_manager
    if manager is None or not manager.adapters:
        return None
    return [next(iter(manager.adapters))] * batch_size
