"""SamplingParams: SGLang's defaults, unknown names rejected, every bad value a
ValueError that names its field, and the normalized forms."""

from __future__ import annotations

import dataclasses

import pytest

from radixserve.managers.validation import FieldError
from radixserve.sampling.sampling_params import SamplingParams

VOCAB = 100


def test_defaults_match_sglang():
    sp = SamplingParams.from_dict(None)
    assert sp == SamplingParams.from_dict({}) == SamplingParams()
    assert (sp.max_new_tokens, sp.min_new_tokens, sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (
        128, 0, 1.0, 1.0, -1, 0.0)
    assert (sp.frequency_penalty, sp.presence_penalty, sp.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (sp.stop, sp.stop_token_ids, sp.logit_bias, sp.sampling_seed) == (None, None, None, None)
    assert (sp.ignore_eos, sp.skip_special_tokens, sp.spaces_between_special_tokens, sp.no_stop_trim, sp.n) == (
        False, True, True, False, 1)
    assert (sp.json_schema, sp.regex, sp.ebnf) == (None, None, None)
    sp.verify(VOCAB)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="unknown sampling param 'foo'"):
        SamplingParams.from_dict({"foo": 1, "temperature": 0.5})
    with pytest.raises(ValueError, match="did you mean 'temperature'"):
        SamplingParams.from_dict({"temprature": 0.5})
    with pytest.raises(ValueError, match="'a'.*'b'"):
        SamplingParams.from_dict({"a": 1, "b": 2})
    # Derived fields are not user params.
    with pytest.raises(ValueError, match="'stop_strs'"):
        SamplingParams.from_dict({"stop_strs": ["x"]})


def test_not_a_dict():
    with pytest.raises(ValueError, match="sampling_params"):
        SamplingParams.from_dict([("temperature", 1.0)])  # type: ignore[arg-type]


BAD = [
    ("max_new_tokens", -1), ("max_new_tokens", 3.0), ("max_new_tokens", True), ("max_new_tokens", "8"),
    ("max_new_tokens", None),
    ("min_new_tokens", -3), ("min_new_tokens", 1.0), ("min_new_tokens", False),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", None),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True),
    ("min_p", -0.01), ("min_p", 1.5),
    ("frequency_penalty", 2.5), ("frequency_penalty", -2.01), ("presence_penalty", -3.0),
    ("presence_penalty", 2.0001),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", 2.5),
    ("n", 0), ("n", 2.0), ("n", -1),
    ("sampling_seed", 1.5), ("sampling_seed", "7"), ("sampling_seed", True),
    ("stop", ""), ("stop", [""]), ("stop", [1]), ("stop", 5), ("stop", ["ok", None]),
    ("stop_token_ids", [VOCAB]), ("stop_token_ids", [-1]), ("stop_token_ids", ["3"]), ("stop_token_ids", [2.0]),
    ("stop_token_ids", 3),
    ("logit_bias", {"abc": 1.0}), ("logit_bias", {str(VOCAB): 1.0}), ("logit_bias", {-1: 1.0}),
    ("logit_bias", {1.5: 1.0}), ("logit_bias", {"1.5": 1.0}), ("logit_bias", {"1": float("inf")}),
    ("logit_bias", {"1": float("nan")}), ("logit_bias", {"1": "big"}), ("logit_bias", [1, 2]),
    ("ignore_eos", 1), ("skip_special_tokens", "yes"), ("json_schema", {"type": "object"}),
    # Out of what the int64 / float32 batch tensors hold, or out of the vocabulary.
    ("top_k", VOCAB + 1), ("top_k", 2**63), ("top_k", 10**6), ("max_new_tokens", 2**63),
    ("min_new_tokens", 2**63), ("n", 2**63), ("n", "2"),
    ("sampling_seed", 2**64), ("sampling_seed", -(2**63) - 1), ("sampling_seed", 2**80), ("sampling_seed", "a"),
    ("temperature", 1e39), ("logit_bias", {"1": 1e39}), ("logit_bias", {"9" * 30: 1.0}),
    # Strings UTF-8 cannot encode (a lone surrogate from JSON's "\ud800").
    ("stop", "\ud800"), ("stop", ["ok", "a\udfff"]), ("regex", "a\ud800"), ("ebnf", "\udc00"),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_values_name_the_field(name, value):
    sp = SamplingParams.from_dict({name: value})
    with pytest.raises(FieldError, match=name) as info:
        sp.verify(VOCAB)
    assert info.value.field == name


def test_min_new_tokens_above_max_new_tokens():
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams.from_dict({"min_new_tokens": 9, "max_new_tokens": 8}).verify(VOCAB)


GOOD = [
    {"max_new_tokens": 0}, {"min_new_tokens": 8, "max_new_tokens": 8}, {"temperature": 0},
    {"temperature": 1e-9}, {"temperature": 5}, {"top_p": 1}, {"top_p": 1e-6}, {"top_k": 0}, {"top_k": -1},
    {"top_k": VOCAB}, {"min_p": 1.0}, {"frequency_penalty": -2}, {"presence_penalty": 2.0},
    {"repetition_penalty": 2.0}, {"repetition_penalty": 0.01}, {"n": 4},
    {"sampling_seed": -(2**63)}, {"sampling_seed": 2**64 - 1}, {"max_new_tokens": 2**63 - 1},
    {"stop": "終"}, {"stop": "x"}, {"stop": []}, {"stop": ["a", "bc"]},
    {"stop_token_ids": []}, {"stop_token_ids": [0, VOCAB - 1]}, {"logit_bias": {}},
    {"logit_bias": {"0": -100, VOCAB - 1: 100.0}}, {"json_schema": "{}", "regex": "a+", "ebnf": "root ::= 'a'"},
]


@pytest.mark.parametrize("params", GOOD, ids=[repr(p) for p in GOOD])
def test_good_values_pass(params):
    SamplingParams.from_dict(params).verify(VOCAB)


def test_good_values_build_batch_tensors():
    """What verify() lets through, the scheduler's int64 / float32 tensors hold."""
    from types import SimpleNamespace

    from radixserve.sampling.sampling_batch_info import SamplingBatchInfo

    reqs = []
    for params in GOOD:
        sp = SamplingParams.from_dict(params)
        sp.verify(VOCAB)
        sp.normalize()
        reqs.append(SimpleNamespace(sampling_params=sp, sampling_seed=sp.sampling_seed or 0, output_ids=[1],
                                    origin_input_ids=[2, 3], return_logprob=True, top_logprobs_num=VOCAB))
    info = SamplingBatchInfo.from_reqs(reqs, VOCAB, "cpu", eos_token_ids={0})
    assert info.batch_size == len(GOOD) and int(info.top_ks.max()) == VOCAB


def test_vocabulary_checks_skipped_without_a_vocabulary():
    SamplingParams.from_dict({"top_k": 10**6, "stop_token_ids": [10**6]}).verify(None)
    with pytest.raises(FieldError, match="top_k"):
        SamplingParams.from_dict({"top_k": 2**63}).verify(None)


def test_normalize():
    sp = SamplingParams.from_dict({"stop": "END", "stop_token_ids": [3, 4, 3], "logit_bias": {"7": 2, 8: -1.5}})
    sp.verify(VOCAB)
    sp.normalize()
    assert sp.stop_strs == ["END"] and sp.max_stop_str_len == 3
    assert sp.stop_token_set == {3, 4}
    assert sp.logit_bias == {7: 2.0, 8: -1.5} and all(type(k) is int for k in sp.logit_bias)
    sp.normalize()  # idempotent
    assert sp.stop_strs == ["END"] and sp.logit_bias == {7: 2.0, 8: -1.5}


def test_normalize_stop_lengths_are_characters():
    sp = SamplingParams(stop=["終わり", "ab"])
    sp.normalize()
    assert sp.stop_strs == ["終わり", "ab"] and sp.max_stop_str_len == 3
    empty = SamplingParams()
    empty.normalize()
    assert (empty.stop_strs, empty.max_stop_str_len, empty.stop_token_set) == ([], 0, set())


def test_replace_keeps_normalized_forms():
    # The n > 1 fan-out copies normalized params with dataclasses.replace.
    sp = SamplingParams(stop="x", stop_token_ids=[5], n=3, sampling_seed=1)
    sp.normalize()
    copy = dataclasses.replace(sp, n=1, sampling_seed=2)
    assert copy.stop_strs == ["x"] and copy.stop_token_set == {5} and copy.max_stop_str_len == 1


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-7).is_greedy
    assert SamplingParams(top_k=1).is_greedy
    assert not SamplingParams().is_greedy
    assert not SamplingParams(temperature=0.1, top_k=2).is_greedy


@pytest.mark.parametrize("pattern, width", [
    ("abc", 3), (r"\n\n", 2), ("a|bcd", 3), ("(ab){2}x?", 5), ("[0-9]{3}", 3), (r"\bend\b", 3),
    (r"\d+", None), (".*", None), ("a{2,}", None),
])
def test_stop_regex_width(pattern, width):
    from radixserve.sampling.sampling_params import regex_max_width

    assert regex_max_width(pattern) == width


def test_stop_regex_normalized():
    sp = SamplingParams.from_dict({"stop_regex": r"\d{2}"})
    sp.verify(VOCAB)
    sp.normalize()
    assert (sp.stop_regex_strs, sp.max_stop_regex_len) == ([r"\d{2}"], 2)
    sp = SamplingParams.from_dict({"stop_regex": ["ab", r"\w+"]})
    sp.normalize()
    assert (sp.stop_regex_strs, sp.max_stop_regex_len) == (["ab", r"\w+"], None)
    for bad in ("(", "", ["x", 1], 7, ["a"] * 33, "y" * 257):
        with pytest.raises(ValueError, match="stop_regex"):
            SamplingParams.from_dict({"stop_regex": bad}).verify(VOCAB)
