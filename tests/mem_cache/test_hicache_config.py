"""HiCache's flags, host pool sizing, storage keys and the file backend, and how
tier counts reach the OpenAI usage and /metrics."""

from __future__ import annotations

import pytest
import torch

from radixserve.entrypoints.openai.serving import usage
from radixserve.managers import io_struct as io
from radixserve.managers.metrics import Metrics
from radixserve.mem_cache.hicache import host_pool_tokens
from radixserve.mem_cache.hicache.storage import FileStorage, StorageConfig
from radixserve.mem_cache.hicache.storage_keys import chain_seed, page_keys
from radixserve.server_args import ServerArgs


def test_defaults_are_sglangs():
    args = ServerArgs()
    assert (args.enable_hierarchical_cache, args.hicache_ratio, args.hicache_size) == (False, 2.0, 0)
    assert (args.hicache_write_policy, args.hicache_io_backend, args.hicache_mem_layout) == \
        ("write_through", "kernel", "page_first")
    assert (args.hicache_storage_backend, args.hicache_storage_prefetch_policy) == (None, "timeout")


@pytest.mark.parametrize("kwargs,message", [
    (dict(hicache_write_policy="write_around"), "--hicache-write-policy"),
    (dict(hicache_mem_layout="page_head"), "not supported"),
    (dict(hicache_io_backend="kernel_ascend"), "Ascend"),
    (dict(hicache_ratio=1.0), "hicache_ratio"),
    (dict(hicache_storage_backend_extra_config="[1]"), "JSON object"),
    (dict(enable_hierarchical_cache=True, disable_radix_cache=True), "radix cache"),
    (dict(enable_hierarchical_cache=True, hicache_storage_backend="dynamic"), "module_path"),
    (dict(enable_hierarchical_cache=True, hicache_storage_backend="file", tp_size=2), "tp_size"),
    (dict(enable_hierarchical_cache=True, hicache_storage_backend="mooncake"), "master_server_address"),
    (dict(enable_hierarchical_cache=True, enable_lora=True, max_lora_rank=8, lora_target_modules=["q_proj"]),
     "enable_lora"),
])
def test_bad_combinations_fail_with_the_flag_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServerArgs(**kwargs)


def test_host_pool_size_from_ratio_or_gigabytes():
    assert host_pool_tokens(ServerArgs(hicache_ratio=2.5, page_size=4), 1000, 100) == 2500
    assert host_pool_tokens(ServerArgs(hicache_size=1), 1000, 1000) == 1_000_000  # GB overrides the ratio
    with pytest.raises(ValueError, match="at least the device pool"):
        host_pool_tokens(ServerArgs(hicache_size=1), 10_000_000, 1000)


def test_keys_chain_over_pages_and_name_the_model_and_rank():
    seed = chain_seed("model-a", 0, 1)
    keys = page_keys(seed, [1, 2, 3, 4, 5], 2)
    assert len(keys) == 2  # whole pages only
    assert page_keys(seed, [1, 2, 9, 9], 2)[0] == keys[0] and page_keys(seed, [1, 2, 9, 9], 2)[1] != keys[1]
    assert page_keys(chain_seed("model-b", 0, 1), [1, 2], 2)[0] != keys[0]
    assert page_keys(chain_seed("model-a", 1, 2), [1, 2], 2)[0] != keys[0]


def test_file_storage_roundtrip_and_clear(tmp_path):
    store = FileStorage(StorageConfig(0, 1, "m", str(tmp_path)))
    value = torch.arange(12, dtype=torch.float32).view(torch.uint8)
    assert store.batch_set(["a", "b"], [value, value]) == [True, True]
    assert torch.equal(store.get("a"), value) and store.get("zz") is None
    assert store.batch_exists(["a", "b", "c", "a"]) == 2  # a prefix counts
    again = FileStorage(StorageConfig(0, 1, "m", str(tmp_path)))  # a restarted server
    assert torch.equal(again.batch_get(["b"])[0], value)
    again.clear()
    assert not store.exists("a")


def test_openai_usage_reports_tiers_when_asked():
    meta = {"prompt_tokens": 10, "completion_tokens": 2, "cached_tokens": 8,
            "cached_tokens_details": {"device": 2, "host": 4, "storage": 2}}
    results = [{"meta_info": meta}, {"meta_info": meta}]
    assert "cached_tokens_details" not in usage(results, 1)["prompt_tokens_details"]
    details = usage(results, 1, cached_details=True)["prompt_tokens_details"]
    assert details == {"cached_tokens": 16, "cached_tokens_details": {"device": 4, "host": 8, "storage": 4}}


def test_openai_requests_accept_the_flag():
    from radixserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                                 "return_cached_tokens_details": True})
    assert chat.return_cached_tokens_details is True and chat.model_extra == {}
    assert CompletionRequest.model_validate({"prompt": "hi"}).return_cached_tokens_details is False


def test_metrics_show_tier_hits_and_bytes():
    metrics = Metrics("m")
    tiers = {"hit_tokens": {"device": 5, "host": 7, "storage": 3}, "bytes_host_to_device": 1024,
             "bytes_device_to_host": 2048}
    metrics.on_stats(io.SchedulerStats(0, 0, 0.0, 0.5, 0.0, hicache=tiers))
    text = metrics.render().decode()
    assert 'radixserve:hicache_hit_tokens{model_name="m",tier="host"} 7.0' in text
    assert 'radixserve:hicache_transfer_bytes{model_name="m",tier="host_to_device"} 1024.0' in text
