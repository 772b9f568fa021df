"""Host <-> device copy bandwidth of the HiCache host pool, for the roofline.

Builds a device KV pool of a model's shape (default: Llama-3-8B, 32 layers x 8
KV heads x 128, bfloat16) and a host pool behind it, then times backups
(device -> host) and loads (host -> device) of `--tokens` tokens in scattered
pages, per layout and io backend. GB/s counts KV bytes moved; compare with the
link's copy rate (e.g. a plain pinned `tensor.to(device)` of the same bytes, also
printed).

    python bench/hicache_copy_bench.py                      # CUDA if present, else a small CPU run
    python bench/hicache_copy_bench.py --tokens 65536 --page-size 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from radixserve.mem_cache.allocator import KVPool
from radixserve.mem_cache.hicache.host_pool import HostKVPool


def timed(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=None, help="tokens per transfer (default 65536 CUDA, 2048 CPU)")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = args.tokens or (65536 if device.type == "cuda" else 2048)
    tokens = tokens // args.page_size * args.page_size
    pool = KVPool(2 * tokens + args.page_size, args.layers, args.kv_heads, args.head_dim, dtype, device)
    pages = torch.randperm(2 * tokens // args.page_size)[: tokens // args.page_size] + 1  # scattered pages
    device_slots = (pages[:, None] * args.page_size + torch.arange(args.page_size)).flatten().to(device)
    nbytes = tokens * KVPool.bytes_per_token(args.layers, args.kv_heads, args.head_dim, dtype)
    results = {"device": str(device), "tokens": tokens, "page_size": args.page_size, "kv_bytes": nbytes}
    for layout in ("page_first", "layer_first"):
        for io_backend in ("kernel", "direct"):
            host = HostKVPool(pool, tokens, args.page_size, layout, io_backend)
            host_slots = host.alloc(tokens)
            d2h = timed(lambda: host.backup(device_slots, host_slots), device, args.repeat)
            h2d = timed(lambda: host.load(host_slots, device_slots), device, args.repeat)
            results[f"{layout}/{io_backend}"] = {"device_to_host_GBps": nbytes / d2h / 1e9,
                                                  "host_to_device_GBps": nbytes / h2d / 1e9}
            del host
    if device.type == "cuda":  # the link's plain copy rate for the same bytes
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        results["pinned_to_device_copy_GBps"] = nbytes / timed(lambda: src.to(device, non_blocking=True),
                                                                device, args.repeat) / 1e9
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
