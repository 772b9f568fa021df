"""Several adapters and the base model in one engine, against transformers +
peft on the same weights: mixed batches, chunked prefill, slot eviction
(3 adapters, 2 slots), radix hits only within an adapter, logits, and
adapters loaded and unloaded while requests run."""

from __future__ import annotations

import threading

import pytest
import torch

from radixserve import Engine
from tests.conftest import assert_no_leak
from tests.lora.conftest import make_adapter, reference_greedy

ADAPTERS = ("attn", "mlp", "all")
PROMPT_LENS = [5, 11, 19, 27, 34, 40]
NEW_TOKENS = 8
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


def random_prompts(lens, seed: int, vocab: int = 40000) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def served(request, lora_setup):
    """An engine with the three adapters, 2 slots, 16-token prefill chunks."""
    setup = lora_setup(request.param)
    prompts = random_prompts(PROMPT_LENS, seed=1)
    expected = {name: reference_greedy(setup["base"], setup.get(name), prompts, NEW_TOKENS)
                for name in (None, *ADAPTERS)}
    # Qwen2's engine also decodes the running requests inside every prefill (mixed batches).
    engine = Engine(model_path=str(setup["base"]), lora_paths=[f"{n}={setup[n]}" for n in ADAPTERS],
                    max_loras_per_batch=2, chunked_prefill_size=16, enable_mixed_chunk=request.param == "qwen2",
                    page_size=1)  # token-exact radix hits (the CPU default page is 16)
    yield request.param, setup, engine, prompts, expected
    engine.shutdown()


def test_mixed_batches_match_peft(served):
    arch, _, engine, prompts, expected = served
    for shift in range(4):  # every prompt under every adapter and the base, all in mixed batches
        names = [(list(ADAPTERS) + [None])[(i + shift) % 4] for i in range(len(prompts))]
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=names)
        assert [o["output_ids"] for o in outs] == [expected[n][i] for i, n in enumerate(names)], names
    info = engine.get_server_info()
    assert info["lora"]["slot_loads"] > 3  # 3 adapters took turns in 2 slots
    assert arch != "qwen2" or info["num_mixed_batches"] > 0
    assert_no_leak(engine)


def test_radix_hits_stay_within_an_adapter(served):
    _, setup, engine, _, _ = served
    prompt = random_prompts([36], seed=7)[0]
    want = {n: reference_greedy(setup["base"], setup.get(n), [prompt], NEW_TOKENS)[0] for n in ("attn", "mlp", None)}

    def run(name):
        out = engine.generate(input_ids=prompt, sampling_params=GREEDY, lora_path=name)
        assert out["output_ids"] == want[name], name
        return out["meta_info"]["cached_tokens"]

    assert run("attn") == 0
    assert run("attn") == len(prompt) - 1  # its own prefix is reused
    assert run("mlp") == 0  # never another adapter's KV...
    assert run(None) == 0  # ...nor the base model's
    assert run(None) == len(prompt) - 1
    assert run("mlp") == len(prompt) - 1


def test_logits_match_peft(served):
    """Prefill logits of two adapters and the base in one forward, through the
    scheduler's batch and the model runner."""
    from peft import PeftModel

    from radixserve.lora.manager import LoRAManager
    from radixserve.managers.io_struct import TokenizedGenerateReqInput
    from radixserve.managers.req import Req
    from radixserve.managers.schedule_batch import ScheduleBatch
    from radixserve.managers.schedule_policy import PrefillAdder
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.sampling.sampling_params import SamplingParams
    from radixserve.server_args import ServerArgs
    from tests.conftest import load_hf_model

    _, setup, _, prompts, _ = served
    args = ServerArgs(model_path=str(setup["base"]), device="cpu", max_total_tokens=2048,
                      lora_paths=[f"{n}={setup[n]}" for n in ADAPTERS])
    runner = ModelRunner(args)
    assert isinstance(runner.lora_manager, LoRAManager)
    names = ["mlp", None, "all"]
    reqs = []
    for i, (ids, name) in enumerate(zip(prompts[:3], names)):
        sp = SamplingParams.from_dict({"max_new_tokens": 1})
        sp.normalize()
        lora_id = None if name is None else ADAPTERS.index(name) + 1
        recv = TokenizedGenerateReqInput(rid=str(i), input_ids=ids, sampling_params=sp, return_logprob=True,
                                         logprob_start_len=0, lora_id=lora_id)
        reqs.append(Req(recv, sampling_seed=0))
    adder = PrefillAdder(2048, [], 0.7, 1, None, 16384)
    assert all(adder.add(r) for r in reqs)
    batch = ScheduleBatch(reqs, runner.pools, runner.device)
    assert batch.prepare_for_extend(adder.plans)
    out = runner.forward(batch.to_forward_batch())
    start = 0
    for ids, name in zip(prompts[:3], names):
        ref_model = load_hf_model(setup["base"])
        if name is not None:
            ref_model = PeftModel.from_pretrained(ref_model, setup[name]).eval()
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].float()
        ours = out.all_logits[start:start + len(ids)]
        assert (ours - ref).norm() / ref.norm() < 1e-4, name
        start += len(ids)


