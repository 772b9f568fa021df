"""Times the Triton decode attention (the split kernel and the merge) on a GPU,
in the default mode and in deterministic mode (fixed splits), each call
replayed from a CUDA graph so launches do not count.

    python3 bench/decode_attention_bench.py --shape qwen0.6b --cases 256x640,64x1024,1x2048
    python3 bench/decode_attention_bench.py --tile 32,2 --split-tokens 512   # an experiment

--tile and --split-tokens change deterministic mode's key block (keys, warps)
and split length for this run only, --default-tiles the default mode's tiles
(a list to sweep): ways to try a choice before making it the kernel's.
--cache-dtype fp8_e4m3 times an FP8 cache; --contiguous gives each request one
run of slots (a fresh pool) instead of shuffled ones (a busy pool). One JSON
line per (case, mode, tiles) to stdout.

An MLA shape (deepseek-v2-lite, deepseek-v3) times the absorbed MLA decode
(its split kernel and the merge) instead, in the default mode only (MLA has no
deterministic mode); --mla-splits tries split counts other than the kernel's
own choice (mla_decode_num_splits):

    python3 bench/decode_attention_bench.py --shape deepseek-v2-lite --cases 1x256,1x2048,64x1024 --mla-splits 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import json

import torch

from radixserve.layers.attention import paged_attention as pa

# (query heads, KV heads, head dim, context length) of the real models. The
# context length sets deterministic mode's split length (fixed_decode_splits);
# bench/bench_shapes.py's configs use 8,192 (--context-len 8192 to match them).
SHAPES = {"qwen0.6b": (16, 8, 128, 40960), "llama8b": (32, 8, 128, 131072)}
# (query heads, latent dim, rope dim) of the MLA models: one latent KV head.
MLA_SHAPES = {"deepseek-v2-lite": (16, 512, 64), "deepseek-v3": (128, 512, 64)}
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}


def time_call(fn, calls_per_graph: int = 20, replays: int = 10) -> float:
    """Microseconds per fn() call, from CUDA-graph replays."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * calls_per_graph)


