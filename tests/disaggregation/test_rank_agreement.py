"""How tensor-parallel ranks agree on transfer outcomes: the rule itself, with
the other rank's view given (the gather is torch.distributed's, tested elsewhere)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from radixserve.disaggregation import rank_agreement


@pytest.fixture
def other_rank(monkeypatch):
    """Sets what the second rank says; agree() then sees [ours, theirs]."""
    theirs = {}
    monkeypatch.setattr(rank_agreement, "get_tp_group", lambda: SimpleNamespace(world_size=2))
    monkeypatch.setattr(rank_agreement, "gather_objects", lambda mine: [mine, theirs])
    return theirs


def test_done_only_when_every_rank_is_done(other_rank):
    other_rank.update({"a": "", "b": None, "c": ""})
    assert rank_agreement.agree({"a": "", "b": "", "c": None}) == {"a": ""}


def test_an_error_waits_for_every_rank_unless_fail_fast(other_rank):
    other_rank.update({"a": None, "b": "", "c": "boom"})
    mine = {"a": "timed out", "b": "timed out", "c": ""}
    # The prefill side: a rank still writing must finish before anyone frees.
    assert rank_agreement.agree(mine) == {"b": "timed out", "c": "boom"}
    # The decode side: any rank's error ends the request at once.
    assert rank_agreement.agree(mine, fail_fast=True) == {"a": "timed out", "b": "timed out", "c": "boom"}


def test_one_rank_needs_no_gather(monkeypatch):
    monkeypatch.setattr(rank_agreement, "get_tp_group", lambda: SimpleNamespace(world_size=1))
    monkeypatch.setattr(rank_agreement, "gather_objects", lambda mine: pytest.fail("no collective with one rank"))
    assert rank_agreement.agree({"a": "", "b": None, "c": "x"}) == {"a": "", "c": "x"}
