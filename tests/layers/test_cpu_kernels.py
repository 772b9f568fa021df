"""The CPU's fused kernels (layers/cpu_kernels.cpp) against independent
references: decode attention against attention written from the definition in
float64 over the same paged pool, RMSNorm and SiLU-and-mul against torch's own
bfloat16 computation, and the torch-native backend's decode through the
kernel against the definition (windows included; poisoned keys outside a
window are never read)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from radixserve.layers import cpu_kernels, cpu_quantized_paths
from radixserve.layers.activation import SiluAndMul
from radixserve.layers.attention.torch_native import TorchNativeAttnBackend
from radixserve.layers.layernorm import RMSNorm
from tests.layers.test_paged_attention import (
    DEVICE, HEAD_DIM, KV_HEADS, Pools, decode_batch, poison_outside_windows, reference_attention, rel, windowed_layer,
)

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU kernels")


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    # make setup installs a compiler; without one every caller keeps its torch path
    assert cpu_kernels.available(), "the CPU kernels did not build (is g++ installed?)"


# The kernels built for this CPU (its AVX-512 BF16 code where it has them)
# and, on x86-64, for any x86-64 CPU of the last 15 years (SSE4.2: the plain
# C++ code every CPU runs).
KERNEL_BUILDS = ["native"] + (["x86-64-v2"] if platform.machine() == "x86_64" else [])


@pytest.fixture(params=KERNEL_BUILDS)
def kernel_build(request, monkeypatch):
    monkeypatch.setenv(cpu_kernels.MARCH_ENV, request.param)
    cpu_kernels._library.cache_clear()
    assert cpu_kernels.available()
    yield request.param
    monkeypatch.undo()
    cpu_kernels._library.cache_clear()


def paged_pool(lengths, kv_heads, dk, dv, dtype, seed, in_order=False):
    """A pool whose slots are a shuffled range (so no request's keys are in
    order; in_order: each request's keys in a run of slots, as a prompt's
    are) and each request's slot table, padded with slot 0 past its length."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths) + 5
    k_buf = torch.randn(total, kv_heads, dk, generator=g).to(dtype)
    v_buf = torch.randn(total, kv_heads, dv, generator=g).to(dtype)
    order = torch.arange(total) if in_order else torch.randperm(total, generator=g)
    slots = torch.zeros(len(lengths), max(lengths), dtype=torch.int64)
    at = 0
    for i, n in enumerate(lengths):
        slots[i, :n] = order[at:at + n]
        at += n
    return k_buf, v_buf, slots


def attention_by_definition(q, k_buf, v_buf, slots, lengths, kv_heads, scale, window):
    """Each request's query over its visible keys, in float64, one request at a time."""
    heads = q.shape[1] // k_buf.shape[-1]
    group = heads // kv_heads
    out = []
    for i, n in enumerate(lengths):
        first = 0 if window is None else max(0, n - window)
        picked = slots[i, first:n]
        k = k_buf[picked].double().repeat_interleave(group, dim=1)  # [L, heads, dk]
        v = v_buf[picked].double().repeat_interleave(group, dim=1)
        qh = q[i].double().view(heads, -1)
        weights = (torch.einsum("hd,lhd->hl", qh, k) * scale).softmax(-1)
        out.append(torch.einsum("hl,lhd->hd", weights, v).reshape(-1))
    return torch.stack(out)


