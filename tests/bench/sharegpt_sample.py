"""A small ShareGPT file (list or JSON lines) for the benchmark tests: some
conversations too short to keep and one out of order, which the loader skips."""

from __future__ import annotations

import json

CONVERSATIONS = [
    ("Tell me a story about a brave little toaster who travels far.",
     "Once upon a time, a toaster set out on a long journey across the hills."),
    ("What is the boiling point of water at sea level, in Celsius?",
     "Water boils at one hundred degrees Celsius at sea level."),
    ("Hi", "Hello!"),  # too short: skipped
    ("List three primary colors and explain how they mix.",
     "Red, yellow and blue; mixing them gives secondary colors like orange."),
    ("Name a planet.", "Mars."),  # the reply is too short: skipped
]


def write_sharegpt(path, jsonl: bool = False) -> str:
    records = [{"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
               for i, (q, a) in enumerate(CONVERSATIONS)]
    # Out of order (the model speaks first): skipped.
    records.append({"id": "x", "conversations": [{"from": "gpt", "value": "I speak first here."},
                                                 {"from": "human", "value": "That is not how it goes."}]})
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return str(path)
