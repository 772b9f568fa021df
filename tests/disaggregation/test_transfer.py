"""The pieces of a KV transfer, with two real Mooncake engines in this process
(TCP on loopback): which bytes go where, and that they arrive."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from radixserve.disaggregation.transfer import (
    FIRST_TOKEN_TOP_K, PAYLOAD_WIDTH, FirstTokenBoard, KVDestination, MooncakeEngine, kv_buffers, kv_write_list,
    room_tag, slot_bytes, slot_runs)
from radixserve.mem_cache.allocator import KVPool
from radixserve.mem_cache.mla_pool import MLAKVPool

needs_mooncake = pytest.mark.skipif(importlib.util.find_spec("mooncake") is None,
                                    reason="needs mooncake-transfer-engine (pip install 'radixserve[pd]')")


def test_slot_runs_split_where_either_side_jumps():
    src = torch.tensor([4, 5, 6, 9, 10, 11, 12])
    dst = torch.tensor([20, 21, 22, 23, 24, 30, 31])
    assert slot_runs(src, dst) == ([4, 9, 11], [20, 23, 30], [3, 2, 2])
    assert slot_runs(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64)) == ([], [], [])


def test_buffers_in_a_fixed_order_one_row_per_slot():
    mha = KVPool(16, 2, 3, 8, torch.float32, torch.device("cpu"))
    assert kv_buffers(mha) == mha.k_buffers + mha.v_buffers
    assert [slot_bytes(b) for b in kv_buffers(mha)] == [3 * 8 * 4] * 4
    mla = MLAKVPool(16, 3, 32, 8, torch.bfloat16, torch.device("cpu"))
    assert kv_buffers(mla) == mla.latent_buffers and slot_bytes(kv_buffers(mla)[0]) == 40 * 2


def test_room_tags_are_never_zero():
    assert room_tag(0) == 1 and room_tag((1 << 63) - 1) > 0 and room_tag(5) != room_tag(6)


@needs_mooncake
@pytest.mark.parametrize("pool_kind", ["mha", "mla"])
def test_a_request_kv_and_first_token_arrive_where_the_decode_side_said(pool_kind):
    def pool():
        if pool_kind == "mha":
            return KVPool(64, 2, 2, 4, torch.float32, torch.device("cpu"))
        return MLAKVPool(64, 2, 6, 2, torch.float32, torch.device("cpu"))

    prefill_pool, decode_pool = pool(), pool()
    for buf in kv_buffers(prefill_pool):
        buf.copy_(torch.randn_like(buf))
    prefill, decode = MooncakeEngine("127.0.0.1", None), MooncakeEngine("127.0.0.1", None)
    prefill_board, decode_board = FirstTokenBoard(4), FirstTokenBoard(4)
    prefill.register(kv_buffers(prefill_pool) + prefill_board.tensors())
    decode.register(kv_buffers(decode_pool) + decode_board.tensors())

    src = torch.tensor([3, 4, 5, 6, 20, 21, 40])  # prefill slots of positions 2..8
    dst = [10, 11, 30, 31, 32, 33, 50]  # decode slots of the same positions
    dest = KVDestination(
        room=77, session=decode.session_id, buffer_addrs=[b.data_ptr() for b in kv_buffers(decode_pool)],
        slot_bytes=[slot_bytes(b) for b in kv_buffers(decode_pool)], start_pos=2, slots=dst, prompt_len=9,
        payload_addr=decode_board.payload_addr(2), status_addr=decode_board.status_addr(2), budget_s=10.0)
    sizes = [slot_bytes(b) for b in kv_buffers(prefill_pool)]
    srcs, dsts, lengths = kv_write_list([b.data_ptr() for b in kv_buffers(prefill_pool)], src, dest, sizes)
    assert len(srcs) == 4 * len(kv_buffers(prefill_pool))  # four runs per buffer
    prefill.write(dest.session, srcs, dsts, lengths)
    for p_buf, d_buf in zip(kv_buffers(prefill_pool), kv_buffers(decode_pool)):
        assert torch.equal(d_buf[dst], p_buf[src])
        untouched = torch.ones(64, dtype=torch.bool)
        untouched[dst] = False
        assert not d_buf[untouched].any()

    top = [(-0.5, 7), (-1.25, 9), (-3.0, 11)]
    prefill_board.stage(1, 7, -0.5, top)
    prefill.write(dest.session, [prefill_board.payload_addr(1)], [dest.payload_addr], [PAYLOAD_WIDTH * 8])
    assert decode_board.status[2].tolist() == [0, 0]  # the payload alone does not say "done"
    prefill_board.status[1, FirstTokenBoard.DONE] = room_tag(77)
    prefill.write(dest.session, [prefill_board.status_addr(1)], [dest.status_addr], [8])
    assert int(decode_board.status[2, FirstTokenBoard.DONE]) == room_tag(77)
    assert decode_board.read(2, 2) == (7, -0.5, top[:2])
    assert len(decode_board.read(2, FIRST_TOKEN_TOP_K)[2]) == FIRST_TOKEN_TOP_K  # zero-padded past the 3 sent


@needs_mooncake
def test_a_write_to_nobody_fails_with_the_peer_named():
    from radixserve.disaggregation.transfer import TransferError

    engine, data = MooncakeEngine("127.0.0.1", None), torch.zeros(4)
    engine.register([data])
    with pytest.raises(TransferError, match="127.0.0.1:1 failed"):
        engine.write("127.0.0.1:1", [data.data_ptr()], [data.data_ptr()], [16])
