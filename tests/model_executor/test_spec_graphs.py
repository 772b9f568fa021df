"""Speculative decoding's graphs (spec_graph_runner.py): a verify-shaped
batch (several requests, each with up to `width` new tokens on its own
cached prefix, every position's logits and the captured layers), a draft
head's extend and its one-token steps give what the eager forward gives,
and the padding writes no KV slot but the reserved slot 0. On the CPU the
buckets run eagerly on the static buffers (Triton's interpreter runs the
attention kernels); on CUDA the graphs are captured and replayed."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import pytest
import torch

from radixserve.managers.schedule_batch import set_extend_lens
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from radixserve.model_executor.spec_graph_runner import SpecGraphRunner, SpecGraphShape
from radixserve.server_args import ServerArgs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []
WIDTH = 4
TOL = 1e-4 if DEVICE == "cuda" else 1e-5
# (cached tokens, new tokens) per request: a full width, one token, a fresh
# request, and a request with fewer tokens than the width.
REQUESTS = [(7, 4), (12, 1), (0, 3), (5, 2)]


def runner_for(path, **kwargs):
    from radixserve.model_executor.model_runner import ModelRunner

    return ModelRunner(ServerArgs(model_path=str(path), device=DEVICE, dtype="float32", attention_backend="triton",
                                  max_total_tokens=1024, max_running_requests=8, disable_cuda_graph=True, **kwargs),
                       warm_up=False)


class Requests:
    """Rows with KV slots, their first `cached` tokens already forwarded."""

    def __init__(self, runner, specs: Sequence[Tuple[int, int]], seed: int = 0, spare: int = 0) -> None:
        """specs: (cached, new) tokens per request; `spare` more tokens each have slots too."""
        self.runner, self.specs = runner, specs
        pools = runner.pools
        g = torch.Generator().manual_seed(seed)
        sizes = [c + n + spare for c, n in specs]
        self.ids = [torch.randint(10, 1000, (size,), generator=g).tolist() for size in sizes]
        self.rows = [pools.req_to_token_pool.alloc() for _ in specs]
        for row, size in zip(self.rows, sizes):
            pools.req_to_token_pool.req_to_token[row, :size] = pools.allocator.alloc_extend([0], [size], [0])
        cached = [(i, c) for i, (c, _) in enumerate(specs) if c]
        if cached:
            runner.forward_eager(self.batch([i for i, _ in cached], [0] * len(cached), [c for _, c in cached]))

    def batch(self, which: List[int], starts: List[int], lens: List[int], every_logit: bool = False,
              mode: ForwardMode = ForwardMode.EXTEND) -> ForwardBatch:
        """An extend of tokens [start, start + len) of each request in `which`
        (a DECODE batch when every len is 1 and mode says so)."""
        dev, pools = self.runner.device, self.runner.pools
        table = pools.req_to_token_pool.req_to_token
        ids = [t for i, s, n in zip(which, starts, lens) for t in self.ids[i][s:s + n]]
        fb = ForwardBatch(
            forward_mode=mode, batch_size=len(which), input_ids=torch.tensor(ids, device=dev),
            positions=torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)]).to(dev),
            req_pool_indices=torch.tensor([self.rows[i] for i in which], device=dev),
            seq_lens=torch.tensor([s + n for s, n in zip(starts, lens)], device=dev),
            out_cache_loc=torch.cat([table[self.rows[i], s:s + n] for i, s, n in zip(which, starts, lens)]),
            seq_lens_cpu=[s + n for s, n in zip(starts, lens)],
            req_to_token_pool=pools.req_to_token_pool, kv_pool=pools.kv_pool)
        if mode == ForwardMode.EXTEND:
            set_extend_lens(fb, starts, lens, dev)
            last = torch.cumsum(torch.tensor(lens, device=dev), 0) - 1
            fb.logits_indices = torch.arange(sum(lens), device=dev) if every_logit else last
            fb.last_logit_rows = last if every_logit else torch.arange(len(which), device=dev)
        return fb

    def new_tokens(self, every_logit: bool = True) -> ForwardBatch:
        """Every request's new tokens on its cached prefix."""
        return self.batch(list(range(len(self.specs))), [c for c, _ in self.specs], [n for _, n in self.specs],
                          every_logit)


def kv_snapshot(runner) -> List[torch.Tensor]:
    pool = runner.pools.kv_pool
    return [b.clone() for b in pool.k_buffers + pool.v_buffers]


def graphs_for(runner, shape: SpecGraphShape) -> SpecGraphRunner:
    return SpecGraphRunner(runner, shape, capture=DEVICE == "cuda")


def assert_same_output(eager, replayed) -> None:
    for name in ("next_token_logits", "all_logits", "aux_hidden", "hidden"):
        a, b = getattr(eager, name), getattr(replayed, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, rtol=TOL, atol=TOL, msg=name)


