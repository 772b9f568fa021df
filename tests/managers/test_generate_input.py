"""GenerateReqInput.split: every malformed shape, type and range is a FieldError
naming its field; rids are unique within a request; split never changes its input."""

from __future__ import annotations

import copy
import threading

import pytest

from radixserve.managers.generate_input import GenerateReqInput
from radixserve.managers.validation import FieldError, check_json_value

VOCAB = 100

BAD = [
    # (GenerateReqInput kwargs, field named)
    ({"input_ids": 1}, "input_ids"), ({"input_ids": {"a": 1}}, "input_ids"), ({"input_ids": True}, "input_ids"),
    ({"input_ids": "abc"}, "input_ids"), ({"input_ids": []}, "input_ids"), ({"input_ids": [[1], []]}, "input_ids"),
    ({"input_ids": [[1, 2], 3]}, "input_ids"), ({"input_ids": [1, [2]]}, "input_ids"),
    ({"input_ids": [1, True]}, "input_ids"), ({"input_ids": [1.0]}, "input_ids"),
    ({"prompt": 5}, "prompt"), ({"prompt": {"a": 1}}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"), ({"prompt": "\ud800"}, "prompt"), ({"prompt": ["ok", "x\udfff"]}, "prompt"),
    ({}, "prompt"), ({"prompt": "a", "input_ids": [1]}, "prompt"),
    ({"sampling_params": {"n": 0}}, "n"), ({"sampling_params": {"n": "2"}}, "n"),
    ({"sampling_params": {"n": 65}}, "n"), ({"sampling_params": {"sampling_seed": "a"}}, "sampling_seed"),
    ({"sampling_params": {"top_k": 2**63}}, "top_k"), ({"sampling_params": {"top_k": VOCAB + 1}}, "top_k"),
    ({"sampling_params": {"sampling_seed": 2**64}}, "sampling_seed"),
    ({"sampling_params": {"stop_token_ids": [VOCAB]}}, "stop_token_ids"),
    ({"sampling_params": {"logit_bias": {str(VOCAB): 1}}}, "logit_bias"),
    ({"sampling_params": {"bogus": 1}}, "bogus"), ({"sampling_params": [{}, {}, {}]}, "sampling_params"),
    ({"sampling_params": "x"}, "sampling_params"),
    ({"stream": -1e308}, "stream"), ({"stream": 1}, "stream"), ({"stream": "true"}, "stream"),
    ({"return_text_in_logprobs": 1}, "return_text_in_logprobs"),
    ({"return_logprob": 1}, "return_logprob"), ({"return_logprob": [True, 1]}, "return_logprob"),
    ({"logprob_start_len": -2}, "logprob_start_len"), ({"logprob_start_len": 2**63}, "logprob_start_len"),
    ({"logprob_start_len": [0, "a"]}, "logprob_start_len"), ({"logprob_start_len": 1.0}, "logprob_start_len"),
    ({"top_logprobs_num": -1}, "top_logprobs_num"), ({"top_logprobs_num": VOCAB + 1}, "top_logprobs_num"),
    ({"top_logprobs_num": [1, 100000]}, "top_logprobs_num"), ({"top_logprobs_num": [1, True]}, "top_logprobs_num"),
    ({"top_logprobs_num": [1, 2, 3]}, "top_logprobs_num"),
    ({"rid": 5}, "rid"), ({"rid": ["a", "a"]}, "rid"), ({"rid": ["a", 1]}, "rid"), ({"rid": ["\ud800", "b"]}, "rid"),
]


def _input(kwargs: dict) -> GenerateReqInput:
    """A two-prompt batch unless the case gives its own prompt."""
    if "prompt" not in kwargs and "input_ids" not in kwargs and kwargs:
        kwargs = {"input_ids": [[1, 2], [3]], **kwargs}
    return GenerateReqInput(**kwargs)


@pytest.mark.parametrize("kwargs,field", BAD, ids=[repr(k) for k, _ in BAD])
def test_bad_input_names_its_field(kwargs, field):
    with pytest.raises(FieldError) as info:
        _input(kwargs).split(max_prompts=8, max_n=64, vocab_size=VOCAB)
    assert info.value.field == field, str(info.value)
    assert field in str(info.value)


def test_is_batch_never_raises_on_malformed_input():
    for value in (1, {"a": 1}, True, "x", [], [1], [[1]]):
        assert GenerateReqInput(input_ids=value).is_batch == (value == [[1]])


def test_one_rid_for_a_batch_becomes_one_per_prompt():
    """As SGLang does: rid_0, rid_1, ...; n samples then add #j."""
    singles = GenerateReqInput(input_ids=[[1, 2], [3]], rid="dup1").split(vocab_size=VOCAB)
    assert [s.rid for s in singles] == ["dup1_0", "dup1_1"]
    singles = GenerateReqInput(prompt=["a", "b"], rid="r", sampling_params={"n": 2}).split(vocab_size=VOCAB)
    assert [s.rid for s in singles] == ["r_0#0", "r_0#1", "r_1#0", "r_1#1"]
    assert [s.index for s in singles] == [0, 1, 2, 3]
    single = GenerateReqInput(input_ids=[1, 2], rid="solo").split(vocab_size=VOCAB)
    assert [s.rid for s in single] == ["solo"]
    rids = [s.rid for s in GenerateReqInput(input_ids=[[1], [2], [3]]).split(vocab_size=VOCAB)]
    assert len(set(rids)) == 3


def test_too_many_prompts():
    with pytest.raises(FieldError, match="max_batch_prompts") as info:
        GenerateReqInput(prompt=["a"] * 3).split(max_prompts=2)
    assert info.value.field == "prompt"


def test_valid_input_is_split_and_left_unchanged():
    kwargs = dict(input_ids=[[1, 2], [3]], sampling_params=[{"top_k": VOCAB, "sampling_seed": 2**64 - 1, "n": 2},
                                                            {"logit_bias": {"7": 1}}],
                  return_logprob=[True, False], logprob_start_len=[0, -1], top_logprobs_num=[VOCAB, 0])
    obj = GenerateReqInput(**copy.deepcopy(kwargs))
    singles = obj.split(max_prompts=2, max_n=2, vocab_size=VOCAB)
    assert [s.input_ids for s in singles] == [[1, 2], [1, 2], [3]]
    assert [s.sampling_params.sampling_seed for s in singles[:2]] == [2**64 - 1, 2**64]  # wrapped by the batch
    assert [s.top_logprobs_num for s in singles] == [VOCAB, VOCAB, 0]
    assert singles[2].sampling_params.logit_bias == {7: 1.0}
    assert GenerateReqInput(**kwargs) == obj  # split did not change its input


def test_json_walk_names_surrogates_and_bounds_depth():
    with pytest.raises(FieldError) as info:
        check_json_value({"messages": [{"role": "user", "content": "hi \ud800"}]})
    assert info.value.field == "messages[0].content"
    with pytest.raises(FieldError) as info:
        check_json_value({"a\udc00": 1})
    assert info.value.field == "a\udc00" and "Unicode" in str(info.value)
    deep = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(FieldError, match="nests deeper"):
        check_json_value({"prompt": deep})
    check_json_value({"prompt": "fine ü 終", "ids": list(range(1000)), "nested": [[[{"a": ["b"]}]]]})


class CountingTokenizer:
    """The embedded model's tokenizer, counting encode calls and their threads."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.calls, self.threads = tokenizer, 0, set()

    def encode(self, text, **kwargs):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        return self.tokenizer.encode(text, **kwargs)


def test_prepare_tokenizes_each_prompt_once_off_the_event_loop(embedded_tokenizer_dir):
    """TokenizerManager.prepare (no sockets are opened before a request is sent):
    one encode per distinct prompt, in the tokenizer threads (a single short
    prompt on the event loop), and its states are what generate_request sends."""
    import asyncio

    from transformers import AutoTokenizer

    from radixserve.managers import io_struct as io
    from radixserve.managers.ipc import PortArgs
    from radixserve.managers.tokenizer_manager import TokenizerManager
    from radixserve.server_args import ServerArgs

    tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer_dir)
    counting = CountingTokenizer(tokenizer)
    ready = io.SchedulerReady(max_total_num_tokens=1024, max_running_requests=8, context_length=64,
                              vocab_size=len(tokenizer), chunked_prefill_size=None, device="cpu")
    tm = TokenizerManager(ServerArgs(), PortArgs.new(), counting, ready)
    obj = GenerateReqInput(prompt=["The cat", "The dog", "The cat"], sampling_params={"n": 2})
    prepared = asyncio.run(tm.prepare(obj))
    assert counting.calls == 2 and all(name.startswith("radixserve-tokenizer") for name in counting.threads)
    assert [s.prompt_ids for s in prepared.states] == [tokenizer.encode(p) for p in ["The cat"] * 2 + ["The dog"] * 2
                                                       + ["The cat"] * 2]
    assert len({s.req.rid for s in prepared.states}) == 6
    with pytest.raises(FieldError) as info:
        asyncio.run(tm.prepare(GenerateReqInput(prompt="word " * 100)))  # longer than the context
    assert info.value.field == "prompt"
    with pytest.raises(FieldError) as info:
        asyncio.run(tm.prepare(GenerateReqInput(input_ids=[1, len(tokenizer)])))
    assert info.value.field == "input_ids"

    from radixserve.managers.tokenizer_manager import INLINE_PROMPT_LIMIT

    counting.threads.clear()
    assert [s.prompt_ids for s in asyncio.run(tm.prepare(GenerateReqInput(prompt="The cat"))).states] == [
        tokenizer.encode("The cat")]
    assert counting.threads == {threading.main_thread().name}
    counting.threads.clear()
    with pytest.raises(FieldError):  # (longer than the context)
        asyncio.run(tm.prepare(GenerateReqInput(prompt="a" * (INLINE_PROMPT_LIMIT + 1))))
    assert all(name.startswith("radixserve-tokenizer") for name in counting.threads) and counting.threads


def test_null_means_the_default():
    singles = GenerateReqInput(prompt="hi", stream=None, return_logprob=None, logprob_start_len=None,
                               top_logprobs_num=None, return_text_in_logprobs=None, rid=None,
                               sampling_params=None).split(vocab_size=VOCAB)
    s = singles[0]
    assert (s.stream, s.return_logprob, s.logprob_start_len, s.top_logprobs_num, s.return_text_in_logprobs) == (
        False, False, -1, 0, False)