# Head sizes 64 and 128 take the kernel's unrolled code, 40 and the mixed pair its general one.
@pytest.mark.parametrize("dk,dv", [(64, 64), (128, 128), (40, 40), (64, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths,window", [([37], None), ([1, 90, 12], None), ([50, 3, 70, 9, 33, 64, 2, 41], None),
                                            ([50, 3, 70, 9, 33, 64, 2, 41], 16), ([90], 8)])
def test_decode_attention_against_the_definition(dk, dv, dtype, lengths, window, kernel_build):
    """One to eight requests (a task per KV head below twice the thread count,
    per request above it), groups of 3 query heads, keys in shuffled slots."""
    kv_heads, group = 2, 3
    k_buf, v_buf, slots = paged_pool(lengths, kv_heads, dk, dv, dtype, seed=len(lengths) + dk)
    g = torch.Generator().manual_seed(1)
    # q as a view into a wider row (the qkv projection's output): a row stride of its own
    qkv = torch.randn(len(lengths), kv_heads * group * dk + 7, generator=g).to(dtype)
    q = qkv[:, :kv_heads * group * dk]
    seq_lens = torch.tensor(lengths)
    scale = dk ** -0.5
    out = cpu_kernels.decode_attention(q, k_buf, v_buf, slots, seq_lens, kv_heads, scale, window)
    assert out.shape == (len(lengths), kv_heads * group * dv) and out.dtype == dtype
    exact = attention_by_definition(q, k_buf, v_buf, slots, lengths, kv_heads, scale, window)
    # float32: arithmetic error only; bfloat16: the output's rounding (2^-9 relative) dominates
    assert rel(out, exact) < (2e-6 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("kv_heads,group", [(3, 3), (8, 4), (1, 24)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("in_order", [False, True])
@pytest.mark.parametrize("lengths", [[1, 90, 12], [50, 3, 70, 9, 33, 64, 2, 41]])
def test_bfloat16_decode_attention_head_layouts(kv_heads, group, head_dim, in_order, lengths, kernel_build):
    """The bfloat16 kernel's task shapes: the default model's 3 x 3 heads (one
    task a request on AMX), 32 heads (two tasks of 16), 24 query heads on one
    KV head (more than a tile's 16 columns: the vector path); keys in runs of
    slots (read in place by the tile loads) or shuffled (gathered)."""
    k_buf, v_buf, slots = paged_pool(lengths, kv_heads, head_dim, head_dim, torch.bfloat16, seed=kv_heads + group,
                                     in_order=in_order)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(len(lengths), kv_heads * group * head_dim, generator=g).to(torch.bfloat16)
    seq_lens = torch.tensor(lengths)
    out = cpu_kernels.decode_attention(q, k_buf, v_buf, slots, seq_lens, kv_heads, head_dim ** -0.5, None)
    exact = attention_by_definition(q, k_buf, v_buf, slots, lengths, kv_heads, head_dim ** -0.5, None)
    assert rel(out, exact) < 4e-3


@pytest.mark.parametrize("window", [None, 6])
@torch.inference_mode()  # as the engine runs
def test_backend_decode_runs_the_kernel(window):
    """The torch-native backend's CPU decode goes through the kernel (no sinks):
    the step's K/V stored at its slots, the output right against the definition,
    and with the keys before each window poisoned with NaN, the same answer (it
    never reads them)."""
    lens = [1, 7, 40, 2, 19, 33]
    pools = Pools(lens, 1, torch.float32)
    attn = windowed_layer(4, window, with_sinks=False)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(len(lens), n * HEAD_DIM, generator=g) for n in (attn.num_heads, KV_HEADS, KV_HEADS))
    assert cpu_kernels.takes_decode_attention(q, pools.kv.k_buffers[0], pools.kv.v_buffers[0], k, v)

    def decode():
        backend = TorchNativeAttnBackend()
        fb = decode_batch(pools, lens, backend, len(lens))
        backend.init_forward_metadata(fb)
        return backend.forward(q, k, v, attn, fb)

    out = decode()
    # The step's own K/V went into the pool at its slots (the kernel stores them itself).
    new_slots = torch.stack([pools.table.req_to_token[r, n - 1] for r, n in zip(pools.rows, lens)])
    assert torch.equal(pools.kv.k_buffers[0][new_slots], k.view(len(lens), KV_HEADS, HEAD_DIM))
    assert torch.equal(pools.kv.v_buffers[0][new_slots], v.view(len(lens), KV_HEADS, HEAD_DIM))
    plain = torch.cat([reference_attention(pools, row, n, q[i:i + 1], n - 1, attn)
                       for i, (row, n) in enumerate(zip(pools.rows, lens))])
    assert rel(out, plain) < 1e-5
    if window is not None:
        poison_outside_windows(pools, [n - window for n in lens])
        assert torch.equal(decode(), out)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bfloat16 steps apart a and b are, elementwise (same-sign values)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_rms_norm_rounds_as_torch_does(rows):
    """bfloat16 RMSNorm with and without the residual add, against the module's
    torch path (transformers' order of roundings): the sum exactly, the output
    within one bfloat16 step (float32 sums in another order can round the
    other way) and nearly always equal."""
    cols = 576
    g = torch.Generator().manual_seed(rows)
    x, residual = (torch.randn(rows, cols, generator=g).to(torch.bfloat16) for _ in range(2))
    norm = RMSNorm(cols, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(cols, generator=g))
        out, summed = cpu_kernels.rms_norm(x, norm.weight, norm.eps, residual)
        alone = cpu_kernels.rms_norm(x, norm.weight, norm.eps)
    summed_ref = x + residual
    assert torch.equal(summed, summed_ref)
    for ours, source in ((out, summed_ref), (alone, x)):
        ref = norm.weight * F.rms_norm(source.float(), (cols,), eps=norm.eps).to(torch.bfloat16)
        assert ulps_apart(ours, ref).max() <= 1
        assert (ours == ref).float().mean() > 0.99


@pytest.mark.parametrize("rows", [1, 40])
def test_silu_and_mul_rounds_as_torch_does(rows):
    g = torch.Generator().manual_seed(rows)
    x = (4 * torch.randn(rows, 2 * 1536, generator=g)).to(torch.bfloat16)
    gate, up = x.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    with torch.no_grad():
        ours = cpu_kernels.silu_and_mul(x)
    assert ulps_apart(ours, ref).max() <= 1
    assert (ours == ref).float().mean() > 0.99


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the plain C++ build is chosen by an x86-64 -march")
def test_vector_norm_and_activation_agree_with_the_plain_code(monkeypatch):
    """The AVX-512 loops of silu * up and of RMSNorm's residual sum give the plain
    C++ code's bits; RMSNorm's output is within two bfloat16 steps of it, nearly
    always equal (the vector loop sums the squares in 16 lanes, the plain one in
    order: a step in the normalized value can round to two after the weight). Tails
    (widths not a multiple of 16), NaN, infinities and subnormals included."""
    g = torch.Generator().manual_seed(3)
    x = (4 * torch.randn(400, 2 * 1539, generator=g)).to(torch.bfloat16)
    specials = [float("nan"), float("inf"), -float("inf"), 1e-39, -1e-39, 0.0, -0.0, 90.0, -90.0, 3e38, -3e38, 1e-40]
    x[0, :len(specials)] = torch.tensor(specials).to(torch.bfloat16)
    h, residual = ((3 * torch.randn(400, 579, generator=g)).to(torch.bfloat16) for _ in range(2))
    h[0, :len(specials)] = torch.tensor(specials).to(torch.bfloat16)
    weight = torch.randn(579, generator=g).to(torch.bfloat16)

    def outputs(march):
        monkeypatch.setenv(cpu_kernels.MARCH_ENV, march)
        cpu_kernels._library.cache_clear()
        with torch.no_grad():
            return (cpu_kernels.silu_and_mul(x), *cpu_kernels.rms_norm(h, weight, 1e-5, residual),
                    cpu_kernels.rms_norm(h, weight, 1e-5))

    def bits(t):
        return t.view(torch.int16)

    try:
        (silu, normed, summed, alone), plain = outputs("native"), outputs("x86-64-v2")
    finally:
        cpu_kernels._library.cache_clear()
    assert torch.equal(bits(silu), bits(plain[0]))
    assert torch.equal(bits(summed), bits(plain[2]))
    for ours, theirs in ((normed, plain[1]), (alone, plain[3])):
        assert torch.equal(ours.isnan(), theirs.isnan())
        finite = ~ours.isnan()
        assert ulps_apart(ours[finite], theirs[finite]).max() <= 2
        assert (ours[finite] == theirs[finite]).float().mean() > 0.99


def test_modules_take_the_kernels_only_outside_autograd():
    """RMSNorm and SiluAndMul run the kernels under no_grad (the engine runs in
    inference mode) and torch where a gradient is wanted (a draft head's training)."""
    x = torch.randn(3, 64).to(torch.bfloat16)
    norm = RMSNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        assert cpu_kernels.takes_bf16_rows(x, None, norm.weight)
    assert not cpu_kernels.takes_bf16_rows(x, None, norm.weight)
    assert norm(x).requires_grad  # the torch path, with a graph
    assert not cpu_kernels.takes_bf16_rows(x.float())
    with torch.no_grad():
        assert torch.equal(SiluAndMul()(torch.cat([x, x], dim=-1)), cpu_kernels.silu_and_mul(torch.cat([x, x], -1)))


def test_one_openmp_runtime_in_the_process():
    """The kernels' OpenMP is torch's: one libgomp mapped, and the kernels see
    torch's thread count (two runtimes would each keep a pool spinning on the cores)."""
    cpu_kernels.available()
    with open("/proc/self/maps") as maps:
        libraries = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(libraries) == 1, libraries
    assert cpu_kernels._library().radixserve_openmp_threads() == torch.get_num_threads()


@pytest.mark.parametrize("env", [{"RADIXSERVE_CPU_KERNELS": "0"}, {"CXX": "no-such-compiler"}])
def test_switched_off_or_no_compiler_keeps_the_torch_path(env, tmp_path):
    """RADIXSERVE_CPU_KERNELS=0, or no compiler (and nothing built yet): not
    available, and the modules run their torch code (same result as the
    torch computation)."""
    code = ("import torch; from radixserve.layers import cpu_kernels as c; from radixserve.layers.layernorm import RMSNorm\n"
            "x = torch.randn(2, 8).to(torch.bfloat16); n = RMSNorm(8).to(torch.bfloat16)\n"
            "with torch.no_grad(): y = n(x)\n"
            "ref = n.weight * torch.nn.functional.rms_norm(x.float(), (8,), eps=n.eps).to(torch.bfloat16)\n"
            "print(c.available(), torch.equal(y, ref))")
    run_env = {**os.environ, "RADIXSERVE_CACHE_DIR": str(tmp_path), **env}
    result = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


@contextlib.contextmanager
def kernels_off():
    """Inside, the kernels are switched off (RADIXSERVE_CPU_KERNELS=0): the layers
    run their torch path. Also the fixture of tests/layers/test_torch_native_decode.py."""
    saved = os.environ.get("RADIXSERVE_CPU_KERNELS")
    os.environ["RADIXSERVE_CPU_KERNELS"] = "0"
    cpu_kernels._library.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["RADIXSERVE_CPU_KERNELS"]
        else:
            os.environ["RADIXSERVE_CPU_KERNELS"] = saved
        cpu_kernels._library.cache_clear()  # loaded again (from the cache) on next use


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side_by_side", [True, False])
@pytest.mark.parametrize("multimodal", [False, True])
def test_rotary_against_the_torch_path(dtype, side_by_side, multimodal):
    """RotaryEmbedding's kernel path (q | k as one slice of a q|k|v row, or two
    tensors) against its own torch path (the kernels switched off), which the
    model tests hold to transformers: the same bits in float32 and bfloat16 (no
    fused multiply-add: the default model's greedy chat answer turned on one
    such rounding). Qwen2.5-VL's rotary with three position axes (time, height,
    width) keeps its torch path (the kernel takes one position a row)."""
    from radixserve.layers.rotary import MRotaryEmbedding, RotaryEmbedding

    params = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}
    rope = (MRotaryEmbedding if multimodal else RotaryEmbedding)(64, 512, params)
    g = torch.Generator().manual_seed(0)
    rows = 80  # 80 x 8 heads x 64 values: the kernel's parallel loop
    qkv = (3 * torch.randn(rows, (6 + 2 + 2) * 64, generator=g)).to(dtype)
    q, k = qkv[:, :6 * 64], qkv[:, 6 * 64:8 * 64]
    if not side_by_side:
        q, k = q.contiguous(), k.contiguous()
    # one position a row; Qwen2.5-VL: three different axes, as an image's tokens have
    positions = torch.randint(0, 512, (3, rows) if multimodal else (rows,), generator=g)
    with torch.no_grad():
        assert cpu_kernels.takes_rows(q)
        ours = rope(positions, q, k)
        with kernels_off():
            reference = rope(positions, q, k)
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)

amx_only = pytest.mark.skipif(not (cpu_kernels.available() and cpu_kernels.amx_available()),
                              reason="the quantized linears' kernels run on CPUs with AMX")


def int4_packed(w: torch.Tensor, group: int):
    """w in int4 groups: (the kernels' packed copy, scales_and_zeros, the
    weight's values (q - 8) * scale + zero in float64)."""
    from radixserve.layers.quantization import quantize_int4_groups, unpack_int4

    packed, scales_and_zeros = quantize_int4_groups(w, group)
    scale, zero = scales_and_zeros.double().permute(2, 1, 0)  # [out, groups] each
    q = unpack_int4(packed).double().view(w.shape[0], -1, group)
    exact = ((q - 8) * scale[..., None] + zero[..., None]).view(w.shape)
    return cpu_kernels.pack_int4_for_amx(unpack_int4(packed)), scales_and_zeros, exact


def int8_packed(w: torch.Tensor):
    """w in int8 per row: (the kernels' packed copy, float32 scales, the weight's values in float64)."""
    from radixserve.layers.quantization import per_row_dequantized, quantize_per_row

    q, scale = quantize_per_row(w, torch.int8)
    return cpu_kernels.pack_int8_for_amx(q), scale.view(-1), per_row_dequantized(q, scale.view(-1)).double()


def int4_on_amx(w: torch.Tensor, group: int):
    """(the AMX kernel's product, the weight's values it multiplies by for so
    many rows) of w in int4: up to 8 rows (q - 8) * scale + zero exactly, from 9
    those values rounded to bfloat16, as the dense copy holds them."""
    from radixserve.layers.cpu_quantized_paths import AMX_INT4_FEW_ROWS

    amx, scales_and_zeros, exact = int4_packed(w, group)
    return (lambda x: cpu_kernels.int4_linear_amx(x, amx, scales_and_zeros),
            lambda rows: exact if rows in AMX_INT4_FEW_ROWS else exact.to(torch.bfloat16))


def int8_on_amx(w: torch.Tensor, group: int):
    amx, scale, exact = int8_packed(w)
    return (lambda x: cpu_kernels.int8_linear_amx(x, amx, scale), lambda rows: exact.to(torch.bfloat16))


def check_against_the_dequantized_weight(fmt, rows: int, out_features: int, in_features: int, group: int) -> None:
    """fmt's product of `rows` rows (a view with a row stride of its own)
    against float64 over the weight's values: within the output's rounding."""
    g = torch.Generator().manual_seed(rows + out_features)
    matmul, weight_for = fmt(torch.randn(out_features, in_features, generator=g), group)
    wide = torch.randn(rows, in_features + 32, generator=g).to(torch.bfloat16)
    x = wide[:, :in_features]
    out = matmul(x)
    exact = x.double() @ weight_for(rows).double().T
    assert out.shape == (rows, out_features) and out.dtype == torch.bfloat16
    assert rel(out, exact) < 4e-3  # the output's bfloat16 rounding
    assert (ulps_apart(out, exact.to(torch.bfloat16))[exact.abs() > 1e-2] <= 1).all()


@amx_only
@pytest.mark.parametrize("fmt", [int4_on_amx, int8_on_amx])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 17, 32, 33, 70])
@pytest.mark.parametrize("out_features,in_features,group", [(64, 96, 32), (128, 256, 64), (64, 128, 128)])
def test_amx_linear_against_the_dequantized_weight(fmt, rows, out_features, in_features, group):
    """The AMX kernels' products (int4 in groups, int8 per row) against float64
    over the weight's values: rows on both sides of the int4 kernel's two ways
    (8 and 9) and of one and two tiles of 16, x a view with a row stride of its own."""
    check_against_the_dequantized_weight(fmt, rows, out_features, in_features, group)


