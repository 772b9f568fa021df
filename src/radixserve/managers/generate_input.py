"""GenerateReqInput: a user's generate call, validated and split into single requests.

Bad input is rejected here, where it enters, with a ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from radixserve.managers.io_struct import BootstrapInfo
from radixserve.managers.validation import INT64_MAX, FieldError, check_bool, check_int, check_text
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
    routed_dp_rank: Optional[int] = None  # the data-parallel replica asked for; None: the balancer picks
    lora_path: Optional[str] = None  # the LoRA adapter's name; None: the base model
    image_data: Optional[List[str]] = None  # images for the prompt's image placeholders, in order
    mm_inputs: Optional[Any] = None  # the processed images (multimodal/inputs.py), set when tokenized
    bootstrap: Optional[BootstrapInfo] = None  # prefill/decode disaggregation (the gateway adds it)


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
    # The data-parallel replica that must serve every prompt (SGLang's
    # routed_dp_rank; its gateway's --dp-aware mode sends data_parallel_rank).
    routed_dp_rank: Optional[int] = None
    # The LoRA adapter by name (SGLang's field name), or one per prompt; None: the base model.
    lora_path: Union[str, List[Optional[str]], None] = None
    # Images (SGLang's field): for one prompt a data URL / path or a list of them;
    # for a batch one such entry per prompt.
    image_data: Union[str, List[Any], None] = None
    # Prefill/decode disaggregation: the prefill server's bootstrap server and
    # the room both halves share (SGLang's gateway adds them), or one per prompt.
    bootstrap_host: Union[str, List[Optional[str]], None] = None
    bootstrap_port: Union[int, List[Optional[int]], None] = None
    bootstrap_room: Union[int, List[Optional[int]], None] = None

    @property
    def is_batch(self) -> bool:
        """A list of prompts (or of id lists); False for anything malformed,
        which split() then refuses by name."""
        if self.prompt is not None:
            return isinstance(self.prompt, list)
        ids = self.input_ids
        return isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)

    def split(self, max_prompts: Optional[int] = None, max_n: Optional[int] = None,
              vocab_size: Optional[int] = None, dp_size: int = 1) -> List[SingleRequest]:
        """Validate and expand to single requests, prompt-major over n samples.
        Does not change self. vocab_size None skips the vocabulary checks."""
        prompts = self._prompts()
        num = len(prompts)
        if max_prompts is not None and num > max_prompts:
            raise FieldError(self._prompt_field, f"too many prompts in one request: {num} > {max_prompts} "
                                                 "(max_batch_prompts)")
        stream = check_bool("stream", self.stream) if self.stream is not None else False
        with_text = self.return_text_in_logprobs
        with_text = check_bool("return_text_in_logprobs", with_text) if with_text is not None else False
        # None (JSON null) anywhere means the default.
        params = self._per_prompt(self.sampling_params, num, "sampling_params", dict)
        logprob = self._per_prompt(self.return_logprob, num, "return_logprob", bool, default=False)
        start = self._per_prompt(self.logprob_start_len, num, "logprob_start_len", int, default=-1)
        topk = self._per_prompt(self.top_logprobs_num, num, "top_logprobs_num", int, default=0)
        rids = self._rids(num)
        loras = self._per_prompt(self.lora_path, num, "lora_path", str)
        images = self._images_per_prompt(num)
        bootstraps = self._bootstraps(num)
        routed = self.routed_dp_rank
        if routed is not None:
            check_int("routed_dp_rank", routed, minimum=0, maximum=dp_size - 1,
                      what=f"a data-parallel rank in [0, {dp_size})")
        out: List[SingleRequest] = []
        for i, prompt in enumerate(prompts):
            check_int("logprob_start_len", start[i], minimum=-1)
            if images[i] and start[i] >= 0 and (logprob[i] or topk[i] > 0):
                raise FieldError("logprob_start_len", "input logprobs are not available for prompts with images")
            check_int("top_logprobs_num", topk[i], minimum=0, maximum=vocab_size or INT64_MAX)
            sp = SamplingParams.from_dict(params[i])
            sp.verify(vocab_size)
            sp.normalize()
            if max_n is not None and sp.n > max_n:
                raise FieldError("n", f"n must be <= {max_n} (max_n), got {sp.n}")
            if bootstraps[i] is not None and sp.n > 1:
                raise FieldError("n", "n > 1 cannot be combined with bootstrap_room (a disaggregated "
                                      "request has one prefill and one decode half)")
            base_rid = rids[i] or uuid.uuid4().hex
            for j in range(sp.n):
                out.append(SingleRequest(
                    rid=base_rid if sp.n == 1 else f"{base_rid}#{j}",
                    prompt=prompt if isinstance(prompt, str) else None,
                    input_ids=None if isinstance(prompt, str) else list(prompt),
                    sampling_params=_sample_copy(sp, j),
                    return_logprob=logprob[i] or topk[i] > 0,
                    logprob_start_len=start[i],
                    top_logprobs_num=topk[i],
                    return_text_in_logprobs=with_text,
                    stream=stream,
                    index=len(out),
                    routed_dp_rank=routed,
                    lora_path=loras[i],
                    image_data=images[i],
                    bootstrap=bootstraps[i],
                ))
        _check_unique_rids(out)
        return out

    @property
    def _prompt_field(self) -> str:
        return "prompt" if self.prompt is not None else "input_ids"

    def _prompts(self) -> list:
        """The prompts as a list, each checked: a non-empty valid-Unicode string,
        or a non-empty list of integer ids."""
        if (self.prompt is None) == (self.input_ids is None):
            raise FieldError("prompt", "exactly one of 'prompt' and 'input_ids' must be given")
        field, value = self._prompt_field, self.prompt if self.prompt is not None else self.input_ids
        if not isinstance(value, (str, list)) or (field == "input_ids" and isinstance(value, str)):
            kind = "a string or a list of strings" if field == "prompt" else "a list of token ids or a list of lists"
            raise FieldError(field, f"'{field}' must be {kind}, got {type(value).__name__}")
        prompts = value if self.is_batch else [value]
        if not prompts:
            raise FieldError(field, f"'{field}' is an empty batch")
        for prompt in prompts:
            _check_prompt(prompt, field)
        return prompts

    def _images_per_prompt(self, num: int) -> List[Optional[List[str]]]:
        """image_data as one list of image sources (or None) per prompt."""
        value = self.image_data
        if value is None:
            return [None] * num
        entries = value if self.is_batch else [value]
        if not isinstance(entries, list) or len(entries) != num:
            raise FieldError("image_data", f"'image_data' needs one entry per prompt ({num})")
        out: List[Optional[List[str]]] = []
        for entry in entries:
            items = [entry] if isinstance(entry, str) else entry
            if items is not None and (not isinstance(items, list) or not all(isinstance(s, str) for s in items)):
                raise FieldError("image_data", "'image_data' must be an image (a data URL or a file path) or a "
                                               "list of them per prompt")
            out.append(items or None)
        return out

    def _rids(self, num: int) -> List[Optional[str]]:
        """One rid per prompt. One string for a batch becomes rid_0, rid_1, ...
        (as SGLang does), so every request of the batch has its own."""
        if isinstance(self.rid, str) and self.is_batch:
            return [f"{self.rid}_{i}" for i in range(num)]
        rids = self._per_prompt(self.rid, num, "rid", str)
        for rid in rids:
            if rid is not None:
                check_text("rid", rid)
        return rids

    def _bootstraps(self, num: int) -> List[Optional[BootstrapInfo]]:
        """Each prompt's pairing, checked; None where no bootstrap_room is given."""
        hosts = self._per_prompt(self.bootstrap_host, num, "bootstrap_host", str)
        ports = self._per_prompt(self.bootstrap_port, num, "bootstrap_port", int)
        rooms = self._per_prompt(self.bootstrap_room, num, "bootstrap_room", int)
        out: List[Optional[BootstrapInfo]] = []
        for host, port, room in zip(hosts, ports, rooms):
            if room is None:
                out.append(None)
                continue
            check_int("bootstrap_room", room, minimum=0)
            if not host:
                raise FieldError("bootstrap_host", "bootstrap_room needs bootstrap_host (the prefill server's host)")
            check_text("bootstrap_host", host)
            if port is None:
                raise FieldError("bootstrap_port", "bootstrap_room needs bootstrap_port (the prefill server's "
                                                   "--disaggregation-bootstrap-port)")
            check_int("bootstrap_port", port, minimum=1, maximum=65535, what="a port in [1, 65535]")
            out.append(BootstrapInfo(host, port, room))
        return out

    def _per_prompt(self, value, num: int, name: str, kind: type, default: Any = None) -> list:
        """One value per prompt, each of the right type; None becomes the default."""
        values = value if isinstance(value, list) else [value] * num
        if len(values) != num:
            raise FieldError(name, f"'{name}' has {len(values)} entries for {num} prompts")
        for v in values:
            wrong_type = not isinstance(v, kind) or (kind is int and isinstance(v, bool))
            if v is not None and wrong_type:
                raise FieldError(name, f"'{name}' must be a {kind.__name__} or a list of them, "
                                       f"got {type(v).__name__}")
        return [default if v is None else v for v in values]


class RequestRejected(Exception):
    """The scheduler refused a request (overload: 503; internal error: 500)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


def _check_prompt(prompt: Any, field: str) -> None:
    if field == "prompt":
        if not isinstance(prompt, str):
            raise FieldError(field, f"'prompt' must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise FieldError(field, "'prompt' is empty")
        check_text(field, prompt)
        return
    if not isinstance(prompt, list) or not prompt:
        raise FieldError(field, "'input_ids' must be a non-empty list of token ids")
    if not all(type(t) is int for t in prompt):  # type(): bools are not token ids
        raise FieldError(field, "'input_ids' must contain only integer token ids")


def _check_unique_rids(singles: List[SingleRequest]) -> None:
    seen = set()
    for single in singles:
        if single.rid in seen:
            raise FieldError("rid", f"rid {single.rid!r} appears more than once in the request; "
                                    "give each prompt its own rid")
        seen.add(single.rid)


def _sample_copy(sp: SamplingParams, j: int) -> SamplingParams:
    """Copy j of an n-sample request: one sample, seed shifted by j when seeded."""
    seed = None if sp.sampling_seed is None else sp.sampling_seed + j
    return dataclasses.replace(sp, n=1, sampling_seed=seed)
