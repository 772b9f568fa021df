"""LoRA under tensor parallelism (two gloo ranks on the CPU): each rank keeps
its rows of B on the column-parallel q|k|v and gate|up, its columns of A on
the row-parallel o and down (whose all-reduce sums the partial deltas), and
the greedy tokens of a mixed batch equal transformers + peft's."""

from __future__ import annotations

import torch

from radixserve import Engine
from tests.conftest import assert_no_leak
from tests.lora.conftest import reference_greedy

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def test_tp2_mixed_batch_matches_peft(lora_setup):
    setup = lora_setup("llama")
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(10, 40000, (n,), generator=g).tolist() for n in (4, 13, 22, 9, 30, 17)]
    names = ["attn", "mlp", "all", None, "mlp", "attn"]
    want = {n: reference_greedy(setup["base"], setup.get(n), prompts, GREEDY["max_new_tokens"])
            for n in set(names)}
    with Engine(model_path=str(setup["base"]), tp_size=2, lora_paths=[f"{n}={setup[n]}" for n in ("attn", "mlp", "all")],
                max_loras_per_batch=2, chunked_prefill_size=16, log_level="warning") as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=names)
        assert [o["output_ids"] for o in outs] == [want[n][i] for i, n in enumerate(names)]
        assert_no_leak(engine)
