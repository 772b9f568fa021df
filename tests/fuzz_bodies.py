"""Hostile HTTP request bodies for the fuzzers (tests/e2e/test_fuzz_http.py and
bench/fuzz_http.py), as hypothesis strategies.

Bodies have the real shapes of the routes (the OpenAI protocol models' fields,
native /generate with sampling_params and the logprob fields, batches), filled
with hostile values: integers past int64, 1e999, lone UTF-16 surrogates, wrong
types, deep nesting, duplicated rids; some are cut short (malformed JSON) or
uploaded chunked, without a Content-Length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

# Field names the endpoints know, so generic bodies reach deep validation paths.
FIELDS = ["model", "prompt", "messages", "text", "input_ids", "sampling_params", "max_tokens", "temperature",
          "top_p", "top_k", "n", "stop", "seed", "stream", "logprobs", "top_logprobs", "echo", "logit_bias",
          "max_new_tokens", "min_p", "role", "content", "rid", "tokens", "return_logprob", "top_logprobs_num",
          "logprob_start_len", "stream_options", "include_usage", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "stop_token_ids", "ignore_eos", "chat_template_kwargs", "abort_all",
          "max_completion_tokens", "min_tokens", "user", "type", "name", "truncate_size", "tools",
          "tool_choice", "response_format", "json_schema", "regex", "ebnf", "sampling_seed", "suffix"]

# Admin routes that are safe to fuzz with the admin key (the others pause the
# scheduler, release its memory, load weights or open sockets to other hosts).
SAFE_ADMIN_PATHS = frozenset({"/flush_cache", "/abort_request", "/get_weights_by_name", "/continue_generation"})


@dataclass(frozen=True)
class RawNumber:
    """A JSON number written verbatim (json.dumps cannot write 1e999)."""

    text: str


def to_json(value: Any) -> str:
    """JSON text of value; str may hold lone surrogates (written as \\ud800-style
    escapes, as ensure_ascii does), RawNumber is written as is."""
    if isinstance(value, RawNumber):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value, allow_nan=True)


# ---- leaves: sane values, extreme values of the right type, anything ----
HUGE_INTS = [2**63, 2**64, -2**63 - 1, 2**63 - 1, -2**63, 2**31, 2**32 + 1, 10**40, -1, 0]
RAW_NUMBERS = ["1e999", "-1e999", "1e308", "-1e308", "-0", "1E400", "123456789012345678901234567890"]
TRICKY_TEXT = ["\ud800", "a\udfffb", "\udc00\ud800", "\x00", "<|im_start|>user", "\U0001f600" * 4, "", " ",
               "\\u0000", "\u202e", "a" * 300]
VOCAB = 49152  # the embedded tokenizer's; tiny test models share it

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=16), st.sampled_from(TRICKY_TEXT))
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)

extreme_ints = st.one_of(st.sampled_from(HUGE_INTS), st.sampled_from(RAW_NUMBERS).map(RawNumber),
                         st.integers(-10, -1), st.sampled_from(["2", 2.5, True]))
extreme_floats = st.one_of(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 5e-324]),
                           st.sampled_from(RAW_NUMBERS).map(RawNumber), st.floats(), st.sampled_from(["1", None]))
beyond_vocab = st.sampled_from([VOCAB, VOCAB + 1, 50000, 100000, 2**31, 2**63, 2**64, -2])
sane_text = st.one_of(st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=12),
                      st.sampled_from(["hello", "Once upon a time", "What is 2+2?"]))
extreme_text = st.one_of(st.sampled_from(TRICKY_TEXT), st.text(max_size=16))
sane_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)
extreme_ids = st.one_of(st.just([]), st.lists(st.one_of(st.integers(0, VOCAB - 1), beyond_vocab, extreme_ints),
                                              min_size=1, max_size=6))


def field(sane: st.SearchStrategy, extreme: Optional[st.SearchStrategy] = None) -> st.SearchStrategy:
    """One field's value: usually sane, sometimes extreme but of the right type
    (past int64, beyond the vocabulary, a lone surrogate), sometimes anything."""
    odd = extreme if extreme is not None else anything
    return st.integers(0, 19).flatmap(lambda r: sane if r < 15 else odd if r < 18 else anything)


def some(max_fields: int, **fields: st.SearchStrategy) -> st.SearchStrategy:
    """A few of these fields (F values): one odd field among sane ones reaches
    deeper than a body where everything is wrong."""
    names = sorted(fields)
    return st.lists(st.sampled_from(names), unique=True, max_size=max_fields).flatmap(
        lambda chosen: st.fixed_dictionaries({k: fields[k] for k in chosen}))


def with_fields(required: Dict[str, st.SearchStrategy], rest: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(lambda head, tail: {**head, **tail}, st.fixed_dictionaries(required), rest)


def one_or_batch(single: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(single, single, st.lists(single, min_size=1, max_size=3))


def per_prompt(sane: st.SearchStrategy, extreme: st.SearchStrategy) -> st.SearchStrategy:
    """A native per-prompt field: one value, or a list whose elements may be odd."""
    return field(sane, st.one_of(extreme, st.lists(st.one_of(sane, extreme), min_size=1, max_size=3)))


unique_rid = st.uuids().map(str)
odd_rid = st.one_of(st.sampled_from(["dup1", "", "\ud800"]), st.lists(st.sampled_from(["dup1", "dup2"]), min_size=2,
                                                                       max_size=3))
grammar = st.sampled_from(["[", "(a|b", "", "root ::= ", "{", '{"type": "nope"}', "\ud800", "a" * 2000])
odd_n = st.sampled_from([0, -1, 65, 1000, 2**63, "2", 1.5])

# Mostly short outputs: the bodies are about input, and a test's server decodes on a CPU.
output_len = field(st.integers(1, 4), extreme_ints)
sampling_params = with_fields({"max_new_tokens": output_len}, some(
    3, min_new_tokens=field(st.integers(0, 4), extreme_ints),
    temperature=field(st.floats(0, 2), extreme_floats), top_p=field(st.floats(0.01, 1), extreme_floats),
    top_k=field(st.integers(-1, 20), beyond_vocab), min_p=field(st.floats(0, 1), extreme_floats),
    frequency_penalty=field(st.floats(-2, 2), extreme_floats), presence_penalty=field(st.floats(-2, 2), extreme_floats),
    repetition_penalty=field(st.floats(0.5, 2), extreme_floats),
    stop=field(st.one_of(sane_text, st.lists(sane_text, max_size=3)), one_or_batch(extreme_text)),
    stop_token_ids=field(sane_ids, extreme_ids), ignore_eos=field(st.booleans()),
    skip_special_tokens=field(st.booleans()), spaces_between_special_tokens=field(st.booleans()),
    no_stop_trim=field(st.booleans()), n=field(st.integers(1, 3), odd_n),
    logit_bias=field(st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=3),
                     st.dictionaries(st.sampled_from(["-1", "50000", "x", "99999999999999999999", "\ud800"]),
                                     extreme_floats, min_size=1, max_size=3)),
    sampling_seed=field(st.integers(0, 2**31), extreme_ints), json_schema=field(st.just('{"type": "object"}'), grammar),
    regex=field(st.just("[a-z]+"), grammar), ebnf=field(st.just('root ::= "x"'), grammar)))

generate_fields = dict(
    sampling_params=field(sampling_params, st.lists(sampling_params, min_size=1, max_size=3)),
    rid=field(unique_rid, odd_rid), return_logprob=per_prompt(st.booleans(), anything),
    logprob_start_len=per_prompt(st.integers(-1, 2), extreme_ints),
    top_logprobs_num=per_prompt(st.integers(0, 5), beyond_vocab),
    return_text_in_logprobs=field(st.booleans()),
    stream=field(st.booleans(), st.sampled_from([-1e308, 1, 0, "yes", RawNumber("1e999")])))
generate_body = st.one_of(
    with_fields({"text": field(one_or_batch(sane_text), one_or_batch(extreme_text)),
                 "sampling_params": generate_fields["sampling_params"]}, some(3, **generate_fields)),
    with_fields({"input_ids": field(one_or_batch(sane_ids), one_or_batch(extreme_ids)),
                 "sampling_params": generate_fields["sampling_params"]}, some(3, **generate_fields)),
    some(3, text=field(sane_text), input_ids=field(sane_ids), **generate_fields))  # neither or both

openai_common = dict(
    model=field(st.none(), st.sampled_from(["nope", "", "\ud800"])), temperature=field(st.floats(0, 2), extreme_floats),
    top_p=field(st.floats(0.01, 1), extreme_floats), n=field(st.integers(1, 3), odd_n),
    stop=field(st.one_of(sane_text, st.lists(sane_text, max_size=3)), one_or_batch(extreme_text)),
    seed=field(st.integers(0, 2**31), extreme_ints), stream=field(st.booleans(), st.sampled_from([-1e308, 1, "yes"])),
    stream_options=field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    presence_penalty=field(st.floats(-2, 2), extreme_floats), frequency_penalty=field(st.floats(-2, 2), extreme_floats),
    logit_bias=field(st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=2),
                     st.dictionaries(extreme_text, extreme_floats, min_size=1, max_size=2)),
    user=field(sane_text, extreme_text), top_k=field(st.integers(-1, 20), beyond_vocab),
    min_p=field(st.floats(0, 1), extreme_floats), repetition_penalty=field(st.floats(0.5, 2), extreme_floats),
    min_tokens=field(st.integers(0, 4), extreme_ints), ignore_eos=field(st.booleans()),
    stop_token_ids=field(sane_ids, extreme_ids), rid=field(unique_rid, odd_rid),
    regex=field(st.just("[a-z]+"), grammar),
    json_schema=field(st.just('{"type": "object"}'), grammar),
    response_format=field(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
                          some(2, type=field(st.sampled_from(["json_schema", "xml"])),
                               json_schema=field(some(2, name=field(sane_text),
                                                      schema=field(st.just({"type": "object"})))))))

completion_body = with_fields(
    {"prompt": field(st.one_of(sane_text, st.lists(sane_text, min_size=1, max_size=3), sane_ids,
                               st.lists(sane_ids, min_size=1, max_size=3)),
                     st.one_of(extreme_text, st.lists(extreme_text, min_size=1, max_size=3), extreme_ids,
                               st.lists(extreme_ids, max_size=3))), "max_tokens": output_len},
    some(3, **openai_common, echo=field(st.booleans()),
         logprobs=field(st.integers(0, 5), beyond_vocab)))

text_part = st.fixed_dictionaries({"type": st.just("text"), "text": sane_text})
tool_call = st.fixed_dictionaries({"id": sane_text, "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": field(st.just("get_weather"), extreme_text), "arguments": field(st.just('{"city": "Paris"}'), anything)})})
message = with_fields(
    {"role": field(st.sampled_from(["user", "system", "assistant"]), st.sampled_from(["tool", "developer", "x", ""])),
     "content": field(st.one_of(sane_text, st.lists(text_part, min_size=1, max_size=2)),
                      st.one_of(extreme_text, st.none(), st.lists(some(2, type=field(st.just("image_url")),
                                                                       text=field(extreme_text)), max_size=2)))},
    some(1, name=field(sane_text, extreme_text), tool_calls=field(st.lists(tool_call, max_size=2)),
         tool_call_id=field(sane_text, extreme_text)))
tool = st.fixed_dictionaries({"type": field(st.just("function")), "function": with_fields(
    {"name": field(st.just("get_weather"), extreme_text)},
    some(2, description=field(sane_text, extreme_text),
         parameters=field(st.just({"type": "object", "properties": {"city": {"type": "string"}}}))))})
chat_body = with_fields(
    {"messages": field(st.lists(message, min_size=1, max_size=3),
                       st.one_of(st.just([]), st.lists(anything, max_size=2))), "max_tokens": output_len},
    some(3, **openai_common, max_completion_tokens=output_len, logprobs=field(st.booleans()),
         top_logprobs=field(st.integers(0, 5), beyond_vocab), tools=field(st.lists(tool, max_size=2)),
         tool_choice=field(st.sampled_from(["auto", "none"]), st.one_of(st.sampled_from(["required", "x"]), st.just(
             {"type": "function", "function": {"name": "get_weather"}}))),
         chat_template_kwargs=field(st.just({"enable_thinking": False}),
                                    st.dictionaries(extreme_text, scalars, max_size=2)),
         parallel_tool_calls=field(st.booleans()), separate_reasoning=field(st.booleans())))

SHAPED = {
    "/generate": generate_body,
    "/v1/completions": completion_body,
    "/v1/chat/completions": chat_body,
    "/tokenize": with_fields({"prompt": field(sane_text, extreme_text)},
                             some(1, add_special_tokens=field(st.booleans()))),
    "/detokenize": st.fixed_dictionaries({"tokens": field(sane_ids, extreme_ids)}),
    "/abort_request": some(2, rid=field(unique_rid, odd_rid), abort_all=field(st.booleans())),
    "/get_weights_by_name": with_fields(
        {"name": field(st.sampled_from(["model.embed_tokens.weight", "lm_head.weight"]), extreme_text)},
        some(1, truncate_size=field(st.integers(0, 10), extreme_ints))),
}
# How often each shaped route is drawn: the generation routes reach the scheduler.
SHAPED_WEIGHTS = {"/generate": 4, "/v1/completions": 3, "/v1/chat/completions": 3}


def deep_nesting(depth: int, path: str) -> bytes:
    """Nested arrays, bare or inside a field the route reads."""
    inner = "[" * depth + "]" * depth
    field = {"/generate": "input_ids", "/v1/completions": "prompt", "/v1/chat/completions": "messages"}.get(path)
    return (f'{{"{field}": {inner}}}' if field else inner).encode()


@dataclass(frozen=True)
class FuzzCase:
    method: str
    path: str
    body: bytes
    chunks: Optional[Tuple[int, ...]]  # None: sent with a Content-Length; else chunked, cut at these offsets
    admin: bool  # sent with the admin key (only to SAFE_ADMIN_PATHS)

    def content(self) -> Union[bytes, Iterator[bytes]]:
        if self.chunks is None:
            return self.body
        return _pieces(self.body, self.chunks)

    def async_content(self) -> Union[bytes, AsyncIterator[bytes]]:
        """content() for httpx.AsyncClient."""
        if self.chunks is None:
            return self.body

        async def pieces() -> AsyncIterator[bytes]:
            for piece in _pieces(self.body, self.chunks):
                yield piece
        return pieces()

    def describe(self) -> str:
        kind = "chunked" if self.chunks is not None else "plain"
        more = f"... ({len(self.body)} bytes)" if len(self.body) > 400 else ""
        return f"{self.method} {self.path} ({kind}{', admin' if self.admin else ''}) {self.body[:400]!r}{more}"

    def _repr_pretty_(self, printer, cycle) -> None:  # how hypothesis prints a failing case
        printer.text(self.describe())


def _pieces(body: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    start = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(body))) + [len(body)]:
        yield body[start:cut]
        start = cut


@st.composite
def fuzz_cases(draw, routes: List[Tuple[str, str]], admin_paths: frozenset) -> FuzzCase:
    """One request: a route of the server (from its OpenAPI schema), a body, a framing.
    The route and framing come from a seeded random.Random: hypothesis' own
    choices repeat themselves too much across thousands of draws."""
    rng = draw(st.randoms(use_true_random=True))
    shaped = [(p, m) for p, m in routes if p in SHAPED and m == "POST" for _ in range(SHAPED_WEIGHTS.get(p, 1))]
    path, method = rng.choice(shaped) if shaped and rng.random() < 0.8 else rng.choice(routes)
    roll = rng.random()
    if roll < 0.04:
        body = deep_nesting(rng.choice([200, 1000, 5000, 100000]), path)
    elif roll < 0.07:
        body = rng.randbytes(rng.randrange(40))  # not UTF-8, not JSON
    else:
        value = draw(SHAPED[path]) if path in SHAPED and roll < 0.85 else draw(st.one_of(
            st.dictionaries(st.sampled_from(FIELDS), anything, max_size=8), anything))
        body = to_json(value).encode()
        if rng.random() < 0.08:
            body = body[:rng.randrange(len(body) + 1)]  # malformed JSON too
    chunks = tuple(rng.randrange(len(body) + 1) for _ in range(rng.randrange(5))) if rng.random() < 0.2 else None
    admin = path in admin_paths and path in SAFE_ADMIN_PATHS and rng.random() < 0.5
    return FuzzCase(method, path.replace("{model_id}", "tiny"), body, chunks, admin)


def draw_cases(routes: List[Tuple[str, str]], admin_paths: frozenset, count: int,
               first_seed: int = 0) -> List[FuzzCase]:
    """count cases drawn outside a test (the bench scripts), reproducibly from first_seed."""
    cases: List[FuzzCase] = []
    while len(cases) < count:  # hypothesis may end a run early; each rerun is a fresh stream

        @seed(first_seed + len(cases))
        @settings(max_examples=count - len(cases), deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def draw(data):
            cases.append(data.draw(fuzz_cases(routes, admin_paths)))

        draw()
    return cases[:count]
