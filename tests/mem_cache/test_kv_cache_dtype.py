"""--kv-cache-dtype: the cast into the cache, both attention backends reading an
FP8 pool, and whole tiny models (Llama, DeepSeek MLA) against transformers
whose keys and values are rounded through the same FP8 format."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers.attention.radix_attention import RadixAttention
from radixserve.layers.attention.torch_native import TorchNativeAttnBackend
from radixserve.layers.attention.triton_attn_backend import TritonAttnBackend
from radixserve.mem_cache import kv_dtype
from radixserve.mem_cache.allocator import KVPool, ReqToTokenPool, TokenAllocator
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from radixserve.server_args import KV_CACHE_DTYPES, ServerArgs
from tests.conftest import load_hf_model
from tests.models.deepseek_tiny import build_deepseek, teacher_forced_logits

E4M3 = torch.float8_e4m3fn
# Under CUDA the attention tests run there (the Triton kernels compiled for the
# GPU); on the CPU, Triton's interpreter runs them.
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = [pytest.mark.gpu] if CUDA else []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def test_flag_values_and_bad_value():
    assert set(KV_CACHE_DTYPES) == set(kv_dtype.KV_CACHE_DTYPES)
    assert kv_dtype.resolve_kv_cache_dtype("auto", torch.float32) == torch.float32
    assert kv_dtype.resolve_kv_cache_dtype("bf16", torch.float32) == torch.bfloat16
    assert kv_dtype.resolve_kv_cache_dtype("fp8_e5m2", torch.bfloat16) == torch.float8_e5m2
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        ServerArgs(kv_cache_dtype="fp4_e2m1")


def test_fp8_store_rounds_and_saturates():
    pool = KVPool(8, 1, 2, 4, E4M3, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 2, 4, generator=g)
    k[0, 0, 0], k[1, 1, 3] = 1e4, -1e4  # beyond E4M3's largest finite value, 448
    loc = torch.tensor([5, 1, 6])
    pool.set_kv(0, loc, k, -k)
    stored = pool.k_buffers[0][loc].float()
    assert stored[0, 0, 0] == 448 and stored[1, 1, 3] == -448
    inside = k.abs() < 448
    assert torch.equal(stored[inside], k[inside].to(E4M3).float())  # round to nearest, nothing else
    assert (stored[inside] - k[inside]).abs().max() > 0  # it did round
    assert torch.equal(pool.v_buffers[0][loc].float(), -stored)
    assert kv_dtype.as_cached(k, E4M3).dtype == torch.float32
    assert torch.equal(kv_dtype.as_cached(k, E4M3), stored)


HEAD_DIM, KV_HEADS, GROUP = 16, 2, 2
LENS = [(0, 9), (5, 1), (23, 17)]  # (cached prefix, new tokens) per request


def attention_batch(cache_dtype: torch.dtype, mode: ForwardMode):
    """Requests of LENS over one pool in cache_dtype (prefixes filled with
    random KV), their new tokens' q/k/v, and a ForwardBatch factory."""
    seqs = [p + e for p, e in LENS]
    alloc = TokenAllocator(sum(seqs) + 8, 1, DEVICE)
    table = ReqToTokenPool(len(seqs), max(seqs) + 1, DEVICE)
    pool = KVPool(alloc.num_slots, 1, KV_HEADS, HEAD_DIM, cache_dtype, DEVICE)
    g = torch.Generator().manual_seed(1)
    pool.set_kv(0, torch.arange(alloc.num_slots, device=DEVICE),
                *(torch.randn(alloc.num_slots, KV_HEADS, HEAD_DIM, generator=g).to(DEVICE) for _ in range(2)))
    rows = [table.alloc() for _ in seqs]
    for row, n in zip(rows, seqs):
        table.req_to_token[row, :n] = alloc.alloc_extend([0], [n], [0])
    if mode == ForwardMode.DECODE:
        prefixes, news = [s - 1 for s in seqs], [1] * len(seqs)
    else:
        prefixes, news = [p for p, _ in LENS], [e for _, e in LENS]
    total = sum(news)
    q, k, v = (torch.randn(total, n * HEAD_DIM, generator=g).to(DEVICE) for n in (KV_HEADS * GROUP, KV_HEADS, KV_HEADS))
    out_loc = torch.cat([table.req_to_token[r, p:s] for r, p, s in zip(rows, prefixes, seqs)])
    lens = torch.tensor(news, device=DEVICE)

    def batch(backend):
        extend = dict(extend_prefix_lens=torch.tensor(prefixes, device=DEVICE), extend_seq_lens=lens,
                      extend_start_loc=torch.cumsum(lens, 0) - lens, extend_prefix_lens_cpu=prefixes,
                      extend_seq_lens_cpu=news) if mode == ForwardMode.EXTEND else {}
        return ForwardBatch(
            forward_mode=mode, batch_size=len(seqs), input_ids=torch.zeros(total, dtype=torch.int64, device=DEVICE),
            positions=torch.zeros(total, dtype=torch.int64, device=DEVICE),
            req_pool_indices=torch.tensor(rows, device=DEVICE), seq_lens=torch.tensor(seqs, device=DEVICE),
            out_cache_loc=out_loc, seq_lens_cpu=seqs, req_to_token_pool=table,
            kv_pool=pool, attn_backend=backend, **extend)

    return pool, (q, k, v), batch