def replay_and_compare(runner, graphs: SpecGraphRunner, make_batch) -> None:
    """The eager forward of a batch, then the graph's replay of the same batch
    writing the same KV: equal outputs, and only slot 0 changed by padding."""
    eager = runner.forward_eager(make_batch())
    before = kv_snapshot(runner)
    batch = make_batch()
    assert graphs.can_run(batch)
    replayed = graphs.replay(batch)
    assert_same_output(eager, replayed)
    for b, a in zip(before, kv_snapshot(runner)):
        torch.testing.assert_close(a[1:], b[1:], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_verify_shaped_batch_matches_eager(arch, tiny_model_factory):
    runner = runner_for(tiny_model_factory(arch))
    graphs = graphs_for(runner, SpecGraphShape(WIDTH, 8, aux_layers=(0, 1)))
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    reqs = Requests(runner, REQUESTS)

    def verify_batch():
        fb = reqs.new_tokens(every_logit=True)
        fb.capture_aux_layers = (0, 1)
        return fb

    replay_and_compare(runner, graphs, verify_batch)  # 4 requests: the bucket of 4
    three = Requests(runner, REQUESTS[:3], seed=1)  # 3 requests padded to 4

    def three_batch():
        fb = three.new_tokens(every_logit=True)
        fb.capture_aux_layers = (0, 1)
        return fb

    replay_and_compare(runner, graphs, three_batch)


def test_last_token_logits_and_one_token_steps(tiny_model_factory):
    runner = runner_for(tiny_model_factory("llama"))
    extend = graphs_for(runner, SpecGraphShape(WIDTH, 4))
    steps = graphs_for(runner, SpecGraphShape(1, 4))
    reqs = Requests(runner, REQUESTS[:3])
    replay_and_compare(runner, extend, lambda: reqs.new_tokens(every_logit=False))
    grown = Requests(runner, [(c + n - 1, 1) for c, n in REQUESTS[:3]], seed=2)
    replay_and_compare(runner, steps, lambda: grown.batch([0, 1, 2], [c for c, _ in grown.specs], [1, 1, 1],
                                                          mode=ForwardMode.DECODE))


def test_only_batches_of_the_captured_kind_run(tiny_model_factory):
    runner = runner_for(tiny_model_factory("llama"))
    graphs = graphs_for(runner, SpecGraphShape(WIDTH, 2, aux_layers=(0, 1)))
    reqs = Requests(runner, [(3, WIDTH), (2, 2), (4, WIDTH + 1)])

    def batch(which, aux=(0, 1), **kwargs):
        fb = reqs.batch(which, [reqs.specs[i][0] for i in which], [reqs.specs[i][1] for i in which], **kwargs)
        fb.capture_aux_layers = aux
        return fb

    assert graphs.can_run(batch([0, 1]))
    assert not graphs.can_run(batch([0, 1], aux=None))  # the graph captures the layers a head reads
    assert not graphs.can_run(batch([2]))  # more tokens than the width
    assert not graphs.can_run(batch([0, 1, 1]))  # more requests than the largest bucket
    decode = reqs.batch([0], [3], [1], mode=ForwardMode.DECODE)
    decode.capture_aux_layers = (0, 1)
    assert not graphs.can_run(decode)
    features = batch([0])
    features.spec_hidden = torch.zeros(WIDTH, 8)
    assert not graphs.can_run(features)  # a draft head's input: another kind of graph


def test_draft_head_steps_match_eager(tiny_model_factory, tmp_path):
    """An EAGLE-3 head reads its input features (spec_hidden) from a static
    buffer and hands back its output hidden state."""
    from radixserve.train_eagle3 import head_config, init_head, save_head

    target = runner_for(tiny_model_factory("llama"))
    config = head_config(target.config, 64, [0, 1, 1])
    save_head(init_head(config, target, torch.arange(64), "cpu"), config, tmp_path, torch.float32)
    head = runner_for(tmp_path)
    head.model.embed = target.model.model.embed_tokens
    hidden_size = target.config.hidden_size
    extend = graphs_for(head, SpecGraphShape(WIDTH, 4, spec_hidden_dim=3 * hidden_size))
    steps = graphs_for(head, SpecGraphShape(1, 4, spec_hidden_dim=hidden_size))
    reqs = Requests(head, [(0, 3), (0, 1), (0, 2)], seed=3, spare=1)
    g = torch.Generator().manual_seed(3)
    features = torch.randn(6, 3 * hidden_size, generator=g).to(DEVICE)

    def extend_batch():
        fb = reqs.new_tokens(every_logit=False)
        fb.spec_hidden, fb.return_hidden = features, True
        return fb

    replay_and_compare(head, extend, extend_batch)
    step_hidden = torch.randn(3, hidden_size, generator=g).to(DEVICE)

    def step_batch():
        fb = reqs.batch([0, 1, 2], [3, 1, 2], [1, 1, 1], mode=ForwardMode.DECODE)
        fb.spec_hidden, fb.return_hidden = step_hidden, True
        return fb

    replay_and_compare(head, steps, step_batch)


def test_tree_verify_batch_matches_eager(tiny_model_factory):
    """A verify graph for draft trees: per-token tree masks (and positions at
    prefix + depth) read from static buffers; a batch of chains (no masks)
    replays it with the causal ones; a graph without trees refuses masks."""
    from radixserve.speculative.tree import DraftTree

    runner = runner_for(tiny_model_factory("llama"))
    graphs = graphs_for(runner, SpecGraphShape(WIDTH, 4, tree=True))
    trees = [DraftTree([5, 6, 7], [-1, -1, 0]), DraftTree([8], [-1]), DraftTree([9, 10, 11], [-1, -1, -1])]
    reqs = Requests(runner, [(7, 4), (12, 2), (5, 4)])

    def tree_batch():
        fb = reqs.new_tokens(every_logit=True)
        fb.positions = torch.tensor([c + d for (c, _), t in zip(reqs.specs, trees) for d in t.row_depths()],
                                    device=DEVICE)
        fb.spec_tree_mask = torch.tensor([m for t in trees for m in t.row_masks()], device=DEVICE)
        return fb

    assert not graphs_for(runner, SpecGraphShape(WIDTH, 4)).can_run(tree_batch())
    replay_and_compare(runner, graphs, tree_batch)
    replay_and_compare(runner, graphs, lambda: reqs.new_tokens(every_logit=True))  # chains
