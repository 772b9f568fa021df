"""EAGLE-3 end to end on a tiny random Llama: `python -m radixserve.train_eagle3`
trains a head for a few steps on the target's own greedy answers (engine
generation, captured hidden states, unrolled training, SpecForge layout,
loss plot); served with --speculative-algorithm EAGLE3, the greedy tokens
equal transformers' and some drafts are accepted; with top-K draft trees
(--speculative-eagle-topk > 1) greedy and seeded sampled tokens equal plain
decoding's, and both KV pools balance after the run and after an abort; a
head that is not an EAGLE-3 head is refused at start-up."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from radixserve import Engine
from radixserve.train_eagle3 import main as train_eagle3
from tests.conftest import assert_draft_kv_balanced, assert_no_leak, generate_then_abort, hf_greedy, load_hf_model

NEW_TOKENS = 16


def train_prompts(count: int):
    """The random prompts train_eagle3 --prompts random --seed 0 answers."""
    rng = random.Random(0)
    return [[rng.randrange(10, 1000) for _ in range(rng.randint(4, 24))] for _ in range(count)]


@pytest.fixture(scope="module")
def target(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def head(target, tmp_path_factory):
    out = tmp_path_factory.mktemp("eagle3_head")
    train_eagle3(["--model-path", str(target), "--output-dir", str(out), "--prompts", "random",
                  "--num-prompts", "3", "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0",
                  "--draft-vocab-size", "128", "--epochs", "12", "--window", "64", "--lr", "2e-2",
                  "--save-dtype", "float32", "--eval-prompts", "4", "--sequences", str(out / "sequences.pt")])
    return out


def test_head_folder_layout(head):
    config = json.loads((head / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 128
    assert len(config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]) == 3
    from safetensors import safe_open

    with safe_open(str(head / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"fc.weight", "midlayer.self_attn.q_proj.weight", "midlayer.hidden_norm.weight", "lm_head.weight",
            "d2t", "t2d"} <= names
    log = json.loads((head / "train_log.json").read_text())
    assert log["losses"][-1] < log["losses"][0]
    assert Image.open(head / "loss.png").size == (800, 480)


def test_trained_head_accepts_and_keeps_tokens(target, head):
    prompts = train_prompts(3)
    # float32 (not "auto"): the head keeps its float32 weights, as the offline walk below runs it
    with Engine(model_path=str(target), log_level="warning", speculative_algorithm="EAGLE3",
                speculative_draft_model_path=str(head), speculative_num_steps=3,
                disable_speculative_adaptive=True, dtype="float32") as engine:
        outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS})
        assert_no_leak(engine)
    assert [o["output_ids"] for o in outs] == hf_greedy(load_hf_model(target), prompts, NEW_TOKENS)
    rates = [o["meta_info"]["spec_accept_rate"] for o in outs]
    assert sum(rates) / len(rates) > 0.15, rates  # 0.29-0.38 seen; an untrained head gets ~0
    walked = offline_walk(target, head, [p + o["output_ids"] for p, o in zip(prompts, outs)], list(map(len, prompts)))
    assert_walk_matches_serving(walked, outs)


def offline_walk(target, head_dir, seqs, prompt_lens):
    """speculative/eagle_eval's walk of the saved head over `seqs`, with the
    target's features captured by a ModelRunner (as train_eagle3 does)."""
    import torch

    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.model_loader.loader import load_model
    from radixserve.model_loader.source import resolve_model_source
    from radixserve.server_args import ServerArgs
    from radixserve.speculative.eagle_data import TargetFeatures
    from radixserve.speculative.eagle_eval import evaluate_head
    from radixserve.utils.hf_utils import load_config

    source = resolve_model_source(str(head_dir))
    head = load_model(source, load_config(source), torch.float32, torch.device("cpu"))
    runner = ModelRunner(ServerArgs(model_path=str(target), device="cpu", max_total_tokens=256))
    head.embed = runner.model.model.embed_tokens
    samples = [TargetFeatures(runner, head.target_feature_layers(runner.config.num_hidden_layers))(s) for s in seqs]
    vocab = head.to_target_ids(torch.arange(head.config.draft_vocab_size))
    return evaluate_head(head, samples, prompt_lens, vocab, 3, "cpu")


def assert_walk_matches_serving(walked, outs) -> None:
    """The walk verifies where serving verified, as often; its tokens are
    serving's after the prefill's first, but for the last verify's drafts
    past the answer's end (serving cuts them: at most num_steps per answer)."""
    steps = sum(o["meta_info"]["spec_verify_ct"] for o in outs)
    served = sum(o["meta_info"]["completion_tokens"] - 1 for o in outs)
    assert walked.verify_steps == steps, (walked, steps)
    assert served <= round(walked.accept_length * steps) <= served + 3 * len(outs), (walked, served)


