"""Soak test: many streaming clients for a long time against a real server.

    .venv/bin/python bench/soak.py --minutes 10 --clients 16 [--model-path SmolLM2-135M-Instruct]
        [any server flag, e.g. --max-total-tokens 8192 (the default here)]

Each client loops: a random prompt and output length, streamed; 20% hang up at a
random point, 5% send a hostile body (the shapes of tests/fuzz_bodies.py, the
fuzzers' generators: protocol fields with huge integers, lone surrogates, deep
nesting, duplicated rids, batches, chunked uploads) to the generation and
tokenizer routes, some abort their request via /abort_request. At the end: zero
5xx, every request that was neither dropped nor aborted finished with exactly
its max_tokens (EOS ignored), no KV in use, all KV free after a flush, and every
process's resident memory (the server, its fork server, the scheduler and the
detokenizer) within 10% of its level after warm-up. The warm-up runs until the
prefix cache holds most of the KV pool, whose pages are resident from first
use; samples through the run ("rss_kb_samples") show whether growth levels
off. Prints a JSON summary; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fuzz_bodies import FuzzCase, draw_cases  # noqa: E402
from tests.server_utils import launch_on_port  # noqa: E402

# Hostile bodies go to these routes only: the server runs without an admin key
# here, and the admin routes would pause or reset it for every client.
HOSTILE_ROUTES = [("/generate", "POST"), ("/v1/completions", "POST"), ("/v1/chat/completions", "POST"),
                  ("/tokenize", "POST"), ("/detokenize", "POST")]
HOSTILE_POOL = 2000  # distinct hostile cases drawn once (reproducibly) and reused


@dataclass
class Tally:
    requests: int = 0
    completed: int = 0
    dropped: int = 0
    aborted: int = 0
    hostile_sent: int = 0
    server_errors: int = 0
    wrong_length: int = 0
    other_errors: List[str] = field(default_factory=list)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


FILL_ROUNDS = 6  # extra warm-up rounds at most, waiting for the cache to fill the pool


def kv_filled(kv: Dict) -> bool:
    return kv["cached_tokens"] + kv["in_use_tokens"] >= 0.9 * kv["total_tokens"]


def sample_rss(samples: Dict[int, List[int]], stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        for pid, values in samples.items():
            values.append(rss_kb(pid))


def process_tree(pid: int) -> List[int]:
    """pid and all its descendants: the server's scheduler and detokenizer are
    children of its fork server, grandchildren of the server."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    tree = [pid]
    for parent in tree:  # (grows while it is walked: breadth first)
        tree += [child for child, p in parents.items() if p == parent]
    return tree


