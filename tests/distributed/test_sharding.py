"""The sharding rules on their own: which heads a rank holds at any tp size,
and lazy safetensors slices reading the same values as the full tensor."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers.sharding import ShardSlice, copy_checkpoint_tensor, split_heads


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
def test_each_rank_holds_the_kv_heads_its_q_heads_read(tp, kv_heads):
    heads = 8
    group = heads // kv_heads  # q heads per KV head
    covered_q, covered_kv = set(), set()
    for rank in range(tp):
        shard = split_heads(heads, kv_heads, tp, rank)
        assert shard.num_heads == heads // tp
        assert shard.num_kv_heads == max(kv_heads // tp, 1)
        mine = range(shard.first_kv_head, shard.first_kv_head + shard.num_kv_heads)
        for q in range(shard.first_head, shard.first_head + shard.num_heads):
            assert q // group in mine, (tp, kv_heads, rank, q)
            covered_q.add(q)
        # Local GQA grouping agrees with the global one: local q head j reads local KV head j // (local group).
        local_group = shard.num_heads // shard.num_kv_heads
        for j in range(shard.num_heads):
            assert shard.first_kv_head + j // local_group == (shard.first_head + j) // group
        covered_kv.update(mine)
    assert covered_q == set(range(heads)) and covered_kv == set(range(kv_heads))


def test_uneven_splits_are_refused():
    with pytest.raises(ValueError, match="attention heads"):
        split_heads(6, 2, 4, 0)
    with pytest.raises(ValueError, match="KV heads"):
        split_heads(12, 6, 4, 0)


def test_lazy_checkpoint_slices_read_the_rows_and_columns_of_the_full_tensor(tmp_path):
    from safetensors.torch import save_file

    from radixserve.model_loader.hf_weights import CheckpointSlice, HFWeights

    full = torch.randn(6, 10)
    save_file({"w": full}, str(tmp_path / "model.safetensors"))
    for name, lazy in HFWeights(tmp_path, lazy=True):
        assert isinstance(lazy, CheckpointSlice) and lazy.shape == (6, 10)
        for dim, start, size in [(0, 2, 3), (1, 5, 5)]:
            target = torch.empty(full.narrow(dim, start, size).shape)
            copy_checkpoint_tensor(target, lazy, ShardSlice(dim, start, size, full.shape[dim]), name)
            assert torch.equal(target, full.narrow(dim, start, size))
        assert torch.equal(lazy.materialize(), full)


def test_a_padded_vocab_slice_zeroes_its_padding_rows():
    full = torch.randn(5, 3)
    target = torch.full((3, 3), 7.0)  # rows 3..5 of a vocab of 5 padded to 6: one padding row
    copy_checkpoint_tensor(target, full, ShardSlice(0, 3, 2, 5), "embed")
    assert torch.equal(target[:2], full[3:]) and torch.equal(target[2], torch.zeros(3))
    with pytest.raises(ValueError, match=r"has shape \(4, 3\), expected \(5, 3\)"):
        copy_checkpoint_tensor(target, torch.randn(4, 3), ShardSlice(0, 3, 2, 5), "embed")
