"""The lora room's parts without an engine: adapter files and their checks,
flags, slot eviction, row grouping, and one projection's delta against peft."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from radixserve.lora.adapter import load_adapter
from radixserve.lora.delta import LoRABatch, LoRATarget, TargetPart, group_rows, row_slots
from radixserve.lora.slots import SlotTable
from radixserve.lora.spec import LoRASpec, normalize_targets, parse_lora_paths
from radixserve.server_args import ServerArgs


@pytest.fixture(scope="module")
def llama(lora_setup):
    return lora_setup("llama")


def test_load_reads_rank_scaling_and_targets(llama):
    attn = load_adapter(LoRASpec("attn", str(llama["attn"])))
    assert attn.rank == 4 and attn.scaling == 2.0  # lora_alpha 8 / r 4
    assert attn.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj"}
    a, b = attn.weights["model.layers.1.self_attn.k_proj"]
    assert a.shape == (4, 64) and b.shape == (32, 4) and b.abs().sum() > 0
    rs = load_adapter(LoRASpec("all", str(llama["all"])))
    assert rs.scaling == pytest.approx(4 / math.sqrt(2))  # rsLoRA: alpha / sqrt(r)


def test_bad_adapters_are_named(llama, tmp_path):
    with pytest.raises(ValueError, match="'gone'.*no adapter_config.json"):
        load_adapter(LoRASpec("gone", str(tmp_path / "nowhere")))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    with pytest.raises(ValueError, match="'no_weights'.*no adapter_model.safetensors"):
        load_adapter(LoRASpec("no_weights", str(no_weights)))
    with pytest.raises(ValueError, match="'mlp'.*rank 8 is larger than max_lora_rank \\(4\\)"):
        load_adapter(LoRASpec("mlp", str(llama["mlp"])), max_rank=4)
    with pytest.raises(ValueError, match="'mlp'.*gate_proj.*not in lora_target_modules"):
        load_adapter(LoRASpec("mlp", str(llama["mlp"])), allowed_targets=normalize_targets(["qkv_proj"]))


def test_unsupported_target_in_the_file_is_named(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((llama["attn"] / "adapter_config.json").read_text())
    tensors = load_file(llama["attn"] / "adapter_model.safetensors")
    renamed = {k.replace("self_attn.q_proj", "self_attn.rotary"): v for k, v in tensors.items()}
    save_file(renamed, bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="unsupported target module\\(s\\) rotary"):
        load_adapter(LoRASpec("bad", str(bad)))


def test_flags_parse_as_sglang_names_them(tmp_path):
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(["--lora-paths", "a=/x/a", "/y/b", "--max-loras-per-batch", "2", "--max-lora-rank",
                            "16", "--lora-target-modules", "q_proj", "v_proj", "--lora-eviction-policy", "fifo",
                            "--max-loaded-loras", "4", "--lora-backend", "torch"])
    args = ServerArgs.from_cli_args(ns)
    assert args.enable_lora and args.lora_paths == ["a=/x/a", "/y/b"]
    assert args.lora_target_modules == ["q_proj", "v_proj"] and args.max_loaded_loras == 4
    assert [s.name for s in parse_lora_paths(args.lora_paths)] == ["a", "b"]
    assert parse_lora_paths({"x": "/p"}) == parse_lora_paths([{"lora_name": "x", "lora_path": "/p"}])
    with pytest.raises(ValueError, match="lora_paths has 2 adapters, more than max_loaded_loras \\(1\\)"):
        ServerArgs(lora_paths=["a=/x", "b=/y"], max_loaded_loras=1, max_loras_per_batch=1)
    with pytest.raises(ValueError, match="max_loaded_loras \\(1\\) must be >= max_loras_per_batch"):
        ServerArgs(enable_lora=True, max_lora_rank=8, lora_target_modules=["all"], max_loaded_loras=1,
                   max_loras_per_batch=2)
    with pytest.raises(ValueError, match="cannot be combined with enable_deterministic_inference"):
        ServerArgs(lora_paths=["a=/x"], enable_deterministic_inference=True)
    with pytest.raises(ValueError, match="needs max_lora_rank and lora_target_modules"):
        ServerArgs(enable_lora=True)
    with pytest.raises(ValueError, match="lora_paths: adapter name 'a' appears more than once"):
        ServerArgs(lora_paths=["a=/x", "a=/y"])
    with pytest.raises(ValueError, match="lora_target_modules: unknown target module 'qproj'"):
        normalize_targets(["qproj"])


def test_slot_eviction_lru_fifo_and_pinned():
    lru = SlotTable(2, "lru")
    assert lru.place(1, keep={1}) == 0 and lru.place(2, keep={2}) == 1
    lru.use(1)  # 2 is now the least recently used
    assert lru.place(3, keep={3}) == 1 and 2 not in lru.slot_of
    fifo = SlotTable(2, "fifo")
    fifo.place(1, keep={1})
    fifo.place(2, keep={2})
    fifo.use(1)  # use does not matter to fifo: 1 came first
    assert fifo.place(3, keep={3}) == 0 and 1 not in fifo.slot_of
    pinned = SlotTable(2, "lru")
    pinned.place(1, keep={1})
    pinned.place(2, keep={1, 2})
    assert pinned.place(3, keep={1, 3}) == 1  # 1 is kept (pinned) although least recently used


def test_rows_group_by_slot():
    groups = dict(group_rows([0, -1, 0, 1, 1], [3, 2, 1, 4, 1], torch.device("cpu")))
    assert groups[1] == slice(6, 11)  # adjacent requests of one slot: one run, no gather
    assert groups[0].tolist() == [0, 1, 2, 5]
    assert set(groups) == {0, 1}  # rows without an adapter are in no group


def test_merged_projection_delta_matches_separate_projections():
    """q|k|v as one layer: each row gets its own slot's per-part delta, scaled."""
    torch.manual_seed(0)
    parts = [TargetPart("q_proj", 0, 8), TargetPart("k_proj", 8, 4), TargetPart("v_proj", 12, 4)]
    batch = LoRABatch()
    target = LoRATarget("model.layers.0.self_attn.qkv_proj", parts, 6, 16, 2, 3, batch,
                        torch.device("cpu"), torch.float32)
    w = {f"model.layers.0.self_attn.{p.peft_name}": (torch.randn(2, 6), torch.randn(p.size, 2)) for p in parts[:2]}
    target.write(1, w, scaling=0.5)  # rank 2 in a rank-3 slot; v not targeted
    x = torch.randn(5, 6)
    batch.set_groups(group_rows([-1, 1], [2, 3], torch.device("cpu")), row_slots([-1, 1], [2, 3], torch.device("cpu")))
    out = target.add_delta(x, torch.zeros(5, 16))
    assert out[:2].abs().sum() == 0 and out[2:, 12:].abs().sum() == 0
    for p in parts[:2]:
        a, b = w[f"model.layers.0.self_attn.{p.peft_name}"]
        torch.testing.assert_close(out[2:, p.offset:p.offset + p.size], x[2:] @ a.T @ b.T * 0.5)


