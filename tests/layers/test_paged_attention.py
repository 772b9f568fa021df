"""The Triton attention backend against the torch-native one, on the same
paged KV pools. On CPU the kernels run under TRITON_INTERPRET=1 (conftest) at
tiny sizes; with CUDA the same tests run at Llama-3-8B head shapes."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers.attention.radix_attention import RadixAttention
from radixserve.layers.attention.torch_native import TorchNativeAttnBackend
from radixserve.layers.attention.triton_attn_backend import TritonAttnBackend
from radixserve.mem_cache.allocator import KVPool, ReqToTokenPool, TokenAllocator
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# With CUDA every test runs at real sizes: `pytest -m gpu` selects them there.
pytestmark = [pytest.mark.gpu] if CUDA else []
HEAD_DIM = 128 if CUDA else 16
KV_HEADS = 8 if CUDA else 2
# Prefix and new-token lengths per request (prefix 0, a 1-token extend, a long prefix).
EXTEND_CASES = ([(0, 9), (5, 1), (23, 17), (0, 1)] if not CUDA
                else [(0, 700), (300, 1), (2500, 333), (0, 1), (64, 64)])
DECODE_LENS = [1, 7, 40, 2] if not CUDA else [1, 130, 5000, 17, 1024]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class Pools:
    """A KV pool and request table filled with random KV for requests of given lengths."""

    def __init__(self, lengths, page_size, dtype, seed=0):
        total = sum(-(-n // page_size) * page_size for n in lengths) + 4 * page_size
        self.alloc = TokenAllocator(total, page_size, DEVICE)
        self.table = ReqToTokenPool(len(lengths) + 1, max(lengths) + 2, DEVICE)
        self.kv = KVPool(self.alloc.num_slots, 1, KV_HEADS, HEAD_DIM, dtype, DEVICE)
        g = torch.Generator().manual_seed(seed)
        self.kv.k_buffers[0].copy_(torch.randn(self.kv.k_buffers[0].shape, generator=g))
        self.kv.v_buffers[0].copy_(torch.randn(self.kv.v_buffers[0].shape, generator=g))
        # Rows in reverse order, so row index and request index differ.
        self.rows = [self.table.alloc() for _ in lengths]
        for row, n in zip(self.rows, lengths):
            self.table.req_to_token[row, :n] = self.alloc.alloc_extend([0], [n], [0])


def layer(group: int) -> RadixAttention:
    return RadixAttention(KV_HEADS * group, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS, layer_id=0)


def run_both(fb_factory, q, k, v, attn, num_splits=None):
    outs = []
    for backend in (TorchNativeAttnBackend(), TritonAttnBackend(DEVICE)):
        fb = fb_factory(backend)
        backend.init_forward_metadata(fb)
        if num_splits is not None and isinstance(backend, TritonAttnBackend):
            fb.attn_metadata = num_splits  # force a split count (the CPU's default is 1)
        outs.append(backend.forward(q, k, v, attn, fb))
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("page_size", [1, 16])
def test_extend_matches_torch_native(dtype, group, page_size):
    prefixes, extends = zip(*EXTEND_CASES)
    seqs = [p + e for p, e in zip(prefixes, extends)]
    pools = Pools(seqs, page_size, dtype)
    total = sum(extends)
    g = torch.Generator().manual_seed(1)
    attn = layer(group)
    q = torch.randn(total, attn.num_heads * HEAD_DIM, generator=g).to(DEVICE, dtype)
    k = torch.randn(total, KV_HEADS * HEAD_DIM, generator=g).to(DEVICE, dtype)
    v = torch.randn(total, KV_HEADS * HEAD_DIM, generator=g).to(DEVICE, dtype)
    out_loc = torch.cat([pools.table.req_to_token[r, p:s] for r, p, s in zip(pools.rows, prefixes, seqs)])
    extend_lens = torch.tensor(extends, device=DEVICE)

    def fb(backend):
        return ForwardBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=len(seqs), input_ids=torch.zeros(total, dtype=torch.int64),
            positions=torch.zeros(total, dtype=torch.int64), req_pool_indices=torch.tensor(pools.rows, device=DEVICE),
            seq_lens=torch.tensor(seqs, device=DEVICE), out_cache_loc=out_loc, seq_lens_cpu=seqs,
            extend_prefix_lens=torch.tensor(prefixes, device=DEVICE), extend_seq_lens=extend_lens,
            extend_start_loc=torch.cumsum(extend_lens, 0) - extend_lens,
            extend_prefix_lens_cpu=list(prefixes), extend_seq_lens_cpu=list(extends),
            req_to_token_pool=pools.table, kv_pool=pools.kv, attn_backend=backend,
        )

    ref, ours = run_both(fb, q, k, v, attn)
    assert rel(ours, ref) < TOL[dtype]


def decode_batch(pools, lens, backend, q_len):
    return ForwardBatch(
        forward_mode=ForwardMode.DECODE, batch_size=len(lens), input_ids=torch.zeros(q_len, dtype=torch.int64),
        positions=torch.zeros(q_len, dtype=torch.int64), req_pool_indices=torch.tensor(pools.rows, device=DEVICE),
        seq_lens=torch.tensor(lens, device=DEVICE),
        out_cache_loc=torch.stack([pools.table.req_to_token[r, n - 1] for r, n in zip(pools.rows, lens)]),
        seq_lens_cpu=list(lens), req_to_token_pool=pools.table, kv_pool=pools.kv, attn_backend=backend,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("num_splits", [None, 4])
def test_decode_matches_torch_native(dtype, group, page_size, num_splits):
    pools = Pools(DECODE_LENS, page_size, dtype)
    attn = layer(group)
    g = torch.Generator().manual_seed(2)
    bs = len(DECODE_LENS)
    q = torch.randn(bs, attn.num_heads * HEAD_DIM, generator=g).to(DEVICE, dtype)
    k = torch.randn(bs, KV_HEADS * HEAD_DIM, generator=g).to(DEVICE, dtype)
    v = torch.randn(bs, KV_HEADS * HEAD_DIM, generator=g).to(DEVICE, dtype)
    ref, ours = run_both(lambda b: decode_batch(pools, DECODE_LENS, b, bs), q, k, v, attn, num_splits)
    assert rel(ours, ref) < TOL[dtype]


@pytest.mark.parametrize("num_splits", [None, 4])
def test_decode_with_the_large_batch_tiles(monkeypatch, num_splits):
    """The tiles a large bfloat16 batch takes (decode_tiles: 32 keys, 2 warps),
    forced onto a small batch, against the torch backend."""
    from radixserve.layers.attention import paged_attention

    monkeypatch.setattr(paged_attention, "MANY_DECODE_PROGRAMS", 1)
    assert paged_attention.decode_tiles(torch.bfloat16, torch.bfloat16, HEAD_DIM, 1, False).block_n == 32
    pools = Pools(DECODE_LENS, 1, torch.bfloat16)
    attn = layer(4)
    g = torch.Generator().manual_seed(3)
    bs = len(DECODE_LENS)
    q, k, v = (torch.randn(bs, n * HEAD_DIM, generator=g).to(DEVICE, torch.bfloat16)
               for n in (attn.num_heads, KV_HEADS, KV_HEADS))
    ref, ours = run_both(lambda b: decode_batch(pools, DECODE_LENS, b, bs), q, k, v, attn, num_splits)
    assert rel(ours, ref) < TOL[torch.bfloat16]


def test_decode_replays_with_new_values_in_the_same_buffers():
    """The CUDA-graph pattern: inputs overwritten in place, kernel run again;
    plus a padding row (seq_len 1 on the table's zero row) and seq_len 0."""
    lens = DECODE_LENS
    pools = Pools(lens, 1, torch.float32)
    attn = layer(4)
    backend = TritonAttnBackend(DEVICE)
    bs = len(lens)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(bs, attn.num_heads * HEAD_DIM, generator=g).to(DEVICE)
    kv = torch.randn(bs, KV_HEADS * HEAD_DIM, generator=g).to(DEVICE)
    fb = decode_batch(pools, lens, backend, bs)
    backend.init_forward_metadata(fb)
    fb.attn_metadata = 4  # several splits, one of them empty for the short rows
    backend.forward(q, kv, kv, attn, fb)
    # New lengths and queries written into the same tensors.
    new_lens = [max(n - 1, 1) for n in lens]
    fb.seq_lens.copy_(torch.tensor(new_lens, device=DEVICE))
    fb.out_cache_loc.copy_(torch.stack([pools.table.req_to_token[r, n - 1] for r, n in zip(pools.rows, new_lens)]))
    q.copy_(torch.randn(q.shape, generator=g))
    fb.req_pool_indices[-1] = pools.table.padding_row
    fb.seq_lens[-1] = 1
    fb.out_cache_loc[-1] = 0
    got = backend.forward(q, kv, kv, attn, fb)
    ref_fb = decode_batch(pools, new_lens, TorchNativeAttnBackend(), bs)
    ref_fb.req_pool_indices.copy_(fb.req_pool_indices)
    ref_fb.seq_lens.copy_(fb.seq_lens)
    ref_fb.seq_lens_cpu = fb.seq_lens.tolist()
    ref_fb.out_cache_loc.copy_(fb.out_cache_loc)
    ref_fb.attn_backend.init_forward_metadata(ref_fb)
    ref = ref_fb.attn_backend.forward(q, kv, kv, attn, ref_fb)
    assert rel(got, ref) < 1e-5
    fb.seq_lens[-1] = 0  # a zero-length row gives zeros, not NaN
    got = backend.forward(q, kv, kv, attn, fb)
    assert torch.isfinite(got).all() and not got[-1].any()


def test_engine_greedy_same_with_either_backend(tiny_model_factory):
    """Through the whole engine (chunked prefill, a cached prefix, paged KV, the
    overlap schedule): greedy tokens identical with the Triton backend."""
    from radixserve import Engine

    path = tiny_model_factory("llama")
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(10, 2000, (20,), generator=g).tolist()
    prompts = [torch.randint(10, 2000, (n,), generator=g).tolist() for n in (3, 11, 26)]
    prompts.append(shared + prompts[0])
    params = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    outs, gaps = {}, []
    for backend in ("torch_native", "triton"):
        # float32 also on CUDA (whose default is bfloat16, where greedy ties are common)
        with Engine(model_path=str(path), attention_backend=backend, page_size=4, chunked_prefill_size=16,
                    dtype="float32", log_level="warning") as engine:
            engine.generate(input_ids=shared + [7], sampling_params=params)  # cache the shared prefix
            results = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True,
                                      top_logprobs_num=2)
            outs[backend] = [o["output_ids"] for o in results]
            # The margin of each greedy choice, to tell a real difference from a near-tie.
            gaps.append([[round(t[0][0] - t[1][0], 7) for t in o["meta_info"]["output_top_logprobs"]]
                         for o in results])
            assert engine.get_server_info()["num_prefill_tokens"] > 0
    assert outs["triton"] == outs["torch_native"], gaps


