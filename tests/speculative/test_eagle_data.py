"""The EAGLE-3 trainer's data helpers: questions picked out of the target's
replies, windows whose labels follow the target's choices, and padded batches."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from radixserve.speculative.eagle_data import Sample, question_in, windows
from radixserve.train_eagle3 import add_feature_noise, batches, parse_args, soft_cross_entropy, tf32_matmuls


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
    (features, inputs, labels, soft), = list(windows([s], 64, 3, random.Random(0)))
    assert soft is None  # a sample without the target's top tokens
    assert features.shape[0] == 9  # every position but the last has a next token
    assert inputs[0].tolist() == s.tokens[1:].tolist()  # step 0 reads the real next token
    assert inputs[1, :8].tolist() == s.greedy[1:9].tolist()  # step s reads the target's choice s ahead
    assert labels[0].tolist() == s.greedy[1:].tolist()  # and predicts the choice after it
    assert labels[2, -2:].tolist() == [-1, -1]  # past the sample's end


def test_batches_pad_the_shorter_windows_with_ignored_labels():
    args = SimpleNamespace(window=8, num_steps=2, batch_size=2)
    (features, inputs, labels, _), = list(batches([sample(9), sample(5)], args, random.Random(0)))
    assert features.shape == (2, 8, 6) and inputs.shape == labels.shape == (2, 2, 8)
    short = 0 if (labels[:, 0, 4:] == -1).all() else 1
    assert (labels[:, short, 4:] == -1).all() and (features[short, 4:] == 0).all()
    assert (labels[0, 1 - short] >= 0).all()


def with_top_tokens(s: Sample, k: int = 3) -> Sample:
    """The target's choice first, then other tokens, probabilities falling."""
    s.top_ids = torch.stack([s.greedy] + [s.greedy + 1000 * i for i in range(1, k)], 1)
    s.top_probs = torch.tensor([0.5 / 2**i for i in range(k)]).half().expand(len(s.greedy), k)
    return s


def test_soft_labels_follow_the_hard_ones():
    """The top tokens of step s at origin p are those after p+1+s, as its label
    is; padded windows pad them with -1 (no token) as they pad the labels."""
    s = with_top_tokens(sample(10))
    (_, _, labels, (ids, probs)), = list(windows([s], 64, 3, random.Random(0)))
    assert ids.shape == (3, 9, 3) and probs.shape == (3, 9, 3)
    assert torch.equal(ids[..., 0], labels)  # the choice is the top token, -1 past the end
    assert (ids[2, -2:] == -1).all()
    args = SimpleNamespace(window=8, num_steps=2, batch_size=2)
    (_, _, labels, (ids, probs)), = list(batches([with_top_tokens(sample(9)), with_top_tokens(sample(5))], args,
                                                 random.Random(0)))
    assert ids.shape == probs.shape == (2, 2, 8, 3)
    assert torch.equal(ids[..., 0], labels)


def test_soft_cross_entropy_against_its_definition():
    """One-hot targets give the ordinary cross-entropy; spread targets give
    -sum p log q with p renormalised over the tokens the draft vocabulary has
    (written out here over a dense distribution); positions with none count for nothing."""
    g = torch.Generator().manual_seed(0)
    target_to_draft = torch.full((50,), -1)
    vocab = torch.tensor([3, 7, 11, 20, 31, 42])
    target_to_draft[vocab] = torch.arange(6)
    logits = torch.randn(2, 4, 6, generator=g)
    choice = vocab[torch.randint(0, 6, (2, 4), generator=g)]
    one_hot = soft_cross_entropy(logits, choice[..., None], torch.ones(2, 4, 1).half(), target_to_draft)
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_to_draft[choice].flatten())
    torch.testing.assert_close(one_hot, plain)

    ids = torch.tensor([[3, 7, 5], [11, 1, 2], [2, 4, 6], [42, 31, -1]])[None].expand(2, 4, 3)
    probs = torch.tensor([[0.5, 0.25, 0.125], [0.4, 0.3, 0.2], [0.6, 0.2, 0.1], [0.7, 0.2, 0.0]]).half()[None] \
        .expand(2, 4, 3)
    got = soft_cross_entropy(logits, ids, probs, target_to_draft)
    dense = torch.zeros(2, 4, 6)
    for b in range(2):
        for t in range(4):
            for i, p in zip(ids[b, t].tolist(), probs[b, t].float().tolist()):
                if i >= 0 and target_to_draft[i] >= 0:
                    dense[b, t, target_to_draft[i]] += p
    counted = dense.sum(-1) > 0
    assert counted.sum() == 6  # (row 2's tokens are all outside the draft vocabulary)
    p = dense[counted] / dense[counted].sum(-1, keepdim=True)
    expected = -(p * logits.log_softmax(-1)[counted]).sum(-1).mean()
    torch.testing.assert_close(got, expected)


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


