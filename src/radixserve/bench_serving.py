"""Load-test a running server: `python -m radixserve.bench_serving --backend radixserve
--dataset-name random --num-prompts 200 --request-rate 8`.

Every request streams; requests arrive as a Poisson process at --request-rate
(inf: all at once), at most --max-concurrency in flight. It speaks SGLang's
native /generate (radixserve, sglang) and plain OpenAI (openai, vllm,
openai-chat), so the same command measures other servers too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from radixserve.benchmark.backends import BACKENDS, CHAT_BACKENDS, BackendConfig, send_request
from radixserve.benchmark.datasets import (BenchRequest, DatasetConfig, add_dataset_args, random_requests,
                                          sample_requests)
from radixserve.benchmark.metrics import RequestOutput, compute_metrics
from radixserve.benchmark.report import append_json_line, now_iso, print_table, serving_rows
from radixserve.benchmark.tokenizer import get_tokenizer

WARMUP_INPUT_LEN = 16
WARMUP_OUTPUT_LEN = 4


@dataclass
class BenchResult:
    requests: List[BenchRequest]
    outputs: List[RequestOutput]
    record: Dict[str, Any]  # what the table shows and the JSON line holds


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m radixserve.bench_serving", allow_abbrev=False)
    parser.add_argument("--backend", choices=BACKENDS, default="radixserve")
    parser.add_argument("--base-url", default=None, help="overrides --host/--port, e.g. http://10.0.0.2:30000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--model", default=None,
                        help="model name sent to OpenAI backends (default: the server's served model name)")
    parser.add_argument("--tokenizer", default=None,
                        help="local tokenizer folder, .gguf or packaged model name "
                             "(default: the model the server reports)")
    add_dataset_args(parser)
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second, Poisson arrivals (inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    parser.add_argument("--disable-ignore-eos", action="store_true",
                        help="let requests stop at EOS (by default they generate their full output length)")
    parser.add_argument("--flush-cache", action="store_true",
                        help="empty the server's prefix cache (POST /flush_cache) after the warm-up, so a "
                             "repeated run with the same seed does not start with its prompts cached")
    parser.add_argument("--output-file", default=None, help="append one JSON line with the results")
    parser.add_argument("--lora-name", nargs="+", default=None,
                        help="LoRA adapters the requests are spread over, in turn (request i uses name i mod N): "
                             "lora_path on native backends, the OpenAI model name otherwise")
    args = parser.parse_args(argv)
    if args.dataset_name == "random-ids" and args.backend in CHAT_BACKENDS:
        parser.error("--dataset-name random-ids sends token ids, which chat messages cannot carry; "
                     "use --backend radixserve, sglang, openai or vllm")
    return args


# ---- talking to the server ----
def base_url(args: argparse.Namespace) -> str:
    return (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")


def server_model(url: str) -> Dict[str, Optional[str]]:
    """The served name and tokenizer location: /get_model_info (SGLang, radixserve),
    else the first of /v1/models (vLLM and other OpenAI servers)."""
    import httpx

    with httpx.Client(timeout=30, trust_env=False) as client:
        info = client.get(url + "/get_model_info")
        if info.status_code == 200:
            data = info.json()
            return {"model": data.get("served_model_name") or data.get("model_path"),
                    "tokenizer": data.get("tokenizer_path") or data.get("model_path")}
        models = client.get(url + "/v1/models")
        models.raise_for_status()
        first = models.json()["data"][0]
        return {"model": first["id"], "tokenizer": first.get("root") or first["id"]}


async def arrivals(requests: List[BenchRequest], rate: float, rng: random.Random) -> AsyncIterator[BenchRequest]:
    """Yield requests on a Poisson process: exponential gaps with mean 1/rate."""
    for i, req in enumerate(requests):
        if i and not math.isinf(rate):
            await asyncio.sleep(rng.expovariate(rate))
        yield req


class InFlight:
    """Counts requests in flight and the most seen at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        self.now -= 1


async def flush_cache(session: Any, url: str) -> None:
    """SGLang's /flush_cache; a server without it (or refusing) only earns a warning."""
    async with session.post(url + "/flush_cache") as response:
        text = await response.text()
        try:
            ok = response.status == 200 and json.loads(text).get("success", True)
        except ValueError:  # not JSON
            ok = False
    if not ok:
        print(f"warning: /flush_cache answered {response.status}: {text[:200]}", file=sys.stderr)