def check_rows_alone(fmt, group: int, rows: int) -> None:
    """Each of up to `rows` rows: the same bits alone, first among others and last."""
    g = torch.Generator().manual_seed(group)
    matmul, _ = fmt(torch.randn(128, 256, generator=g), group)
    x = torch.randn(rows, 256, generator=g).to(torch.bfloat16)
    together = matmul(x)
    for count in range(1, rows + 1):
        assert torch.equal(matmul(x[:count]), together[:count])
        assert torch.equal(matmul(x[count - 1:count]), together[count - 1:count])


@amx_only
@pytest.mark.parametrize("fmt,group", [(int4_on_amx, 32), (int4_on_amx, 64), (int8_on_amx, 32)])
def test_amx_few_rows_do_not_depend_on_each_other(fmt, group):
    """Up to 8 rows, each row's product is the same bits alone as beside others:
    a batch-1 decode and a speculative verify of its drafts (a few rows) must
    give the same token, and a decode batch's requests must not steer each other."""
    check_rows_alone(fmt, group, 8)


@torch.inference_mode()
def test_amx_takes_only_whole_blocks():
    """Shapes the kernels' 32 x 32 blocks do not tile stay off them (amx_takes)."""
    rows = torch.randn(8, 96).to(torch.bfloat16)
    amx = cpu_kernels.amx_available()
    assert cpu_kernels.amx_takes(rows, 64) == amx and cpu_kernels.amx_takes(rows, 64, 32) == amx
    assert not cpu_kernels.amx_takes(rows, 48, 32)  # output columns not a multiple of 32
    assert not cpu_kernels.amx_takes(rows[:, :80], 64, 16)  # inputs, group
    assert not cpu_kernels.amx_takes(rows.float(), 64, 32)


