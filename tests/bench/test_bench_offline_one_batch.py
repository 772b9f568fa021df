"""bench_offline_throughput (Engine, no HTTP) and bench_one_batch (model runner,
no scheduler) on a tiny model: their tables, JSON lines, and greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch

from radixserve import bench_offline_throughput, bench_one_batch
from tests.conftest import load_hf_model

OFFLINE_FIELDS = ["model_path", "dataset_name", "num_prompts", "seed", "date", "duration_s", "completed",
                  "total_input_tokens", "total_output_tokens", "request_throughput", "input_throughput",
                  "output_throughput", "total_throughput"]
ONE_BATCH_FIELDS = ["model_path", "batch_size", "input_len", "output_len", "prefill_latency_s",
                    "prefill_throughput", "median_decode_latency_s", "decode_throughput",
                    "mean_decode_latency_s", "total_latency_s", "overall_throughput"]


def test_offline_throughput(tiny_model_factory, tmp_path, capsys):
    out_file = tmp_path / "offline.jsonl"
    result = bench_offline_throughput.main([
        "--model-path", str(tiny_model_factory("llama")), "--max-total-tokens", "4096",
        "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "2", "--gsp-prompts-per-group", "4",
        "--gsp-system-prompt-len", "32", "--gsp-question-len", "8", "--gsp-output-len", "5",
        "--output-file", str(out_file),
    ])
    printed = capsys.readouterr().out
    assert "Offline Throughput Benchmark Result" in printed
    assert "Output token throughput (tok/s)" in printed
    line = json.loads(out_file.read_text())
    assert set(OFFLINE_FIELDS) <= set(line)
    assert line["completed"] == line["num_prompts"] == 8
    # The engine counted exactly the prompts we built and generated exactly the asked lengths.
    metas = [r["meta_info"] for r in result.results]
    assert [m["prompt_tokens"] for m in metas] == [r.prompt_len for r in result.requests]
    assert [m["completion_tokens"] for m in metas] == [5] * 8
    assert line["total_input_tokens"] == sum(r.prompt_len for r in result.requests)
    assert line["total_output_tokens"] == 40
    assert line["total_throughput"] == pytest.approx(line["input_throughput"] + line["output_throughput"])
    assert line["request_throughput"] * line["duration_s"] == pytest.approx(8)


def test_one_batch_table_and_json(tiny_model_factory, tmp_path, capsys, monkeypatch):
    """Random weights (--load-format dummy): shapes are timed without a checkpoint.
    Each shape runs once untimed first, with its own lengths, and the total is
    the prefill plus every decode step (the mean step, not the median)."""
    out_file = tmp_path / "one_batch.jsonl"
    runs = []  # (batch, input len, output len) of every static batch run, timed or not
    real_run = bench_one_batch.run_static_batch

    def recording_run(runner, prompts, output_len):
        runs.append((len(prompts), len(prompts[0]), output_len))
        return real_run(runner, prompts, output_len)

    monkeypatch.setattr(bench_one_batch, "run_static_batch", recording_run)
    results = bench_one_batch.main([
        "--model-path", str(tiny_model_factory("llama")), "--max-total-tokens", "2048",
        "--load-format", "dummy", "--batch-size", "1", "4", "--input-len", "24", "--output-len", "6", "--output-file", str(out_file),
    ])
    printed = capsys.readouterr().out
    assert "prefill tok/s" in printed and "decode ms (median)" in printed and "decode ms (mean)" in printed
    assert [(r.batch_size, r.input_len, r.output_len) for r in results] == [(1, 24, 6), (4, 24, 6)]
    assert runs == [(1, 24, 6), (1, 24, 6), (4, 24, 6), (4, 24, 6)]
    lines = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert len(lines) == 2 and all(set(ONE_BATCH_FIELDS) <= set(x) for x in lines)
    assert all(x["load_format"] == "dummy" for x in lines)
    for r in results:
        assert r.prefill_throughput == pytest.approx(r.batch_size * r.input_len / r.prefill_latency_s)
        assert r.decode_throughput == pytest.approx(r.batch_size / r.median_decode_latency_s)
        assert r.total_latency_s == pytest.approx(r.prefill_latency_s + (r.output_len - 1) * r.mean_decode_latency_s)


def test_one_batch_greedy_matches_transformers(tiny_model_factory, capsys):
    """The static batch's prefill + decode steps give transformers' greedy tokens,
    and --correct prints them."""
    path = tiny_model_factory("llama")
    args = bench_one_batch.parse_args(["--model-path", str(path), "--max-total-tokens", "1024",
                                       "--output-len", "8"])
    runner = bench_one_batch.build_runner(args)
    hf = load_hf_model(path)
    prompts = [[5, 900, 1200, 33, 7], [17, 2500, 48, 9, 301, 77, 12, 4000, 5]]
    ours, _, steps = bench_one_batch.run_static_batch(runner, prompts, 8)
    assert len(steps) == 7
    for ids, got in zip(prompts, ours):
        x = torch.tensor([ids])
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, min_new_tokens=8,
                          do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
        assert got == ref
    assert runner.allocator.available_size() == runner.max_total_num_tokens  # memory handed back
    texts = bench_one_batch.print_correct(runner, 8)
    printed = capsys.readouterr().out
    assert len(texts) == len(bench_one_batch.CORRECT_PROMPTS)
    assert all(repr(p) in printed for p in bench_one_batch.CORRECT_PROMPTS)
