"""Element math the MoE kernels share (fused_moe_triton.py, few_token_experts.py):
the rounding to the activations' dtype and the gated activation."""

import triton
import triton.language as tl

from radixserve.layers.triton_utils import INTERPRETED

# Triton's interpreter casts float32 to bfloat16 by truncation, a GPU rounds
# to nearest: rounded in software there, the CPU tests see the GPU's rounding.
_SOFTWARE_BF16_ROUNDING = tl.constexpr(INTERPRETED)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding float32 to bfloat16 to nearest even everywhere."""
    if _SOFTWARE_BF16_ROUNDING and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out


@triton.jit
def activate(gate, up, alpha, limit, SWIGLU_OAI: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """apply_activation's math on float32 gate and up values."""
    if SWIGLU_OAI:
        if HAS_LIMIT:
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        out = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    else:
        out = gate * tl.sigmoid(gate) * up
    return out
