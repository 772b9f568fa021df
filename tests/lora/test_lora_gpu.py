"""LoRA on CUDA (the GPU machine; skipped without CUDA): the segmented Triton
kernels with decode CUDA graphs, and the torch backend, give transformers +
peft's greedy tokens on a tiny float32 model, in mixed batches."""

from __future__ import annotations

import pytest
import torch

from radixserve import Engine
from tests.conftest import assert_no_leak
from tests.lora.conftest import reference_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ADAPTERS = ("attn", "mlp", "all")
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_greedy_matches_peft_on_cuda(lora_setup, backend):
    setup = lora_setup("llama")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(10, 40000, (n,), generator=g).tolist() for n in (3, 9, 17, 30, 41, 64, 5, 12)]
    names = [(list(ADAPTERS) + [None])[i % 4] for i in range(len(prompts))]
    want = {n: reference_greedy(setup["base"], setup.get(n), prompts, GREEDY["max_new_tokens"])
            for n in (None, *ADAPTERS)}
    with Engine(model_path=str(setup["base"]), dtype="float32", lora_backend=backend, max_loras_per_batch=2,
                lora_paths=[f"{n}={setup[n]}" for n in ADAPTERS], log_level="warning") as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=names)
        assert [o["output_ids"] for o in outs] == [want[n][i] for i, n in enumerate(names)]
        assert_no_leak(engine)


def test_nothing_compiles_while_serving_with_adapters(lora_setup):
    """The start-up warm-up runs its forwards through a loaded adapter, so the
    segmented kernels' prefill and decode variants are compiled before serving:
    mixed adapter/base batches of varied lengths, in bf16, compile nothing."""
    setup = lora_setup("llama")
    g = torch.Generator().manual_seed(8)
    with Engine(model_path=str(setup["base"]), dtype="bfloat16", enable_mixed_chunk=True, chunked_prefill_size=256,
                lora_paths=[f"{n}={setup[n]}" for n in ADAPTERS], log_level="warning") as engine:
        for round_ in range(3):
            lens = torch.randint(1, 300, (12,), generator=g).tolist()
            prompts = [torch.randint(10, 40000, (n,), generator=g).tolist() for n in lens]
            names = [(list(ADAPTERS) + [None])[(i + round_) % 4] for i in range(len(prompts))]
            engine.generate(input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": 20}, lora_path=names)
        assert engine.get_server_info()["kernel_compiles_while_serving"] == 0
        assert_no_leak(engine)
