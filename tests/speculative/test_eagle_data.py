"""The EAGLE-3 trainer's data helpers: questions picked out of the target's
replies, windows whose labels follow the target's choices, and padded batches."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from radixserve.speculative.eagle_data import Sample, question_in, windows
from radixserve.train_eagle3 import batches


def test_question_in_takes_a_quoted_question_or_a_question_line():
    assert question_in('A curious person might ask: "Why is the sea salty?" That is a fine one.') == \
        "Why is the sea salty?"
    assert question_in("How do bees make honey?\nThey collect nectar.") == "How do bees make honey?"
    assert question_in('I would say "hello there" to them.') is None
    assert question_in("Bees are insects.") is None


def sample(length: int, features: int = 6) -> Sample:
    tokens = torch.arange(100, 100 + length)
    greedy = torch.arange(200, 200 + length)
    return Sample(torch.randn(length, features), greedy, tokens)


def test_windows_read_the_next_token_then_the_targets_choices():
    s = sample(10)
    (features, inputs, labels), = list(windows([s], 64, 3, random.Random(0)))
    assert features.shape[0] == 9  # every position but the last has a next token
    assert inputs[0].tolist() == s.tokens[1:].tolist()  # step 0 reads the real next token
    assert inputs[1, :8].tolist() == s.greedy[1:9].tolist()  # step s reads the target's choice s ahead
    assert labels[0].tolist() == s.greedy[1:].tolist()  # and predicts the choice after it
    assert labels[2, -2:].tolist() == [-1, -1]  # past the sample's end


def test_batches_pad_the_shorter_windows_with_ignored_labels():
    args = SimpleNamespace(window=8, num_steps=2, batch_size=2)
    (features, inputs, labels), = list(batches([sample(9), sample(5)], args, random.Random(0)))
    assert features.shape == (2, 8, 6) and inputs.shape == labels.shape == (2, 2, 8)
    short = 0 if (labels[:, 0, 4:] == -1).all() else 1
    assert (labels[:, short, 4:] == -1).all() and (features[short, 4:] == 0).all()
    assert (labels[0, 1 - short] >= 0).all()
