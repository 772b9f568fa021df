"""SamplingParams: defaults, and every bad value is a ValueError naming its field."""

from __future__ import annotations

import pytest

from radixserve.sampling.sampling_params import SamplingParams

VOCAB = 100


def test_defaults_match_sglang():
    sp = SamplingParams.from_dict(None)
    assert (sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (128, 1.0, 1.0, -1, 0.0)
    assert (sp.n, sp.ignore_eos, sp.skip_special_tokens, sp.no_stop_trim) == (1, False, True, False)
    sp.verify(VOCAB)


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", -1), ("max_new_tokens", 2.0), ("max_new_tokens", True), ("max_new_tokens", "8"),
    ("min_new_tokens", -3), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_k", -2), ("top_k", 1.5), ("min_p", 1.5),
    ("frequency_penalty", 2.5), ("presence_penalty", -3.0), ("repetition_penalty", 0.0),
    ("n", 0), ("sampling_seed", 1.5), ("stop", ""), ("stop", [1]), ("stop_token_ids", [VOCAB]),
    ("logit_bias", {"abc": 1.0}), ("logit_bias", {str(VOCAB): 1.0}), ("logit_bias", {"1": float("inf")}),
])
def test_bad_values_name_the_field(field, value):
    sp = SamplingParams.from_dict({field: value})
    with pytest.raises(ValueError, match=field):
        sp.verify(VOCAB)


def test_min_new_above_max_new():
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams.from_dict({"min_new_tokens": 9, "max_new_tokens": 8}).verify(VOCAB)


def test_unknown_key():
    with pytest.raises(ValueError, match="'temprature'"):
        SamplingParams.from_dict({"temprature": 0.5})


def test_normalize():
    sp = SamplingParams.from_dict({"stop": "END", "stop_token_ids": [3, 4], "logit_bias": {"7": 2}})
    sp.verify(VOCAB)
    sp.normalize()
    assert sp.stop_strs == ["END"] and sp.max_stop_str_len == 3
    assert sp.stop_token_set == {3, 4} and sp.logit_bias == {7: 2.0}
    assert SamplingParams(temperature=0).is_greedy and SamplingParams(top_k=1).is_greedy
    assert not SamplingParams().is_greedy