@pytest.mark.parametrize("slots,tokens", [([2, -1, 0, 0, 1], [20, 3, 1, 5, 1]), ([1, 1, 1], [1, 1, 1]),
                                          ([-1, -1], [4, 1]), ([0, 1, 2, 1], [1, 1, 1, 1])])
def test_segmented_triton_kernel_matches_torch_groups(slots, tokens):
    """The CUDA path's kernels (here under TRITON_INTERPRET=1) against the torch
    path, through a merged target: prefill runs, decode rows, base-only batches."""
    from radixserve.lora.triton_ops import segments_of

    torch.manual_seed(0)
    parts = [TargetPart("gate_proj", 0, 40), TargetPart("up_proj", 40, 30)]
    batch = LoRABatch()
    target = LoRATarget("model.layers.0.mlp.gate_up_proj", parts, 24, 70, 3, 4, batch,
                        torch.device("cpu"), torch.float32)
    for slot in range(3):
        w = {f"model.layers.0.mlp.{p.peft_name}": (torch.randn(3, 24), torch.randn(p.size, 3)) for p in parts}
        target.write(slot, w, scaling=0.25 * (slot + 1))
    x, base = torch.randn(sum(tokens), 24), torch.randn(sum(tokens), 70)
    want = base.clone()  # row by row
    for row, slot in enumerate(row_slots(slots, tokens, torch.device("cpu")).tolist()):
        if slot >= 0:
            want[row] += x[row] @ target.A[slot].T @ target.B[slot]
    batch.set_groups(group_rows(slots, tokens, torch.device("cpu")), row_slots(slots, tokens, torch.device("cpu")))
    torch.testing.assert_close(target.add_delta(x, base.clone()), want, rtol=1e-5, atol=1e-5)  # torch path
    batch.segments = segments_of(slots, tokens, torch.device("cpu"))
    torch.testing.assert_close(target.add_delta(x, base.clone()), want, rtol=1e-5, atol=1e-5)  # Triton kernels


