"""Compile the CUDA path's Triton kernels for Hopper on a machine without a GPU.

The CPU tests run our kernels in Triton's interpreter, which checks what they
compute but not that they compile: a kernel the interpreter runs may still be
rejected by the compiler (a construct it lowers differently, a register or
shared-memory budget, an instruction only Hopper has, such as PDL's grid
waits). Triton ships its CUDA compiler (ptxas), so a compile for sm_90 needs
no GPU: this module stands a fake driver in for the missing device, calls the
kernels' own Python wrappers with CPU tensors of real model shapes (every
constexpr, dtype and PDL choice is made as on a GPU), and compiles each launch
instead of running it. Outputs are never computed.

Run in a process of its own, without TRITON_INTERPRET (test_hopper_compile.py
does): `python -m tests.layers.hopper_compile` prints one JSON object, case ->
the kernels compiled, or the error.
"""

from __future__ import annotations

import json
import sys
from typing import Callable, Dict, List

import torch

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
SLOTS = 256  # cache rows of the attention cases


class FakeHopper:
    """The driver calls a kernel launch makes before compiling, answered for an sm_90 device."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int = 0) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def install_fake_hopper(compiled: List[str]) -> None:
    """Every launch compiles for sm_90 and appends the kernel's name to compiled; none runs.
    PDL is on, as on a Hopper GPU."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(FakeHopper())
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        assert kernel.asm.get("cubin"), f"{self.fn.__name__}: no cubin"
        compiled.append(self.fn.__name__)
        return kernel

    JITFunction.run = compile_only
    import radixserve.layers  # noqa: F401  (the modules below import use_pdl by name)

    for module in [m for name, m in sys.modules.items() if name.startswith("radixserve.") and m is not None]:
        if hasattr(module, "use_pdl"):
            module.use_pdl = lambda device: True


