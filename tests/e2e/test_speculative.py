"""Speculative decoding end to end on a tiny random Llama: NGRAM and
STANDALONE give exactly the tokens decoding without speculation gives
(greedy, seeded sampling with penalties, stop tokens and strings and
max_new_tokens inside accepted runs, logprobs, streaming), greedy tokens equal
transformers', the target as its own draft accepts every draft, an unrelated
draft almost none, and the KV invariant holds after aborts."""

from __future__ import annotations

import json
import random
from typing import Dict, List, Tuple

import pytest

from radixserve import Engine
from tests.conftest import assert_draft_kv_balanced, assert_no_leak, generate_then_abort, hf_greedy, load_hf_model

NUM_STEPS = 3  # --speculative-num-steps; a verify step yields at most NUM_STEPS + 1 tokens
LOGPROB_TOL = 1e-4


def prompts(seed: int, count: int) -> List[List[int]]:
    """Prompts that repeat themselves, so n-gram drafts find matches."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        body = [rng.randrange(10, 1000) for _ in range(rng.randint(4, 20))]
        out.append(body * 3)
    return out


def workload() -> Tuple[List[List[int]], List[Dict]]:
    ids = prompts(1, 6)
    params = [
        {"temperature": 0, "max_new_tokens": 17, "ignore_eos": True},
        {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True},
        {"temperature": 0.8, "top_p": 0.9, "sampling_seed": 11, "max_new_tokens": 14, "ignore_eos": True},
        {"temperature": 1.0, "top_k": 20, "frequency_penalty": 0.5, "repetition_penalty": 1.2,
         "sampling_seed": 5, "max_new_tokens": 14, "ignore_eos": True},
        {"temperature": 0, "max_new_tokens": 15, "presence_penalty": 0.7, "ignore_eos": True},
        {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True},
    ]
    return ids, params


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def with_grammar(engine, ids) -> list:
    """A JSON-schema request batched with a plain one (such a batch decodes without speculation)."""
    return engine.generate(input_ids=ids[:2], sampling_params=[
        {"temperature": 0, "max_new_tokens": 20, "json_schema": json.dumps(SCHEMA)},
        {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}])


def generate(engine, ids, params) -> list:
    return engine.generate(input_ids=ids, sampling_params=params, return_logprob=True, top_logprobs_num=2)


@pytest.fixture(scope="module")
def target(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def baseline(target):
    """Outputs without speculation, and where their stops land (set after a first run)."""
    ids, params = workload()
    with Engine(model_path=str(target), log_level="warning") as engine:
        outs = generate(engine, ids, params)
        stops = stop_params(outs)
        stopped = generate(engine, ids[:2], stops)
        grammar = with_grammar(engine, ids)
    return ids, params, outs, stops, stopped, grammar


def stop_params(outs: list) -> List[Dict]:
    """A stop token at output index 6 and a max_new_tokens of 7: both inside
    the second accepted run of a draft that is always right."""
    first = outs[0]["output_ids"]
    return [{"temperature": 0, "max_new_tokens": 30, "stop_token_ids": [first[6]], "ignore_eos": True},
            {"temperature": 0, "max_new_tokens": 7, "ignore_eos": True}]


def assert_same(got: list, want: list) -> None:
    for g, w in zip(got, want):
        assert g["output_ids"] == w["output_ids"]
        assert g["meta_info"]["finish_reason"] == w["meta_info"]["finish_reason"]
        glp = [lp for lp, _, _ in g["meta_info"]["output_token_logprobs"]]
        wlp = [lp for lp, _, _ in w["meta_info"]["output_token_logprobs"]]
        assert len(glp) == len(wlp) and max(abs(a - b) for a, b in zip(glp, wlp)) < LOGPROB_TOL
        gtop = [[tid for _, tid, _ in top] for top in g["meta_info"]["output_top_logprobs"]]
        wtop = [[tid for _, tid, _ in top] for top in w["meta_info"]["output_top_logprobs"]]
        assert gtop == wtop


def spec_engine(target, **kwargs) -> Engine:
    """Speculation on every qualifying step (no governor): these tests count verify steps."""
    kwargs.setdefault("disable_speculative_adaptive", True)
    return Engine(model_path=str(target), log_level="warning", speculative_num_steps=NUM_STEPS, **kwargs)


def test_ngram_same_tokens_paged(target, baseline):
    ids, params, outs, stops, stopped, _ = baseline
    with spec_engine(target, speculative_algorithm="NGRAM", page_size=4) as engine:
        assert_same(generate(engine, ids, params), outs)
        assert_same(generate(engine, ids[:2], stops), stopped)
        info = engine.get_server_info()
        assert_no_leak(engine)
    assert info["speculative"]["verify_ct"] > 0 and info["speculative"]["mean_accept_length"] > 1.0


@pytest.fixture(scope="module")
def self_draft(target, baseline):
    """STANDALONE with the target itself as the draft."""
    with spec_engine(target, speculative_algorithm="STANDALONE",
                     speculative_draft_model_path=str(target)) as engine:
        yield engine


def test_self_draft_same_tokens(self_draft, baseline):
    ids, params, outs, stops, stopped, _ = baseline
    assert_same(generate(self_draft, ids, params), outs)
    got = generate(self_draft, ids[:2], stops)
    assert_same(got, stopped)
    # the stop token ended the request in the middle of an accepted run
    assert got[0]["meta_info"]["finish_reason"]["type"] == "stop" and len(got[0]["output_ids"]) == 7
    assert_no_leak(self_draft)


def test_grammar_batch_same_tokens(self_draft, baseline):
    got = with_grammar(self_draft, baseline[0])
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in baseline[-1]]
    assert got[0]["text"].lstrip().startswith("{")  # the constrained answer is a JSON object so far
    assert_no_leak(self_draft)


def test_self_draft_accepts_every_draft(self_draft, target):
    runs = 5
    new_tokens = 1 + runs * (NUM_STEPS + 1)  # the prefill's token, then full runs
    ids = prompts(2, 3)
    outs = self_draft.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": new_tokens,
                                                               "ignore_eos": True})
    hf = load_hf_model(target)
    assert [o["output_ids"] for o in outs] == hf_greedy(hf, ids, new_tokens)
    for out in outs:
        meta = out["meta_info"]
        assert meta["spec_verify_ct"] == runs and meta["spec_accept_rate"] == 1.0
        assert meta["spec_accept_length"] == new_tokens / runs  # completion tokens / verify steps


def test_self_draft_streaming(self_draft, baseline):
    ids, params, outs, _, _, _ = baseline
    chunks = list(self_draft.generate(input_ids=ids[0], sampling_params=params[0], stream=True))
    assert chunks[-1]["output_ids"] == outs[0]["output_ids"]
    assert len(chunks) < len(outs[0]["output_ids"])  # several tokens per streamed chunk


def test_self_draft_trees_same_tokens(target, baseline):
    """STANDALONE top-K trees (the target as its own draft: its first branch
    is always the target's choice): the same tokens, and both KV pools
    balance after the run and after an abort."""
    ids, params, outs, _, _, _ = baseline
    with spec_engine(target, speculative_algorithm="STANDALONE", speculative_draft_model_path=str(target),
                     speculative_eagle_topk=2, speculative_num_draft_tokens=6) as engine:
        assert_same(generate(engine, ids[:2], params[:2]), outs[:2])
        # greedy: the target's token is always a node's first (likeliest) child
        assert engine.get_server_info()["speculative"]["off_first_branch"] == 0
        assert_same(generate(engine, ids, params), outs)
        spec = engine.get_server_info()["speculative"]
        assert_no_leak(engine)
        out = generate_then_abort(engine, prompts(3, 1)[0], "standalone-tree-abort")
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert_no_leak(engine)
        assert_draft_kv_balanced(engine)
    assert spec["trees"] and spec["mean_accept_length"] > 1.5, spec


def test_abort_keeps_kv_invariant(self_draft):
    out = generate_then_abort(self_draft, prompts(3, 1)[0], "spec-abort")
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(out["output_ids"]) < 400
    assert_no_leak(self_draft)


def test_unrelated_draft_accepts_almost_nothing(target, tiny_model_factory, baseline):
    ids, params, outs, _, _, _ = baseline
    draft = tiny_model_factory("qwen2")  # same tokenizer, other random weights
    with spec_engine(target, speculative_algorithm="STANDALONE", speculative_draft_model_path=str(draft)) as engine:
        got = generate(engine, ids, params)
        assert_no_leak(engine)
    assert_same(got, outs)
    verified = [o["meta_info"] for o in got if o["meta_info"]["spec_verify_ct"]]
    assert verified and all(m["spec_accept_rate"] < 0.2 for m in verified)


def test_default_model_same_tokens():
    """The packaged SmolLM2-135M-Instruct (bfloat16 on its int4 kernels), each
    request alone: n-gram drafts on a rewriting prompt, n-gram trees on chat
    answers, and the shipped EAGLE-3 head accept tokens, and every answer is
    plain decoding's token for token. (A verified token attends as a decode query; with the extend path's
    attention instead, the bicycle answer drifted from plain decoding's.)"""
    text = "The cat sat on the mat. The dog lay by the door. The bird sang in the tree."
    rewrite = {"text": f"Repeat exactly: {text}\n{text}\n", "max_new_tokens": 24}
    questions = ["Explain why the sky is blue in three sentences.", "Describe how a bicycle works."]

    def answers(**flags) -> List[Dict]:
        with Engine(log_level="warning", **flags) as engine:
            chats = [engine.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                                          add_generation_prompt=True, return_dict=True)
                     for q in questions]
            outs = [engine.generate(rewrite["text"], {"temperature": 0, "max_new_tokens": rewrite["max_new_tokens"]})]
            outs += [engine.generate(input_ids=list(c["input_ids"]), sampling_params={"temperature": 0,
                                                                                       "max_new_tokens": 96})
                     for c in chats]
            assert_no_leak(engine)
        return outs

    want = answers()
    got = answers(speculative_algorithm="NGRAM", disable_speculative_adaptive=True)
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    assert got[0]["meta_info"]["spec_accept_rate"] > 0
    assert sum(g["meta_info"]["spec_verify_ct"] for g in got[1:]) < sum(len(g["output_ids"]) for g in got[1:])
    # the shipped EAGLE-3 head, found without a draft path: the same tokens, and on the chat
    # answers well over one token a verify (it walks about 2 there; an untrained head, about 1)
    got = answers(speculative_algorithm="EAGLE3", disable_speculative_adaptive=True)
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    chat = [g["meta_info"] for g in got[1:]]
    assert sum(m["completion_tokens"] for m in chat) / sum(m["spec_verify_ct"] for m in chat) > 1.5


