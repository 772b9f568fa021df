"""The target's KV pool pays for its draft model's: the draft keeps as many
tokens as the target, so the memory that sizes the target's pool is divided
by both models' bytes per token (an equal-sized STANDALONE draft on a GPU
asked for a second 85% of the memory before)."""

from __future__ import annotations

from radixserve.model_executor.model_runner import ModelRunner
from radixserve.server_args import ServerArgs

# A small share of the host's memory: beyond the weights, a pool of some ten thousand tokens.
FRACTION = 0.003


def runner(path, **kwargs) -> ModelRunner:
    return ModelRunner(ServerArgs(model_path=str(path), device="cpu", max_running_requests=4,
                                  disable_cuda_graph=True, **kwargs), warm_up=False)


def test_target_pool_is_divided_by_both_models_bytes_per_token(tiny_model_factory):
    target, draft_path = tiny_model_factory("llama"), tiny_model_factory("qwen3")
    plain = runner(target, mem_fraction_static=FRACTION)
    speculative = runner(target, mem_fraction_static=FRACTION, speculative_algorithm="STANDALONE",
                         speculative_draft_model_path=str(draft_path))
    draft = runner(draft_path, max_total_tokens=64)
    assert speculative._draft_kv_bytes_per_token() == draft.kv_bytes_per_token
    assert plain._draft_kv_bytes_per_token() == 0
    share = plain.kv_bytes_per_token / (plain.kv_bytes_per_token + draft.kv_bytes_per_token)
    expected = plain.max_total_num_tokens * share
    assert abs(speculative.max_total_num_tokens - expected) <= 0.01 * expected
