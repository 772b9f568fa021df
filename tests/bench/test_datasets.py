"""Benchmark datasets and metrics, without a server: seeds, lengths, shared prefixes, ShareGPT."""

from __future__ import annotations

import json
import random

import pytest

from radixserve.benchmark.datasets import DatasetConfig, sample_requests
from radixserve.benchmark.metrics import RequestOutput, compute_metrics
from radixserve.benchmark.tokenizer import get_tokenizer
from radixserve.bench_serving import count_unreported
from tests.bench.sharegpt_sample import CONVERSATIONS, write_sharegpt

@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def sharegpt_file(tmp_path_factory) -> str:
    return write_sharegpt(tmp_path_factory.mktemp("sharegpt") / "sharegpt.json")


def config(name: str, **kw) -> DatasetConfig:
    base = dict(dataset_name=name, num_prompts=6, random_input_len=40, random_output_len=8,
                random_range_ratio=0.5, gsp_num_groups=3, gsp_prompts_per_group=4,
                gsp_system_prompt_len=40, gsp_question_len=6, gsp_output_len=5, seed=7)
    return DatasetConfig(**{**base, **kw})


@pytest.mark.parametrize("name", ["random", "random-ids", "generated-shared-prefix", "sharegpt"])
def test_seed_gives_identical_prompts(tokenizer, sharegpt_file, name):
    first = sample_requests(config(name, dataset_path=sharegpt_file), tokenizer)
    again = sample_requests(config(name, dataset_path=sharegpt_file), tokenizer)
    other = sample_requests(config(name, dataset_path=sharegpt_file, seed=8), tokenizer)
    assert first == again
    if name == "sharegpt":  # three usable conversations: another seed only reorders them
        assert sorted(r.prompt for r in other) == sorted(r.prompt for r in first)
    else:
        assert [r.prompt_ids for r in first] != [r.prompt_ids for r in other]


def test_random_lengths_are_exact(tokenizer):
    reqs = sample_requests(config("random", num_prompts=20), tokenizer)
    assert len(reqs) == 20 and not any(r.use_ids for r in reqs)
    for r in reqs:
        # The text re-encodes to exactly the drawn number of tokens.
        assert r.prompt_ids == tokenizer.encode(r.prompt)
        assert 20 <= r.prompt_len <= 40 and 4 <= r.output_len <= 8
    assert len({r.prompt_len for r in reqs}) > 1


def test_random_ids_are_sent_as_ids(tokenizer):
    reqs = sample_requests(config("random-ids", random_range_ratio=1.0), tokenizer)
    special = set(tokenizer.all_special_ids)
    for r in reqs:
        assert r.use_ids and r.prompt_len == 40 and r.output_len == 8
        assert all(0 <= t < len(tokenizer) and t not in special for t in r.prompt_ids)


def test_shared_prefix_shares_token_ids(tokenizer):
    reqs = sample_requests(config("generated-shared-prefix"), tokenizer)
    assert len(reqs) == 12 and all(r.output_len == 5 for r in reqs)
    groups = {}
    for r in reqs:
        assert r.prompt_ids == tokenizer.encode(r.prompt)  # what the server will see
        assert r.prompt_len == 46
        groups.setdefault(tuple(r.prompt_ids[:40]), []).append(r.prompt_ids[40:])
    # Three distinct 40-token system prompts, each followed by four different questions.
    assert len(groups) == 3
    assert all(len(qs) == 4 and len({tuple(q) for q in qs}) == 4 for qs in groups.values())
    # Shuffled: the groups arrive interleaved, not one after another.
    order = [tuple(r.prompt_ids[:40]) for r in reqs]
    assert order != sorted(order, key=list(dict.fromkeys(order)).index)


def test_sharegpt_reads_local_file(tokenizer, tmp_path):
    for jsonl in (False, True):
        path = write_sharegpt(tmp_path / f"data{int(jsonl)}.json", jsonl=jsonl)
        reqs = sample_requests(config("sharegpt", dataset_path=path, num_prompts=10), tokenizer)
        replies = dict(CONVERSATIONS)
        assert sorted(r.prompt for r in reqs) == sorted(q for q, _ in CONVERSATIONS[:4] if q != "Hi")
        for r in reqs:
            assert r.prompt_ids == tokenizer.encode(r.prompt)
            assert r.output_len == len(tokenizer.encode(replies[r.prompt], add_special_tokens=False))
    with pytest.raises(ValueError, match="dataset-path"):
        sample_requests(config("sharegpt"), tokenizer)


def test_metrics_percentiles_and_throughput():
    rng = random.Random(0)
    outputs = []
    for _ in range(50):
        ttft = rng.uniform(0.01, 0.5)
        itl = [rng.uniform(0.005, 0.05) for _ in range(7)]
        outputs.append(RequestOutput(success=True, prompt_len=10, output_len=8, cached_tokens=5,
                                     counts_reported=True, ttft=ttft, latency=ttft + sum(itl), itl=itl))
    outputs.append(RequestOutput(success=False, error="HTTP 500"))
    m = compute_metrics(outputs, duration=2.0, max_concurrency_reached=51)
    assert (m["completed"], m["failed"]) == (50, 1)
    assert m["total_input_tokens"] == 500 and m["total_output_tokens"] == 400
    assert m["request_throughput"] == 25.0 and m["total_throughput"] == 450.0
    assert m["cache_hit_rate"] == 0.5
    for name in ("ttft", "itl", "tpot", "e2e_latency"):
        assert m[f"median_{name}_ms"] <= m[f"p90_{name}_ms"] <= m[f"p99_{name}_ms"]
    # TPOT of each request is its decode time over the tokens after the first.
    assert m["mean_tpot_ms"] == pytest.approx(sum(sum(o.itl) / 7 for o in outputs[:50]) / 50 * 1000)
    assert compute_metrics(outputs[:1], 1.0, 1)["cache_hit_rate"] == 0.5
    unreported = [RequestOutput(success=True, prompt_len=3, ttft=0.1, latency=0.2)]
    assert compute_metrics(unreported, 1.0, 1)["cache_hit_rate"] is None


def test_unreported_counts_are_counted_locally(tokenizer):
    out = RequestOutput(success=True, text=" the cat sat on the mat")
    count_unreported([out], tokenizer)
    assert out.output_len == len(tokenizer.encode(" the cat sat on the mat", add_special_tokens=False))
