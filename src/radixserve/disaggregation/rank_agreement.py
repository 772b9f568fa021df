"""Tensor-parallel ranks decide together: each rank's scheduler sees its own
transfers finish, but every rank must end, free or admit the same requests
at the same step (scheduling is replicated)."""

from __future__ import annotations

from typing import Dict, Hashable, Optional

from radixserve.distributed import get_tp_group
from radixserve.distributed.rank_sync import gather_objects


def agree(verdicts: Dict[Hashable, Optional[str]], fail_fast: bool = False) -> Dict[Hashable, str]:
    """verdicts: key -> "" (done), an error message, or None (not yet), per rank.
    The agreed verdicts: an error when any rank has one (at once with
    fail_fast, else once every rank has a verdict), "" when every rank is done;
    keys still open are left out. A collective: every rank calls it with the same keys."""
    if get_tp_group().world_size == 1:
        return {k: v for k, v in verdicts.items() if v is not None}
    every = gather_objects(verdicts)
    agreed = {}
    for key in verdicts:
        seen = [ranks.get(key) for ranks in every]
        error = next((v for v in seen if v), None)
        if error is not None and (fail_fast or None not in seen):
            agreed[key] = error
        elif all(v == "" for v in seen):
            agreed[key] = ""
    return agreed