# --- sliding window and attention sinks -------------------------------------------------------

# Prefix and new-token lengths: one request longer than an extend tile (32 on
# the CPU), on top of a prefix longer than the windows below.
WINDOW_EXTEND_CASES = [(0, 9), (5, 1), (23, 17), (0, 1), (30, 45)] if not CUDA else [(0, 700), (300, 1), (2500, 333)]
WINDOW_DECODE_LENS = [1, 7, 40, 2, 75] if not CUDA else [1, 130, 5000, 17, 1024]
# (sliding window, with sinks, page size): a window of one token, windows
# smaller than a KV page and an extend tile, one longer than most requests.
WINDOW_SINK_CASES = [(1, False, 1), (5, False, 16), (5, True, 1), (None, True, 16), (24, True, 16)]


def windowed_layer(group: int, window, with_sinks: bool) -> RadixAttention:
    sinks = None
    if with_sinks:
        # Large enough to matter next to the scores, on both sides of them.
        sinks = (2 * torch.randn(KV_HEADS * group, generator=torch.Generator().manual_seed(9))).to(DEVICE)
    return RadixAttention(KV_HEADS * group, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS, layer_id=0,
                          sliding_window=window, sinks=sinks)


def reference_attention(pools, row, seq_len, q, first_query_pos, attn) -> torch.Tensor:
    """Plain softmax attention of queries at positions first_query_pos.. over a
    request's K/V in position order, written from the definitions: a query at p
    sees keys p - window + 1 .. p, and exp(sink) joins the denominator.
    q [Q, heads*D] -> [Q, heads*D] float32."""
    slots = pools.table.req_to_token[row, :seq_len].long()
    group = attn.num_heads // attn.num_kv_heads
    k = pools.kv.k_buffers[0][slots].float().repeat_interleave(group, dim=1)  # [L, heads, D]
    v = pools.kv.v_buffers[0][slots].float().repeat_interleave(group, dim=1)
    qh = q.float().view(q.shape[0], attn.num_heads, HEAD_DIM)
    logits = torch.einsum("qhd,lhd->hql", qh, k) * attn.scaling
    key_pos = torch.arange(seq_len, device=q.device)[None, :]
    query_pos = first_query_pos + torch.arange(q.shape[0], device=q.device)[:, None]
    visible = key_pos <= query_pos
    if attn.sliding_window is not None:
        visible &= key_pos > query_pos - attn.sliding_window
    logits = logits.masked_fill(~visible, float("-inf"))
    top = logits.amax(-1, keepdim=True)
    if attn.sinks is not None:
        top = torch.maximum(top, attn.sinks.float().view(-1, 1, 1))
    weights = torch.exp(logits - top)
    denominator = weights.sum(-1, keepdim=True)
    if attn.sinks is not None:
        denominator = denominator + torch.exp(attn.sinks.float().view(-1, 1, 1) - top)
    out = torch.einsum("hql,lhd->qhd", weights / denominator, v)
    return out.reshape(q.shape[0], -1)


