"""The CPU decode step's fused kernels (cpu_kernels.cpp), built on first use.

Four kernels, each replacing several small torch calls (a CPU decode step of
a small model is made of them, each costing more to launch than to run):
paged decode attention that reads the keys where they lie in the pool (the
torch path gathers them first), RMSNorm with its residual add, SiLU-and-mul,
and rotary embedding. float32 sums, results rounded as torch rounds them.
cpu_kernels_amx.cpp holds the quantized linears on AMX, cpu_decode_layers.cpp
a decode step's decoder layers made of these kernels in one call, and
cpu_kernels_common.h what the sources share.

The source is compiled with this machine's C++ compiler (`$CXX`, else g++;
-O3 -march=native -fopenmp, about a second) into a cache directory
(`$RADIXSERVE_CACHE_DIR`, else ~/.cache/radixserve) under a name made of the
source, the flags and the CPU's feature flags, so later processes only load
it. No compiler, or RADIXSERVE_CPU_KERNELS=0, and every caller keeps its torch
path: `available()` says which one runs.

Callers test `takes_*` (dtypes, strides, no autograd) and fall back otherwise.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch

logger = logging.getLogger(__name__)

# the kernels of the decode step, and the quantized linears on AMX: one library
SOURCES = [Path(__file__).with_suffix(".cpp"), Path(__file__).with_name("cpu_kernels_amx.cpp"),
           Path(__file__).with_name("cpu_kernels_avx512.cpp"), Path(__file__).with_name("cpu_decode_layers.cpp")]
HEADERS = [Path(__file__).with_name("cpu_kernels_common.h")]
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
# The instruction set the kernels are built for: the machine's own by default.
# The source has AVX-512 BF16 paths with plain-C++ fallbacks; a narrower target
# (RADIXSERVE_CPU_KERNELS_MARCH=x86-64-v2) builds the fallbacks, as the tests do.
MARCH_ENV = "RADIXSERVE_CPU_KERNELS_MARCH"
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native builds for them), '' where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(compiler: str) -> Path:
    """The compiled library's path, compiling it unless a process already did."""
    source = b"\0".join(path.read_bytes() for path in SOURCES + HEADERS)
    flags = [*FLAGS, f"-march={os.environ.get(MARCH_ENV, 'native')}"]
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler.encode(), _cpu_flags().encode()]))
    cache = Path(os.environ.get("RADIXSERVE_CACHE_DIR", Path.home() / ".cache" / "radixserve")) / "cpu_kernels"
    target = cache / f"cpu_kernels_{key.hexdigest()[:20]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Compiled under a temporary name and renamed: processes starting together
    # never load a half-written file.
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(built)], check=True, capture_output=True, text=True)
        os.replace(built, target)
    return target


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    if os.environ.get("RADIXSERVE_CPU_KERNELS", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        logger.warning("no C++ compiler (g++ or $CXX): the CPU path runs without its fused kernels")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        logger.warning("the CPU kernels did not build or load (%s): the CPU path runs without them",
                       getattr(e, "stderr", None) or e)
        return None
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.radixserve_openmp_threads.restype = ctypes.c_int
    lib.radixserve_avx512_bf16_available.restype = ctypes.c_int
    lib.radixserve_decode_attention.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr,
                                                *[i64] * 10, f32, ptr, i64, ptr, i64, ptr]
    lib.radixserve_rms_norm_bf16.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, f32]
    lib.radixserve_silu_and_mul_bf16.argtypes = [ptr, i64, ptr, i64, i64]
    lib.radixserve_rotary.argtypes = [ctypes.c_int, ptr, i64, ptr, ptr, ptr, i64, i64, i64]
    lib.radixserve_gumbel_argmax.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, i64]
    lib.radixserve_row_argmax.argtypes = [ptr, i64, i64, i64, ptr]
    lib.radixserve_int4_linear_amx.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64]
    lib.radixserve_int8_linear_amx.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64]
    lib.radixserve_int4_linear_avx512.argtypes = lib.radixserve_int4_linear_amx.argtypes
    lib.radixserve_int8_linear_avx512.argtypes = lib.radixserve_int8_linear_amx.argtypes
    lib.radixserve_avx512_vnni_available.restype = ctypes.c_int
    lib.radixserve_int8_linear_vnni.argtypes = lib.radixserve_int8_linear_amx.argtypes
    lib.radixserve_decode_layers.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, ptr]
    lib.radixserve_eagle3_layer.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr]
    return lib


