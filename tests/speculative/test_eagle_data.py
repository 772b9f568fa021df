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


def test_greedy_data_uses_each_template_once():
    from radixserve.speculative.eagle_data import TASKS, TOPICS, chat_prompts

    everything = [m[0]["content"] for m in chat_prompts(10**6, 0, unique=True)]
    assert len(everything) == len(set(everything)) == len(TASKS) * len(TOPICS)
    assert [m[0]["content"] for m in chat_prompts(5, 0, unique=True)] == everything[:5]


def test_batched_capture_equals_one_sequence_at_a_time(tiny_model_factory):
    """Several sequences in one extend forward give each the features and
    greedy choices it gets alone (batches split by count and by the pool's pages)."""
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs
    from radixserve.speculative.eagle_data import TargetFeatures

    runner = ModelRunner(ServerArgs(model_path=str(tiny_model_factory("llama")), device="cpu", max_total_tokens=256,
                                    max_running_requests=9, dtype="float32", page_size=16))
    rng = random.Random(1)
    seqs = [[rng.randrange(10, 1000) for _ in range(rng.randint(3, 40))] for _ in range(9)]
    alone = [TargetFeatures(runner, [0, 1])(s) for s in seqs]
    by_count = list(TargetFeatures(runner, [0, 1], max_batch_tokens=1000, max_batch_seqs=3).all(seqs))
    # the pool (256 tokens in pages of 16) holds fewer than all 9: batches split by whole pages
    batched = list(TargetFeatures(runner, [0, 1], max_batch_tokens=1000, max_batch_seqs=9).all(seqs))
    assert [b.tokens.tolist() for b in by_count] == seqs
    assert [b.tokens.tolist() for b in batched] == seqs
    for a, b in zip(alone, batched):
        assert torch.equal(a.greedy, b.greedy)
        torch.testing.assert_close(a.features, b.features, rtol=1e-4, atol=1e-5)
    assert runner.pools.allocator.available_size() == runner.pools.allocator.total_tokens  # each batch freed
