"""The verify step's acceptance keeps the target's sampling distribution
exactly: a chi-square test over many seeded rows on a tiny vocabulary, with
temperature, top-k and a frequency penalty that must see the accepted draft
before the next position is sampled. Expected probabilities are computed
here by hand, not with the sampler's code."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import torch

from radixserve.layers.sampler import Sampler
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo
from radixserve.sampling.sampling_params import SamplingParams
from radixserve.speculative.tree import DraftTree
from radixserve.speculative.verify import accept

VOCAB = 6
ROWS = 20000
TEMPERATURE, TOP_K, FREQ = 0.9, 5, 1.5
DRAFT = 2  # the one draft token every row proposes
EARLIER_OUTPUT = 3  # a token each request already produced (the penalty counts it)


def make_req(seed: int = 0, output=(), **params) -> SimpleNamespace:
    sp = SamplingParams.from_dict(params)
    sp.verify(1000)
    sp.normalize()
    return SimpleNamespace(sampling_params=sp, origin_input_ids=[1, 2], output_ids=list(output),
                           sampling_seed=seed, return_logprob=False, top_logprobs_num=0)


def batch_info(reqs) -> SamplingBatchInfo:
    return SamplingBatchInfo.from_reqs(reqs, VOCAB, "cpu", {0})


def target_probs(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The target's distribution: penalty, temperature, top-k, softmax."""
    scaled = (logits - FREQ * counts) / TEMPERATURE
    kth = scaled.topk(TOP_K).values[-1]
    return torch.softmax(scaled.masked_fill(scaled < kth, float("-inf")), -1)


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_accepted_runs_follow_the_target_distribution():
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(VOCAB, generator=gen) * 1.5, torch.randn(VOCAB, generator=gen) * 1.5
    first[DRAFT] = first.max()  # the draft is likely, so both branches are well sampled
    second[DRAFT] = second.max() + 1.5  # and likely again next, so a missed penalty would show
    reqs = [make_req(seed=1000 + i, output=(EARLIER_OUTPUT,), temperature=TEMPERATURE, top_k=TOP_K,
                     frequency_penalty=FREQ) for i in range(ROWS)]
    info = batch_info(reqs)
    logits = torch.stack([first, second]).repeat(ROWS, 1)  # rows 2i, 2i+1: request i's two positions
    batch = SimpleNamespace(spec_drafts=[DraftTree.chain([DRAFT])] * ROWS, reqs=reqs,
                            last_logit_rows=torch.arange(ROWS) * 2 + 1)
    result = accept(batch, logits, info, Sampler())

    observed = Counter(tuple(t) for t in result.tokens)
    counts = torch.zeros(VOCAB)
    counts[EARLIER_OUTPUT] = 1
    p_first = target_probs(first, counts)
    counts[DRAFT] += 1  # the accepted draft is part of the history at the second position
    p_second = target_probs(second, counts)
    expected = {(x,): p_first[x].item() for x in range(VOCAB) if x != DRAFT}
    expected.update({(DRAFT, y): (p_first[DRAFT] * p_second[y]).item() for y in range(VOCAB)})

    assert expected[(DRAFT, DRAFT)] > 0.05
    assert set(observed) <= {k for k, p in expected.items() if p > 0}  # top-k's cut tokens never appear
    cells = {k: p for k, p in expected.items() if p > 0}
    stat = sum((observed[k] - ROWS * p) ** 2 / (ROWS * p) for k, p in cells.items())
    assert stat < chi_square_critical(len(cells) - 1), (stat, observed, cells)
    # every emitted token counted: the step index advanced once per token
    assert info.steps.tolist() == [1 + len(t) for t in result.tokens]


def test_greedy_rows_accept_the_matching_prefix():
    logits = torch.full((8, VOCAB), -5.0)
    for row, token in enumerate([4, 1, 2, 5, 3, 3, 0, 1]):
        logits[row, token] = 5.0
    # request 0 verifies [4, 1, 2] at rows 0..3 (argmax 4, 1, 2, 5); request 1 [3, 0, 0] at rows 4..7
    batch = SimpleNamespace(spec_drafts=[DraftTree.chain([4, 1, 2]), DraftTree.chain([3, 0, 0])],
                            reqs=[make_req(temperature=0)] * 2,
                            last_logit_rows=torch.tensor([3, 7]))
    result = accept(batch, logits, batch_info(batch.reqs), Sampler())
    assert result.tokens == [[4, 1, 2, 5], [3, 3]]


def test_greedy_fast_path_matches_the_sampler_path():
    """accept() takes one argmax over all positions for plain greedy batches;
    the position-by-position sampler path must give the same runs and steps."""
    from radixserve.speculative.verify import accept_greedy, accept_sampled, is_plain_greedy

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        bs = 1 + trial % 4
        drafts = [torch.randint(0, VOCAB, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist()
                  for _ in range(bs)]
        lens = torch.tensor([len(d) + 1 for d in drafts])
        logits = torch.randn(int(lens.sum()), VOCAB, generator=g)
        for row, d in zip((torch.cumsum(lens, 0) - lens).tolist(), drafts):  # most drafts right, some not
            for j, token in enumerate(d):
                if torch.rand(1, generator=g).item() < 0.8:
                    logits[row + j, token] += 10.0
        batch = SimpleNamespace(spec_drafts=[DraftTree.chain(d) for d in drafts], reqs=[make_req(temperature=0)] * bs,
                                last_logit_rows=torch.cumsum(lens, 0) - 1)
        fast_info, slow_info = batch_info(batch.reqs), batch_info(batch.reqs)
        assert is_plain_greedy(fast_info)
        fast = accept_greedy(batch, logits, fast_info)
        slow = accept_sampled(batch, logits, slow_info, Sampler())
        assert fast.tokens == slow.tokens and fast.num_drafts == slow.num_drafts
        assert torch.equal(fast_info.steps, slow_info.steps)
    assert not is_plain_greedy(batch_info([make_req(temperature=0, frequency_penalty=0.5)]))
    assert not is_plain_greedy(batch_info([make_req(temperature=0.7)]))