def available() -> bool:
    """Whether the kernels are built and loaded (building them if need be)."""
    return _library() is not None


def takes_rows(x: torch.Tensor) -> bool:
    """Whether the kernels run on x: 2-D float32 or bfloat16 CPU rows with a
    contiguous last axis, outside autograd (the kernels have no backward)."""
    return (x.device.type == "cpu" and x.dtype in _DTYPE_CODES and x.dim() == 2 and x.stride(-1) == 1
            and not torch.is_grad_enabled() and available())


def takes_decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                           k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether decode_attention runs these: q's rows (takes_rows), a pool of
    q's dtype with each head's values contiguous, and the step's new k and v
    rows ([bs, kv_heads * d]) in that dtype with a unit inner stride."""
    return (k_buf.dtype == q.dtype and v_buf.dtype == q.dtype and k_buf.stride(-1) == 1 and v_buf.stride(-1) == 1
            and k.dtype == q.dtype and v.dtype == q.dtype and k.dim() == 2 and v.dim() == 2
            and k.stride(-1) == 1 and v.stride(-1) == 1 and takes_rows(q))


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor,
                     seq_lens: torch.Tensor, num_kv_heads: int, scale: float, window: Optional[int],
                     new_kv: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """One decode query per request over its keys in the paged pool, read in place.

    q [bs, heads * dk]; k_buf [pool slots, kv_heads, dk], v_buf [.., kv_heads, dv];
    slots [bs, >= longest] int64, request i's positions' slots in order;
    seq_lens [bs] int64; window: the query sees only its last `window` positions.
    new_kv: (slots [bs] int64, k [bs, kv_heads * dk], v [bs, kv_heads * dv]) in the
    pool's dtype with unit inner strides, stored into the pool first (the step's
    own tokens). Returns [bs, heads * dv] in q's dtype.
    """
    bs = q.shape[0]
    dk, dv = k_buf.shape[-1], v_buf.shape[-1]
    heads = q.shape[1] // dk
    if slots.dtype != torch.int64 or slots.stride(-1) != 1 or seq_lens.dtype != torch.int64 \
            or not seq_lens.is_contiguous():
        raise ValueError("decode_attention takes int64 slots with a contiguous last axis and contiguous seq_lens")
    new = (None, 0, None, 0, None)
    if new_kv is not None:
        new_slots, k, v = new_kv
        if not (new_slots.dtype == torch.int64 and new_slots.is_contiguous() and len(new_slots) == bs):
            raise ValueError("decode_attention's new_kv: contiguous int64 slots, one a request")
        new = (k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), new_slots.data_ptr())
    out = torch.empty(bs, heads * dv, dtype=q.dtype)
    _library().radixserve_decode_attention(
        _DTYPE_CODES[q.dtype], q.data_ptr(), q.stride(0), k_buf.data_ptr(), v_buf.data_ptr(), out.data_ptr(),
        slots.data_ptr(), slots.stride(0), seq_lens.data_ptr(), bs, heads, num_kv_heads, dk, dv,
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1), window or 0, scale, *new)
    return out


def takes_bf16_rows(x: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Whether the bfloat16 row kernels (rms_norm, silu_and_mul) run x and the
    other tensors given: bfloat16 rows (takes_rows), the others bfloat16 with a
    contiguous last axis too."""
    return (x.dtype == torch.bfloat16 and takes_rows(x)
            and all(t is None or (t.dtype == torch.bfloat16 and t.stride(-1) == 1) for t in others))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None):
    """norm(x) * weight, or with residual (norm(x + residual) * weight, x + residual),
    rounded as transformers' bfloat16 RMSNorm rounds. x, residual [rows, cols],
    weight [cols], all bfloat16 (takes_bf16_rows)."""
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=x.dtype)
    summed = None if residual is None else torch.empty(rows, cols, dtype=x.dtype)
    _library().radixserve_rms_norm_bf16(
        x.data_ptr(), x.stride(0), None if residual is None else residual.data_ptr(),
        0 if residual is None else residual.stride(0), weight.data_ptr(), out.data_ptr(),
        None if summed is None else summed.data_ptr(), rows, cols, eps)
    return out if residual is None else (out, summed)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] [rows, 2 * cols] bfloat16 -> silu(gate) * up [rows, cols]."""
    rows, cols = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, cols, dtype=x.dtype)
    _library().radixserve_silu_and_mul_bf16(x.data_ptr(), x.stride(0), out.data_ptr(), rows, cols)
    return out



def rotary(x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Each head of x [rows, heads * head_dim] (takes_rows) turned by its row's
    position: table [positions, head_dim] float32 (cos | sin of the half head's
    frequencies), positions [rows] int64 -> [rows, heads * head_dim] in x's dtype."""
    rows, width = x.shape
    if positions.dtype != torch.int64 or positions.shape != (rows,) or not positions.is_contiguous() \
            or table.dtype != torch.float32 or not table.is_contiguous():
        raise ValueError("rotary takes one contiguous int64 position a row and a contiguous float32 table")
    out = torch.empty(rows, width, dtype=x.dtype)
    _library().radixserve_rotary(_DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0), positions.data_ptr(),
                                 table.data_ptr(), out.data_ptr(), rows, width // head_dim, head_dim)
    return out