def bench_case(shape: str, batch: int, context: int, deterministic: bool, split_tokens: int | None,
               context_len: int | None = None, cache_dtype: str = "bf16", shuffled: bool = True) -> dict:
    heads, kv_heads, head_dim, det_context = SHAPES[shape]
    det_context = context_len or det_context
    dev = torch.device("cuda")
    slots = batch * context
    k = torch.randn(slots, kv_heads, head_dim, device=dev, dtype=torch.bfloat16).to(CACHE_DTYPES[cache_dtype])
    v = torch.randn(slots, kv_heads, head_dim, device=dev, dtype=torch.bfloat16).to(CACHE_DTYPES[cache_dtype])
    # Each request's positions in a shuffled set of slots, as a busy pool holds
    # them, or in one run of slots, as a fresh pool hands them out.
    order = torch.randperm(slots, device=dev) if shuffled else torch.arange(slots, device=dev)
    table = order.to(torch.int32).view(batch, context)
    rows = torch.arange(batch, device=dev)
    lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    q = torch.randn(batch, heads * head_dim, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    programs = pa.decode_num_splits(batch, kv_heads, num_sms)
    if deterministic:
        num_splits, tokens = pa.fixed_decode_splits(det_context)
        if split_tokens:
            tokens = split_tokens
            num_splits = 1 << (-(-det_context // tokens) - 1).bit_length()
        kwargs = dict(num_splits=num_splits, split_tokens=tokens, split_programs=programs)
    else:
        kwargs = dict(num_splits=programs)
    fn = lambda: pa.decode_attention(q, k, v, out, table, rows, lens, head_dim ** -0.5, **kwargs)  # noqa: E731
    us = time_call(fn)
    kv_bytes = 2 * batch * context * kv_heads * head_dim * k.element_size()
    return dict(shape=shape, batch=batch, context=context, deterministic=deterministic, cache=cache_dtype,
                slots="shuffled" if shuffled else "contiguous",
                split_tokens=kwargs.get("split_tokens"), programs_per_head=programs, us=round(us, 2),
                kv_tb_per_s=round(kv_bytes / us / 1e6, 3))


def bench_mla_case(shape: str, batch: int, context: int, num_splits: int | None, cache_dtype: str = "bf16",
                   shuffled: bool = True, device: str = "cuda", timer=time_call) -> dict:
    """One absorbed MLA decode call, timed: queries in the latent space [batch,
    heads, latent] | [batch, heads, rope] over cached [latent | rope] rows."""
    from radixserve.layers.attention.mla_triton import mla_decode_attention, mla_decode_num_splits

    heads, lora, rope = MLA_SHAPES[shape]
    dev = torch.device(device)
    slots = batch * context
    kv = torch.randn(slots, 1, lora + rope, device=dev, dtype=torch.bfloat16).to(CACHE_DTYPES[cache_dtype])
    order = torch.randperm(slots, device=dev) if shuffled else torch.arange(slots, device=dev)
    table = order.to(torch.int32).view(batch, context)
    rows = torch.arange(batch, device=dev)
    lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    q_latent = torch.randn(batch, heads, lora, device=dev, dtype=torch.bfloat16)
    q_pe = torch.randn(batch, heads, rope, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(q_latent)
    if num_splits is None:
        num_splits = mla_decode_num_splits(batch, heads, torch.cuda.get_device_properties(dev).multi_processor_count)
    fn = lambda: mla_decode_attention(q_latent, q_pe, kv, out, table, rows, lens,  # noqa: E731
                                      (192 ** -0.5), num_splits)
    us = timer(fn)
    kv_bytes = batch * context * (lora + rope) * kv.element_size()
    return dict(shape=shape, batch=batch, context=context, cache=cache_dtype,
                slots="shuffled" if shuffled else "contiguous", num_splits=num_splits, us=round(us, 2),
                kv_tb_per_s=round(kv_bytes / us / 1e6, 3) if us else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen0.6b", choices=sorted(SHAPES) + sorted(MLA_SHAPES))
    p.add_argument("--mla-splits", help="an MLA shape's split counts to try, e.g. 1,2,4,8,16 (default: its own)")
    p.add_argument("--cases", default="256x640,64x1024,1x2048,1x8192", help="BATCHxCONTEXT,...")
    p.add_argument("--tile", help="deterministic mode's key block: KEYS,WARPS")
    p.add_argument("--split-tokens", type=int, help="deterministic mode's split length")
    p.add_argument("--context-len", type=int, help="the model's context length (default: the real model's)")
    p.add_argument("--label", default="", help="copied into each JSON line")
    p.add_argument("--cache-dtype", default="bf16", choices=sorted(CACHE_DTYPES))
    p.add_argument("--contiguous", action="store_true", help="each request's slots in one run (default: shuffled)")
    p.add_argument("--default-tiles", help="the default mode's tiles to try, KEYS,WARPS,STAGES,FP16_DOTS;... "
                   "(FP16_DOTS 0 or 1: an FP8 cache widened to float16)")
    p.add_argument("--no-deterministic", action="store_true", help="the default mode only")
    args = p.parse_args()
    if args.shape in MLA_SHAPES:
        for case in args.cases.split(","):
            batch, context = (int(x) for x in case.split("x"))
            for splits in [int(x) for x in args.mla_splits.split(",")] if args.mla_splits else [None]:
                row = bench_mla_case(args.shape, batch, context, splits, args.cache_dtype, not args.contiguous)
                print(json.dumps(dict(row, label=args.label)), flush=True)
        return
    # Tiles forced for this run, per mode (None: the kernel's own choice).
    forced = {True: None, False: None}
    if args.tile:
        keys, warps = (int(x) for x in args.tile.split(","))
        forced[True] = pa.DecodeTiles(keys, warps, 2, False)
    kernel_tiles = pa.decode_tiles
    pa.decode_tiles = lambda cache, qd, bd, progs, fixed: (  # noqa: E731
        forced[fixed] or kernel_tiles(cache, qd, bd, progs, fixed))
    for default_tile in args.default_tiles.split(";") if args.default_tiles else [None]:
        if default_tile:
            keys, warps, stages, fp16 = (int(x) for x in default_tile.split(","))
            forced[False] = pa.DecodeTiles(keys, warps, stages, bool(fp16))
        for case in args.cases.split(","):
            batch, context = (int(x) for x in case.split("x"))
            for deterministic in (False,) if args.no_deterministic else (False, True):
                row = bench_case(args.shape, batch, context, deterministic, args.split_tokens, args.context_len,
                                 args.cache_dtype, not args.contiguous)
                row.update(label=args.label, tile=args.tile, default_tile=default_tile)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
