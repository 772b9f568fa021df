"""What every Triton kernel module here shares: the interpreter switch, the
float32-accumulating dot, the smallest tile tl.dot accepts, and the rule that
picks how many splits a decode kernel spreads over.

Importing this module also installs the interpreter shim below, so any kernel
module that imports it runs under TRITON_INTERPRET=1 (the CPU tests).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter (the tests' TRITON_INTERPRET=1) computes tl.dot of
# bfloat16 inputs wrongly, and casts float32 to bfloat16 by truncation; the
# kernels widen or round in software there.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

MIN_DOT = 16  # tl.dot needs at least 16 along every axis of a tile


def _allow_scalar_loop_bounds_when_interpreted() -> None:
    """Triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a
    Python int with int(array), which numpy >= 2.4 refuses, so loops whose
    bounds are read from memory fail under TRITON_INTERPRET=1 only. Convert
    with the array's single element instead."""
    import triton.runtime.interpreter as interp

    patch_tensor = interp._patch_lang_tensor

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


if INTERPRETED:
    _allow_scalar_loop_bounds_when_interpreted()


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32; IEEE: exact float32 products (no TF32)."""
    if IEEE:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


def exact_dot(dtype: torch.dtype) -> bool:
    """The IEEE flag of `dot` for inputs of `dtype`: float32 inputs keep float32
    products, and the interpreter always widens (its bf16 dot is wrong)."""
    return dtype == torch.float32 or INTERPRETED


def dot_block(dim: int) -> int:
    """The tile covering `dim`: a power of two, at least what tl.dot accepts."""
    return max(MIN_DOT, triton.next_power_of_2(dim))


def decode_split_count(programs: int, num_sms: int, max_splits: int = 16) -> int:
    """How many splits of its positions each decode request spreads over: enough
    that `programs` (the grid before splitting) times the splits fills the GPU
    about twice over; a power of two (the merge kernel's arange needs one).
    It depends on the batch size only, so each CUDA graph has a fixed value."""
    want = max(1, (2 * num_sms) // max(programs, 1))
    return min(max_splits, triton.next_power_of_2(want))


def extend_tile(dtype: torch.dtype, widest_block: int) -> int:
    """BLOCK_M = BLOCK_N of an extend-attention kernel whose widest head tile is
    `widest_block`: smaller tiles for float32 and wide heads keep them within
    shared memory."""
    if widest_block >= 512:
        return 16
    return 32 if dtype == torch.float32 or widest_block > 128 else 64


# Programmatic dependent launch (Hopper and later): a kernel launched with it
# may start while the kernel before it finishes; it waits (gdc_wait) before it
# reads what that kernel wrote or writes anything, and lets the next one start
# (gdc_launch_dependents) once its own programs run. The batch-1 decode chain
# of small kernels overlaps each start with the previous tail, and the GEMV
# reads its first weight tile before waiting. RADIXSERVE_DISABLE_PDL=1 turns it
# off (to compare); it is read once, and use_pdl's answer cached per device,
# since every launch of those kernels asks.
_PDL_OFF = INTERPRETED or os.environ.get("RADIXSERVE_DISABLE_PDL") == "1"
# The interpreter has no grid-dependency instructions; its tests still run the
# kernels' PDL code paths (the GEMV's first tile read early), without the waits.
_GDC = tl.constexpr(not INTERPRETED)


@functools.lru_cache(maxsize=None)
def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch."""
    if _PDL_OFF or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Before the first read of another kernel's output and the first write."""
    if USE_PDL:
        if _GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
