"""A 1P1D cluster (radixserve.launch_cluster --prefill-workers 1 --decode-workers 1,
SGLang's gateway in front) checked against an ordinary server: the decode
server itself, asked without bootstrap fields, takes the ordinary path. For the
GPU machine (both servers on one GPU, half the memory each) as much as the CPU.

    .venv/bin/python bench/pd_check.py --model-path /models/Llama-3.1-8B-Instruct --load-format dummy \\
        --random-seed 0 --mem-fraction-static 0.4

(with --load-format dummy, --random-seed gives both servers the same random weights).

Every flag it does not know goes to both servers. Prints one JSON line: how
many greedy answers (and output logprobs, compared as float32) matched, one
request at a time and all at once (batches then differ: logprobs are not
compared), the transfer counters of both sides, and the KV counts once idle.
On the prefill side the repeated prompts are radix-cache hits.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.gateway_utils import start_cluster  # noqa: E402
from tests.pd_utils import kv_settled, pd_info  # noqa: E402


def float32(logprobs: list) -> list:
    return [(struct.unpack("f", struct.pack("f", lp))[0], token) for lp, token, *_ in logprobs]


def generate(url: str, ids: list, new_tokens: int) -> dict:
    body = {"input_ids": ids, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}}
    r = httpx.post(f"{url}/generate", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    args, server_flags = parser.parse_known_args()
    prompts = [[(97 * i + 31 * j) % 20000 + 100 for j in range(8 + 61 * i % 900)] for i in range(args.num_prompts)]
    with tempfile.TemporaryDirectory() as logs:
        cluster = start_cluster(args.model_path, Path(logs), *server_flags, workers=1, pd=(1, 1), timeout_s=1200)
        try:
            decode, prefill = cluster.workers["decode 0"], cluster.workers["prefill 0"]
            # one at a time on both paths (the same batch shapes), then all at once through the gateway
            refs = [generate(decode, ids, args.new_tokens) for ids in prompts]
            ours = [generate(cluster.url, ids, args.new_tokens) for ids in prompts]
            with ThreadPoolExecutor(args.num_prompts) as pool:
                together = list(pool.map(lambda ids: generate(cluster.url, ids, args.new_tokens), prompts))
            same_ids = sum(o["output_ids"] == r["output_ids"] for o, r in zip(ours, refs))
            same_lp = sum(float32(o["meta_info"]["output_token_logprobs"]) ==
                          float32(r["meta_info"]["output_token_logprobs"]) for o, r in zip(ours, refs))
            same_together = sum(o["output_ids"] == r["output_ids"] for o, r in zip(together, refs))
            print(json.dumps({"prompts": len(prompts), "same_output_ids": same_ids, "same_output_logprobs": same_lp,
                              "same_output_ids_all_at_once": same_together,
                              "prefill": pd_info(prefill), "decode": pd_info(decode),
                              "prefill_kv": kv_settled(prefill), "decode_kv": kv_settled(decode)}), flush=True)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