avx512_only = pytest.mark.skipif(not (cpu_kernels.available() and cpu_kernels.avx512_bf16_available()),
                                 reason="the kernels for CPUs without AMX need AVX-512 BF16")


def int4_on_avx512(w: torch.Tensor, group: int):
    """(the AVX-512 BF16 kernel's product, the weight's values for any rows): unrounded."""
    packed, scales_and_zeros, exact = int4_packed(w, group)
    return lambda x: cpu_kernels.int4_linear_avx512(x, packed, scales_and_zeros), lambda rows: exact


def int8_on_avx512(w: torch.Tensor, group: int):
    packed, scale, exact = int8_packed(w)
    return lambda x: cpu_kernels.int8_linear_avx512(x, packed, scale), lambda rows: exact


vnni_only = pytest.mark.skipif(not (cpu_kernels.available() and cpu_kernels.avx512_vnni_available()),
                               reason="the int8 x 16-bit kernel needs AVX-512 VNNI and BF16")


def int8_on_vnni(w: torch.Tensor, group: int):
    """The VNNI kernel's product, and the weight's values in float64."""
    from radixserve.layers.quantization import per_row_dequantized, quantize_per_row

    q, scale = quantize_per_row(w, torch.int8)
    packed, scale = cpu_kernels.pack_int8_for_vnni(q), scale.view(-1)
    exact = per_row_dequantized(q, scale).double()
    return lambda x: cpu_kernels.int8_linear_vnni(x, packed, scale), lambda rows: exact


