"""Bounded JSON schemas and regexes: random weights rarely end an unbounded
string or number, so every string, number and array here has a bound."""

S = {"type": "string", "maxLength": 6}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9},
                                             "minItems": 2, "maxItems": 4}}, "required": ["xs"], "additionalProperties": False},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {"a": S, "b": {"type": "boolean"}},
                                                "required": ["a", "b"], "additionalProperties": False}},
     "required": ["inner"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}, "required": ["code"],
     "additionalProperties": False},
    {"type": "object", "properties": {"level": {"type": "integer", "minimum": 1, "maximum": 5},
                                      "label": {"enum": ["low", "mid", "high"]}},
     "required": ["level", "label"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 100, "maximum": 999}, "note": S},
     "required": ["id"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                                                "minItems": 2, "maxItems": 2}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": S, "roles": {"type": "array", "items": {"enum": ["admin", "dev"]}, "maxItems": 2}},
        "required": ["name", "roles"], "additionalProperties": False}}, "required": ["user"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 5},
    {"type": "object", "properties": {"flag": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 50}},
     "required": ["flag", "count"], "additionalProperties": False},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"],
     "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"k": S, "v": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["k", "v"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"enum": ["ok", "error"]}, "detail": S}, "required": ["status"],
     "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "integer", "minimum": 0, "maximum": 3}}, "required": ["c"], "additionalProperties": False}},
        "required": ["b"], "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"word": {"type": "string", "pattern": "^[a-z]{2,5}$"}, "n": {"type": "integer", "minimum": 1, "maximum": 3}},
     "required": ["word", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"grid": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1}, "minItems": 2, "maxItems": 2}}},
     "required": ["grid"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "event"}, "day": {"type": "integer", "minimum": 1, "maximum": 31}},
     "required": ["kind", "day"], "additionalProperties": False},
]

REGEXES = [
    r"[a-z]{1,6}@[a-z]{1,6}\.(com|org|net)",  # email
    r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",  # ISO date
    r"\(\d{3}\) \d{3}-\d{4}",  # phone
    r"#[0-9a-fA-F]{6}",  # hex colour
    r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)",  # IPv4
    r"(yes|no|maybe)",
    r"[A-Z][a-z]{1,8} [A-Z][a-z]{1,8}",  # a name
    r"\d{1,3}(,\d{3}){0,2}",  # grouped number
    r"([01]\d|2[0-3]):[0-5]\d",  # time
    r"v\d\.\d{1,2}\.\d{1,2}",  # version
]
