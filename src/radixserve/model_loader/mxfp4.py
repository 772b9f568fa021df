"""MXFP4 checkpoints (GPT-OSS): expert weights dequantized while they stream in.

A quantized tensor X is stored as two: `X_blocks`, uint8 [*lead, rows, G, 16],
two FP4 (E2M1) values per byte, the low nibble first; and `X_scales`, uint8
[*lead, rows, G], one E8M0 exponent (bias 127) per group of 32 values along
the last (input) axis. Each value is fp4 * 2**(scale - 127). The rows are the
output features, so the dequantized [*lead, rows, G*32] is transposed to
[*lead, G*32, rows]: the layout of the unquantized checkpoint's tensor X (for
GPT-OSS `experts.gate_up_proj` [E, hidden, 2I], `experts.down_proj` [E, I, hidden]),
which the model then loads as usual. This is the layout transformers'
dequantization (integrations/mxfp4.py) produces.

Every value is exact in bfloat16 (two significant bits, an exponent inside
bfloat16's range), so dequantizing to bfloat16 loses nothing.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import torch

# E2M1 by its 4-bit code: sign bit, 2 exponent bits, 1 mantissa bit.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127
GROUP_SIZE = 32
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"


def is_mxfp4(quantization_config: Any) -> bool:
    """Whether a checkpoint's quantization_config (a dict in config.json; some
    transformers versions turn it into an object) names MXFP4."""
    qc = quantization_config
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(method).lower() == "mxfp4"


def _byte_table(device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the two values of every byte, low nibble first."""
    fp4 = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=device)
    codes = torch.arange(256, device=device)
    return torch.stack([fp4[codes & 0x0F], fp4[codes >> 4]], dim=-1)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks uint8 [*lead, rows, G, 16] and scales uint8 [*lead, rows, G] ->
    [*lead, G*32, rows] in `dtype`. One leading slice at a time, to bound the
    temporaries of a large expert stack."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 3 or blocks.shape[-1] * 2 != GROUP_SIZE or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair: "
            f"expected [..., rows, G, {GROUP_SIZE // 2}] and [..., rows, G]"
        )
    table = _byte_table(blocks.device)
    *lead, rows, groups, _ = blocks.shape
    out = torch.empty(*lead, groups * GROUP_SIZE, rows, dtype=dtype, device=blocks.device)
    flat_blocks = blocks.reshape(-1, rows, groups, GROUP_SIZE // 2)
    flat_scales = scales.reshape(-1, rows, groups)
    flat_out = out.view(-1, groups * GROUP_SIZE, rows)
    for i in range(flat_blocks.shape[0]):
        values = table[flat_blocks[i].long()].reshape(rows, groups, GROUP_SIZE)
        powers = torch.exp2(flat_scales[i].float() - E8M0_BIAS)
        flat_out[i] = (values * powers[..., None]).reshape(rows, groups * GROUP_SIZE).t().to(dtype)
    return out


class Mxfp4Weights:
    """(name, tensor) pairs of a checkpoint with every `X_blocks` / `X_scales`
    pair replaced by one dequantized `X`; other tensors pass through. The two
    halves of a pair may come in either order, from different files."""

    def __init__(self, weights: Iterable[Tuple[str, torch.Tensor]], dtype: torch.dtype = torch.bfloat16) -> None:
        self.weights = weights
        self.dtype = dtype

    def __len__(self) -> int:
        # The source's count (a progress bar's total): each pair counts twice there.
        return len(self.weights)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        waiting: Dict[Tuple[str, str], torch.Tensor] = {}
        for name, tensor in self.weights:
            base, part = _split_quantized_name(name)
            if part is None:
                yield name, tensor
                continue
            other = BLOCKS_SUFFIX if part == SCALES_SUFFIX else SCALES_SUFFIX
            partner = waiting.pop((base, other), None)
            if partner is None:
                waiting[(base, part)] = tensor
                continue
            blocks, scales = (tensor, partner) if part == BLOCKS_SUFFIX else (partner, tensor)
            yield base, dequantize_mxfp4(blocks, scales, self.dtype)
        if waiting:
            unpaired = sorted(base + part for base, part in waiting)
            raise ValueError(f"MXFP4 tensors without their blocks/scales partner: {', '.join(unpaired[:8])}")


def _split_quantized_name(name: str) -> Tuple[str, Optional[str]]:
    for suffix in (BLOCKS_SUFFIX, SCALES_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, None
