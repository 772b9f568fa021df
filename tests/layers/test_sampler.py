"""The batched sampler against direct computations on the same logits."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.layers.sampler import Sampler, apply_logit_processors, filter_logits
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo
from radixserve.sampling.sampling_params import SamplingParams

VOCAB = 8


def req(seed=0, output=(), prompt=(1, 2), logprob=False, top=0, **params):
    sp = SamplingParams.from_dict(params)
    sp.verify(1000)
    sp.normalize()
    return SimpleNamespace(sampling_params=sp, origin_input_ids=list(prompt), output_ids=list(output),
                           sampling_seed=seed, return_logprob=logprob, top_logprobs_num=top)


def info(reqs, vocab=VOCAB, eos=frozenset({0})):
    return SamplingBatchInfo.from_reqs(reqs, vocab, "cpu", set(eos))


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    reqs = [req(temperature=0), req(top_k=1, seed=1), req(top_k=1, seed=2), req(temperature=0)]
    out = Sampler().forward(logits, info(reqs))
    assert out.next_token_ids.tolist() == logits.argmax(-1).tolist()


def test_seeded_row_same_alone_and_in_batch():
    g = torch.Generator().manual_seed(1)
    mine = torch.randn(1, 50, generator=g)
    others = torch.randn(5, 50, generator=g)
    r = req(seed=1234, output=[3, 4], temperature=1.0)
    alone = Sampler().forward(mine, info([r], vocab=50)).next_token_ids[0]
    batch = torch.cat([others[:2], mine, others[2:]])
    rows = [req(seed=i) for i in range(2)] + [r] + [req(seed=9 + i) for i in range(3)]
    together = Sampler().forward(batch, info(rows, vocab=50)).next_token_ids[2]
    assert alone == together


def test_distribution_matches_softmax():
    """Over many seeds, sampled frequencies follow softmax(logits / T)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 1.5, 0.2]])
    draws = 20000
    reqs = [req(seed=s, temperature=0.7) for s in range(draws)]
    out = Sampler().forward(logits.expand(draws, -1), info(reqs)).next_token_ids
    freq = torch.bincount(out, minlength=VOCAB).float() / draws
    expected = torch.softmax(logits[0] / 0.7, -1)
    # 4 standard deviations of a binomial frequency.
    tol = 4 * torch.sqrt(expected * (1 - expected) / draws) + 1e-3
    assert ((freq - expected).abs() <= tol).all(), (freq, expected)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**40), top_k=st.integers(2, VOCAB), top_p=st.floats(0.05, 1.0),
       min_p=st.floats(0.0, 0.9), data=st.data())
def test_filters_never_sample_excluded_tokens(seed, top_k, top_p, min_p, data):
    values = data.draw(st.lists(st.floats(-5, 5), min_size=VOCAB, max_size=VOCAB, unique=True))
    logits = torch.tensor([values])
    reqs = [req(seed=seed + i, top_k=top_k, top_p=top_p, min_p=min_p) for i in range(16)]
    out = Sampler().forward(logits.expand(16, -1), info(reqs)).next_token_ids
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True).tolist()
    allowed = set()
    mass = 0.0
    for rank, tok in enumerate(order):
        keep = rank == 0 or (rank < top_k and (top_p >= 1.0 or mass < top_p)
                             and probs[tok] >= min_p * probs[order[0]])
        if keep:
            allowed.add(tok)
        mass += probs[tok].item()
    # Rounding at a boundary may include one more token; never one outside these rules
    # by more than that margin.
    filtered = filter_logits(logits.expand(16, -1), info(reqs))
    kept = set(torch.nonzero(filtered[0] > float("-inf")).flatten().tolist())
    assert set(out.tolist()) <= kept
    assert len(kept ^ allowed) <= 1


def test_penalties_and_bias_exact():
    logits = torch.tensor([[1.0, -2.0, 3.0, 0.5, 0.0, 1.0, 2.0, -1.0]])
    r = req(output=[2, 2, 5], prompt=[1], frequency_penalty=0.5, presence_penalty=0.25,
            repetition_penalty=2.0, logit_bias={"4": 3.0})
    got = apply_logit_processors(logits, info([r]))[0]
    expected = logits[0].clone()
    for t in (1, 2, 5):  # repetition: prompt and output tokens, shrink toward zero
        expected[t] = expected[t] / 2.0 if expected[t] > 0 else expected[t] * 2.0
    expected[2] -= 0.5 * 2 + 0.25
    expected[5] -= 0.5 * 1 + 0.25
    expected[4] += 3.0
    assert torch.allclose(got, expected)


def test_record_updates_counts():
    r = req(output=[1], frequency_penalty=1.0)
    i = info([r])
    i.record(torch.tensor([3]))
    i.record(torch.tensor([3]))
    assert i.output_counts[0, 3] == 2 and i.output_counts[0, 1] == 1 and i.steps.tolist() == [3]


def test_min_new_tokens_blocks_stop_tokens_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, 0] = 10.0  # EOS is by far the best
    r = req(temperature=0, min_new_tokens=2, stop_token_ids=[5])
    i = info([r])
    assert Sampler().forward(logits, i).next_token_ids.item() != 0
    masked = apply_logit_processors(logits, i)[0]
    assert masked[0] == float("-inf") and masked[5] == float("-inf")
    i.record(torch.tensor([1]))
    i.record(torch.tensor([1]))
    assert Sampler().forward(logits, i).next_token_ids.item() == 0


def test_logprobs_are_raw_log_softmax():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3))
    reqs = [req(seed=i, logprob=True, top=3, temperature=0.5, frequency_penalty=1.0) for i in range(3)]
    out = Sampler().forward(logits, info(reqs))
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.next_token_ids[:, None])[:, 0])
    assert torch.allclose(out.top_logprobs_val, ref.topk(3, -1).values)