def test_governor_measures_both_modes_and_keeps_tokens(target, baseline):
    """With the governor on (the default), a long request at batch 1 runs a
    probe of verify steps, then one of plain steps (overlapped, as without
    speculation), and its tokens are plain decoding's whatever the governor chose."""
    ids, params, outs, _, _, _ = baseline
    long_params = {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}
    with Engine(model_path=str(target), log_level="warning") as engine:
        want = engine.generate(input_ids=ids[0], sampling_params=long_params)["output_ids"]
    with spec_engine(target, speculative_algorithm="STANDALONE", speculative_draft_model_path=str(target),
                     disable_speculative_adaptive=False) as engine:
        out = engine.generate(input_ids=ids[0], sampling_params=long_params)
        info = engine.get_server_info()
        assert_no_leak(engine)
    assert out["output_ids"] == want
    assert out["meta_info"]["spec_verify_ct"] >= 63  # the first probe: speculation
    costs = info["speculative"]["adaptive"]["1"]
    assert costs["speculate_s_per_token"] > 0 and costs["plain_s_per_token"] > 0
    # the plain steps ran under the overlap schedule: each launched while the one before was in flight
    assert info["num_overlapped_batches"] > 0


def test_governor_switching_modes_under_overlap_keeps_tokens(target, baseline):
    """A batch of four long requests (greedy, seeded sampling with penalties,
    logprobs) while the governor moves between verify steps and overlapped
    plain steps, and requests finish at different steps: every token, finish
    reason and logprob equals plain decoding's."""
    ids, _, _, _, _, _ = baseline
    params = [{"temperature": 0, "max_new_tokens": 260, "ignore_eos": True},
              {"temperature": 0.8, "top_p": 0.9, "sampling_seed": 3, "max_new_tokens": 200, "ignore_eos": True},
              {"temperature": 1.0, "top_k": 20, "frequency_penalty": 0.4, "sampling_seed": 9,
               "max_new_tokens": 150, "ignore_eos": True},
              {"temperature": 0, "max_new_tokens": 90, "presence_penalty": 0.5, "ignore_eos": True}]
    with Engine(model_path=str(target), log_level="warning") as engine:
        want = generate(engine, ids[:4], params)
    with spec_engine(target, speculative_algorithm="STANDALONE", speculative_draft_model_path=str(target),
                     disable_speculative_adaptive=False) as engine:
        got = generate(engine, ids[:4], params)
        info = engine.get_server_info()
        assert_no_leak(engine)
    assert_same(got, want)
    assert info["speculative"]["verify_ct"] > 0 and info["num_overlapped_batches"] > 0