def row_argmax(x: torch.Tensor) -> Optional[torch.Tensor]:
    """Each row's index of its largest value, the first on a tie (a NaN
    row: its first NaN), int64 [rows]; None where the kernel does not run
    (float32 CPU rows outside autograd)."""
    if not (x.dtype == torch.float32 and takes_rows(x)):
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _library().radixserve_row_argmax(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr())
    return out


def gumbel_argmax(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                  steps: torch.Tensor) -> Optional[torch.Tensor]:
    """Each row's argmax of logits / temperature + the sampler's seeded Gumbel
    noise (sampler.seeded_gumbel: the same uniform bits; the logarithms to
    about 2 ulp) in one pass, int64 [rows]; None where the kernel does not run
    (float32 CPU rows outside autograd). The noise is never stored: in torch
    it took 15 elementwise passes over [rows, vocab] (17.2 ms for the default
    model's 32 x 49,152, against 2.3 here, 2-core AMX Xeon)."""
    if not (logits.dtype == torch.float32 and takes_rows(logits)):
        return None
    temperatures, seeds, steps = (t.contiguous() for t in (temperatures.float(), seeds, steps))
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64)
    _library().radixserve_gumbel_argmax(logits.data_ptr(), logits.stride(0), temperatures.data_ptr(),
                                        seeds.data_ptr(), steps.data_ptr(), out.data_ptr(), rows, vocab)
    return out


# ---- quantized linear layers on AMX (cpu_kernels_amx.cpp) ----

AMX_BLOCK = 32  # the kernels' blocks of output columns and of input values


@functools.lru_cache(maxsize=None)
def amx_available() -> bool:
    """Whether the AMX kernels run here: built with AMX (a CPU that has it)
    and Linux granting the process its tile state."""
    lib = _library()
    return lib is not None and lib.radixserve_amx_available() == 1


def _fits_blocks(rows: torch.Tensor, out_features: int, group: int) -> bool:
    """bfloat16 rows the kernels take, times an [out_features, in] weight (int4
    in groups of `group` input values, or int8 per row) their 32 x 32 blocks tile."""
    return (rows.dtype == torch.bfloat16 and takes_rows(rows) and out_features % AMX_BLOCK == 0
            and rows.shape[1] % AMX_BLOCK == 0 and group % AMX_BLOCK == 0)


def amx_takes(rows: torch.Tensor, out_features: int, group: int = AMX_BLOCK) -> bool:
    """Whether an AMX kernel multiplies these rows by an [out_features, in] weight."""
    return _fits_blocks(rows, out_features, group) and amx_available()