async def one_request(client: httpx.AsyncClient, base: str, rng: random.Random, tally: Tally, cid: int,
                      hostile: List[FuzzCase]) -> None:
    tally.requests += 1
    roll = rng.random()
    if roll < 0.05:  # a hostile body: a 4xx (or a bounded answer), never a 5xx
        tally.hostile_sent += 1
        case = rng.choice(hostile)
        r = await client.request(case.method, f"{base}{case.path}", content=case.async_content(),
                                 headers={"content-type": "application/json"})
        if r.status_code >= 500:
            tally.server_errors += 1
            tally.other_errors.append(f"{r.status_code} for {case.describe()[:300]}: {r.text[:200]}")
        return
    max_tokens = rng.randint(1, 48)
    prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(1, 96))]
    rid = f"soak-{cid}-{tally.requests}"
    drop_after = rng.randint(0, max_tokens) if roll < 0.25 else None
    abort_after = rng.randint(0, max_tokens) if 0.25 <= roll < 0.30 else None
    body = {"input_ids": prompt, "rid": rid, "stream": True,
            "sampling_params": {"max_new_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0}}
    last = None
    async with client.stream("POST", f"{base}/generate", json=body) as r:
        if r.status_code >= 500:
            tally.server_errors += 1
            return
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            last = json.loads(line[5:])
            done = last["meta_info"]["completion_tokens"]
            if drop_after is not None and done >= drop_after:
                tally.dropped += 1
                return  # hang up mid-stream
            if abort_after is not None and done >= abort_after:
                await client.post(f"{base}/abort_request", json={"rid": rid})
                abort_after = None
    if last is None:
        tally.other_errors.append(f"{rid}: no output")
    elif last["meta_info"]["finish_reason"]["type"] == "abort":
        tally.aborted += 1
    elif last["meta_info"]["completion_tokens"] != max_tokens:
        tally.wrong_length += 1
    else:
        tally.completed += 1


async def client_loop(base: str, seconds: float, seed: int, tally: Tally, hostile: List[FuzzCase],
                      max_requests: Optional[int]) -> None:
    """Requests until `seconds` have passed or the clients together have sent
    `max_requests` (when given: a run of fixed size, whatever the machine's speed)."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=120) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and (max_requests is None or tally.requests < max_requests):
            try:
                await one_request(client, base, rng, tally, seed, hostile)
            except httpx.HTTPError as e:
                tally.other_errors.append(f"{type(e).__name__}: {e}")


def run_soak(model_path: str, seconds: float, clients: int, port: int, extra: List[str],
             max_requests: Optional[int] = None, hostile_pool: int = HOSTILE_POOL) -> Dict:
    """`seconds` of load (after a warm-up of a quarter of it, at most 30 s);
    with max_requests, the load stops after that many requests (the warm-up
    after a quarter of them) and `seconds` only bounds a stuck run."""
    hostile = draw_cases(HOSTILE_ROUTES, frozenset(), hostile_pool)
    proc = launch_on_port(model_path, port, "--log-level", "warning", *extra, log=None, timeout_s=300)
    base = f"http://127.0.0.1:{port}"
    try:
        async def all_clients(duration: float, tally: Tally, first_seed: int, count: Optional[int]) -> None:
            await asyncio.gather(*(client_loop(base, duration, first_seed + i, tally, hostile, count)
                                   for i in range(clients)))

        # Warm-up with the full load, long enough to fill the prefix cache, so
        # later growth would be a leak rather than the cache filling up.
        warmup_requests = None if max_requests is None else max(max_requests // 4, clients)
        asyncio.run(all_clients(min(30.0, seconds / 4), Tally(), 1000, warmup_requests))
        # ... and on until the cache holds most of the KV pool: on the CPU the
        # pool's pages are resident from their first use, and freed pages are
        # reused first, so a pool filling up after the warm-up looked like a
        # leak (the default model's scheduler: +240 MB in the first minute,
        # then flat).
        for round_ in range(FILL_ROUNDS):
            if kv_filled(httpx.get(f"{base}/get_server_info").json()["kv_cache"]):
                break
            asyncio.run(all_clients(min(15.0, seconds / 8), Tally(), 2000 + 100 * round_, warmup_requests))
        pids = process_tree(proc.pid)
        rss_after_warmup = {p: rss_kb(p) for p in pids}
        # Samples through the run tell growth that levels off (a cache, a lazy
        # import) from growth that goes on (a leak).
        samples: Dict[int, List[int]] = {p: [] for p in pids}
        stop_sampling = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(samples, stop_sampling, max(seconds / 8, 1.0)), daemon=True)
        sampler.start()
        tally = Tally()
        start = time.monotonic()
        asyncio.run(all_clients(seconds, tally, 0, max_requests))
        elapsed = time.monotonic() - start
        stop_sampling.set()
        sampler.join()
        time.sleep(1.0)  # let dropped connections' aborts land
        rss_end = {p: rss_kb(p) for p in pids}  # (before the checks' own requests)
        kv_end = httpx.get(f"{base}/get_server_info").json()["kv_cache"]
        httpx.post(f"{base}/flush_cache")
        kv_flushed = httpx.get(f"{base}/get_server_info").json()["kv_cache"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    growth = {p: round(rss_end[p] / max(rss_after_warmup[p], 1), 3) for p in pids}
    ok = (tally.server_errors == 0 and tally.wrong_length == 0 and not tally.other_errors
          and kv_end["in_use_tokens"] == 0 and kv_flushed["free_tokens"] == kv_flushed["total_tokens"]
          and all(g <= 1.10 for g in growth.values()))
    return {"ok": ok, "seconds": round(elapsed, 1), "clients": clients, **asdict(tally),
            "kv_at_end": kv_end, "kv_after_flush": kv_flushed,
            "rss_kb_after_warmup": rss_after_warmup, "rss_kb_samples": samples, "rss_kb_at_end": rss_end,
            "rss_growth": growth}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default="SmolLM2-135M-Instruct")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--port", type=int, default=30555)
    args, extra = parser.parse_known_args()
    if "--max-total-tokens" not in extra:
        extra += ["--max-total-tokens", "8192"]  # a pool the warm-up fills: growth after it is a leak
    if "--context-length" not in extra:
        extra += ["--context-length", "512"]  # bounds the hostile bodies' generations (soak's own need < 150)
    result = run_soak(args.model_path, args.minutes * 60, args.clients, args.port, extra)
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
