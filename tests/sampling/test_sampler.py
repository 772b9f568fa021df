"""The batched sampler and SamplingBatchInfo against direct computations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.layers import cpu_kernels
from radixserve.layers.sampler import (
    Sampler, apply_logit_processors, filter_logits, row_argmax, seeded_gumbel, seeded_uniform,
)
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo
from radixserve.sampling.sampling_params import SamplingParams

VOCAB = 8
EOS = 0


def make_req(seed=0, output=(), prompt=(1, 2), logprob=False, top=0, **params):
    sp = SamplingParams.from_dict(params)
    sp.verify(1000)
    sp.normalize()
    return SimpleNamespace(sampling_params=sp, origin_input_ids=list(prompt), output_ids=list(output),
                           sampling_seed=seed, return_logprob=logprob, top_logprobs_num=top)


def batch_info(reqs, vocab=VOCAB, eos=(EOS,), device="cpu"):
    return SamplingBatchInfo.from_reqs(reqs, vocab, device, set(eos))


def sample(logits, reqs, **kw):
    return Sampler().forward(logits, batch_info(reqs, vocab=logits.shape[-1], **kw)).next_token_ids


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- greedy


def test_top_k_1_and_temperature_0_are_argmax():
    logits = randn(64, 50)
    reqs = [make_req(seed=i, top_k=1) if i % 2 else make_req(seed=i, temperature=0) for i in range(64)]
    assert torch.equal(sample(logits, reqs), logits.argmax(-1))
    # Greedy rows mixed with sampled rows still take the argmax.
    mixed = [make_req(seed=i, temperature=0) if i % 2 else make_req(seed=i) for i in range(64)]
    out = sample(logits, mixed)
    assert torch.equal(out[1::2], logits.argmax(-1)[1::2])


# ---------------------------------------------------------------- determinism


def _decode(reqs, logits_per_step, row):
    """Run a decode loop; returns row `row`'s tokens."""
    info = batch_info(reqs, vocab=logits_per_step[0].shape[-1])
    tokens = []
    for logits in logits_per_step:
        ids = Sampler().forward(logits, info).next_token_ids
        info.record(ids)
        tokens.append(ids[row].item())
    return tokens


@pytest.fixture(params=["torch", "cpu_kernel"])
def sampling_path(request):
    """Unfiltered sampled rows on the CPU: torch's noise and argmax (with
    autograd on, as in these tests), or the fused kernel (cpu_kernels.
    gumbel_argmax), which the engine's inference mode takes."""
    if request.param == "torch":
        yield request.param
        return
    assert cpu_kernels.available()
    with torch.inference_mode():
        yield request.param


def test_the_fused_kernel_picks_what_torch_picks():
    """cpu_kernels.gumbel_argmax against argmax(logits / t + seeded_gumbel):
    the same pick on every row whose two best torch values are not within
    float32 noise of each other (the kernel's logarithms differ in the last bits)."""
    g = torch.Generator().manual_seed(11)
    rows, vocab = 512, 1000
    logits = torch.randn(rows, vocab, generator=g) * 4
    temperatures = torch.rand(rows, generator=g) * 1.5 + 0.1
    seeds = torch.randint(-2**62, 2**62, (rows,), generator=g)
    steps = torch.randint(0, 5000, (rows,), generator=g)
    values = logits / temperatures[:, None] + seeded_gumbel(seeds, steps, vocab)
    with torch.inference_mode():
        picked = cpu_kernels.gumbel_argmax(logits, temperatures, seeds, steps)
    best_two = values.topk(2, dim=-1).values
    clear = (best_two[:, 0] - best_two[:, 1]) > 1e-4 * best_two[:, 0].abs().clamp(min=1)
    assert clear.sum() > 500
    assert torch.equal(picked[clear], row_argmax(values)[clear])
    assert cpu_kernels.gumbel_argmax(logits.double(), temperatures, seeds, steps) is None  # float32 rows only