def extend_batch(pools, cases, backend, total):
    prefixes, extends = zip(*cases)
    seqs = [p + e for p, e in cases]
    extend_lens = torch.tensor(extends, device=DEVICE)
    return ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=len(seqs), input_ids=torch.zeros(total, dtype=torch.int64),
        positions=torch.zeros(total, dtype=torch.int64), req_pool_indices=torch.tensor(pools.rows, device=DEVICE),
        seq_lens=torch.tensor(seqs, device=DEVICE),
        out_cache_loc=torch.cat([pools.table.req_to_token[r, p:s] for r, p, s in zip(pools.rows, prefixes, seqs)]),
        seq_lens_cpu=seqs, extend_prefix_lens=torch.tensor(prefixes, device=DEVICE), extend_seq_lens=extend_lens,
        extend_start_loc=torch.cumsum(extend_lens, 0) - extend_lens,
        extend_prefix_lens_cpu=list(prefixes), extend_seq_lens_cpu=list(extends),
        req_to_token_pool=pools.table, kv_pool=pools.kv, attn_backend=backend,
    )


def poison_outside_windows(pools, first_seen) -> None:
    """NaN into the K/V of positions no query may read: any read of them shows."""
    for row, first in zip(pools.rows, first_seen):
        slots = pools.table.req_to_token[row, :max(first, 0)].long()
        pools.kv.k_buffers[0][slots] = float("nan")
        pools.kv.v_buffers[0][slots] = float("nan")


