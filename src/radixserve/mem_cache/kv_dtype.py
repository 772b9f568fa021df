"""The dtype the KV cache stores (`--kv-cache-dtype`) and the cast into it.

An FP8 cache halves the bytes of a bfloat16 one: twice the tokens in the same
memory, and half the KV traffic of each decode step. Values are stored
unscaled (a scale of 1.0, as SGLang does for checkpoints that ship no KV
scales) and saturated at the format's largest finite value instead of
overflowing. Attention kernels read the stored values and widen them to the
query's dtype before any arithmetic.
"""

from __future__ import annotations

import torch

from radixserve.server_args import KV_CACHE_DTYPES

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of `--kv-cache-dtype name` for a model running in model_dtype."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {'|'.join(KV_CACHE_DTYPES)}, got {name!r}")
    torch_name = KV_CACHE_DTYPES[name]
    return getattr(torch, torch_name) if torch_name else model_dtype


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's dtype; FP8 saturates at its largest finite value
    (a plain cast turns what is out of range into NaN on some devices)."""
    if dtype in FP8_DTYPES:
        limit = torch.finfo(dtype).max
        return x.clamp(-limit, limit).to(dtype)
    return x.to(dtype)


def as_cached(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded as a cache of `dtype` would hold it, in x's own dtype: what
    attending over freshly computed keys must use to equal attending over the cache."""
    return x if x.dtype == dtype else to_cache_dtype(x, dtype).to(x.dtype)