def fixed_point_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[rows, out]: what the VNNI kernel's 16-bit fixed point of x may add to
    x @ weight.T: half a step 2^(e - 14) a value, e the power of two of its
    block's largest (32 values), times the weight's magnitudes."""
    rows, k = x.shape
    largest = x.double().view(rows, k // 32, 32).abs().amax(-1)
    step = torch.ldexp(torch.ones_like(largest), torch.frexp(largest).exponent - 15)
    return (step / 2) @ weight.abs().view(weight.shape[0], k // 32, 32).sum(-1).T


@avx512_only
@pytest.mark.parametrize("fmt", [int4_on_avx512, int8_on_avx512])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 17])
@pytest.mark.parametrize("out_features,in_features,group", [(64, 96, 32), (128, 256, 64), (192, 128, 128)])
def test_avx512_linear_against_the_dequantized_weight(fmt, rows, out_features, in_features, group):
    """The AVX-512 BF16 kernels (int4 in groups, int8 per row) against float64
    over the weight's unrounded values: rows in one, two and several tiles of 4,
    x a view with a row stride of its own, 3 blocks of 32 columns to a thread."""
    check_against_the_dequantized_weight(fmt, rows, out_features, in_features, group)


@avx512_only
@pytest.mark.parametrize("fmt,group", [(int4_on_avx512, 32), (int4_on_avx512, 64), (int8_on_avx512, 32),
                                       pytest.param(int8_on_vnni, 32, marks=vnni_only)])
def test_avx512_rows_do_not_depend_on_each_other(fmt, group):
    """Each row's product is the same bits alone as beside others, whatever its
    place in a tile of 4: a batch-1 decode and a speculative verify of its drafts
    must give the same token."""
    check_rows_alone(fmt, group, 9)


@avx512_only
@torch.inference_mode()
def test_quantized_linears_take_the_avx512_kernels_without_amx(monkeypatch):
    """Without AMX, a few bfloat16 rows times an int4 weight take the AVX-512 kernel
    in any forward; times an int8 weight (the LM head) only in a decode step, as on AMX."""
    from radixserve.layers import quantization as qz

    monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(192, 128, generator=g)
    x = torch.randn(4, 128, generator=g).to(torch.bfloat16)
    packed, scales_and_zeros = qz.quantize_int4_groups(w, 32)
    kernel = cpu_kernels.int4_linear_avx512(x, qz.int4_amx_copy(packed), scales_and_zeros)
    assert torch.equal(qz.int4_weight_only_linear(x, packed, scales_and_zeros, None), kernel)
    q, scale = qz.quantize_per_row(w, torch.int8)
    scale = scale.view(-1)
    torch_kernel = torch.ops.aten._weight_int8pack_mm(x, q, scale.to(torch.bfloat16))
    assert torch.equal(qz.int8_weight_only_linear(x, q, scale, None), torch_kernel)
    with cpu_quantized_paths.decode_step():
        in_decode = qz.int8_weight_only_linear(x, q, scale, None)
    if cpu_kernels.avx512_vnni_available():  # int8 products where the CPU has them
        assert torch.equal(in_decode, cpu_kernels.int8_linear_vnni(x, cpu_kernels.pack_int8_for_vnni(q), scale))
    else:
        assert torch.equal(in_decode, cpu_kernels.int8_linear_avx512(x, cpu_kernels.pack_int8_for_amx(q), scale))
    assert not torch.equal(in_decode, torch_kernel)  # another kernel, another rounding: the test sees which ran


@vnni_only
@torch.inference_mode()
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("outlier", [None, 1e4])
def test_vnni_linear_within_its_fixed_point_step(rows, outlier):
    """The VNNI kernel (int8 weight, rows in 16-bit fixed point) against float64
    over the weight's values: within the fixed point's half step a value plus
    the output's bfloat16 rounding, also with an outlier 10^4 times the rest in
    a block (as activations have), where 8-bit rows (a step of 1e4 / 127) would
    be 2^7 times further off; rows in one, two and three tiles of 4, x a view
    with a row stride of its own, 3 blocks of 32 columns to a thread."""
    from radixserve.layers.quantization import per_row_dequantized, quantize_per_row

    g = torch.Generator().manual_seed(rows)
    q, scale = quantize_per_row(torch.randn(192, 128, generator=g), torch.int8)
    scale = scale.view(-1)
    x = torch.randn(rows, 128 + 32, generator=g)
    if outlier is not None:
        x[:, 7] = outlier
    x = x.to(torch.bfloat16)[:, :128]
    out = cpu_kernels.int8_linear_vnni(x, cpu_kernels.pack_int8_for_vnni(q), scale).double()
    weight = per_row_dequantized(q, scale).double()
    exact = x.double() @ weight.T
    assert ((out - exact).abs() <= fixed_point_bound(x, weight) + exact.abs() * 2.0 ** -8).all()


@vnni_only
@torch.inference_mode()
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_vnni_linear_keeps_a_bad_value_in_its_own_row(bad):
    """A NaN or inf input value makes its row's outputs NaN (as float arithmetic
    would, not finite garbage from the fixed point), and no other row's."""
    q = torch.randint(-127, 128, (64, 96), dtype=torch.int8)
    scale = torch.rand(64) + 0.5
    x = torch.randn(3, 96).to(torch.bfloat16)
    clean = cpu_kernels.int8_linear_vnni(x, cpu_kernels.pack_int8_for_vnni(q), scale)
    x[1, 40] = bad
    out = cpu_kernels.int8_linear_vnni(x, cpu_kernels.pack_int8_for_vnni(q), scale)
    assert out[1].isnan().all()
    assert torch.equal(out[[0, 2]], clean[[0, 2]])