@pytest.mark.parametrize("window,with_sinks,page_size", WINDOW_SINK_CASES)
def test_extend_with_window_and_sinks(window, with_sinks, page_size):
    cases = WINDOW_EXTEND_CASES
    seqs = [p + e for p, e in cases]
    pools = Pools(seqs, page_size, torch.float32)
    attn = windowed_layer(4, window, with_sinks)
    total = sum(e for _, e in cases)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(total, n * HEAD_DIM, generator=g).to(DEVICE)
               for n in (attn.num_heads, KV_HEADS, KV_HEADS))
    ref_native, ours = run_both(lambda b: extend_batch(pools, cases, b, total), q, k, v, attn)
    # The K/V of the new tokens are in the pool now: the plain reference reads them there.
    starts = [0] + torch.cumsum(torch.tensor([e for _, e in cases]), 0).tolist()
    plain = torch.cat([reference_attention(pools, row, p + e, q[s:s + e], p, attn)
                       for row, (p, e), s in zip(pools.rows, cases, starts)])
    assert rel(ref_native, plain) < 1e-5
    assert rel(ours, plain) < 1e-5
    if window is not None:
        # Keys before every query's window are never read, by either backend.
        poison_outside_windows(pools, [p - window + 1 for p, _ in cases])
        again = run_both(lambda b: extend_batch(pools, cases, b, total), q, k, v, attn)
        assert all(torch.equal(a, b) for a, b in zip(again, (ref_native, ours)))