async def run_requests(cfg: BackendConfig, requests: List[BenchRequest], rate: float,
                       max_concurrency: Optional[int], seed: int, warmup: BenchRequest,
                       flush: bool = False) -> Tuple[List[RequestOutput], float, int]:
    """Warm up with one request, then send them all. Returns (outputs, duration_s, peak in flight).
    aiohttp rather than httpx: it reads a stream's chunks with about a third of
    the CPU, and the client shares the machine with the server it measures."""
    import aiohttp
    from tqdm.auto import tqdm

    connector = aiohttp.TCPConnector(limit=0)  # no cap on connections: --max-concurrency is the cap
    # read_bufsize: a native stream's events carry the whole text so far, and
    # aiohttp refuses a line over twice this.
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                     read_bufsize=1 << 22) as client:
        first = await send_request(client, cfg, warmup)
        if not first.success:
            raise SystemExit(f"warm-up request failed: {first.error}")
        if flush:
            await flush_cache(client, cfg.base_url)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        in_flight, bar = InFlight(), tqdm(total=len(requests), desc="requests")

        async def one(req: BenchRequest) -> RequestOutput:
            if gate is not None:
                await gate.acquire()
            in_flight.enter()
            try:
                return await send_request(client, cfg, req)
            finally:
                in_flight.leave()
                if gate is not None:
                    gate.release()
                bar.update(1)

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(r)) async for r in arrivals(requests, rate, random.Random(seed))]
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return list(outputs), duration, in_flight.peak


def count_unreported(outputs: List[RequestOutput], tokenizer: Any) -> None:
    """Servers that report no usage: count the generated text's tokens locally."""
    for out in outputs:
        if out.success and not out.counts_reported:
            out.output_len = len(tokenizer.encode(out.text, add_special_tokens=False))


# ---- the run ----
def run_benchmark(args: argparse.Namespace) -> BenchResult:
    url = base_url(args)
    info: Dict[str, Optional[str]] = {}
    if args.model is None or args.tokenizer is None:
        try:
            info = server_model(url)
        except Exception as e:  # noqa: BLE001 - any failure here means no usable server
            raise SystemExit(f"cannot ask {url} which model it serves ({type(e).__name__}: {e}); "
                             f"is the server up? (or pass --model and --tokenizer)") from None
    model = args.model or info.get("model")
    tokenizer_name = args.tokenizer or info.get("tokenizer")
    tokenizer = get_tokenizer(tokenizer_name)
    dataset = DatasetConfig.from_args(args)
    requests = sample_requests(dataset, tokenizer)
    for i, req in enumerate(requests if args.lora_name else []):
        req.lora_name = args.lora_name[i % len(args.lora_name)]
    # A short prompt of its own, so the warm-up leaves nothing in the prefix cache
    # that a measured request could hit.
    warmup = random_requests(tokenizer, random.Random(args.seed + 1), 1, WARMUP_INPUT_LEN,
                             WARMUP_OUTPUT_LEN, 1.0, use_ids=requests[0].use_ids)[0]
    cfg = BackendConfig(args.backend, url, model, ignore_eos=not args.disable_ignore_eos)
    outputs, duration, peak = asyncio.run(
        run_requests(cfg, requests, args.request_rate, args.max_concurrency, args.seed, warmup, args.flush_cache))
    count_unreported(outputs, tokenizer)
    record = {
        "tool": "bench_serving", "date": now_iso(), "backend": args.backend, "base_url": url,
        "model": model, "tokenizer": tokenizer_name, **vars(dataset), "num_prompts": len(requests),
        "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "ignore_eos": not args.disable_ignore_eos, "lora_names": args.lora_name,
        **compute_metrics(outputs, duration, peak),
    }
    return BenchResult(requests, outputs, record)


def main(argv: Optional[Sequence[str]] = None) -> BenchResult:
    args = parse_args(argv)
    result = run_benchmark(args)
    print_table("Serving Benchmark Result", serving_rows(result.record))
    failures = [o.error for o in result.outputs if not o.success]
    if failures:
        print(f"{len(failures)} requests failed; first error: {failures[0]}", file=sys.stderr)
    append_json_line(args.output_file, result.record)
    return result


if __name__ == "__main__":
    main()