def test_held_out_walk_matches_serving(target, head):
    """train_eagle3 --eval-prompts: held-out greedy answers (no training
    prompt among them), and the walked accept length it reports is what
    serving them measures."""
    from radixserve.train_eagle3 import load_sequences

    log = json.loads((head / "train_log.json").read_text())["held_out"]
    _, held_out, prompt_lens = load_sequences(str(head / "sequences.pt"))
    prompts = [s[:n] for s, n in zip(held_out, prompt_lens)]
    assert log["prompts"] == len(prompts) == 4 and not set(map(tuple, prompts)) & set(map(tuple, train_prompts(3)))
    with Engine(model_path=str(target), log_level="warning", speculative_algorithm="EAGLE3",
                speculative_draft_model_path=str(head), speculative_num_steps=3,
                disable_speculative_adaptive=True) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS})
    assert [p + o["output_ids"] for p, o in zip(prompts, outs)] == held_out  # the same greedy answers
    # (a head trained on 3 random prompts drafts nothing right on new ones: the counts are what is checked)
    assert_walk_matches_serving(SimpleNamespace(**{k: log[k] for k in ("verify_steps", "accept_length")}), outs)
    assert 0 < log["vocab_coverage"] <= 1


def test_a_second_run_trains_on_the_saved_sequences(target, head, tmp_path):
    """--sequences FILE, when it exists, replaces generation: a run asking for
    1 prompt trains on the file's 3 answers (here on the target's top 8
    tokens, --soft-labels, with noisy features, --feature-noise)."""
    train_eagle3(["--model-path", str(target), "--output-dir", str(tmp_path), "--num-prompts", "1",
                  "--draft-vocab-size", "64", "--soft-labels", "8", "--feature-noise", "0.05", "--epochs", "4",
                  "--sequences", str(head / "sequences.pt")])
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["sequences"] == 3 and "held_out" in log
    assert log["steps"] > 4 and log["losses"][-1] < log["losses"][0]


def test_a_request_ending_in_a_plain_step_gives_its_draft_entries_to_the_tree(target, head):
    """With the governor on, a lone request's first 64 decode steps speculate
    (its first probe) and the next 64 do not: a 128-token answer of a head that
    keeps under 2 tokens a verify ends in a plain step. Its draft entries join
    the draft's tree with its KV (before, they stayed in use until a later
    draft step, which a server that falls idle never runs)."""
    with Engine(model_path=str(target), log_level="warning", speculative_algorithm="EAGLE3",
                speculative_draft_model_path=str(head), speculative_num_steps=3, speculative_eagle_topk=1,
                speculative_num_draft_tokens=4) as engine:
        out = engine.generate(input_ids=train_prompts(1)[0], sampling_params={
            "temperature": 0, "max_new_tokens": 128, "ignore_eos": True})
        assert_no_leak(engine)
        kv = assert_draft_kv_balanced(engine)
    assert out["meta_info"]["spec_verify_ct"] == 64  # then plain steps to the end
    assert kv["in_use_tokens"] == 0 and kv["cached_tokens"] > 0, kv


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_features_kept_on_the_host_train_as_on_the_gpu(target, head, tmp_path):
    """--device cuda --feature-device cpu: the captured features wait in host
    memory (room for more answers than the GPU has) and each batch moves to the
    GPU; the losses are those of a run that keeps them on the GPU. Training
    matmuls in TF32 leaves the process's own setting as it found it (float32
    references run later in the same process)."""
    losses, tf32 = {}, torch.backends.cuda.matmul.allow_tf32
    for where in ("cuda", "cpu"):
        out = tmp_path / where
        train_eagle3(["--model-path", str(target), "--output-dir", str(out), "--draft-vocab-size", "64",
                      "--epochs", "3", "--window", "16", "--device", "cuda", "--feature-device", where,
                      "--sequences", str(head / "sequences.pt")])
        losses[where] = json.loads((out / "train_log.json").read_text())["losses"]
    assert torch.backends.cuda.matmul.allow_tf32 == tf32
    assert len(losses["cpu"]) == len(losses["cuda"]) > 3
    torch.testing.assert_close(torch.tensor(losses["cpu"]), torch.tensor(losses["cuda"]), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("tiers", [{}, {"enable_hierarchical_cache": True}], ids=["radix", "hicache"])
def test_a_cached_prefix_keeps_the_heads_context(target, head, tiers):
    """A prefix taken from the radix cache comes with the head's draft KV
    (speculative/draft_prefix.py): the training prompts asked again draft
    exactly as with no cache at all (without the draft's tree the head saw
    none of the cached tokens, and verified more often), the target still
    reuses the prompts, both pools balance, and a flush empties both."""
    prompts = train_prompts(3) * 2
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    kwargs = dict(model_path=str(target), log_level="warning", speculative_algorithm="EAGLE3",
                  speculative_draft_model_path=str(head), speculative_num_steps=3,
                  disable_speculative_adaptive=True, dtype="float32", page_size=1)
    runs = {}
    for cache in (False, True):
        with Engine(disable_radix_cache=not cache, **kwargs, **(tiers if cache else {})) as engine:
            runs[cache] = [engine.generate(input_ids=p, sampling_params=params) for p in prompts]  # one at a time
            assert_no_leak(engine)
            kv = assert_draft_kv_balanced(engine)
            assert engine.flush_cache()  # the draft's tree is emptied with the target's
            assert assert_draft_kv_balanced(engine)["cached_tokens"] == 0
    cold, warm = runs[False], runs[True]
    assert [o["output_ids"] for o in warm] == [o["output_ids"] for o in cold]
    assert [o["meta_info"]["spec_verify_ct"] for o in warm] == [o["meta_info"]["spec_verify_ct"] for o in cold]
    # The draft's match ends a token short of the target's (its entry of a prompt's last cached
    # token pairs it with the next one), so the target gives back that token.
    assert [o["meta_info"]["cached_tokens"] for o in warm] == [0] * 3 + [len(p) - 2 for p in prompts[3:]]
    assert kv["in_use_tokens"] == 0 and kv["cached_tokens"] > 0


def test_answers_from_several_runs_train_one_head(target, head, tmp_path):
    """--generate-only writes the answers and stops (no head); --sequences A B
    trains on both files' answers, each once, dropping a training answer that
    begins with one of their held-out prompts."""
    from radixserve.train_eagle3 import load_sequences, save_sequences

    other = tmp_path / "other.pt"
    train_eagle3(["--model-path", str(target), "--generate-only", "--prompts", "random", "--num-prompts", "2",
                  "--max-new-tokens", "4", "--seed", "7", "--sequences", str(other)])
    assert len(load_sequences(str(other))[0]) == 2 and not list(tmp_path.glob("*.safetensors"))
    # a third file whose one training answer begins with a held-out prompt of the first
    first_train, first_held, first_lens = load_sequences(str(head / "sequences.pt"))
    clash = tmp_path / "clash.pt"
    save_sequences(str(clash), [first_held[0][:first_lens[0]] + [5, 6]], [], [])
    out = tmp_path / "head"
    train_eagle3(["--model-path", str(target), "--output-dir", str(out), "--draft-vocab-size", "64",
                  "--sequences", str(head / "sequences.pt"), str(other), str(clash), str(other)])
    log = json.loads((out / "train_log.json").read_text())
    assert log["sequences"] == len(first_train) + 2 and log["held_out"]["prompts"] == len(first_held)
    with pytest.raises(ValueError, match="sequences"):
        train_eagle3(["--model-path", str(target), "--output-dir", str(out), "--sequences", str(other),
                      str(tmp_path / "missing.pt")])


SAMPLED = [{"temperature": 0.8, "top_p": 0.9, "sampling_seed": 7, "max_new_tokens": NEW_TOKENS, "ignore_eos": True},
           {"temperature": 1.0, "top_k": 20, "sampling_seed": 3, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}]


def tree_workload(engine) -> tuple:
    prompts = train_prompts(3)
    greedy = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS,
                                                                  "ignore_eos": True})
    sampled = engine.generate(input_ids=prompts[:2], sampling_params=SAMPLED)
    return [o["output_ids"] for o in greedy], [o["output_ids"] for o in sampled]