@pytest.mark.parametrize("window,with_sinks,page_size", WINDOW_SINK_CASES)
@pytest.mark.parametrize("num_splits", [1, 8])
def test_decode_with_window_and_sinks(window, with_sinks, page_size, num_splits):
    lens = WINDOW_DECODE_LENS
    pools = Pools(lens, page_size, torch.float32)
    attn = windowed_layer(4, window, with_sinks)
    bs = len(lens)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(bs, attn.num_heads * HEAD_DIM, generator=g).to(DEVICE)
    k = torch.randn(bs, KV_HEADS * HEAD_DIM, generator=g).to(DEVICE)
    v = torch.randn(bs, KV_HEADS * HEAD_DIM, generator=g).to(DEVICE)
    ref_native, ours = run_both(lambda b: decode_batch(pools, lens, b, bs), q, k, v, attn, num_splits)
    plain = torch.cat([reference_attention(pools, row, n, q[i:i + 1], n - 1, attn)
                       for i, (row, n) in enumerate(zip(pools.rows, lens))])
    assert rel(ref_native, plain) < 1e-5
    assert rel(ours, plain) < 1e-5
    if window is not None:
        # Every split stays inside the window: poisoned keys before it are never read.
        poison_outside_windows(pools, [n - window for n in lens])
        backend = TritonAttnBackend(DEVICE)
        fb = decode_batch(pools, lens, backend, bs)
        backend.init_forward_metadata(fb)
        fb.attn_metadata = num_splits
        assert torch.equal(backend.forward(q, k, v, attn, fb), ours)


