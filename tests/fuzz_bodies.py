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
from typing import Any, AsyncIterator, Iterator, List, Optional, Sequence, Tuple, Union

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
    """JSON text of value; str may hold lone surrogates (written as \\udXXX
    escapes, as ensure_ascii does), RawNumber is written as is."""
    if isinstance(value, RawNumber):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value, allow_nan=True)


# ---- hostile leaves ----
HUGE_INTS = [2**63, 2**64, -2**63 - 1, 2**63 - 1, -2**63, 2**31, 2**32 + 1, -1, 0, 10**40]
RAW_NUMBERS = ["1e999", "-1e999", "1e308", "-1e308", "-0", "1E400", "123456789012345678901234567890", "0.0"]
TRICKY_TEXT = ["hello", "\ud800", "a\udfffb", "\udc00\ud800", "\x00", "<|im_start|>user", "😀" * 4, "", " ",
               "\\u0000", "\u202e", "a" * 300]

ints = st.one_of(st.integers(-3, 70), st.sampled_from(HUGE_INTS), st.sampled_from(RAW_NUMBERS).map(RawNumber))
floats = st.one_of(st.floats(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([1e308, -1e308, 5e-324]), st.sampled_from(RAW_NUMBERS).map(RawNumber))
texts = st.one_of(st.text(max_size=16), st.sampled_from(TRICKY_TEXT))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)