@pytest.fixture(scope="module")
def plain_outputs(target):
    with Engine(model_path=str(target), log_level="warning") as engine:
        return tree_workload(engine)


@pytest.mark.parametrize("topk,draft_tokens", [(2, 6), (4, 10)])
def test_trained_head_trees_keep_tokens(target, head, plain_outputs, topk, draft_tokens):
    with Engine(model_path=str(target), log_level="warning", speculative_algorithm="EAGLE3",
                speculative_draft_model_path=str(head), speculative_num_steps=3, speculative_eagle_topk=topk,
                speculative_num_draft_tokens=draft_tokens, disable_speculative_adaptive=True) as engine:
        assert tree_workload(engine) == plain_outputs
        spec = engine.get_server_info()["speculative"]
        assert_no_leak(engine)
        assert_draft_kv_balanced(engine)
        out = generate_then_abort(engine, train_prompts(1)[0], f"eagle-tree-abort-{topk}")
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert_no_leak(engine)
        assert_draft_kv_balanced(engine)
    # 1.58 (top-2) and 1.61 (top-4) seen, 1.38 for the chain; accepted paths left a node's first child 12 times
    assert spec["trees"] and spec["verify_ct"] > 0 and spec["mean_accept_length"] > 1.2, spec
    assert spec["off_first_branch"] > 0, spec


def test_not_a_head_is_refused(target):
    with pytest.raises(Exception, match="not an EAGLE-3 head"):
        Engine(model_path=str(target), log_level="warning", speculative_algorithm="EAGLE3",
               speculative_draft_model_path=str(target))


def test_time_budget_spent_by_generation_still_writes_a_head(target, tmp_path):
    """--time-budget counts from the start: a budget the generation already
    used up trains no step, and the untrained head is still written."""
    train_eagle3(["--model-path", str(target), "--output-dir", str(tmp_path), "--prompts", "random",
                  "--num-prompts", "2", "--max-new-tokens", "4", "--draft-vocab-size", "64", "--time-budget", "1"])
    assert json.loads((tmp_path / "train_log.json").read_text())["losses"] == []
    assert (tmp_path / "model.safetensors").stat().st_size > 0
