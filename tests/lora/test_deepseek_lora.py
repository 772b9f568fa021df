"""A PEFT adapter on DeepSeek-V2-Lite's attention: q_proj lives in the merged
q|kv_a projection (only its q rows take the adapter's delta) and o_proj is
row-parallel. Greedy tokens against transformers + peft on the same weights."""

from __future__ import annotations

from radixserve import Engine
from tests.conftest import assert_no_leak
from tests.lora.conftest import make_adapter, reference_greedy
from tests.lora.test_engine_lora import GREEDY, NEW_TOKENS, random_prompts
from tests.models.deepseek_tiny import build_deepseek


def test_attention_adapter_on_the_merged_q_matches_peft(embedded_tokenizer_dir, tmp_path):
    base = tmp_path / "deepseek_v2"
    model = build_deepseek("v2", 49152, base, embedded_tokenizer_dir)
    adapter = make_adapter(base, tmp_path / "attn", 4, ["q_proj", "o_proj"], seed=5)
    prompts = random_prompts([6, 13, 21], seed=3, vocab=model.config.vocab_size)
    expected = reference_greedy(base, adapter, prompts, NEW_TOKENS)
    assert expected != reference_greedy(base, None, prompts, NEW_TOKENS)  # the adapter changes the tokens
    engine = Engine(model_path=str(base), lora_paths=[f"attn={adapter}"], max_loras_per_batch=1)
    try:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=["attn"] * len(prompts))
        assert [o["output_ids"] for o in outs] == expected
        assert_no_leak(engine)
    finally:
        engine.shutdown()
