"""An EAGLE-3 head's layer in one C++ call (cpu_eagle3_layer.py) against the
eager head: a catch-up extend (a few tokens a request over its earlier
entries) and draft decode steps give bit-identical logits and hidden states
and write the same K/V; a new request's first extend runs eagerly."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers import cpu_kernels
from radixserve.model_executor.cpu_eagle3_layer import CpuEagle3Layer
from radixserve.model_executor.forward_batch import ForwardMode
from radixserve.server_args import ServerArgs
from tests.model_executor.test_spec_graphs import Requests

pytestmark = pytest.mark.skipif(not cpu_kernels.quantized_kernels_available(),
                                reason="the fused layer runs on a CPU with AMX or AVX-512 BF16")


def head_runner(target_path, out, dtype: str = "bfloat16"):
    """A random EAGLE-3 head for the tiny target, run as the draft runner runs
    one on the CPU (int8 linears), reading the target's embedding."""
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.train_eagle3 import head_config, init_head, save_head

    target = ModelRunner(ServerArgs(model_path=str(target_path), device="cpu", max_total_tokens=256,
                                    max_running_requests=4), warm_up=False)
    config = head_config(target.config, 64, [0, 1, 1])
    save_head(init_head(config, target, torch.arange(64), "cpu"), config, out, torch.bfloat16)
    head = ModelRunner(ServerArgs(model_path=str(out), device="cpu", dtype=dtype, torchao_config="int8wo",
                                  max_total_tokens=1024, max_running_requests=8), warm_up=False)
    head.model.attach_target(target.model)
    return head


def with_metadata(runner, fb):
    """fb with its attention metadata, which takes() reads (forward sets it again)."""
    fb.attn_backend = runner.attn_backend
    runner.attn_backend.init_forward_metadata(fb)
    return fb


def both_ways(runner, make_batch):
    """The batch eagerly, then through the fused layer, each writing its K/V:
    (eager output, fused output, eager K/V, fused K/V) of the batch's slots."""
    fused = runner.cpu_decode_layers
    pool = runner.pools.kv_pool

    def kv(fb):
        return [buf[fb.out_cache_loc].clone() for buf in pool.k_buffers + pool.v_buffers]

    runner.cpu_decode_layers = None
    fb = make_batch()
    eager = runner.forward(fb)
    eager_kv = kv(fb)
    for buf in pool.k_buffers + pool.v_buffers:  # the fused call must write them itself
        buf[fb.out_cache_loc] = 0
    runner.cpu_decode_layers = fused
    fb = with_metadata(runner, make_batch())
    assert fused.takes(fb)
    return eager, runner.forward(fb), eager_kv, kv(fb)


def test_fused_layer_equals_the_eager_head(tiny_model_factory, tmp_path):
    runner = head_runner(tiny_model_factory("llama"), tmp_path)
    assert isinstance(runner.cpu_decode_layers, CpuEagle3Layer)
    hidden = runner.model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    reqs = Requests(runner, [(0, 12), (0, 7), (0, 10)], spare=4)
    prompt = reqs.batch([0, 1, 2], [0, 0, 0], [6, 3, 5])
    prompt.spec_hidden, prompt.as_decode_step = torch.randn(14, 3 * hidden, generator=g).bfloat16(), True
    assert not runner.cpu_decode_layers.takes(with_metadata(runner, prompt))  # no earlier entries: a prompt, eagerly
    runner.forward(prompt)
    catch_up_features = torch.randn(6, 3 * hidden, generator=g).bfloat16()

    def catch_up():  # the target's features of a verify's accepted tokens
        fb = reqs.batch([0, 1, 2], [6, 3, 5], [3, 1, 2])
        fb.spec_hidden, fb.return_hidden, fb.as_decode_step = catch_up_features, True, True
        return fb

    step_hidden = torch.randn(3, hidden, generator=g).bfloat16()

    def draft_step():  # a later draft step: the previous step's output fed back
        fb = reqs.batch([0, 1, 2], [9, 4, 7], [1, 1, 1], mode=ForwardMode.DECODE)
        fb.spec_hidden, fb.return_hidden = step_hidden, True
        return fb

    for make_batch in (catch_up, draft_step):
        eager, fused, eager_kv, fused_kv = both_ways(runner, make_batch)
        assert torch.equal(eager.next_token_logits, fused.next_token_logits)
        assert torch.equal(eager.hidden, fused.hidden)
        assert all(torch.equal(a, b) for a, b in zip(eager_kv, fused_kv))
        assert eager_kv[0].abs().sum() > 0