def test_seeded_row_same_alone_and_in_any_batch(sampling_path):
    vocab, steps = 50, 12
    mine = [randn(1, vocab, seed=100 + s) for s in range(steps)]
    others = [randn(5, vocab, seed=200 + s) for s in range(steps)]
    target = dict(seed=1234, output=[3, 4], temperature=0.8, top_p=0.9)
    alone = _decode([make_req(**target)], mine, row=0)
    neighbours = [make_req(seed=7, top_k=5, min_p=0.1), make_req(temperature=0),
                  make_req(seed=8, frequency_penalty=1.0, output=[1, 1]), make_req(seed=9, logit_bias={"3": 5}),
                  make_req(seed=10, min_new_tokens=3, repetition_penalty=1.3)]
    batch = [torch.cat([o[:2], m, o[2:]]) for o, m in zip(others, mine)]
    together = _decode(neighbours[:2] + [make_req(**target)] + neighbours[2:], batch, row=2)
    assert alone == together
    # And the global RNG is neither read nor advanced.
    torch.manual_seed(999)
    state = torch.random.get_rng_state()
    assert _decode([make_req(**target)], mine, row=0) == alone
    assert torch.equal(torch.random.get_rng_state(), state)


def test_different_seeds_and_steps_differ(sampling_path):
    flat = torch.zeros(256, 1000)  # uniform: every token equally likely
    by_seed = sample(flat, [make_req(seed=s) for s in range(256)])
    # 256 draws from 1000 tokens: about 30 repeats expected, not 200.
    assert len(set(by_seed.tolist())) > 200
    info = batch_info([make_req(seed=5) for _ in range(256)], vocab=1000)
    info.steps = torch.arange(256)
    by_step = Sampler().forward(flat, info).next_token_ids
    assert len(set(by_step.tolist())) > 200


def test_seed_and_step_are_not_interchangeable():
    seeds, steps = torch.tensor([3, 5, -1, 2**40]), torch.tensor([5, 3, 0, 0])
    u = seeded_uniform(seeds, steps, 64)
    assert not torch.equal(u[0], u[1])  # seed 3 at step 5 vs seed 5 at step 3
    assert not torch.equal(u[2], u[3])
    assert ((u > 0) & (u < 1)).all()


def _chi_square(tokens, probs):
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * n
    return (((counts - expected) ** 2) / expected).sum().item()


# Chi-square with 7 degrees of freedom: P(stat > 24.3) = 0.001. The noise is a
# fixed function of (seed, step, token), so these are not flaky: they either
# always pass or always fail.
CHI2_7_P001 = 24.3


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_distribution_over_seeds_matches_softmax(temperature, sampling_path):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 1.5, 0.2]])
    draws = 20000
    tokens = sample(logits.expand(draws, -1), [make_req(seed=s, temperature=temperature) for s in range(draws)])
    assert _chi_square(tokens, torch.softmax(logits[0] / temperature, -1)) < CHI2_7_P001


def test_distribution_over_steps_matches_softmax(sampling_path):
    logits = torch.tensor([[0.3, -0.5, 1.2, 0.0, 0.8, -1.5, 0.1, 0.6]])
    draws = 20000
    info = batch_info([make_req(seed=42) for _ in range(draws)])
    info.steps = torch.arange(draws)
    tokens = Sampler().forward(logits.expand(draws, -1), info).next_token_ids
    assert _chi_square(tokens, torch.softmax(logits[0], -1)) < CHI2_7_P001


def test_adjacent_seeds_are_independent():
    # n > 1 fans out seeds s, s+1, ...: their draws must not be correlated.
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, 0.2, 0.1, -1.0, 0.7]])
    draws = 20000
    tokens = sample(logits.expand(draws, -1), [make_req(seed=s) for s in range(draws)])
    agree = (tokens[:-1] == tokens[1:]).double().mean().item()
    p = torch.softmax(logits[0], -1).double()
    expected = (p * p).sum().item()
    assert abs(agree - expected) < 4 * (expected * (1 - expected) / draws) ** 0.5


# ---------------------------------------------------------------- filters


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.floats(-5, 5, width=32), min_size=2, max_size=16),
       top_k=st.sampled_from([-1, 0, 1, 2, 3, 5, 8]), top_p=st.floats(0.01, 1.0),
       min_p=st.floats(0.0, 1.0), temperature=st.floats(0.1, 2.0), seed=st.integers(-(2**63), 2**63 - 1))