@pytest.mark.parametrize("window", [None, 5])
def test_sinks_in_bfloat16_against_the_definition(monkeypatch, window):
    """torch_native's attention with sinks (matmuls, not SDPA) in bfloat16,
    decode and extend, against the definition; on the CPU its keys are padded
    with masked zeros to their bucket (75 -> 80), so the bfloat16 matmuls meet
    a few key counts rather than a new one every step (cpu_gemm_rows)."""
    from radixserve.layers.attention import torch_native
    from radixserve.layers.cpu_gemm_rows import bucketed_row_count

    key_counts = []

    def spy(keys, values, mask):
        out = pad_keys(keys, values, mask)
        key_counts.append(out[0].shape[-2])
        return out

    pad_keys = torch_native.pad_keys
    monkeypatch.setattr(torch_native, "pad_keys", spy)
    attn = windowed_layer(4, window, True)
    attn.sinks = attn.sinks.to(torch.bfloat16)
    g = torch.Generator().manual_seed(10)
    lens = WINDOW_DECODE_LENS
    pools = Pools(lens, 16, torch.bfloat16)
    q, k, v = (torch.randn(len(lens), n * HEAD_DIM, generator=g).to(DEVICE, torch.bfloat16)
               for n in (attn.num_heads, KV_HEADS, KV_HEADS))
    backend = TorchNativeAttnBackend()
    fb = decode_batch(pools, lens, backend, len(lens))
    backend.init_forward_metadata(fb)
    out = backend.forward(q, k, v, attn, fb)
    plain = torch.cat([reference_attention(pools, row, n, q[i:i + 1], n - 1, attn)
                       for i, (row, n) in enumerate(zip(pools.rows, lens))])
    assert rel(out, plain) < 1e-2  # bfloat16 inputs and arithmetic: 2.4e-3 to 3.6e-3 seen
    cases = WINDOW_EXTEND_CASES
    pools = Pools([p + e for p, e in cases], 16, torch.bfloat16)
    total = sum(e for _, e in cases)
    q, k, v = (torch.randn(total, n * HEAD_DIM, generator=g).to(DEVICE, torch.bfloat16)
               for n in (attn.num_heads, KV_HEADS, KV_HEADS))
    fb = extend_batch(pools, cases, backend, total)
    backend.init_forward_metadata(fb)
    out = backend.forward(q, k, v, attn, fb)
    starts = [0] + torch.cumsum(torch.tensor([e for _, e in cases]), 0).tolist()
    plain = torch.cat([reference_attention(pools, row, p + e, q[s:s + e], p, attn)
                       for row, (p, e), s in zip(pools.rows, cases, starts)])
    assert rel(out, plain) < 1e-2  # bfloat16 inputs and arithmetic: 2.4e-3 to 3.6e-3 seen
    if not CUDA and torch_native._decode_dtype(q, len(lens)) == torch.bfloat16:
        assert key_counts and all(bucketed_row_count(n) == n for n in key_counts)
        assert 80 in key_counts  # the 75 keys of the longest decode and of the (30, 45) extend


