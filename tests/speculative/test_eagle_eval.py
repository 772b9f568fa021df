"""The offline accept-length walk (speculative/eagle_eval.py): a head that
drafts the target's choices for the first k steps at every origin accepts k
tokens per verify, walked from the end of the prompt the way serving walks."""

from __future__ import annotations

import pytest
import torch

from radixserve.speculative.eagle_data import Sample
from radixserve.speculative.eagle_eval import evaluate_head

VOCAB = 50


class RightForSteps(torch.nn.Module):
    """Drafts the right token for its first `right` steps, a wrong one after
    (a stand-in head: the walk's arithmetic is under test, not a head)."""

    def __init__(self, right: int, labels: torch.Tensor) -> None:
        super().__init__()
        self.right, self.labels = right, labels  # labels [S, T-1]: the target's choice each step must draft

    def train_forward(self, features, step_inputs):
        steps, _, length = step_inputs.shape
        out = []
        for step in range(steps):
            wanted = self.labels[step, :length].clamp(min=0)
            if step >= self.right:
                wanted = (wanted + 1) % VOCAB
            out.append(torch.nn.functional.one_hot(wanted, VOCAB).float()[None])
        return out


def greedy_sample(length: int) -> Sample:
    tokens = torch.arange(length) % VOCAB
    return Sample(torch.zeros(length, 4), torch.roll(tokens, -1), tokens)  # greedy[p] == tokens[p + 1]


@pytest.mark.parametrize("right", [0, 1, 2, 3])
def test_accept_length_is_one_plus_the_steps_drafted_right(right):
    sample, prompt_len, steps = greedy_sample(42), 6, 3
    labels = torch.stack([torch.cat([sample.greedy[1 + s:], torch.full((1 + s,), -1)])[:-1] for s in range(steps)])
    result = evaluate_head(RightForSteps(right, labels), [sample], [prompt_len], torch.arange(VOCAB), steps, "cpu")
    # from origin prompt_len-1, each verify moving right+1 tokens, until the answer is complete (origin 40);
    # step s at origin p has a label (the target's choice after p + 1 + s) while p + 1 + s <= 41
    origin, cycles, tokens = prompt_len - 1, 0, 0
    while origin < 40:
        accepted = min(right, 41 - origin)
        cycles, tokens, origin = cycles + 1, tokens + accepted + 1, origin + accepted + 1
    assert result.verify_steps == cycles
    assert result.accept_length == pytest.approx(tokens / cycles)
    assert result.step_agreement == pytest.approx([1.0 if s < right else 0.0 for s in range(steps)])
    assert result.vocab_coverage == 1.0
    half = torch.arange(VOCAB) + (torch.arange(VOCAB) >= VOCAB // 2) * VOCAB  # its upper half: ids never chosen
    partial = evaluate_head(RightForSteps(right, labels), [sample], [prompt_len], half, steps, "cpu")
    assert 0.3 < partial.vocab_coverage < 0.7  # the answer cycles through all VOCAB ids
