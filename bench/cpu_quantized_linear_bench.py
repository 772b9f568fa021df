"""The CPU's quantized linears at a few rows: our C++ kernels against torch's.

The default model's widest int4 linear (gate|up, 3,072 x 576, groups of 32)
and its int8 LM head (49,152 x 576) times 1-8 bfloat16 rows: the AVX-512 BF16
kernels (CPUs without AMX) or the AMX ones, against torch's int4 and int8
kernels, in microseconds (best of --repeats). The int4 weights are 48
different matrices called in turn, about 41 MB packed, so each call reads its
weight from memory as a decode step does; the LM head is read whole each call.

    PYTHONPATH=src python bench/cpu_quantized_linear_bench.py
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable, List

import torch

from radixserve.layers import cpu_kernels
from radixserve.layers.quantization import quantize_int4_groups, quantize_per_row, unpack_int4

INT4_WEIGHTS = 48


def best_us(call: Callable[[], None], repeats: int, calls: int = 1) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 5, 8])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if cpu_kernels.amx_available():
        ours, int4_ours, int8_ours = "amx", cpu_kernels.int4_linear_amx, cpu_kernels.int8_linear_amx
    elif cpu_kernels.avx512_bf16_available():
        ours, int4_ours, int8_ours = "avx512_bf16", cpu_kernels.int4_linear_avx512, cpu_kernels.int8_linear_avx512
    else:
        raise SystemExit("no AMX or AVX-512 BF16 kernels on this CPU")
    torch.manual_seed(0)
    int4: List = []
    for _ in range(INT4_WEIGHTS):
        packed, scales_and_zeros = quantize_int4_groups(torch.randn(3072, 576), 32)
        int4.append((packed, scales_and_zeros, cpu_kernels.pack_int4_for_amx(unpack_int4(packed))))
    q, scale = quantize_per_row(torch.randn(49152, 576), torch.int8)
    int8_packed = cpu_kernels.pack_int8_for_amx(q)
    scale_f32, scale_bf16 = scale.view(-1).float(), scale.view(-1).bfloat16()
    with torch.inference_mode():
        for rows in args.rows:
            x = torch.randn(rows, 576).to(torch.bfloat16)
            row = {"kernels": ours, "rows": rows,
                   "int4_ours_us": best_us(lambda: [int4_ours(x, c, s) for _, s, c in int4], args.repeats,
                                           INT4_WEIGHTS),
                   "int4_torch_us": best_us(lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, 32, s)
                                                     for w, s, _ in int4], args.repeats, INT4_WEIGHTS),
                   "int8_lm_head_ours_us": best_us(lambda: int8_ours(x, int8_packed, scale_f32), args.repeats * 4),
                   "int8_lm_head_torch_us": best_us(lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale_bf16),
                                                    args.repeats * 4)}
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