def test_filters_never_keep_excluded_tokens(values, top_k, top_p, min_p, temperature, seed):
    eps = 1e-5
    logits = torch.tensor([values])
    rows = 32
    reqs = [make_req(seed=seed + i, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature)
            for i in range(rows)]
    info = batch_info(reqs, vocab=len(values))
    drawn = set(Sampler().forward(logits.expand(rows, -1), info).next_token_ids.tolist())
    if top_k == 1:  # a greedy row: the sampler takes the argmax and filter_logits does not apply
        kept = set(torch.nonzero(logits[0] == logits[0].max()).flatten().tolist())
    else:
        kept = set(torch.nonzero(filter_logits(logits.expand(rows, -1), info)[0] > float("-inf")).flatten().tolist())
    assert drawn <= kept

    p = torch.softmax(torch.tensor(values, dtype=torch.float64) / temperature, -1).tolist()
    top = max(p)
    for t, pt in enumerate(p):
        above = [q for q in p if q > pt + eps]  # surely ranked before t
        at_least = [q for u, q in enumerate(p) if u != t and q >= pt - eps]  # maybe ranked before t
        surely_out = (top_k > 0 and len(above) >= top_k) or (top_p < 1 and sum(above) >= top_p + eps) \
            or pt < min_p * top - eps
        surely_in = (top_k <= 0 or len(at_least) < top_k) and (top_p == 1 or sum(at_least) < top_p - eps) \
            and pt >= min_p * top + eps
        if pt >= top - eps * 1e-3 and not above:
            surely_out = False  # the most likely token always stays
        assert not (surely_out and t in kept), (t, p)
        assert not (surely_in and t not in kept), (t, p)
    assert any(t in kept for t, pt in enumerate(p) if pt >= top * (1 - 1e-6))  # a most likely token stays


@pytest.mark.parametrize("params,kept", [
    (dict(top_k=2), {0, 1}), (dict(top_k=0), {0, 1, 2, 3, 4}), (dict(top_k=-1), {0, 1, 2, 3, 4}),
    (dict(top_p=0.45), {0}), (dict(top_p=0.55), {0, 1}), (dict(top_p=0.8), {0, 1, 2}),
    (dict(min_p=0.35), {0, 1}), (dict(min_p=0.25), {0, 1, 2}), (dict(min_p=0.15), {0, 1, 2, 3}),
    (dict(top_k=3, top_p=0.55, min_p=0.05), {0, 1}),
])
def test_filters_keep_exactly(params, kept):
    # Probabilities by rank; `kept` lists ranks. Boundaries sit away from the
    # parameters, so float rounding cannot decide.
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])  # cumulative: .5 .7 .85 .95 1
    rank_of_column = torch.tensor([3, 0, 4, 1, 2])  # shuffled: token order must not matter
    logits = probs.log()[rank_of_column][None]
    filtered = filter_logits(logits, batch_info([make_req(**params)], vocab=5))[0]
    got = {int(rank_of_column[c]) for c in range(5) if filtered[c] > float("-inf")}
    assert got == kept


def test_tight_filters_leave_only_the_top_token():
    logits = randn(16, 40, seed=3)
    for params in (dict(top_p=1e-4), dict(min_p=1.0), dict(top_k=1, temperature=2.0)):
        reqs = [make_req(seed=i, **params) for i in range(16)]
        assert torch.equal(sample(logits, reqs), logits.argmax(-1)), params


# ---------------------------------------------------------------- processors


def test_frequency_and_presence_penalties_exact():
    logits = randn(2, VOCAB, seed=4)
    reqs = [make_req(output=[2, 2, 5, 2], frequency_penalty=0.5, presence_penalty=0.25), make_req(output=[2])]
    info = batch_info(reqs)
    got = apply_logit_processors(logits, info)
    expected = logits.clone()
    expected[0, 2] -= 3 * 0.5 + 0.25
    expected[0, 5] -= 1 * 0.5 + 0.25
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(got[1], logits[1])  # the other row is untouched


def test_repetition_penalty_only_on_seen_tokens():
    logits = torch.tensor([[1.0, -2.0, 3.0, -0.5, 0.0, 1.0, 2.0, -1.0]])
    info = batch_info([make_req(prompt=[1, 2], output=[3, 4], repetition_penalty=2.0)])
    got = apply_logit_processors(logits, info)[0]
    expected = torch.tensor([1.0, -4.0, 1.5, -1.0, 0.0, 1.0, 2.0, -1.0])
    assert torch.equal(got, expected)


def test_logit_bias_forces_a_token():
    logits = randn(200, VOCAB, seed=5)
    reqs = [make_req(seed=i, logit_bias={"6": 100}) for i in range(200)]
    assert (sample(logits, reqs) == 6).all()
    got = apply_logit_processors(logits[:1], batch_info(reqs[:1]))
    assert got[0, 6] == logits[0, 6] + 100 and torch.equal(got[0, :6], logits[0, :6])