@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE])
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_backends_attend_over_the_stored_values(mode, cache_dtype):
    """Both backends over an FP8 pool equal the torch backend over a float32
    pool holding the same (rounded) values: FP8 changes what is stored, not
    how it is attended."""
    attn = RadixAttention(KV_HEADS * GROUP, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS, layer_id=0)
    fp8_pool, qkv, fp8_batch = attention_batch(cache_dtype, mode)
    ref_pool, _, ref_batch = attention_batch(torch.float32, mode)
    ref_pool.k_buffers[0].copy_(fp8_pool.k_buffers[0].float())
    ref_pool.v_buffers[0].copy_(fp8_pool.v_buffers[0].float())
    q, k, v = qkv
    rounded = [kv_dtype.as_cached(x, cache_dtype) for x in (k, v)]  # the new tokens as the FP8 pool keeps them
    ref_backend = TorchNativeAttnBackend()
    fb = ref_batch(ref_backend)
    ref_backend.init_forward_metadata(fb)
    reference = ref_backend.forward(q, *rounded, attn, fb)
    for backend in (TorchNativeAttnBackend(), TritonAttnBackend(DEVICE)):
        fb = fp8_batch(backend)
        backend.init_forward_metadata(fb)
        out = backend.forward(q, k, v, attn, fb)
        assert rel(out, reference) < 1e-5, type(backend).__name__


@pytest.mark.parametrize("many_programs", [False, True])
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_triton_decode_over_fp8_with_bfloat16_queries(monkeypatch, cache_dtype, many_programs):
    """A bfloat16 model's decode over an FP8 pool: the Triton kernel widens the
    cache to float16 and rounds its queries to float16 (decode_tiles), with
    the tiles of few programs and of many. Against attention in float32 over
    the same stored values and the same bfloat16 queries, it differs by
    bfloat16 rounding only."""
    from radixserve.layers.attention import paged_attention

    monkeypatch.setattr(paged_attention, "FP8_FEW_DECODE_PROGRAMS", 1 if many_programs else 1 << 30)
    attn = RadixAttention(KV_HEADS * GROUP, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS, layer_id=0)
    fp8_pool, (q, k, v), fp8_batch = attention_batch(cache_dtype, ForwardMode.DECODE)
    q, k, v = (x.bfloat16() for x in (q, k, v))
    ref_pool, _, ref_batch = attention_batch(torch.float32, ForwardMode.DECODE)
    backend = TritonAttnBackend(DEVICE)
    fb = fp8_batch(backend)
    backend.init_forward_metadata(fb)
    out = backend.forward(q, k, v, attn, fb)
    ref_pool.k_buffers[0].copy_(fp8_pool.k_buffers[0].float())
    ref_pool.v_buffers[0].copy_(fp8_pool.v_buffers[0].float())
    ref_backend = TorchNativeAttnBackend()
    fb = ref_batch(ref_backend)
    ref_backend.init_forward_metadata(fb)
    reference = ref_backend.forward(q.float(), *(kv_dtype.as_cached(x.float(), cache_dtype) for x in (k, v)), attn, fb)
    assert out.dtype == torch.bfloat16
    assert rel(out, reference) < 1e-2