def test_sinks_and_window_in_bfloat16():
    """bf16 activations, KV and sinks (a bf16 model holds its sinks in bf16): Triton vs torch-native."""
    lens = WINDOW_DECODE_LENS
    pools = Pools(lens, 16, torch.bfloat16)
    attn = windowed_layer(4, 5, True)
    attn.sinks = attn.sinks.to(torch.bfloat16)
    bs = len(lens)
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(bs, n * HEAD_DIM, generator=g).to(DEVICE, torch.bfloat16)
               for n in (attn.num_heads, KV_HEADS, KV_HEADS))
    ref, ours = run_both(lambda b: decode_batch(pools, lens, b, bs), q, k, v, attn, 4)
    assert rel(ours, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("window,with_sinks", [(None, False), (5, True)])
def test_fixed_split_decode_is_batch_invariant(window, with_sinks):
    """Deterministic decode: splits of a fixed number of positions. The output
    matches the reference, and each request's bits are the same alone and in
    the batch (the split count no longer follows the batch size), however
    many programs share the splits (the backend gives large batches fewer)."""
    from radixserve.layers.attention.paged_attention import decode_attention

    lens = WINDOW_DECODE_LENS
    split_tokens = 16 if not CUDA else 256
    num_splits = triton_next_pow2(-(-max(lens) // split_tokens))
    pools = Pools(lens, 1, torch.float32)
    attn = windowed_layer(4, window, with_sinks)
    bs = len(lens)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(bs, attn.num_heads * HEAD_DIM, generator=g).to(DEVICE)
    table = pools.table.req_to_token

    def run(rows, programs=None):
        out = torch.empty(len(rows), q.shape[1], device=DEVICE)
        decode_attention(q[rows], pools.kv.k_buffers[0], pools.kv.v_buffers[0], out, table,
                         torch.tensor([pools.rows[i] for i in rows], device=DEVICE),
                         torch.tensor([lens[i] for i in rows], device=DEVICE), attn.scaling, num_splits,
                         sliding_window=window, sinks=attn.sinks, split_tokens=split_tokens, split_programs=programs)
        return out

    assert num_splits >= 4  # several splits, so sharing programs changes who computes which
    batched = run(list(range(bs)), programs=1)
    plain = torch.cat([reference_attention(pools, row, n, q[i:i + 1], n - 1, attn)
                       for i, (row, n) in enumerate(zip(pools.rows, lens))])
    assert rel(batched, plain) < 1e-5
    assert torch.equal(run(list(range(bs)), programs=3), batched)
    for i in range(bs):
        assert torch.equal(run([i]), batched[i:i + 1]), i
    if window is None and not with_sinks:
        # A request within one split skips the merge: its bits are those a
        # one-split merge gives (the default mode with one split, same tile).
        short = [i for i in range(bs) if lens[i] <= split_tokens]
        assert short and len(short) < bs
        one_split = torch.empty(len(short), q.shape[1], device=DEVICE)
        decode_attention(q[short], pools.kv.k_buffers[0], pools.kv.v_buffers[0], one_split, table,
                         torch.tensor([pools.rows[i] for i in short], device=DEVICE),
                         torch.tensor([lens[i] for i in short], device=DEVICE), attn.scaling, 1)
        assert torch.equal(one_split, batched[short])


def triton_next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# --- mixed batches (--enable-mixed-chunk) ---------------------------------------------------------

@pytest.mark.parametrize("window,with_sinks,page_size", [(None, False, 1), (None, False, 16), (5, True, 16)])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_mixed_batch_matches_plain_attention(window, with_sinks, page_size, num_splits):
    """Decode rows first, then extend rows, in one batch: the Triton backend
    sends the decode rows to its decode kernel and the rest to its extend
    kernel; both halves equal attention written from the definition."""
    decode_lens = WINDOW_DECODE_LENS
    cases = WINDOW_EXTEND_CASES
    lens = decode_lens + [p + e for p, e in cases]
    pools = Pools(lens, page_size, torch.float32)
    attn = windowed_layer(4, window, with_sinks)
    n, total = len(decode_lens), len(decode_lens) + sum(e for _, e in cases)
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(total, h * HEAD_DIM, generator=g).to(DEVICE) for h in (attn.num_heads, KV_HEADS, KV_HEADS))
    # A decode row is an extend of one token on top of the rest of its request.
    rows = [(d - 1, 1) for d in decode_lens] + cases
    prefixes, extends = zip(*rows)

    def mixed_batch(backend):
        fb = extend_batch(pools, rows, backend, total)
        fb.forward_mode, fb.num_decode_rows = ForwardMode.MIXED, n
        return fb

    outs = []
    for backend in (TorchNativeAttnBackend(), TritonAttnBackend(DEVICE)):
        fb = mixed_batch(backend)
        backend.init_forward_metadata(fb)
        if isinstance(backend, TritonAttnBackend):
            fb.attn_metadata.decode_splits = num_splits  # (the CPU's default is 1)
        outs.append(backend.forward(q, k, v, attn, fb))
    starts = torch.cumsum(torch.tensor(extends), 0) - torch.tensor(extends)
    plain = torch.cat([reference_attention(pools, row, s, q[st:st + e], p, attn)
                       for row, s, p, e, st in zip(pools.rows, lens, prefixes, extends, starts.tolist())])
    for out in outs:
        assert rel(out[:n], plain[:n]) < 1e-5 and rel(out[n:], plain[n:]) < 1e-5

