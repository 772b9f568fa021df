"""Speculative decoding against plain decoding, same machine, same run.

For each configuration (no speculation, then the speculative flags given):
batch-1 decode speed (output tokens / second over requests run one at a
time, greedy) and the mean accept length; then throughput at larger batch
sizes (all requests at once, the median of --repeats runs). Workload: `rewrite` (the model copies a given
text back: n-gram drafts match), `chat` (8 chat questions written here) or `heldout` (the 128
questions of heldout_questions.json: questions the default model wrote itself when asked for one,
the held-out set of the shipped EAGLE-3 head's training, which no training answer begins with).

    PYTHONPATH=src python bench/spec_bench.py --workload rewrite --spec NGRAM
    PYTHONPATH=src python bench/spec_bench.py --workload chat --spec EAGLE3
    PYTHONPATH=src python bench/spec_bench.py --workload heldout --spec EAGLE3 --new-tokens 256 \
        --batch1-requests 128 --batch-sizes
    PYTHONPATH=src python bench/spec_bench.py --workload chat --spec EAGLE3 --new-tokens 128 \
        --batch1-requests 8 --batch-sizes 16 --starts 4   # pairs of starts, alternated
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List

from radixserve import Engine

TEXT = ("The river rose slowly through the night, and by morning the lower fields were under water. "
        "Farmers moved their animals to the hills, and the school in the valley closed for the week. "
        "By Friday the water had begun to fall, leaving mud and broken fences behind it.")
CHAT_PROMPTS = [
    "Explain why the sky is blue in three sentences.", "Write a short poem about autumn leaves.",
    "What are the benefits of regular exercise?", "Describe how a bicycle works.",
    "Give me three tips for learning a new language.", "What is the capital of France and why is it famous?",
    "Summarize the story of Cinderella.", "How do plants make food from sunlight?",
]


HELD_OUT_QUESTIONS = Path(__file__).with_name("heldout_questions.json")


def prompts(workload: str, count: int) -> List[List[Dict[str, str]]]:
    if workload == "rewrite":
        return [[{"role": "user", "content": f"Repeat this text exactly, word for word:\n\n{TEXT}"}]] * count
    questions = json.loads(HELD_OUT_QUESTIONS.read_text()) if workload == "heldout" else CHAT_PROMPTS
    return [[{"role": "user", "content": questions[i % len(questions)]}] for i in range(count)]


def chat_ids(engine: Engine, messages) -> List[int]:
    ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def measure(engine: Engine, workload: str, new_tokens: int, batch_sizes: List[int], batch1_requests: int = 4,
            warmup_requests: int = 0, repeats: int = 3) -> Dict[str, float]:
    params = {"temperature": 0, "max_new_tokens": new_tokens}
    ids = [chat_ids(engine, m) for m in prompts(workload, max(batch_sizes + [batch1_requests + warmup_requests]))]
    engine.generate(input_ids=ids[0], sampling_params={"temperature": 0, "max_new_tokens": 8})  # warm-up
    for one in ids[:warmup_requests]:  # untimed: e.g. for the speculation governor's first probes
        engine.generate(input_ids=one, sampling_params=params)
    tokens, seconds = 0, 0.0
    for one in ids[warmup_requests:warmup_requests + batch1_requests]:
        start = time.perf_counter()
        out = engine.generate(input_ids=one, sampling_params=params)
        seconds += time.perf_counter() - start
        tokens += out["meta_info"]["completion_tokens"]
    # Tokens per verify step over the verify steps run so far (with the governor
    # some steps are plain ones: completion tokens / verify steps would overstate it).
    spec = engine.get_server_info().get("speculative") or {}
    result = {"batch1_tok_s": tokens / seconds, "accept_length": spec.get("mean_accept_length") or 1.0,
              "verify_steps": spec.get("verify_ct", 0), "batch1_tokens": tokens}
    for bs in batch_sizes:
        rates = []
        for _ in range(repeats):  # one run of a few seconds moved by +-5% between runs on a 2-core CPU
            start = time.perf_counter()
            outs = engine.generate(input_ids=ids[:bs], sampling_params=params)
            rates.append(sum(o["meta_info"]["completion_tokens"] for o in outs) / (time.perf_counter() - start))
        result[f"bs{bs}_tok_s"] = statistics.median(rates)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--workload", choices=("rewrite", "chat", "heldout"), default="rewrite")
    parser.add_argument("--spec", default="NGRAM", help="--speculative-algorithm to compare")
    parser.add_argument("--draft", default=None, help="--speculative-draft-model-path")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--engine-args", default="{}", help="JSON of extra Engine arguments for both runs")
    parser.add_argument("--batch1-requests", type=int, default=4, help="timed requests, one at a time")
    parser.add_argument("--warmup-requests", type=int, default=0,
                        help="untimed requests before them (the governor's first probes run there)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each batch size; the median's throughput is reported")
    parser.add_argument("--starts", type=int, default=1,
                        help="engine starts of each configuration, alternated; the ratios' mean is reported")
    args = parser.parse_args()
    extra = json.loads(args.engine_args)
    spec = {"speculative_algorithm": args.spec, "speculative_num_steps": 3, "speculative_eagle_topk": 1,
            "speculative_num_draft_tokens": 4}
    if args.draft:
        spec["speculative_draft_model_path"] = args.draft
    starts: Dict[str, List[Dict[str, float]]] = {"plain": [], args.spec: []}
    for start in range(args.starts):  # alternated: a slow spell of the machine falls on both sides
        for name, kwargs in (("plain", {}), (args.spec, spec)):
            with Engine(model_path=args.model_path, log_level="warning", **extra, **kwargs) as engine:
                starts[name].append(measure(engine, args.workload, args.new_tokens, args.batch_sizes,
                                            args.batch1_requests, args.warmup_requests, args.repeats))
            print(name, f"start {start + 1}", json.dumps(starts[name][-1]), flush=True)
    report_ratios(starts["plain"], starts[args.spec], args.batch_sizes)


def report_ratios(plain: List[Dict[str, float]], spec: List[Dict[str, float]], batch_sizes: List[int]) -> None:
    """Speculation over plain decoding for each pair of starts, and their mean:
    engines of one configuration differ by up to 8% from start to start on a
    2-core CPU, so one pair's ratio is not the answer."""
    for key, label in [("batch1_tok_s", "batch-1 speedup")] + [(f"bs{bs}_tok_s", f"batch {bs} throughput ratio")
                                                                for bs in batch_sizes]:
        ratios = [s[key] / p[key] for p, s in zip(plain, spec)]
        each = " ".join(f"{r:.2f}" for r in ratios)
        print(f"{label}: {statistics.mean(ratios):.2f}x" + (f" (mean of {len(ratios)} starts: {each})"
                                                            if len(ratios) > 1 else ""))

if __name__ == "__main__":
    main()
