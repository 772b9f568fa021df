"""What the CPU computes in hardware, for the choices the CPU path makes by it."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX).
    Without it torch converts bfloat16 element by element, and a bfloat16
    matmul runs several times slower than float32. (torch.cpu's private
    probes; a torch without them is assumed to have it.)"""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None) or all(probe is None for probe in probes)


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (bfloat16 matrix units): there a dense
    bfloat16 GEMM of a few rows already beats the int4 and int8 kernels."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())
