"""bench_serving against a live server on a tiny model: every dataset through the
native and both OpenAI backends, the JSON line, seeds, concurrency and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from radixserve import bench_serving
from tests.bench.sharegpt_sample import write_sharegpt
from tests.server_utils import running_server

NUM_PROMPTS = 8
SERVING_FIELDS = [
    "backend", "dataset_name", "num_prompts", "seed", "request_rate", "max_concurrency", "model", "date",
    "duration_s", "completed", "failed", "request_throughput", "input_throughput", "output_throughput",
    "total_throughput", "total_input_tokens", "total_output_tokens", "max_concurrency_reached",
    "cache_hit_rate",
] + [f"{stat}_{name}_ms" for name in ("ttft", "itl", "tpot", "e2e_latency")
     for stat in ("mean", "median", "p90", "p99")]


@pytest.fixture(scope="module")
def server(tiny_model_factory):
    with running_server(tiny_model_factory("llama")) as (_, base):
        yield base


@pytest.fixture(scope="module")
def sharegpt_file(tmp_path_factory) -> str:
    return write_sharegpt(tmp_path_factory.mktemp("sharegpt") / "sharegpt.json")


DATASET_FLAGS = {
    "random": ["--random-input-len", "32", "--random-output-len", "6", "--random-range-ratio", "0.5"],
    "random-ids": ["--random-input-len", "32", "--random-output-len", "6", "--random-range-ratio", "0.5"],
    "generated-shared-prefix": ["--gsp-num-groups", "2", "--gsp-prompts-per-group", "4",
                                "--gsp-system-prompt-len", "48", "--gsp-question-len", "8",
                                "--gsp-output-len", "4"],
    "sharegpt": [],
}
CASES = [(b, d) for b in ("radixserve", "openai", "openai-chat") for d in DATASET_FLAGS
         if not (b == "openai-chat" and d == "random-ids")]


def bench(server: str, tmp_path, backend: str, dataset: str, *extra: str, sharegpt: str = ""):
    out_file = tmp_path / "results.jsonl"
    argv = ["--base-url", server, "--backend", backend, "--dataset-name", dataset,
            "--num-prompts", str(NUM_PROMPTS), "--seed", "3", "--output-file", str(out_file),
            *DATASET_FLAGS[dataset], *extra]
    if dataset == "sharegpt":
        argv += ["--dataset-path", sharegpt]
    result = bench_serving.main(argv)
    lines = out_file.read_text().splitlines()
    return result, json.loads(lines[-1])


def assert_latencies_sane(record: dict, outputs) -> None:
    """Orderings that hold for any timestamps of one monotonic clock (percentiles,
    first token before the last); nothing about how long anything took."""
    for name in ("ttft", "itl", "tpot", "e2e_latency"):
        assert 0 <= record[f"median_{name}_ms"] <= record[f"p90_{name}_ms"] <= record[f"p99_{name}_ms"], name
    for out in outputs:
        assert 0 <= out.ttft <= out.latency
        assert len(out.itl) <= out.output_len - 1 and all(gap >= 0 for gap in out.itl)


@pytest.mark.parametrize("backend,dataset", CASES)
def test_every_backend_and_dataset(server, tmp_path, sharegpt_file, capsys, backend, dataset):
    result, line = bench(server, tmp_path, backend, dataset, sharegpt=sharegpt_file)
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Median TTFT (ms)" in printed
    reqs, outs = result.requests, result.outputs
    assert all(o.success for o in outs), [o.error for o in outs if not o.success]
    assert line["completed"] == len(reqs) and line["failed"] == 0
    assert set(SERVING_FIELDS) <= set(line), set(SERVING_FIELDS) - set(line)
    assert line["backend"] == backend and line["dataset_name"] == dataset and line["request_rate"] == "inf"
    for req, out in zip(reqs, outs):
        # EOS is ignored: the server generated exactly the asked length, and said so.
        assert out.counts_reported and out.output_len == req.output_len
        if backend == "openai-chat":  # the chat template wraps the prompt
            assert out.prompt_len > req.prompt_len
        else:  # the server counted exactly the prompt tokens we built
            assert out.prompt_len == req.prompt_len
    assert line["total_output_tokens"] == sum(r.output_len for r in reqs)
    assert line["total_input_tokens"] == sum(o.prompt_len for o in outs)
    assert line["max_concurrency_reached"] <= len(reqs)
    assert 0 <= line["cache_hit_rate"] <= 1  # radixserve reports cached tokens on every route
    assert_latencies_sane(line, outs)


def test_seed_gives_identical_prompts_across_runs(server, tmp_path, capsys):
    first, line1 = bench(server, tmp_path, "radixserve", "random", "--num-prompts", "4")
    again, line2 = bench(server, tmp_path, "radixserve", "random", "--num-prompts", "4")
    other, _ = bench(server, tmp_path, "radixserve", "random", "--num-prompts", "4", "--seed", "4")
    assert first.requests == again.requests
    assert [r.prompt for r in first.requests] != [r.prompt for r in other.requests]
    assert line1["total_input_tokens"] == line2["total_input_tokens"]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3  # appended, one per run


def test_shared_prefix_hits_the_radix_cache(server, tmp_path, capsys):
    """One request at a time on a flushed cache: the first request of each group
    finds nothing of its system prompt cached, every later one finds all of it."""
    result, line = bench(server, tmp_path, "radixserve", "generated-shared-prefix", "--max-concurrency", "1",
                         "--flush-cache")
    assert line["max_concurrency_reached"] == 1
    seen = set()
    for req, out in zip(result.requests, result.outputs):
        group = tuple(req.prompt_ids[:48])
        if group in seen:
            assert 48 <= out.cached_tokens < req.prompt_len
        else:
            assert out.cached_tokens < 48
        seen.add(group)
    assert len(seen) == 2
    assert line["cache_hit_rate"] >= (6 * 48) / sum(r.prompt_len for r in result.requests)


def test_cli_with_rate_and_concurrency(server, tmp_path):
    """The command line as users run it: Poisson arrivals, a concurrency cap, the
    tokenizer given by packaged name, the table on stdout and one JSON line."""
    out_file = tmp_path / "cli.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "radixserve.bench_serving", "--base-url", server, "--backend", "openai",
         "--tokenizer", "SmolLM2-135M-Instruct", "--model", "tiny", "--num-prompts", "6",
         "--random-input-len", "24", "--random-output-len", "4", "--request-rate", "50",
         "--max-concurrency", "2", "--disable-ignore-eos", "--output-file", str(out_file)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Serving Benchmark Result" in proc.stdout and "Max concurrency reached" in proc.stdout
    line = json.loads(out_file.read_text())
    assert line["completed"] == 6 and line["request_rate"] == 50.0 and line["max_concurrency"] == 2
    assert 1 <= line["max_concurrency_reached"] <= 2
    assert line["ignore_eos"] is False and line["tokenizer"] == "SmolLM2-135M-Instruct"
    assert 0 < line["total_output_tokens"] <= 4 * 6  # never more than asked


def test_random_ids_with_chat_is_refused():
    with pytest.raises(SystemExit):
        bench_serving.parse_args(["--backend", "openai-chat", "--dataset-name", "random-ids"])


def test_a_refused_request_is_recorded_not_raised(server):
    """A request the server answers with an error status is a failed output
    carrying the status and the server's message; the run goes on."""
    import asyncio

    import aiohttp

    from radixserve.benchmark.backends import BackendConfig, send_request
    from radixserve.benchmark.datasets import BenchRequest

    async def send(req: BenchRequest):
        async with aiohttp.ClientSession() as session:
            return await send_request(session, BackendConfig("radixserve", server, None), req)

    refused = asyncio.run(send(BenchRequest(prompt="Hi", prompt_ids=[1], output_len=-3)))
    assert not refused.success and refused.error.startswith("HTTP 400") and "max_new_tokens" in refused.error
    ok = asyncio.run(send(BenchRequest(prompt="Hello", prompt_ids=[1], output_len=3)))
    assert ok.success and ok.output_len == 3, ok.error
