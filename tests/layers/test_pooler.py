"""Which pooling a checkpoint declares (sentence-transformers' files), and the
pooling of chunked prefills adding up to the whole prompt's."""

from __future__ import annotations

import json

import pytest
import torch

from radixserve.layers.pooler import PooledState, PoolingConfig, pool_extend, read_pooling_config


def write_st_files(folder, modes: dict) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 8, **modes}))


@pytest.mark.parametrize("modes, method", [
    ({"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}, "last"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, "mean"),
])
def test_declared_pooling(tmp_path, modes, method):
    write_st_files(tmp_path, modes)
    assert read_pooling_config(tmp_path) == PoolingConfig(method)


def test_no_files_means_last_token_and_other_modes_are_refused(tmp_path):
    assert read_pooling_config(tmp_path).method == "last"
    write_st_files(tmp_path, {"pooling_mode_cls_token": True})
    with pytest.raises(ValueError, match="pooling_mode_cls_token"):
        read_pooling_config(tmp_path)


@pytest.mark.parametrize("method", ["last", "mean"])
def test_chunks_add_up_to_the_whole_prompt(method):
    """Two requests in one batch, the second prompt split over two forwards."""
    torch.manual_seed(0)
    a, b = torch.randn(3, 8), torch.randn(7, 8)
    config = PoolingConfig(method)
    whole = {"last": b[-1], "mean": b.mean(0)}[method]
    first = pool_extend(torch.cat([a, b[:4]]), torch.tensor([3, 4]), torch.tensor([2, 6]), config)
    second = pool_extend(b[4:], torch.tensor([3]), torch.tensor([2]), config)
    state = PooledState(config)
    state.add(first, 1, 4)
    state.add(second, 0, 3)
    expected = torch.nn.functional.normalize(whole, dim=0)
    assert torch.allclose(torch.tensor(state.embedding()), expected, atol=1e-6)
