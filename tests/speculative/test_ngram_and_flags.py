"""NGRAM drafts from a request's own history, and the speculative flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radixserve.server_args import ServerArgs
from radixserve.speculative.ngram import NgramIndex


def propose(history, num_tokens=3, by_frequency=False, max_n=4):
    index = NgramIndex(max_n=max_n, capacity=10_000)
    index.update(history)
    return index.propose(history, num_tokens, by_frequency)


def test_longest_latest_match_continues():
    assert propose([1, 2, 3, 4, 9, 1, 2]) == [3, 4, 9]
    # [7, 1] matched (longer than [1]), so the continuation is 5's, not the later 8's
    assert propose([7, 1, 5, 6, 1, 8, 7, 1]) == [5, 6, 1]
    assert propose([1, 2, 3]) == []  # nothing repeats
    assert propose([4, 4]) == [4]  # the continuation stops at the history's end


def test_prob_match_takes_the_most_frequent_next_token():
    history = [1, 9, 2, 1, 9, 3, 1, 7, 4, 1]
    assert propose(history, 2, by_frequency=False, max_n=1) == [7, 4]
    assert propose(history, 2, by_frequency=True, max_n=1) == [9, 3]


def test_index_grows_incrementally():
    index = NgramIndex(max_n=3, capacity=10_000)
    history = [5, 6, 7]
    index.update(history)
    history += [5, 6]
    index.update(history)
    assert index.propose(history, 2, False) == [7, 5]


def test_flags_checked_and_mixed_chunks_turned_off():
    args = ServerArgs(speculative_algorithm="NGRAM", enable_mixed_chunk=True)
    assert (args.speculative_num_steps, args.speculative_eagle_topk, args.speculative_num_draft_tokens) == (3, 1, 4)
    # NGRAM trees: more nodes than one per step
    args = ServerArgs(speculative_algorithm="NGRAM", speculative_num_steps=2, speculative_num_draft_tokens=8)
    assert (args.speculative_num_steps, args.speculative_num_draft_tokens) == (2, 8)
    assert not args.disable_overlap_schedule and not args.enable_mixed_chunk
    for kwargs, field in [
        (dict(speculative_algorithm="MEDUSA"), "speculative_algorithm"),
        (dict(speculative_algorithm="STANDALONE"), "speculative_draft_model_path"),
        (dict(speculative_algorithm="NGRAM", speculative_eagle_topk=4), "speculative_eagle_topk"),
        (dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=9, speculative_ngram_max_bfs_breadth=1),
         "speculative_num_draft_tokens"),  # a chain: num_steps + 1
        (dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=65), "speculative_num_draft_tokens"),
        (dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=1), "speculative_num_draft_tokens"),
        (dict(speculative_algorithm="STANDALONE", speculative_draft_model_path="x", speculative_eagle_topk=4,
              speculative_num_draft_tokens=4), "speculative_eagle_topk"),  # more root children than nodes
        (dict(speculative_algorithm="STANDALONE", speculative_draft_model_path="x", speculative_num_draft_tokens=8),
         "speculative_num_draft_tokens"),
        (dict(speculative_algorithm="NGRAM", speculative_ngram_min_bfs_breadth=3, speculative_ngram_max_bfs_breadth=2),
         "speculative_ngram_min_bfs_breadth"),
        (dict(speculative_algorithm="NGRAM", speculative_ngram_max_bfs_breadth=0), "speculative_ngram_max_bfs_breadth"),
        (dict(speculative_algorithm="NGRAM", speculative_ngram_match_type="DFS"), "speculative_ngram_match_type"),
        (dict(speculative_algorithm="NGRAM", enable_lora=True, max_lora_rank=8, lora_target_modules=["all"]),
         "enable_lora"),
        (dict(speculative_algorithm="EAGLE"), "speculative_draft_model_path"),
        # a token map narrows an EAGLE-1/2 head only, and must exist
        (dict(speculative_algorithm="EAGLE3", speculative_draft_model_path="x", speculative_token_map=__file__),
         "speculative_token_map"),
        (dict(speculative_algorithm="EAGLE", speculative_draft_model_path="x", speculative_token_map="/no/map.pt"),
         "speculative_token_map"),
    ]:
        with pytest.raises(ValueError, match=field):
            ServerArgs(**kwargs)


def test_eagle3_finds_the_shipped_head_for_the_default_model_only(tmp_path):
    head = Path(ServerArgs(speculative_algorithm="EAGLE3").speculative_draft_model_path)
    config = json.loads((head / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and (head / "model.safetensors").is_file()
    # a path given wins; another model has no head to find
    assert ServerArgs(speculative_algorithm="EAGLE3", speculative_draft_model_path="x").speculative_draft_model_path == "x"
    with pytest.raises(ValueError, match="speculative_draft_model_path"):
        ServerArgs(model_path=str(tmp_path), speculative_algorithm="EAGLE3")
