"""The CUDA fast path gives the outputs of the plain path (run on the GPU machine;
skipped without CUDA).

Greedy tokens of a tiny float32 model are identical between the torch-native
and Triton attention backends, with and without CUDA graphs, the overlap
schedule and mixed batches; bf16 logits of the Llama-3.1-8B shape agree between the backends.
"""

from __future__ import annotations

import json

import pytest
import torch

from radixserve import Engine
from tests.conftest import assert_no_leak

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEW_TOKENS = 24


def prompts(vocab: int) -> list:
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(10, vocab, (40,), generator=g).tolist()
    own = [torch.randint(10, vocab, (n,), generator=g).tolist() for n in (1, 5, 17, 33, 64, 130, 300, 9)]
    # Two share a long prefix, so the second one extends a cached prefix.
    return own + [shared + own[2], shared + own[3]]


def greedy(path, **args) -> list:
    with Engine(model_path=str(path), dtype="float32", log_level="warning", **args) as engine:
        ps = prompts(2000)
        first = engine.generate(input_ids=ps[:-1], sampling_params={
            "temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True})
        last = engine.generate(input_ids=ps[-1], sampling_params={
            "temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True})
        assert_no_leak(engine)
    return [o["output_ids"] for o in first] + [last["output_ids"]]


VARIANTS = {
    "triton+graph+overlap": {},
    "triton+graph": {"disable_overlap_schedule": True},
    "triton+overlap": {"disable_cuda_graph": True},
    "triton": {"disable_cuda_graph": True, "disable_overlap_schedule": True},
    "triton+graph+page16": {"page_size": 16},
    # chunks of 64: later chunks run in one forward with the decodes of the requests already running
    "triton+graph+overlap+mixed": {"enable_mixed_chunk": True, "chunked_prefill_size": 64},
}


@pytest.fixture(scope="module")
def reference(tiny_model_factory):
    path = tiny_model_factory("llama")
    return path, greedy(path, attention_backend="torch_native", disable_cuda_graph=True,
                        disable_overlap_schedule=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_identical_across_fast_paths(reference, variant):
    path, expected = reference
    got = greedy(path, attention_backend="triton", **VARIANTS[variant])
    assert got == expected


def test_bf16_logits_8b_shape_agree_between_backends(tmp_path, embedded_tokenizer_dir):
    """Prefill and decode logits of the Llama-3.1-8B shape (dummy bf16 weights):
    ||triton - torch_native|| / ||torch_native|| < 1e-2."""
    import shutil

    from transformers import LlamaConfig

    from radixserve.layers.attention.torch_native import TorchNativeAttnBackend
    from radixserve.managers.io_struct import TokenizedGenerateReqInput
    from radixserve.managers.req import Req
    from radixserve.managers.schedule_batch import ScheduleBatch
    from radixserve.managers.schedule_policy import PrefillAdder
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.sampling.sampling_params import SamplingParams
    from radixserve.server_args import ServerArgs

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    config.save_pretrained(tmp_path)
    for f in embedded_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    runner = ModelRunner(ServerArgs(model_path=str(tmp_path), load_format="dummy", dtype="bfloat16",
                                    attention_backend="triton", disable_cuda_graph=True,
                                    max_total_tokens=1 << 15))
    triton_backend, native_backend = runner.attn_backend, TorchNativeAttnBackend()
    g = torch.Generator().manual_seed(0)
    reqs = []
    for i, n in enumerate((7, 300, 1500, 64)):
        sp = SamplingParams.from_dict({"max_new_tokens": 2})
        sp.normalize()
        ids = torch.randint(100, 49000, (n,), generator=g).tolist()
        reqs.append(Req(TokenizedGenerateReqInput(rid=str(i), input_ids=ids, sampling_params=sp), sampling_seed=0))
    adder = PrefillAdder(1 << 15, [], 0.7, 1, None, 16384)
    assert all(adder.add(r) for r in reqs)
    batch = ScheduleBatch(reqs, runner.pools, runner.device)
    assert batch.prepare_for_extend(adder.plans)

    def logits_with(backend) -> torch.Tensor:
        runner.attn_backend = backend
        return runner.forward(batch.to_forward_batch()).next_token_logits.float()

    # The KV written by either backend is the same (it is the projections' output).
    ref, ours = logits_with(native_backend), logits_with(triton_backend)
    assert (ours - ref).norm() / ref.norm() < 1e-2
    batch.last_token_ids = ref.argmax(-1)
    batch.prepare_for_decode()
    ref, ours = logits_with(native_backend), logits_with(triton_backend)
    assert (ours - ref).norm() / ref.norm() < 1e-2


def test_fp8_kv_cache_greedy_identical_between_backends(reference):
    """With an FP8 KV cache both backends read the same stored values: the
    Triton store kernel (which saturates) and CUDA graphs change no token."""
    path, _ = reference
    plain = greedy(path, attention_backend="torch_native", disable_cuda_graph=True, disable_overlap_schedule=True,
                   kv_cache_dtype="fp8_e4m3")
    assert greedy(path, attention_backend="triton", kv_cache_dtype="fp8_e4m3") == plain


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def serve_varied_requests(engine, vocab: int, context_len: int) -> None:
    """Requests of many shapes: a batch of prompts from 1 to 1,100 tokens (one
    prefill of up to 3,000 tokens), then singles with input logprobs, a
    JSON-schema request, radix hits and mixed batches (chunks beside decodes)."""
    g = torch.Generator().manual_seed(11)
    lengths = [n for n in (1, 2, 3, 5, 15, 16, 17, 33, 100, 127, 129, 300, 511, 700, 1100) if n + 80 < context_len]
    prompts = [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths]
    sampled = {"max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9, "top_k": 20, "ignore_eos": True}
    engine.generate(input_ids=prompts, sampling_params=sampled)
    for p in prompts[::3]:
        engine.generate(input_ids=p, sampling_params={"max_new_tokens": 3, "temperature": 0},
                        return_logprob=True, logprob_start_len=0, top_logprobs_num=2)
    engine.generate(prompt="Say a number", sampling_params={"max_new_tokens": 10, "json_schema": json.dumps(SCHEMA)})
    longer = [p + torch.randint(10, vocab, (37,), generator=g).tolist() for p in prompts] * 3
    engine.generate(input_ids=longer, sampling_params={**sampled, "max_new_tokens": 40})


@pytest.mark.parametrize("arch", ["llama", "deepseek_v2"])
def test_nothing_compiles_while_serving(arch, tiny_model_factory, embedded_tokenizer_dir, tmp_path):
    """Every Triton kernel variant is compiled at start-up (kernel_warmup.py):
    the scheduler's compile watch counts none during a varied workload in bf16,
    with mixed batches and (DeepSeek) the fused MoE and MLA kernels."""
    from transformers import AutoTokenizer

    from tests.models.deepseek_tiny import build_deepseek

    vocab = len(AutoTokenizer.from_pretrained(embedded_tokenizer_dir))
    if arch == "llama":
        path = tiny_model_factory("llama")
    else:
        path = tmp_path / "ds"
        build_deepseek("v2", vocab, path, embedded_tokenizer_dir, max_position_embeddings=4096)
    with Engine(model_path=str(path), dtype="bfloat16", enable_mixed_chunk=True, chunked_prefill_size=1024,
                log_level="warning") as engine:
        serve_varied_requests(engine, vocab, engine.get_server_info()["context_length"])
        info = engine.get_server_info()
        assert info["kernel_compiles_while_serving"] == 0
        assert_no_leak(engine)