def test_captured_top_tokens_are_the_targets_softmax(tiny_model_factory):
    """top_k: each position's likeliest tokens and probabilities are those of
    transformers' model on the same weights (its choice first)."""
    from transformers import AutoModelForCausalLM

    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs
    from radixserve.speculative.eagle_data import TargetFeatures

    path = str(tiny_model_factory("llama"))
    runner = ModelRunner(ServerArgs(model_path=path, device="cpu", max_total_tokens=256, max_running_requests=4,
                                    dtype="float32"))
    rng = random.Random(2)
    seqs = [[rng.randrange(10, 1000) for _ in range(rng.randint(3, 30))] for _ in range(4)]
    samples = list(TargetFeatures(runner, [0, 1], max_batch_tokens=256, max_batch_seqs=4, top_k=5).all(seqs))
    reference = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    for s, ids in zip(samples, seqs):
        with torch.no_grad():
            probs = reference(torch.tensor([ids])).logits[0].softmax(-1)
        assert s.top_ids.shape == s.top_probs.shape == (len(ids), 5)
        assert torch.equal(s.top_ids[:, 0], s.greedy)
        torch.testing.assert_close(s.top_probs.float(), probs.gather(-1, s.top_ids), rtol=2e-3, atol=1e-4)
        assert (s.top_probs[:, :-1] >= s.top_probs[:, 1:]).all()


def test_trainer_refuses_a_negative_soft_label_count(capsys):
    assert parse_args(["--output-dir", "h", "--soft-labels", "16"]).soft_labels == 16
    with pytest.raises(SystemExit):
        parse_args(["--output-dir", "h", "--soft-labels", "-1"])
    assert "--soft-labels must be >= 0" in capsys.readouterr().err


def test_feature_noise_follows_each_layers_size():
    """Three layers' outputs of very different sizes, as a target's are: each
    gets noise of `scale` times its own RMS at that position, independent draws."""
    torch.manual_seed(0)
    hidden, sizes = 256, torch.tensor([0.1, 3.0, 80.0])
    features = (torch.randn(64, 3, hidden) * sizes[:, None]).flatten(-2)
    noisy = add_feature_noise(features, 0.2, hidden)
    layers, diff = features.unflatten(-1, (3, hidden)), (noisy - features).unflatten(-1, (3, hidden))
    relative = diff.pow(2).mean(-1).sqrt() / layers.pow(2).mean(-1).sqrt()  # [positions, layers]
    assert relative.mean().item() == pytest.approx(0.2, rel=0.03)
    torch.testing.assert_close(relative.mean(0), torch.full((3,), 0.2), rtol=0.05, atol=0)
    assert abs(torch.corrcoef(torch.stack([diff[:, 0].flatten(), diff[:, 1].flatten() / 30]))[0, 1]) < 0.05
    assert torch.equal(add_feature_noise(features, 0.0, hidden), features)


def test_trainer_refuses_negative_feature_noise(capsys):
    assert parse_args(["--output-dir", "h", "--feature-noise", "0.1"]).feature_noise == 0.1
    with pytest.raises(SystemExit):
        parse_args(["--output-dir", "h", "--feature-noise", "-0.5"])
    assert "--feature-noise must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("before", [False, True])
def test_training_restores_the_processs_tf32_setting(before):
    """TF32 while a head trains on a GPU; the caller's setting afterwards, even
    when training raises (a test process's float32 references ran in TF32 after
    train_eagle3 had set it for good)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = before
        with pytest.raises(RuntimeError), tf32_matmuls(True):
            assert torch.backends.cuda.matmul.allow_tf32
            raise RuntimeError("training failed")
        assert torch.backends.cuda.matmul.allow_tf32 == before
        with tf32_matmuls(False):
            assert torch.backends.cuda.matmul.allow_tf32 == before
        assert torch.backends.cuda.matmul.allow_tf32 == before
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
