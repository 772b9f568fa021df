"""Our engine against transformers on the same tiny random weights (float32)."""

from __future__ import annotations

import pytest
import torch

from radixserve import Engine
from tests.conftest import assert_no_leak, hf_greedy, load_hf_model

ARCHS = ["llama", "qwen2", "qwen3"]
PROMPT_LENS = [3, 7, 12, 18, 25, 31, 40, 47]
NEW_TOKENS = 32


def make_prompts(vocab: int) -> list:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=ARCHS)
def arch_setup(request, tiny_model_factory):
    path = tiny_model_factory(request.param)
    hf = load_hf_model(path)
    prompts = make_prompts(hf.config.vocab_size)
    return request.param, path, hf, prompts, hf_greedy(hf, prompts, NEW_TOKENS)


GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


def test_prefill_logits_match(arch_setup):
    """Full prefill logits, through the scheduler's own batch and runner."""
    from radixserve.managers.io_struct import TokenizedGenerateReqInput
    from radixserve.managers.req import Req
    from radixserve.managers.schedule_batch import ScheduleBatch
    from radixserve.managers.schedule_policy import PrefillAdder
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.sampling.sampling_params import SamplingParams
    from radixserve.server_args import ServerArgs

    _, path, hf, prompts, _ = arch_setup
    runner = ModelRunner(ServerArgs(model_path=str(path), device="cpu", max_total_tokens=4096))
    reqs = []
    for i, ids in enumerate(prompts[:4]):
        sp = SamplingParams.from_dict({"max_new_tokens": 1})
        sp.normalize()
        recv = TokenizedGenerateReqInput(rid=str(i), input_ids=ids, sampling_params=sp,
                                         return_logprob=True, logprob_start_len=0)
        reqs.append(Req(recv, sampling_seed=0))
    adder = PrefillAdder(4096, [], 0.7, 1, None, 16384)
    assert all(adder.add(r) for r in reqs)
    batch = ScheduleBatch(reqs, runner.pools, runner.device)
    assert batch.prepare_for_extend(adder.plans)
    out = runner.forward(batch.to_forward_batch())
    # Rows per request: positions 0..n-2 (input logprobs), then the last token.
    start = 0
    for ids in prompts[:4]:
        ours = out.all_logits[start:start + len(ids)]
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        rel = (ours - ref).norm() / ref.norm()
        assert rel < 1e-4, rel
        start += len(ids)


def test_greedy_matches_generate(arch_setup):
    _, path, _, prompts, expected = arch_setup
    with Engine(model_path=str(path)) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
        assert [o["meta_info"]["prompt_tokens"] for o in outs] == PROMPT_LENS
        assert_no_leak(engine)


def test_greedy_with_chunked_prefill_and_retraction(arch_setup):
    """Chunks of 16 tokens, and a KV pool too small for all eight requests at
    once: some get retracted and resumed, and the output is still identical."""
    _, path, _, prompts, expected = arch_setup
    with Engine(model_path=str(path), chunked_prefill_size=16, max_total_tokens=192,
                page_size=1) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        info = engine.get_server_info()
        assert info["num_retractions"] > 0, info
        assert_no_leak(engine)


def test_paged_kv_matches(arch_setup):
    _, path, _, prompts, expected = arch_setup
    with Engine(model_path=str(path), page_size=4, chunked_prefill_size=16,
                max_total_tokens=256) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        assert_no_leak(engine)


def test_logprobs_match_log_softmax(tiny_model_factory):
    path = tiny_model_factory("llama")
    hf = load_hf_model(path)
    ids = make_prompts(hf.config.vocab_size)[3]
    with Engine(model_path=str(path)) as engine:
        out = engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 4},
                              return_logprob=True, logprob_start_len=2, top_logprobs_num=3)
        assert_no_leak(engine)
    full = ids + out["output_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), -1)
    meta = out["meta_info"]
    # Output token i was predicted at position len(ids)-1+i.
    for i, (lp, tid, text) in enumerate(meta["output_token_logprobs"]):
        assert tid == full[len(ids) + i]
        assert abs(lp - ref[len(ids) - 1 + i, tid].item()) < 1e-4
        top = meta["output_top_logprobs"][i]
        ref_top = ref[len(ids) - 1 + i].topk(3)
        assert [t for _, t, _ in top] == ref_top.indices.tolist()
    inputs = meta["input_token_logprobs"]
    assert [t for _, t, _ in inputs] == ids[2:]
    for k, (lp, tid, _) in enumerate(inputs):
        pos = 2 + k
        assert abs(lp - ref[pos - 1, tid].item()) < 1e-4
