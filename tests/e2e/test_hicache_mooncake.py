"""The Mooncake store as HiCache's storage tier, with a mooncake_master on
127.0.0.1: prefixes flushed from the device and host tiers come back from the
store, with outputs identical to recomputing them. Skipped where the
mooncake-transfer-engine package is not installed."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from radixserve import Engine

mooncake = pytest.importorskip("mooncake.store", reason="needs mooncake-transfer-engine-non-cuda")

GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def master_binary() -> str:
    import mooncake as package

    bundled = Path(package.__file__).parent / "mooncake_master"
    return str(bundled) if bundled.exists() else (shutil.which("mooncake_master") or "mooncake_master")


@pytest.fixture(scope="module")
def master():
    rpc, http, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [master_binary(), "-rpc_address=127.0.0.1", f"-rpc_port={rpc}", "-enable_http_metadata_server=true",
         "-http_metadata_server_host=127.0.0.1", f"-http_metadata_server_port={http}", f"-metrics_port={metrics}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):  # bounded wait for the RPC port
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", rpc)) == 0:
                    break
            time.sleep(0.05)
        yield {"master_server_address": f"127.0.0.1:{rpc}",
               "metadata_server": f"http://127.0.0.1:{http}/metadata",
               "global_segment_size": 64 << 20, "local_buffer_size": 16 << 20}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mooncake_store_serves_flushed_prefixes(tiny_model_factory, master):
    rng = random.Random(3)
    prompts = [[rng.randrange(10, 5000) for _ in range(50)] for _ in range(3)]
    with Engine(model_path=str(tiny_model_factory("llama")), enable_hierarchical_cache=True, page_size=4,
                max_total_tokens=256, hicache_storage_backend="mooncake",
                hicache_storage_backend_extra_config=json.dumps(master),
                hicache_storage_prefetch_policy="wait_complete") as engine:
        first = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        pages = sum(len(p) // 4 for p in prompts)
        for _ in range(500):  # bounded wait for the background writes
            if engine.get_server_info()["hicache"]["storage_pages_written"] >= pages:
                break
            time.sleep(0.02)
        assert engine.flush_cache() is True  # device and host tiers only
        again = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in again] == [o["output_ids"] for o in first]
        for out, prompt in zip(again, prompts):
            assert out["meta_info"]["cached_tokens_details"]["storage"] == (len(prompt) - 1) // 4 * 4
        assert engine.flush_cache(flush_storage=True) is True
        last = engine.generate(input_ids=prompts[0], sampling_params=GREEDY)
        assert last["meta_info"]["cached_tokens"] == 0  # the store was emptied too