def typed(good: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a value of the right shape, sometimes anything at all."""
    return st.one_of(good, good, good, anything)


def some(**fields: st.SearchStrategy) -> st.SearchStrategy:
    """A dict with any subset of these fields, each drawn from typed(strategy)."""
    return st.fixed_dictionaries({}, optional={k: typed(v) for k, v in fields.items()})


def one_or_batch(single: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(single, single, st.lists(single, min_size=1, max_size=3))


token_ids = st.lists(st.one_of(st.integers(0, 49151), st.integers(-2, 2**20), st.sampled_from(HUGE_INTS)),
                     min_size=0, max_size=6)
small_ints = st.one_of(st.integers(-2, 8), st.sampled_from(HUGE_INTS))
top_k_like = st.one_of(st.integers(-2, 8), st.sampled_from([100000, 50000, 49152, 2**63, 9223372036854775808]))
rids = st.sampled_from(["dup1", "dup2", "r-1", "", "\ud800"])
stops = st.one_of(texts, st.lists(texts, max_size=3))
grammar_texts = st.sampled_from(["a+", "[", "(a|b", "\\d{3}", "", "root ::= \"x\"", "{", '{"type": "object"}'])

sampling_params = some(
    max_new_tokens=small_ints, min_new_tokens=small_ints, temperature=floats, top_p=floats, top_k=top_k_like,
    min_p=floats, frequency_penalty=floats, presence_penalty=floats, repetition_penalty=floats, stop=stops,
    stop_token_ids=token_ids, ignore_eos=st.booleans(), skip_special_tokens=st.booleans(),
    spaces_between_special_tokens=st.booleans(), no_stop_trim=st.booleans(), n=st.integers(-1, 3),
    logit_bias=st.dictionaries(st.sampled_from(["1", "50000", "-1", "x", "99999999999999999999"]), floats,
                               max_size=3),
    sampling_seed=ints, json_schema=grammar_texts, regex=grammar_texts, ebnf=grammar_texts)

generate_rest = some(
    sampling_params=one_or_batch(sampling_params), rid=one_or_batch(rids), return_logprob=one_or_batch(st.booleans()),
    logprob_start_len=one_or_batch(ints), top_logprobs_num=one_or_batch(top_k_like),
    return_text_in_logprobs=st.booleans(), stream=st.booleans())

generate_body = st.one_of(
    st.builds(lambda p, rest: {"text": p, **rest}, typed(one_or_batch(texts)), generate_rest),
    st.builds(lambda p, rest: {"input_ids": p, **rest}, typed(one_or_batch(token_ids)), generate_rest),
    generate_rest)

openai_common = dict(
    model=st.sampled_from(["tiny", "nope", ""]), temperature=floats, top_p=floats, n=st.integers(-1, 3),
    stop=stops, seed=ints, stream=st.booleans(), stream_options=some(include_usage=st.booleans()),
    presence_penalty=floats, frequency_penalty=floats, logit_bias=st.dictionaries(texts, floats, max_size=2),
    user=texts, top_k=top_k_like, min_p=floats, repetition_penalty=floats, min_tokens=small_ints,
    ignore_eos=st.booleans(), stop_token_ids=token_ids, rid=rids, regex=grammar_texts, json_schema=grammar_texts,
    response_format=some(type=st.sampled_from(["text", "json_object", "json_schema", "xml"]),
                         json_schema=some(name=texts, schema=st.just({"type": "object"}))))

completion_body = st.builds(lambda p, rest: {"prompt": p, **rest},
                            typed(st.one_of(texts, st.lists(texts, min_size=1, max_size=3), token_ids,
                                            st.lists(token_ids, min_size=1, max_size=3))),
                            some(**openai_common, max_tokens=small_ints, logprobs=top_k_like, echo=st.booleans()))

content_part = some(type=st.sampled_from(["text", "image_url", "x"]), text=texts)
message = some(role=st.sampled_from(["system", "user", "assistant", "tool", "developer", "x"]),
               content=st.one_of(texts, st.lists(content_part, max_size=2), st.none()),
               name=texts, tool_call_id=texts,
               tool_calls=st.lists(some(id=texts, type=st.just("function"),
                                        function=some(name=texts, arguments=st.one_of(texts, st.just({})))),
                                   max_size=2))
tool = some(type=st.sampled_from(["function", "x"]),
            function=some(name=st.sampled_from(["get_weather", "", "\ud800"]), description=texts,
                          parameters=st.just({"type": "object", "properties": {"city": {"type": "string"}}})))
chat_body = st.builds(lambda m, rest: {"messages": m, **rest}, typed(st.lists(message, max_size=3)),
                      some(**openai_common, max_tokens=small_ints, max_completion_tokens=small_ints,
                           logprobs=st.booleans(), top_logprobs=top_k_like, tools=st.lists(tool, max_size=2),
                           tool_choice=st.one_of(st.sampled_from(["auto", "none", "required", "x"]),
                                                 st.just({"type": "function", "function": {"name": "get_weather"}})),
                           chat_template_kwargs=st.dictionaries(texts, scalars, max_size=2),
                           parallel_tool_calls=st.booleans(), separate_reasoning=st.booleans()))

SHAPED = {
    "/generate": generate_body,
    "/v1/completions": completion_body,
    "/v1/chat/completions": chat_body,
    "/tokenize": some(prompt=texts, text=texts, add_special_tokens=st.booleans()),
    "/detokenize": some(tokens=token_ids),
    "/abort_request": some(rid=rids, abort_all=st.booleans()),
    "/get_weights_by_name": some(name=st.sampled_from(["model.embed_tokens.weight", "lm_head.weight", "x"]),
                                 truncate_size=ints),
}


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
        return f"{self.method} {self.path} ({kind}{', admin' if self.admin else ''}) {self.body[:400]!r}"


def _pieces(body: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    start = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(body))) + [len(body)]:
        yield body[start:cut]
        start = cut


@st.composite
def fuzz_cases(draw, routes: List[Tuple[str, str]], admin_paths: frozenset) -> FuzzCase:
    """One request: a route of the server (from its OpenAPI schema), a body, a framing."""
    shaped = [(p, m) for p, m in routes if p in SHAPED and m == "POST"]
    path, method = draw(st.sampled_from(shaped) if shaped and draw(st.integers(0, 9)) < 7 else st.sampled_from(routes))
    kind = draw(st.integers(0, 19))
    if kind == 0:
        body = deep_nesting(draw(st.sampled_from([200, 1000, 5000, 100000])), path)
    elif kind == 1:
        body = draw(st.binary(max_size=40))  # not UTF-8, not JSON
    else:
        value = draw(SHAPED[path]) if path in SHAPED and kind < 16 else draw(st.one_of(
            st.dictionaries(st.sampled_from(FIELDS), anything, max_size=8), anything))
        body = to_json(value).encode()
        if draw(st.integers(0, 9)) == 0:
            body = body[:draw(st.integers(0, len(body)))]  # malformed JSON too
    chunks = tuple(draw(st.lists(st.integers(0, len(body)), max_size=4))) if draw(st.integers(0, 4)) == 0 else None
    admin = path in admin_paths and path in SAFE_ADMIN_PATHS and draw(st.booleans())
    return FuzzCase(method, path.replace("{model_id}", "tiny"), body, chunks, admin)


def draw_cases(routes: List[Tuple[str, str]], admin_paths: frozenset, count: int, first_seed: int = 0) -> List[FuzzCase]:
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