@pytest.mark.parametrize("served", ["llama"], indirect=True)  # one architecture is enough for the control path
def test_load_and_unload_while_requests_run(served, tmp_path):
    arch, setup, engine, prompts, expected = served
    long_prompt, long_new = prompts[2], 160  # long enough to be running still when paused
    long_want = reference_greedy(setup["base"], setup["attn"], [long_prompt], long_new)[0]
    first_chunk, result = threading.Event(), {}

    def long_request():
        chunks = engine.generate(input_ids=long_prompt, lora_path="attn", stream=True,
                                 sampling_params={**GREEDY, "max_new_tokens": long_new})
        for chunk in chunks:
            first_chunk.set()
            result["ids"] = chunk["output_ids"]

    running = threading.Thread(target=long_request)
    running.start()
    assert first_chunk.wait(60)
    # A new adapter (the mlp weights under another name) serves at once...
    loaded = engine.load_lora_adapter("mlp2", str(setup["mlp"]))
    assert set(loaded) == {"attn", "mlp", "all", "mlp2"}
    out = engine.generate(input_ids=prompts[:2], sampling_params=GREEDY, lora_path=["mlp2", None])
    assert [o["output_ids"] for o in out] == [expected["mlp"][0], expected[None][1]]
    # ...and unloading "attn" waits for its running request: paused mid-way, it
    # holds the unload until generation continues, then ends undisturbed.
    engine.pause_generation()
    unloading = threading.Thread(target=engine.unload_lora_adapter, args=("attn",))
    unloading.start()
    unloading.join(1.0)
    result["at_pause"] = len(result["ids"])
    assert unloading.is_alive() or result["at_pause"] == long_new, "unload did not wait for the running request"
    engine.continue_generation()
    unloading.join(60)
    running.join(60)
    assert not unloading.is_alive() and not running.is_alive()
    assert result["ids"] == long_want
    assert "attn" not in engine.loaded_lora_adapters()
    with pytest.raises(ValueError, match="lora_path: unknown LoRA adapter 'attn'"):
        engine.generate(input_ids=prompts[0], sampling_params=GREEDY, lora_path="attn")
    # Loaded again under its old name: new id, so nothing of the old one's cache is reused.
    engine.load_lora_adapter("attn", str(setup["attn"]))
    again = engine.generate(input_ids=long_prompt, sampling_params=GREEDY, lora_path="attn")
    assert again["output_ids"] == expected["attn"][2] and again["meta_info"]["cached_tokens"] == 0
    engine.unload_lora_adapter("mlp2")
    assert_no_leak(engine)


@pytest.mark.parametrize("served", ["llama"], indirect=True)  # one architecture is enough for the error path
def test_bad_adapters_are_refused_and_others_serve_on(served, tmp_path):
    arch, setup, engine, prompts, expected = served
    with pytest.raises(ValueError, match="'missing'.*no adapter_config.json"):
        engine.load_lora_adapter("missing", str(tmp_path / "nowhere"))
    big = make_adapter(setup["base"], tmp_path / "big", 16, ["q_proj"], seed=5)
    with pytest.raises(ValueError, match="rank 16 is larger than max_lora_rank \\(8\\)"):
        engine.load_lora_adapter("big", str(big))
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_lora_adapter("mlp", str(setup["mlp"]))
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        engine.unload_lora_adapter("nope")
    with pytest.raises(ValueError, match="lora_path"):
        engine.generate(input_ids=[prompts[0], prompts[1]], sampling_params=GREEDY, lora_path=["mlp", "nope"])
    out = engine.generate(input_ids=prompts[1], sampling_params=GREEDY, lora_path="mlp")
    assert out["output_ids"] == expected["mlp"][1]