def _tile_order(q: torch.Tensor) -> torch.Tensor:
    """q [out, in] -> [out / 32, in / 32, 2 tiles, 16 tile rows, 32]: per 32 x 32
    block, the B tiles of its columns 0..15 and 16..31, row r = the pairs
    (k = 2r, 2r + 1) of the tile's 16 columns."""
    n, k = q.shape
    return q.view(n // 32, 2, 16, k // 32, 16, 2).permute(0, 3, 1, 4, 2, 5).reshape(n // 32, k // 32, 2, 16, 32)


def pack_int4_for_amx(q: torch.Tensor) -> torch.Tensor:
    """q values [out, in] (uint8, 0..15) -> the int4 kernel's layout: two tile
    rows to each nibble half of a 64-byte chunk. Half a byte a weight."""
    n, k = q.shape
    halves = _tile_order(q).view(n // 32, k // 32, 2, 4, 2, 2, 32)  # tile row = 4 chunk + 2 high + row
    packed = halves[:, :, :, :, 0] | (halves[:, :, :, :, 1] << 4)
    return packed.contiguous().view(n // 32, k // 32 * 512)


def pack_int8_for_amx(q: torch.Tensor) -> torch.Tensor:
    """An int8 weight [out, in] -> the int8 kernel's layout (tile order)."""
    n, k = q.shape
    return _tile_order(q).contiguous().view(n // 32, k // 32 * 1024)


def _amx_ran(status: int) -> None:
    if status != 0:
        raise RuntimeError("the AMX kernels: this CPU or process has no AMX")


def _int4_linear(kernel: str, rows: torch.Tensor, packed: torch.Tensor,
                 scales_and_zeros: torch.Tensor) -> Tuple[int, torch.Tensor]:
    """Runs the library's int4 kernel `kernel` into a new [m, out] bfloat16
    tensor: (its status, the tensor)."""
    out_features, k = packed.shape[0] * AMX_BLOCK, rows.shape[1]
    if scales_and_zeros.dtype != torch.bfloat16 or not scales_and_zeros.is_contiguous():
        raise ValueError(f"{kernel} takes contiguous bfloat16 scales_and_zeros")
    out = torch.empty(rows.shape[0], out_features, dtype=torch.bfloat16)
    status = getattr(_library(), kernel)(
        rows.data_ptr(), rows.stride(0), packed.data_ptr(), scales_and_zeros.data_ptr(), out.data_ptr(),
        rows.shape[0], out_features, k, k // scales_and_zeros.shape[0])
    return status, out


def _int8_linear(kernel: str, rows: torch.Tensor, packed: torch.Tensor,
                 scales: torch.Tensor) -> Tuple[int, torch.Tensor]:
    """The same for an int8 kernel with float32 scales [out]."""
    out_features = packed.shape[0] * AMX_BLOCK
    if scales.dtype != torch.float32 or not scales.is_contiguous():
        raise ValueError(f"{kernel} takes contiguous float32 scales")
    out = torch.empty(rows.shape[0], out_features, dtype=torch.bfloat16)
    status = getattr(_library(), kernel)(rows.data_ptr(), rows.stride(0), packed.data_ptr(), scales.data_ptr(),
                                         out.data_ptr(), rows.shape[0], out_features, rows.shape[1])
    return status, out


def int4_linear_amx(rows: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """rows [m, in] bfloat16 times the int4 weight packed by pack_int4_for_amx,
    with torch's bfloat16 scales_and_zeros [in / group, out, 2] -> [m, out]
    bfloat16; the weight's values are (q - 8) * scale + zero, rounded to
    bfloat16 as the dense copy holds them from 9 rows, unrounded up to 8 (where
    in / group <= 256; amx_takes says where it runs)."""
    status, out = _int4_linear("radixserve_int4_linear_amx", rows, packed, scales_and_zeros)
    _amx_ran(status)
    return out


def int8_linear_amx(rows: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """rows [m, in] bfloat16 times the int8 weight packed by pack_int8_for_amx,
    with float32 scales [out] -> [m, out] bfloat16; the weight's values are
    q * scale rounded to bfloat16, as the dense copy holds them."""
    status, out = _int8_linear("radixserve_int8_linear_amx", rows, packed, scales)
    _amx_ran(status)
    return out


# ---- the same layouts on AVX-512 BF16, for CPUs without AMX (cpu_kernels_avx512.cpp) ----


@functools.lru_cache(maxsize=None)
def avx512_bf16_available() -> bool:
    """Whether the AVX-512 BF16 kernels run here (built for a CPU that has it)."""
    lib = _library()
    return lib is not None and lib.radixserve_avx512_bf16_available() == 1


def quantized_kernels_available() -> bool:
    """Whether quantized weights multiply on one of these kernels here (AMX or AVX-512 BF16)."""
    return amx_available() or avx512_bf16_available()


def avx512_takes(rows: torch.Tensor, out_features: int, group: int = AMX_BLOCK) -> bool:
    """Whether an AVX-512 BF16 kernel multiplies these rows by an [out_features, in] weight."""
    return _fits_blocks(rows, out_features, group) and avx512_bf16_available()


def _avx512_ran(status: int) -> None:
    if status != 0:
        raise RuntimeError("the AVX-512 BF16 kernels: this library was built without them")


def int4_linear_avx512(rows: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """rows [m, in] bfloat16 times the int4 weight packed by pack_int4_for_amx,
    with torch's bfloat16 scales_and_zeros [in / group, out, 2] -> [m, out]
    bfloat16; the weight's values (q - 8) * scale + zero unrounded, each
    row's product the same bits whatever rows are beside it."""
    status, out = _int4_linear("radixserve_int4_linear_avx512", rows, packed, scales_and_zeros)
    _avx512_ran(status)
    return out


def int8_linear_avx512(rows: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """rows [m, in] bfloat16 times the int8 weight packed by pack_int8_for_amx,
    with float32 scales [out] -> [m, out] bfloat16: each column's sum of
    rows x q in float32, times its scale (the weight's values unrounded)."""
    status, out = _int8_linear("radixserve_int8_linear_avx512", rows, packed, scales)
    _avx512_ran(status)
    return out


@functools.lru_cache(maxsize=None)
def avx512_vnni_available() -> bool:
    """Whether the int8 x int8 kernel (AVX-512 VNNI, beside BF16) runs here."""
    lib = _library()
    return lib is not None and lib.radixserve_avx512_vnni_available() == 1


def pack_int8_for_vnni(q: torch.Tensor) -> torch.Tensor:
    """An int8 weight [out, in] -> the VNNI kernel's layout: per 16 output
    columns, in / 4 lines of 16 columns x 4 consecutive input values, stored
    as q + 128 (uint8)."""
    n, k = q.shape
    lines = q.view(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3)
    return (lines.to(torch.int16) + 128).to(torch.uint8).contiguous().view(n // AMX_BLOCK, k * AMX_BLOCK)


def int8_linear_vnni(rows: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """rows [m, in] bfloat16 times the int8 weight packed by pack_int8_for_vnni,
    with float32 scales [out] -> [m, out] bfloat16, in int8 products (vpdpbusd)
    with int32 sums: the rows in 16-bit fixed point by blocks of 32 values,
    a power-of-two step per block (cpu_kernels_avx512.cpp), exact for values
    within 2^7 of their block's largest, so the sums are the bfloat16 kernel's
    to float32 rounding. About 2.5x faster than int8_linear_avx512 at 4 rows
    on Zen 4; each row's result the same bits whatever rows are beside it."""
    status, out = _int8_linear("radixserve_int8_linear_vnni", rows, packed, scales)
    if status != 0:
        raise RuntimeError("the AVX-512 VNNI kernel: this library was built without it")
    return out


def decode_layers(shape: ctypes.c_void_p, layers: ctypes.Array, num_layers: int, batch: ctypes.c_void_p,
                  hidden: torch.Tensor, residual: torch.Tensor, scratch: torch.Tensor) -> int:
    """Every decoder layer of a decode step (cpu_decode_layers.cpp; the structs
    are model_executor/cpu_decode_layers.py's). hidden: the embeddings in, the
    last layer's output out; residual: the stream before it. 0 when done."""
    return _library().radixserve_decode_layers(shape, layers, num_layers, batch, hidden.data_ptr(),
                                               residual.data_ptr(), scratch.data_ptr())


def eagle3_layer(shape: ctypes.c_void_p, layer: ctypes.c_void_p, batch: ctypes.c_void_p, embeds: torch.Tensor,
                 features: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> int:
    """An EAGLE-3 head's layer for a batch of decode queries (cpu_decode_layers.cpp;
    the structs are model_executor/cpu_eagle3_layer.py's). features: the target's
    fused features or the previous step's output (rows with a contiguous last
    axis); out: the layer's output. 0 when done."""
    return _library().radixserve_eagle3_layer(shape, layer, batch, embeds.data_ptr(), features.data_ptr(),
                                              features.stride(0), features.shape[1], out.data_ptr(),
                                              scratch.data_ptr())