def test_min_new_tokens_blocks_stop_tokens_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0  # EOS is by far the most likely
    logits[0, 5] = 9.0  # then the stop token
    info = batch_info([make_req(seed=1, min_new_tokens=2, stop_token_ids=[5])])
    masked = apply_logit_processors(logits, info)[0]
    assert masked[EOS] == float("-inf") and masked[5] == float("-inf") and masked[1] == 0.0
    for _ in range(2):
        token = Sampler().forward(logits, info).next_token_ids
        assert token.item() not in (EOS, 5)
        info.record(token)
    assert torch.equal(apply_logit_processors(logits, info), logits)
    assert Sampler().forward(logits, info).next_token_ids.item() == EOS


def test_min_new_tokens_respects_ignore_eos_and_output_so_far():
    logits = torch.zeros(2, VOCAB)
    reqs = [make_req(min_new_tokens=3, ignore_eos=True, stop_token_ids=[4]),
            make_req(min_new_tokens=3, output=[1, 1, 1])]  # already reached
    masked = apply_logit_processors(logits, batch_info(reqs))
    assert masked[0, EOS] == 0.0 and masked[0, 4] == float("-inf")
    assert torch.equal(masked[1], logits[1])


def test_only_needed_tensors_are_built():
    plain = batch_info([make_req(), make_req(temperature=0)])
    assert not plain.has_logit_processors and plain.output_counts is None and plain.stop_mask is None
    logits = randn(2, VOCAB)
    assert apply_logit_processors(logits, plain) is logits
    assert plain.steps.tolist() == [0, 0] and plain.temperatures.tolist() == [1.0, 1.0]
    full = batch_info([make_req(frequency_penalty=1), make_req(repetition_penalty=1.2, logit_bias={"1": 1},
                                                               min_new_tokens=1)])
    assert all(t is not None for t in (full.output_counts, full.seen_mask, full.logit_bias, full.stop_mask))


def test_record_updates_steps_and_counts():
    reqs = [make_req(output=[1], frequency_penalty=1.0, repetition_penalty=1.1, prompt=[7]), make_req(output=[])]
    info = batch_info(reqs)
    assert info.steps.tolist() == [1, 0]
    info.record(torch.tensor([3, 3]))
    info.record(torch.tensor([3, 2]))
    assert info.steps.tolist() == [3, 2]
    assert info.output_counts[0].tolist() == [0, 1, 0, 2, 0, 0, 0, 0]
    assert info.output_counts[1].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert info.seen_mask[0].nonzero().flatten().tolist() == [1, 3, 7]
    assert info.seen_mask[1].nonzero().flatten().tolist() == [1, 2, 3]  # the default prompt is [1, 2]


def test_out_of_vocab_ids_are_ignored():
    info = batch_info([make_req(output=[VOCAB + 3, 1], prompt=[VOCAB], frequency_penalty=1.0,
                                repetition_penalty=1.5)])
    assert info.output_counts.sum().item() == 1 and info.seen_mask.sum().item() == 1


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_of_the_raw_logits():
    logits = randn(4, VOCAB, seed=6)
    reqs = [make_req(seed=i, logprob=True, top=k, temperature=0.5, frequency_penalty=1.0, output=[1, 2])
            for i, k in enumerate([0, 3, 1, 2])]
    out = Sampler().forward(logits, batch_info(reqs))
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.next_token_ids[:, None])[:, 0])
    assert out.top_logprobs_val.shape == (4, 3)
    top = ref.topk(3, -1)
    assert torch.allclose(out.top_logprobs_val, top.values) and torch.equal(out.top_logprobs_idx, top.indices)
    assert (out.top_logprobs_val[:, :-1] >= out.top_logprobs_val[:, 1:]).all()


def test_no_logprobs_unless_asked():
    out = Sampler().forward(randn(2, VOCAB), batch_info([make_req(), make_req(top=3)]))
    assert out.logprobs is None and out.top_logprobs_val is None and out.top_logprobs_idx is None
    only = Sampler().forward(randn(2, VOCAB), batch_info([make_req(logprob=True), make_req()]))
    assert only.logprobs.shape == (2,) and only.top_logprobs_val is None
    assert only.next_token_ids.dtype == torch.int64 and only.logprobs.dtype == torch.float32


# ---------------------------------------------------------------- devices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    seeds = torch.tensor([0, 1, -5, 2**62 + 3])
    steps = torch.tensor([0, 7, 3, 100])
    assert torch.equal(seeded_uniform(seeds, steps, 1000), seeded_uniform(seeds.cuda(), steps.cuda(), 1000).cpu())
    logits = randn(64, 1000, seed=7)
    reqs = [make_req(seed=i, top_p=0.9, top_k=50, frequency_penalty=0.5, output=[i, 3]) for i in range(64)]
    cpu = Sampler().forward(logits, batch_info(reqs, vocab=1000)).next_token_ids
    cuda = Sampler().forward(logits.cuda(), batch_info(reqs, vocab=1000, device="cuda")).next_token_ids
    # Float math may differ in the last ulp; a token may flip only at a near tie.
    assert (cpu == cuda.cpu()).float().mean() > 0.95