def test_what_runs_eagerly(tiny_model_factory, tmp_path):
    runner = head_runner(tiny_model_factory("llama"), tmp_path, dtype="float32")
    assert runner.cpu_decode_layers is None  # float32 activations: not the int8 kernel's bfloat16 rows
    assert CpuEagle3Layer.for_model(runner.model, torch.device("cpu"), torch.bfloat16, object()) is None  # LoRA


def draft_runner(target_path, head_dir):
    """A DraftRunner for a random EAGLE-3 head saved in bfloat16, as the server
    builds one on the CPU (int8 linears and LM head), reading a bfloat16 target's embedding."""
    from types import SimpleNamespace

    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.speculative.draft_runner import DraftRunner
    from radixserve.train_eagle3 import head_config, init_head, save_head

    target = ModelRunner(ServerArgs(model_path=str(target_path), device="cpu", dtype="bfloat16",
                                    max_total_tokens=256, max_running_requests=4), warm_up=False)
    config = head_config(target.config, 64, [0, 1, 1])
    head = init_head(config, target, torch.arange(0, 128, 2), "cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights far from the initial ones, so that each step drafts something else
        for p in head.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    save_head(head, config, head_dir, torch.bfloat16)
    args = ServerArgs(model_path=str(target_path), device="cpu", speculative_algorithm="EAGLE3",
                      speculative_draft_model_path=str(head_dir), speculative_num_steps=3, speculative_eagle_topk=1,
                      speculative_num_draft_tokens=4)
    draft = DraftRunner(args, SimpleNamespace(max_running_requests=4, max_total_num_tokens=256,
                                              device=torch.device("cpu")))
    draft.model.attach_target(target.model)
    return draft


def eager_chain(draft, states, ids, positions, features, steps):
    """The drafts as EagleDrafter runs them without the fused chain: the
    catch-up extend, then steps - 1 decode steps feeding the head's output back."""
    from radixserve.layers.sampler import row_argmax

    head = draft.model
    out = draft.extend(states, ids, positions, features)
    drafts = [[t] for t in head.to_target_ids(row_argmax(out.next_token_logits)).tolist()]
    for step in range(1, steps):
        out = draft.decode(states, [d[-1] for d in drafts], [pos[-1] + step for pos in positions], out.hidden)
        for d, t in zip(drafts, head.to_target_ids(row_argmax(out.next_token_logits)).tolist()):
            d.append(t)
    return drafts


def test_fused_chain_drafts_as_the_eager_head(tiny_model_factory, tmp_path):
    """DraftRunner.chain (one C++ call for the catch-up extend, the later
    steps, the LM head and the greedy choices) gives the eager head's drafts
    (the head's layer, norm and LM head as torch and the kernels run them one
    by one) and writes the same K/V; a new request's first extend is refused."""
    from radixserve.speculative.draft_runner import DraftState

    draft = draft_runner(tiny_model_factory("llama"), tmp_path)
    hidden = draft.model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    states = [DraftState(draft.pools.req_to_token_pool.alloc()) for _ in range(3)]
    prompt_lens, catch_up = [7, 4, 9], [3, 1, 2]
    features = [torch.randn(n, 3 * hidden, generator=g).bfloat16() for n in (sum(prompt_lens), sum(catch_up))]
    prompt_ids = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in prompt_lens]
    prompt_positions = [list(range(n)) for n in prompt_lens]
    assert draft.chain(states, prompt_ids, prompt_positions, features[0], 3) is None  # no earlier entries
    draft.extend(states, prompt_ids, prompt_positions, features[0])
    for state in states:
        state.kv_len = state.spec_len
    ids = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in catch_up]
    positions = [list(range(p, p + n)) for p, n in zip(prompt_lens, catch_up)]
    pool = draft.pools.kv_pool

    def run(chain):
        drafts = chain(draft, states, ids, positions, features[1], 3)
        slots = torch.cat([draft.table[s.row, s.kv_len:s.spec_len] for s in states])
        kv = [buf[slots].clone() for buf in pool.k_buffers + pool.v_buffers]
        for state, n in zip(states, prompt_lens):
            draft.truncate(state, n)
        return drafts, kv

    fused, fused_kv = run(lambda d, *a: d.chain(*a))
    assert fused is not None and [len(d) for d in fused] == [3, 3, 3]
    draft.runner.cpu_decode_layers = None  # the head's layer as torch modules
    eager, eager_kv = run(eager_chain)
    assert fused == eager, (fused, eager)
    assert all(torch.equal(a, b) for a, b in zip(fused_kv, eager_kv)) and fused_kv[0].abs().sum() > 0
