"""Storage keys: a hash chain over pages, so a page's key names its tokens and
every token before it (the KV of a token depends on all of them).

key(page i) = sha256(key(page i-1) || token ids of page i), and the chain
starts from a seed naming the model, its KV shape and the rank, so pages of
another model, dtype or rank never match.
"""

from __future__ import annotations

import hashlib
from typing import List

from array import array


def chain_seed(model_identity: str, tp_rank: int, tp_size: int) -> str:
    return hashlib.sha256(f"radixserve-kv|{model_identity}|rank {tp_rank}/{tp_size}".encode()).hexdigest()


def page_keys(previous: str, tokens: List[int], page_size: int) -> List[str]:
    """The keys of the whole pages of tokens, chained after `previous`."""
    keys = []
    for start in range(0, len(tokens) - page_size + 1, page_size):
        page = array("q", tokens[start:start + page_size]).tobytes()
        previous = hashlib.sha256(previous.encode() + page).hexdigest()
        keys.append(previous)
    return keys