def fp8_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA with keys and values rounded through E4M3 first (for
    MLA only the rope part of the key: its other part and the values come from
    the latent, rounded where it is made, by round_latents)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rope = getattr(module, "qk_rope_head_dim", None)
    if rope is None:
        key, value = (kv_dtype.as_cached(x, E4M3) for x in (key, value))
    else:
        key = torch.cat([key[..., :-rope], kv_dtype.as_cached(key[..., -rope:], E4M3)], dim=-1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def round_latents(hf) -> None:
    for name, module in hf.named_modules():
        if name.endswith("kv_a_layernorm"):
            module.register_forward_hook(lambda _m, _i, out: kv_dtype.as_cached(out, E4M3))


@torch.no_grad()
def reference_logits(hf, sequences, fp8: bool):
    from transformers import AttentionInterface

    if fp8:
        AttentionInterface.register("fp8_kv_reference", fp8_attention)
        hf.set_attn_implementation("fp8_kv_reference")
        round_latents(hf)
    return [hf(torch.tensor([s])).logits[0] for s in sequences]


def fp8_cache_runner(path, backend: str):
    from radixserve.model_executor.model_runner import ModelRunner

    runner = ModelRunner(ServerArgs(model_path=str(path), device=DEVICE.type, kv_cache_dtype="fp8_e4m3",
                                    attention_backend=backend, max_total_tokens=256, dtype="float32",
                                    disable_cuda_graph=True))
    assert runner.pools.kv_pool.k_buffers[0].dtype == E4M3
    return runner


def check_against_transformers(runner, path) -> None:
    """Chunked extends (the second on the first's cache) and decode steps, two
    requests batched: every position's logits."""
    g = torch.Generator().manual_seed(4)
    sequences = [torch.randint(10, 1000, (24,), generator=g).tolist() for _ in range(2)]
    ours = teacher_forced_logits(runner, sequences, chunks=[9, 12], decode_steps=3)
    rounded = reference_logits(load_hf_model(path), sequences, fp8=True)
    exact = reference_logits(load_hf_model(path), sequences, fp8=False)
    for o, r, e in zip(ours, rounded, exact):
        assert rel(o, r) < 1e-4  # the same arithmetic
        assert rel(o, e) > 10 * rel(o, r)  # and not the unrounded model's


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_tiny_llama_matches_transformers_with_fp8_kv(tiny_model_factory, backend):
    path = tiny_model_factory("llama")
    check_against_transformers(fp8_cache_runner(path, backend), path)


@pytest.mark.parametrize("form, backend", [("absorbed", "torch_native"), ("expanded", "torch_native"),
                                           ("absorbed", "triton")])
def test_tiny_deepseek_matches_transformers_with_fp8_latents(tmp_path, form, backend):
    """The expanded form's first chunk attends over freshly computed latents:
    they must be rounded as the cache holds them, or a prefix hit would change the answer."""
    from radixserve.layers.attention.mla import MLAAttention

    build_deepseek("v3", 1024, tmp_path)
    runner = fp8_cache_runner(tmp_path, backend)
    for module in runner.model.modules():
        if isinstance(module, MLAAttention):
            module.form = form
    check_against_transformers(runner, tmp_path)


def test_fp8_cache_holds_more_tokens(tiny_model_factory):
    """The same memory budget holds 4x the tokens of a float32 cache."""
    from radixserve.model_executor.model_runner import ModelRunner

    path = tiny_model_factory("llama")
    runners = {name: ModelRunner(ServerArgs(model_path=str(path), device="cpu", kv_cache_dtype=name,
                                            mem_fraction_static=0.01)) for name in ("auto", "fp8_e4m3")}
    assert runners["auto"].kv_bytes_per_token == 4 * runners["fp8_e4m3"].kv_bytes_per_token
    assert runners["fp8_e4m3"].max_total_num_tokens >= 3.9 * runners["auto"].max_total_num_tokens