def test_decode_graph_segments_match_torch_groups():
    """What a decode CUDA graph replays: static per-slot segments over the
    graph's rows (padding and base rows in none), refilled per step; here
    under TRITON_INTERPRET=1."""
    from radixserve.lora.triton_ops import DecodeSegments

    torch.manual_seed(1)
    batch = LoRABatch()
    target = LoRATarget("model.layers.0.self_attn.o_proj", [TargetPart("o_proj", 0, 20)], 16, 20, 3, 4, batch,
                        torch.device("cpu"), torch.float32)
    for slot in range(3):
        target.write(slot, {"model.layers.0.self_attn.o_proj": (torch.randn(4, 16), torch.randn(20, 4))}, 0.5)
    static = DecodeSegments(3, 16, torch.device("cpu"))
    for slots in ([1, -1, 0, 1, 1, -1, -1, -1], [2, 2, 2, 2, 2, 2, 2, 2], [-1] * 8):  # a graph of 8 rows
        x, base = torch.randn(8, 16), torch.randn(8, 20)
        batch.set_groups(group_rows(slots, [1] * 8, torch.device("cpu")), row_slots(slots, [1] * 8, torch.device("cpu")))
        want = target.add_delta(x, base.clone())
        static.fill(slots)
        batch.set_segments(static.view(8))
        torch.testing.assert_close(target.add_delta(x, base.clone()), want)


def test_manager_slots_admission_pinning_and_graph_segments(llama):
    """The scheduler side on the tiny Llama: which adapters a batch admits,
    pinned slots, the host-memory limit, and the decode graph's segments."""
    from radixserve.lora.manager import LoRAManager
    from radixserve.model_loader.source import resolve_model_source
    from radixserve.models.llama import LlamaForCausalLM
    from radixserve.utils.hf_utils import load_config

    model = LlamaForCausalLM(load_config(resolve_model_source(str(llama["base"]))))
    args = ServerArgs(model_path=str(llama["base"]), lora_paths=[f"attn={llama['attn']}"], max_loras_per_batch=3,
                      max_loaded_loras=4, max_lora_rank=8, lora_target_modules=["all"])
    lora = LoRAManager(args, model, torch.device("cpu"), torch.float32)
    assert model.model.layers[0].mlp.gate_up_proj.lora is not None  # every targeted projection carries one
    lora.load(2, LoRASpec("mlp", str(llama["mlp"]), pinned=True))
    lora.load(3, LoRASpec("all", str(llama["all"]), pinned=True))
    assert {2, 3} <= set(lora.slots.slot_of)  # pinned: resident at once, and for good
    with pytest.raises(ValueError, match="pinned adapters must leave at least one"):
        lora.load(4, LoRASpec("attn2", str(llama["attn"]), pinned=True))
    lora.load(4, LoRASpec("attn2", str(llama["attn"])))
    with pytest.raises(ValueError, match="max_loaded_loras \\(4\\)"):
        lora.load(5, LoRASpec("more", str(llama["attn"])))
    # 3 slots, two pinned: a batch holds them and one other adapter at most.
    assert lora.admits({1}, 2) and lora.admits({None}, 4) and lora.admits({1}, None)
    assert not lora.admits({1}, 4)
    lora.unload(3)
    assert lora.admits({1}, 4) and lora.admits({1, 4}, 2)  # 2 is pinned: always admitted
    lora.capture_decode(4, 8)
    lora.prepare_decode([4, None, 1], 4)
    segs, slot_of = lora.batch.segments, lora.slots.slot_of
    assert segs.count == 3 and segs.max_len == 4  # one segment per slot; a slot may hold all 4 rows
    assert slot_of[2] not in (slot_of[4], slot_of[1])  # the pinned one kept its slot
    lens = segs.lens.tolist()
    assert lens[slot_of[4]] == 1 and lens[slot_of[1]] == 1 and lens[slot_of[2]] == 0
    assert segs.order[segs.starts[slot_of[4]]] == 0 and segs.order[segs.starts[slot_of[1]]] == 2
    with pytest.raises(ValueError, match="no LoRA adapter with id 9"):
        lora.unload(9)


def test_bench_serving_requests_name_their_adapter():
    """bench_serving --lora-name: lora_path on /generate, the model name on OpenAI routes."""
    from radixserve.benchmark.backends import BackendConfig
    from radixserve.benchmark.datasets import BenchRequest

    req = BenchRequest("hi", [1, 2], 4, lora_name="sql")
    assert BackendConfig("radixserve", "http://x", "base").body(req)["lora_path"] == "sql"
    assert BackendConfig("openai", "http://x", "base").body(req)["model"] == "sql"
    base = BenchRequest("hi", [1, 2], 4)
    assert "lora_path" not in BackendConfig("sglang", "http://x", "base").body(base)
    assert BackendConfig("openai-chat", "http://x", "base").body(base)["model"] == "base"