# ---- NGRAM trees (breadth > 1) ----
TREE_ARGS = dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=8, speculative_ngram_max_bfs_breadth=3)


def branching_prompts() -> List[List[int]]:
    """Prompts of three distinct tokens in random order: their n-gram tries
    branch, and on these four the target's greedy continuation takes a
    branch other than the first at some verify steps (found by trying
    candidates of this construction with the tiny Llama)."""
    rng = random.Random(5)
    candidates = []
    for _ in range(30):
        alphabet = [rng.randrange(10, 1000) for _ in range(3)]
        candidates.append([rng.choice(alphabet) for _ in range(30)])
    return [candidates[i] for i in (1, 4, 25, 29)]


def tree_params() -> List[Dict]:
    return [{"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}] * 2 + [
        {"temperature": 0.7, "top_k": 8, "frequency_penalty": 0.3, "sampling_seed": 7, "max_new_tokens": 30,
         "ignore_eos": True},
        {"temperature": 0, "max_new_tokens": 33, "presence_penalty": 0.4, "ignore_eos": True}]


@pytest.fixture(scope="module")
def tree_baseline(target):
    with Engine(model_path=str(target), log_level="warning") as engine:
        return generate(engine, branching_prompts(), tree_params())


@pytest.mark.parametrize("page_size", [1, 4])
def test_ngram_trees_same_tokens(target, baseline, tree_baseline, page_size):
    """Greedy (a non-first branch accepted too), seeded sampling with
    penalties, logprobs, stops inside accepted runs: plain decoding's tokens;
    the KV invariant after the batches and after an abort. One-slot pages
    take the accepted path by rewriting the request's table, larger pages by
    moving its KV."""
    ids, params, outs, stops, stopped, _ = baseline
    with spec_engine(target, page_size=page_size, **TREE_ARGS) as engine:
        assert_same(generate(engine, branching_prompts(), tree_params()), tree_baseline)
        info = engine.get_server_info()["speculative"]
        assert info["trees"] and info["off_first_branch"] > 0
        assert_same(generate(engine, ids, params), outs)
        assert_same(generate(engine, ids[:2], stops), stopped)
        assert_no_leak(engine)
        out = generate_then_abort(engine, branching_prompts()[0], "tree-abort")
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert_no_leak(engine)
