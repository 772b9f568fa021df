"""GenerateReqInput: a user's generate call, validated and split into single requests.

Bad input is rejected here, where it enters, with a ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from radixserve.sampling.sampling_params import SamplingParams

Prompt = Union[str, List[str], None]
InputIds = Union[List[int], List[List[int]], None]


@dataclass
class SingleRequest:
    """One prompt with one sample; n > 1 becomes n of these."""

    rid: str
    prompt: Optional[str]
    input_ids: Optional[List[int]]
    sampling_params: SamplingParams
    return_logprob: bool
    logprob_start_len: int
    top_logprobs_num: int
    return_text_in_logprobs: bool
    stream: bool
    index: int  # position in the caller's result list (prompt-major)


@dataclass
class GenerateReqInput:
    prompt: Prompt = None
    input_ids: InputIds = None
    sampling_params: Union[Dict[str, Any], List[Dict[str, Any]], None] = None
    rid: Union[str, List[str], None] = None
    return_logprob: Union[bool, List[bool]] = False
    logprob_start_len: Union[int, List[int]] = -1
    top_logprobs_num: Union[int, List[int]] = 0
    return_text_in_logprobs: bool = False
    stream: bool = False

    @property
    def is_batch(self) -> bool:
        if self.prompt is not None:
            return isinstance(self.prompt, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)

    def split(self, max_prompts: Optional[int] = None, max_n: Optional[int] = None) -> List[SingleRequest]:
        """Validate and expand to single requests, prompt-major over n samples."""
        if (self.prompt is None) == (self.input_ids is None):
            raise ValueError("exactly one of 'prompt' and 'input_ids' must be given")
        prompts = self._as_list(self.prompt if self.prompt is not None else self.input_ids)
        if not prompts:
            raise ValueError("'prompt' is an empty batch")
        num = len(prompts)
        if max_prompts is not None and num > max_prompts:
            raise ValueError(f"too many prompts in one request: {num} > {max_prompts} (max_batch_prompts)")
        params = self._per_prompt(self.sampling_params, num, "sampling_params", dict)
        rids = self._per_prompt(self.rid, num, "rid", str)
        logprob = self._per_prompt(self.return_logprob, num, "return_logprob", bool)
        start = self._per_prompt(self.logprob_start_len, num, "logprob_start_len", int)
        topk = self._per_prompt(self.top_logprobs_num, num, "top_logprobs_num", int)
        out: List[SingleRequest] = []
        for i, prompt in enumerate(prompts):
            _check_prompt(prompt, self.prompt is not None)
            if isinstance(start[i], bool) or start[i] < -1:
                raise ValueError(f"logprob_start_len must be an int >= -1, got {start[i]!r}")
            if isinstance(topk[i], bool) or topk[i] < 0:
                raise ValueError(f"top_logprobs_num must be an int >= 0, got {topk[i]!r}")
            sp = SamplingParams.from_dict(params[i])
            if max_n is not None and isinstance(sp.n, int) and sp.n > max_n:
                raise ValueError(f"n must be <= {max_n} (max_n), got {sp.n}")
            base_rid = rids[i] or uuid.uuid4().hex
            for j in range(sp.n):
                copy = _sample_copy(sp, j)
                out.append(
                    SingleRequest(
                        rid=base_rid if sp.n == 1 else f"{base_rid}#{j}",
                        prompt=prompt if isinstance(prompt, str) else None,
                        input_ids=None if isinstance(prompt, str) else list(prompt),
                        sampling_params=copy,
                        return_logprob=bool(logprob[i]) or topk[i] > 0,
                        logprob_start_len=start[i],
                        top_logprobs_num=topk[i],
                        return_text_in_logprobs=self.return_text_in_logprobs,
                        stream=self.stream,
                        index=len(out),
                    )
                )
        return out

    def _as_list(self, value) -> list:
        return value if self.is_batch else [value]

    @staticmethod
    def _per_prompt(value, num: int, name: str, kind: type) -> list:
        if isinstance(value, list):
            if len(value) != num:
                raise ValueError(f"'{name}' has {len(value)} entries for {num} prompts")
            return value
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"'{name}' must be a {kind.__name__} or a list, got {type(value).__name__}")
        return [value] * num


class RequestRejected(Exception):
    """The scheduler refused a request (overload: 503; internal error: 500)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


def _check_prompt(prompt, is_text: bool) -> None:
    if is_text:
        if not isinstance(prompt, str):
            raise ValueError(f"'prompt' must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("'prompt' is empty")
        return
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("'input_ids' must be a non-empty list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ValueError("'input_ids' must contain only integer token ids")


def _sample_copy(sp: SamplingParams, j: int) -> SamplingParams:
    """Copy j of an n-sample request: one sample, seed shifted by j when seeded."""
    seed = None if sp.sampling_seed is None else sp.sampling_seed + j
    return dataclasses.replace(sp, n=1, sampling_seed=seed)
