"""bench/fp8_layer_sensitivity.py's groups of linears and its FP8 rounding."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from fp8_layer_sensitivity import fp8_rounded, groups  # noqa: E402

NAMES = [f"model.layers.{i}.{part}" for i in range(3)
         for part in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]


def test_groups_split_the_linears_by_kind_and_by_layer():
    g = groups(NAMES)
    assert g["all"] == NAMES
    for key in ("qkv", "o_proj", "gate_up", "down"):  # each kind once per layer, kinds disjoint
        assert len(g[key]) == 3
    assert sorted(sum((g[k] for k in ("qkv", "o_proj", "gate_up", "down")), [])) == sorted(NAMES)
    assert [k for k in g if k.startswith("layer")] == ["layer 0", "layer 1", "layer 2"]
    assert g["layer 1"] == NAMES[4:8]


def test_fp8_rounding_lands_on_e4m3_values_within_half_a_step():
    """Each row over its scale (its largest magnitude / 448) is an E4M3 value,
    the nearest one: within 2^-4 of the original, relative (3 mantissa bits)."""
    torch.manual_seed(0)
    w = torch.randn(16, 64, dtype=torch.bfloat16) * torch.logspace(-3, 2, 16).view(-1, 1).bfloat16()
    r = fp8_rounded(w)
    assert r.dtype == w.dtype and not torch.equal(r, w)
    scale = w.float().abs().amax(1, keepdim=True) / 448
    on_grid = r.float() / scale
    torch.testing.assert_close(on_grid.to(torch.float8_e4m3fn).float(), on_grid, rtol=1e-2, atol=0)
    big = w.float().abs() > scale * 2 ** -6 * 8  # away from the subnormals
    assert ((r.float() - w.float()).abs()[big] <= 2 ** -4 * w.float().abs()[big] + 1e-6).all()