def rand(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def weight(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    """A tensor only kernels read: never computed on, so left unfilled."""
    return torch.empty(*shape, dtype=dtype)


def table(requests: int, positions: int) -> torch.Tensor:
    """A request-to-token table whose rows are the first slots."""
    return torch.arange(requests * positions).view(requests, positions) % SLOTS


# ---- the cases: each calls wrappers the way the CUDA path does ----

def fused_small_ops() -> None:
    from radixserve.layers import fused_kernels as fk

    x, res = rand(1, 2048), rand(1, 2048)
    fk.rms_norm(x, rand(2048), 1e-6)
    fk.rms_norm(x, rand(2048), 1e-6, res)
    fk.silu_and_mul(rand(4, 2 * 3072))
    cos_sin = torch.randn(4096, 128)
    q, k = rand(2, 32 * 128), rand(2, 8 * 128)
    fk.rotary(torch.arange(2), q, k, cos_sin, 128)
    fk.rotary(torch.arange(2), q, k, cos_sin, 128, head_norms=(rand(128), rand(128), 1e-6))  # Qwen3


def kv_stores() -> None:
    """The KV store, and the rotary kernel that writes keys and values itself
    (q, k and v as column slices of one qkv output, as the models pass them)."""
    from radixserve.layers import fused_kernels as fk

    k, v = rand(2, 8, 128), rand(2, 8, 128)
    qkv, cos_sin = rand(2, (32 + 16) * 128), torch.randn(4096, 128)
    q, k_cols, v_cols = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1)
    for dtype in (BF16, FP8):
        fk.store_kv(k, v, torch.arange(2), torch.zeros(SLOTS, 8, 128, dtype=dtype),
                    torch.zeros(SLOTS, 8, 128, dtype=dtype))
        rows = fk.KVCacheRows(torch.arange(2), torch.zeros(SLOTS, 8, 128, dtype=dtype),
                              torch.zeros(SLOTS, 8, 128, dtype=dtype))
        fk.rotary(torch.arange(2), q, k_cols, cos_sin, 128, head_norms=(rand(128), rand(128), 1e-6),
                  cache=(v_cols, rows))


def mla_small_ops() -> None:
    """DeepSeek-V2-Lite's: the one kernel before attention (its interleaved
    rope, and V3's rotate-half one) and the absorption GEMVs."""
    from radixserve.layers import fused_kernels as fk
    from radixserve.layers.attention import mla_absorb

    merged = rand(2, 16 * 192 + 576)
    q, kv_a = merged[:, :16 * 192].view(2, 16, 192), merged[:, 16 * 192:]
    cos_sin = torch.randn(4096, 64)
    for dtype, interleaved in ((BF16, True), (FP8, True), (BF16, False)):
        fk.mla_latent_kv(torch.arange(2), q[..., 128:], kv_a, rand(512), 1e-6, cos_sin, interleaved,
                         torch.arange(2), torch.zeros(SLOTS, 1, 576, dtype=dtype))
    kv_b = rand(16 * 256, 512).view(16, 256, 512)
    mla_absorb.query_to_latent(q[..., :128], kv_b[:, :128])
    mla_absorb.latent_to_value(rand(2, 16, 512), kv_b[:, 128:])


def gemvs() -> None:
    from radixserve.layers import gemv
    from radixserve.layers.quantization import quantize_per_row

    x, w = rand(1, 2048), rand(3072, 2048)
    gemv.gemv(x, w)
    gemv.gemv(x, w, bias=rand(3072))
    gemv.gemv(rand(1, 2 * 2048), w, silu_gated=True)
    gemv.gemv(x, rand(64, 2048), out_dtype=torch.float32)  # a router's float32 logits
    gemv.gemv_after_norm(x, rand(1, 2048), rand(2048), 1e-6, w)  # a decoder layer's norm folded in
    gemv.gemv_after_norm(x, rand(1, 2048), rand(2048), 1e-6, rand(64, 2048), out_dtype=torch.float32)
    wq, ws = quantize_per_row(w.float())
    gemv.gemv(x, wq, ws.view(-1))
    block_scales = torch.rand(3072 // 128, 2048 // 128)
    gemv.gemv(x, wq, block_scales, scale_block=(128, 128))


def decode_attention() -> None:
    from radixserve.layers.attention.paged_attention import decode_attention, fixed_decode_splits

    lens = torch.tensor([100])
    for cache in (BF16, FP8):
        k_buf, v_buf = torch.zeros(SLOTS, 8, 128, dtype=cache), torch.zeros(SLOTS, 8, 128, dtype=cache)
        decode_attention(rand(1, 32 * 128), k_buf, v_buf, rand(1, 32 * 128), table(1, 128), torch.tensor([0]),
                         lens, 0.08, 16)
    k_buf, v_buf = torch.zeros(SLOTS, 8, 128, dtype=BF16), torch.zeros(SLOTS, 8, 128, dtype=BF16)
    splits, split_tokens = fixed_decode_splits(4096)  # deterministic mode
    decode_attention(rand(1, 32 * 128), k_buf, v_buf, rand(1, 32 * 128), table(1, 128), torch.tensor([0]), lens,
                     0.08, splits, split_tokens=split_tokens)
    k_buf, v_buf = torch.zeros(SLOTS, 8, 64, dtype=BF16), torch.zeros(SLOTS, 8, 64, dtype=BF16)  # GPT-OSS
    decode_attention(rand(1, 64 * 64), k_buf, v_buf, rand(1, 64 * 64), table(1, 128), torch.tensor([0]), lens,
                     0.125, 16, sliding_window=128, sinks=rand(64))


def extend_attention() -> None:
    from radixserve.layers.attention.paged_attention import extend_attention

    k_buf, v_buf = torch.zeros(SLOTS, 8, 128, dtype=BF16), torch.zeros(SLOTS, 8, 128, dtype=BF16)
    prefix, new = torch.tensor([16]), torch.tensor([8])
    extend_attention(rand(8, 32 * 128), k_buf, v_buf, rand(8, 32 * 128), table(1, 128), torch.tensor([0]),
                     prefix, new, torch.tensor([0]), 8, 0.08)
    extend_attention(rand(8, 32 * 128), k_buf, v_buf, rand(8, 32 * 128), table(1, 128), torch.tensor([0]),
                     prefix, new, torch.tensor([0]), 8, 0.08, tree_mask=torch.ones(8, dtype=torch.int64))


def mla_attention() -> None:
    from radixserve.layers.attention import mla_triton

    for cache in (BF16, FP8):
        kv = torch.zeros(SLOTS, 1, 576, dtype=cache)
        mla_triton.mla_decode_attention(rand(1, 16, 512), rand(1, 16, 64), kv, rand(1, 16, 512), table(1, 128),
                                        torch.tensor([0]), torch.tensor([100]), 0.1, 16)
    kv = torch.zeros(SLOTS, 1, 576, dtype=BF16)
    prefix, new, start = torch.tensor([16]), torch.tensor([8]), torch.tensor([0])
    mla_triton.mla_extend_latent_attention(rand(8, 16, 512), rand(8, 16, 64), kv, rand(8, 16, 512), table(1, 128),
                                           torch.tensor([0]), prefix, new, start, 8, 0.1)
    mla_triton.mla_extend_expanded_attention(rand(8, 16, 128), rand(8, 16, 64), rand(24, 16, 128), rand(24, 64),
                                             rand(24, 16, 128), rand(8, 16, 128), prefix, new, start, start, 8, 0.1)


def moe() -> None:
    """Routing and the experts of Qwen3-30B-A3B's shape (128 experts, top 8):
    a batch-1 step's GEMV path and a prefill's grouped GEMM; DeepSeek-V2-Lite's
    batch-1 experts (64, top 6: a k that is no power of two), alone and with
    its shared experts as slots."""
    from radixserve.layers.moe.activation import ExpertActivation
    from radixserve.layers.moe.few_token_experts import SharedExperts
    from radixserve.layers.moe.fused_moe_triton import fused_experts_triton
    from radixserve.layers.moe.topk import RoutingConfig
    from radixserve.layers.moe.topk_triton import select_experts_triton

    select_experts_triton(torch.randn(1, 128), RoutingConfig(top_k=8, scoring="softmax", renormalize=True))
    select_experts_triton(torch.randn(1, 256), RoutingConfig(top_k=8, scoring="sigmoid", renormalize=True),
                          torch.zeros(256))  # V3's correction bias
    w13, w2 = weight(128, 2 * 768, 2048), weight(128, 2048, 768)
    for tokens in (1, 64):
        ids = torch.randint(0, 128, (tokens, 8), dtype=torch.int32)
        fused_experts_triton(rand(tokens, 2048), w13, w2, torch.rand(tokens, 8), ids, ExpertActivation("silu"))
    w13, w2 = weight(64, 2 * 1408, 2048), weight(64, 2048, 1408)
    ids = torch.randint(0, 64, (1, 6), dtype=torch.int32)
    fused_experts_triton(rand(1, 2048), w13, w2, torch.rand(1, 6), ids, ExpertActivation("silu"))
    shared = SharedExperts(weight(2 * 2816, 2048), weight(2048, 2816))  # its 2 shared experts as 2 more slots
    fused_experts_triton(rand(1, 2048), w13, w2, torch.rand(1, 6), ids, ExpertActivation("silu"), shared=shared)


def fp8_matmuls() -> None:
    from radixserve.layers.block_fp8_kernels import block_fp8_matmul, quantize_groups_fp8
    from radixserve.layers.fp8_kernels import fp8_weight_only_matmul, quantize_rows_fp8
    from radixserve.layers.quantization import quantize_per_row

    w = rand(1024, 2048)
    wq, ws = quantize_per_row(w.float())
    quantize_rows_fp8(rand(4, 2048))
    fp8_weight_only_matmul(rand(4, 2048), wq, ws.view(-1))
    xq, xs = quantize_groups_fp8(rand(16, 2048), 128)
    block_fp8_matmul(xq, xs, wq, torch.rand(1024 // 128, 2048 // 128), (128, 128), BF16)


def gpt_oss_experts() -> None:
    """The clamped SwiGLU with expert biases, at one token and in a prefill."""
    from radixserve.layers.moe.activation import ExpertActivation
    from radixserve.layers.moe.fused_moe_triton import fused_experts_triton

    act = ExpertActivation("swiglu_oai", limit=7.0)
    w13, w2 = weight(32, 2 * 2880, 2880), weight(32, 2880, 2880)
    for tokens in (1, 64):
        ids = torch.randint(0, 32, (tokens, 4), dtype=torch.int32)
        fused_experts_triton(rand(tokens, 2880), w13, w2, torch.rand(tokens, 4), ids, act, rand(32, 2 * 2880),
                             rand(32, 2880))


def deterministic_and_lora() -> None:
    """Deterministic mode's batch-invariant GEMM and the LoRA adapters' segmented products."""
    from radixserve.layers.batch_invariant import _triton_linear
    from radixserve.lora.triton_ops import segmented_lora, segments_of

    _triton_linear(rand(4, 2048), rand(1024, 2048), None)
    segs = segments_of([0, 1], [3, 1], torch.device("cpu"))
    segmented_lora(rand(4, 2048), rand(2, 16, 2048), rand(2, 16, 1024), rand(4, 1024), segs)


CASES: Dict[str, Callable[[], None]] = {
    f.__name__: f for f in (fused_small_ops, kv_stores, mla_small_ops, gemvs, decode_attention, extend_attention,
                            mla_attention, moe, gpt_oss_experts, fp8_matmuls, deterministic_and_lora)
}


def main() -> None:
    compiled: List[str] = []
    install_fake_hopper(compiled)
    results = {}
    for name, case in CASES.items():
        start = len(compiled)
        try:
            case()
            results[name] = sorted(set(compiled[start:]))
        except Exception as exc:  # reported per case, so one failure does not hide the others
            results[name] = f"error: {type(exc).__name__}: {exc}"
    print(json.dumps(results))


if __name__ == "__main__":
    main()