def test_uniform_noise_never_reaches_0_or_1(monkeypatch):
    """The extreme hash values still map strictly inside (0, 1): u == 1 would
    make the Gumbel noise +inf and let a masked (-inf) token win."""
    from radixserve.layers import sampler as sampler_module

    seeds, steps = torch.arange(4), torch.zeros(4, dtype=torch.int64)
    for extreme in (0, 0xFFFFFFFF):
        monkeypatch.setattr(sampler_module, "_mix32", lambda x, v=extreme: torch.full_like(x, v))
        u = sampler_module.seeded_uniform(seeds, steps, 16)
        assert (u > 0).all() and (u < 1).all(), (extreme, u.max().item())
        assert torch.isfinite(sampler_module.seeded_gumbel(seeds, steps, 16)).all()


# ---------------------------------------------------------------- filter / merge


def _assert_same_info(a: SamplingBatchInfo, b: SamplingBatchInfo) -> None:
    for name in ("temperatures", "top_ps", "top_ks", "min_ps", "greedy", "seeds", "steps", "rows"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("all_greedy", "any_greedy", "need_filter", "return_logprob", "max_top_logprobs"):
        assert getattr(a, name) == getattr(b, name), name
    # Optional processors: a missing tensor must act like neutral rows.
    logits = randn(a.batch_size, VOCAB, seed=9)
    assert torch.allclose(apply_logit_processors(logits, a), apply_logit_processors(logits, b))


def test_filter_and_merge_equal_a_rebuild_after_recorded_steps():
    """Filtering and merging device state, with steps recorded on the device,
    gives what building from the requests' token lists would give."""
    left = [make_req(seed=1, output=(3,), frequency_penalty=0.5, temperature=0.7),
            make_req(seed=2, output=(4, 4), temperature=0.0),
            make_req(seed=3, output=(), repetition_penalty=1.2, top_k=3, temperature=1.0)]
    right = [make_req(seed=4, output=(5,), logit_bias={"6": 2.0}, min_new_tokens=4, temperature=1.0, top_p=0.5,
                      logprob=True, top=2),
             make_req(seed=5, output=(), temperature=0.0)]
    info_l, info_r = batch_info(left), batch_info(right)
    step_l, step_r = torch.tensor([1, 2, 7]), torch.tensor([6, 1])
    info_l.record(step_l)
    info_r.record(step_r)
    for req, tok in zip(left + right, step_l.tolist() + step_r.tolist()):
        req.output_ids.append(tok)
    info_l.merge(info_r, left + right)
    _assert_same_info(info_l, batch_info(left + right))
    keep = [0, 3, 4]
    info_l.filter(torch.tensor(keep), [(left + right)[i] for i in keep])
    _assert_same_info(info_l, batch_info([(left + right)[i] for i in keep]))


@pytest.mark.skipif(not cpu_kernels.available(), reason="the C++ CPU kernels did not build here")
@pytest.mark.parametrize("vocab", [1, 7, 16, 49_152, 49_155])
def test_row_argmax_kernel_is_torch_max(vocab):
    """cpu_kernels.row_argmax (row_argmax's CPU path) against torch's
    max(dim).indices: the first index on ties (bfloat16-rounded values tie
    often), in the vector part and the tail, and the first NaN in a row holding one."""
    g = torch.Generator().manual_seed(vocab)
    rows = (torch.randn(8, vocab, generator=g) * 4).bfloat16().float()
    rows[1] = rows[1].round()  # many equal largest values
    rows[2, vocab // 2:] = rows[2].max() + 1  # a tie between the last values, the tail's included
    rows[3, vocab - 1] = float("nan")
    rows[4, vocab // 3] = float("nan")
    rows[4, -1] = float("nan")
    rows[5] = float("-inf")
    with torch.inference_mode():
        picked = cpu_kernels.row_argmax(rows)
        assert torch.equal(picked, rows.max(dim=-1).indices)
        assert torch.equal(row_argmax(rows[:, :vocab]), picked)
        assert cpu_kernels.row_argmax(rows.double()) is None  # float32 rows only
