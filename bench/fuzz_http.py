"""The long HTTP fuzz run: thousands of hostile bodies against a real server.

    .venv/bin/python bench/fuzz_http.py [--bodies 10000] [--concurrency 8]
        [--model-path SmolLM2-135M-Instruct] [any server flag, e.g. --context-length 256 (the default here)]

Launches the server itself with --api-key and --admin-api-key, reads its routes
from /openapi.json, and sends the bodies of tests/fuzz_bodies.py (the same
generators as the CI fuzz test, tests/e2e/test_fuzz_http.py), several at a time,
some uploaded chunked. It does not stop at the first failure: it counts every
status code, groups the 5xx answers and hangs by route and message, and checks
at the end that the server (and so its scheduler) is alive, that a valid
request works and that no KV is in use. Prints a JSON summary; exits 1 on any
5xx, hang, admin route open to the user key, or a dead scheduler.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fuzz_bodies import FuzzCase, draw_cases  # noqa: E402
from tests.server_utils import launch_on_port  # noqa: E402

API_KEY, ADMIN_KEY = "fuzz-user", "fuzz-admin"
USER = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)  # (kind, route, message) -> count
    examples: Dict[str, str] = field(default_factory=dict)  # one body per failure class
    open_admin: int = 0
    server_died: bool = False

    def fail(self, kind: str, case: FuzzCase, message: str) -> None:
        key = f"{kind} {case.path}: {message[:120]}"
        self.failures[key] += 1
        self.examples.setdefault(key, case.describe())


async def send(client: httpx.AsyncClient, base: str, case: FuzzCase, admin_paths: frozenset,
               proc: subprocess.Popen, tally: Tally, timeout_s: float) -> None:
    headers = {"content-type": "application/json", "Authorization": f"Bearer {ADMIN_KEY if case.admin else API_KEY}"}
    url = f"{base}{case.path}"
    try:
        try:
            r = await client.request(case.method, url, content=case.async_content(), headers=headers)
        except (httpx.ReadError, httpx.RemoteProtocolError):
            # The pooled connection may have been closed by the server after an
            # earlier answer on it (uvicorn closes after a 500): once more, alone.
            async with httpx.AsyncClient(timeout=timeout_s) as fresh:
                r = await fresh.request(case.method, url, content=case.async_content(), headers=headers)
    except httpx.TimeoutException:
        tally.statuses["timeout"] += 1
        tally.fail("hang", case, f"no answer within {timeout_s:g} s")
        return
    except httpx.HTTPError as e:
        tally.statuses[type(e).__name__] += 1
        if proc.poll() is not None:
            tally.server_died = True
        tally.fail("transport", case, f"{type(e).__name__}: {e}")
        return
    tally.statuses[str(r.status_code)] += 1
    if r.status_code >= 500:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        tally.fail(str(r.status_code), case, message)
    if case.path in admin_paths and not case.admin and r.status_code != 401:
        tally.open_admin += 1
        tally.fail("open-admin", case, str(r.status_code))


async def run_cases(base: str, cases: List[FuzzCase], admin_paths: frozenset, concurrency: int,
                    proc: subprocess.Popen, tally: Tally, timeout_s: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()
    for case in cases:
        queue.put_nowait(case)

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            while not queue.empty() and not tally.server_died:
                await send(client, base, queue.get_nowait(), admin_paths, proc, tally, timeout_s)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def final_checks(base: str, proc: subprocess.Popen) -> Dict:
    """After the storm: alive, serving, and no KV left in use."""
    if proc.poll() is not None:
        return {"server_alive": False}
    ok = httpx.post(f"{base}/generate", headers=USER, timeout=120, json={
        "input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}})
    kv: Optional[dict] = None
    for _ in range(100):  # aborts of abandoned requests land asynchronously
        kv = httpx.get(f"{base}/get_server_info", headers=USER, timeout=30).json()["kv_cache"]
        if kv["in_use_tokens"] == 0:
            break
        time.sleep(0.2)
    return {"server_alive": proc.poll() is None, "health": httpx.get(f"{base}/health").status_code,
            "valid_request_after": ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 3,
            "kv_after": kv}


def run(model_path: str, bodies: int, concurrency: int, port: int, first_seed: int, extra: List[str],
        log_path: str, timeout_s: float) -> Dict:
    with open(log_path, "w") as log:
        proc = launch_on_port(model_path, port, "--api-key", API_KEY, "--admin-api-key", ADMIN_KEY,
                              "--log-level", "warning", *extra, log=log, timeout_s=300)
        base = f"http://127.0.0.1:{port}"
        try:
            spec = httpx.get(f"{base}/openapi.json", headers=USER).json()
            routes = [(p, m.upper()) for p, ops in spec["paths"].items() for m in ops]
            admin_paths = frozenset(p for p, _ in routes if httpx.post(f"{base}{p}", headers=USER).status_code == 401)
            cases = draw_cases(routes, admin_paths, bodies, first_seed)
            tally = Tally()
            start = time.monotonic()
            asyncio.run(run_cases(base, cases, admin_paths, concurrency, proc, tally, timeout_s))
            elapsed = time.monotonic() - start
            after = final_checks(base, proc)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    tally.server_died = tally.server_died or not after["server_alive"]
    server_errors = sum(n for s, n in tally.statuses.items() if s.isdigit() and int(s) >= 500)
    ok = (server_errors == 0 and not tally.failures and not tally.server_died
          and after.get("valid_request_after") and (after.get("kv_after") or {}).get("in_use_tokens") == 0)
    return {"ok": bool(ok), "bodies": sum(tally.statuses.values()), "seconds": round(elapsed, 1),
            "concurrency": concurrency, "statuses": dict(sorted(tally.statuses.items())),
            "server_errors_5xx": server_errors, "hangs": tally.statuses.get("timeout", 0),
            "admin_open_to_user_key": tally.open_admin, "scheduler_died": tally.server_died, **after,
            "failure_classes": dict(tally.failures.most_common()), "examples": tally.examples, "server_log": log_path}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default="SmolLM2-135M-Instruct")
    parser.add_argument("--bodies", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--port", type=int, default=30556)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-log", default="fuzz_http_server.log")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="an answer later than this is a hang")
    args, extra = parser.parse_known_args()
    if "--context-length" not in extra:
        extra += ["--context-length", "256"]  # bounds each generation, so the run is about bodies, not decoding
    result = run(args.model_path, args.bodies, args.concurrency, args.port, args.seed, extra, args.server_log,
                 args.request_timeout)
    print(json.dumps(result, indent=1, ensure_ascii=True))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
