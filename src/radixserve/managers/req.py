"""Req: one request's state on the scheduler side."""

from __future__ import annotations

import re
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from radixserve.managers.io_struct import LogprobList, TokenizedGenerateReqInput
from radixserve.sampling.sampling_params import SamplingParams


class Req:
    def __init__(self, recv: TokenizedGenerateReqInput, sampling_seed: int) -> None:
        self.rid = recv.rid
        self.origin_input_ids: List[int] = list(recv.input_ids)
        self.sampling_params: SamplingParams = recv.sampling_params
        self.stream = recv.stream
        self.return_logprob = recv.return_logprob
        self.logprob_start_len = recv.logprob_start_len
        self.top_logprobs_num = recv.top_logprobs_num
        self.sampling_seed = sampling_seed
        # The LoRA adapter's id (None: the base model); also its radix-cache namespace.
        self.lora_id: Optional[int] = recv.lora_id
        # Images (multimodal/inputs.py): their pixels, token spans and M-RoPE positions.
        self.mm = recv.mm_inputs
        # Prefill/decode disaggregation: where the other half of the request is.
        self.bootstrap = recv.bootstrap

        self.output_ids: List[int] = []
        self.finished_reason: Optional[Dict[str, Any]] = None
        # A stop_regex match stays in the text (SGLang keeps it: its trim looks
        # for the pattern itself in the text, which a match rarely equals).
        self.stopped_by_regex = False
        self.to_abort = False

        # KV state: row in req_to_token and how many positions have KV slots.
        self.req_pool_idx: Optional[int] = None
        self.kv_len = 0
        # The cached prefix: positions [0, prefix_len) are the radix tree's slots,
        # pinned by locking last_node; prefix_slots until they are copied to the row.
        self.prefix_len = 0
        self.prefix_slots = None
        self.last_node = None
        self.cached_tokens: Optional[int] = None
        # With the hierarchical cache: the matched prefix's tokens per tier
        # (device, host, storage), and their dict as first admitted.
        self.hit_tiers: Optional[Tuple[int, int, int]] = None
        self.cached_tokens_details: Optional[Dict[str, int]] = None
        # Input logprobs are recorded once; a retracted request does not redo them.
        self.input_logprobs_done = not (self.return_logprob and self.logprob_start_len >= 0)

        # What has been sent to the detokenizer so far.
        self.sent_output_len = 0
        self.output_token_logprobs: LogprobList = []
        self.output_top_logprobs: List[LogprobList] = []
        self.input_token_logprobs: List[Tuple[Optional[float], int]] = []
        self.input_top_logprobs: List[Optional[LogprobList]] = []
        self.sent_logprob_len = 0
        self.sent_input_logprobs = False

        self.created_at = time.monotonic()
        self.queue_time: Optional[float] = None  # arrival to first prefill, in seconds
        self.first_token_at: Optional[float] = None
        self.grammar = None  # a GrammarMatcher when the request is constrained
        self.grammar_future = None  # its compilation, while queued
        # On an embedding server: the pooling of its prefill's hidden states
        # (layers/pooler.py PooledState), then the finished vector.
        self.pooled = None
        self.embedding: Optional[List[float]] = None
        # Speculative decoding: verify steps, drafts verified, drafts accepted.
        self.spec_verify_ct = 0
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0
        # EAGLE-3: the target's captured hidden states not yet fed to the draft
        # head, as (first position, [n, features]) pieces (speculative/eagle.py).
        self.spec_features: List[Tuple[int, Any]] = []

    # ---- token views ----
    @property
    def fill_ids(self) -> List[int]:
        """Every token that must have KV before the next one can be sampled."""
        return self.origin_input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    def reset_for_retract(self) -> None:
        self.kv_len = 0

    # ---- finishing ----
    def check_finished(self, eos_token_ids: Set[int], context_len: int, tokenizer: Any) -> None:
        """Decide, after a token was appended, whether the request ends here; the
        scheduler does it so nothing is decoded past a stop."""
        if self.finished:
            return
        if self.to_abort:
            self.finished_reason = {"type": "abort", "message": "aborted"}
            return
        sp = self.sampling_params
        token = self.output_ids[-1]
        if self.grammar is not None and self.grammar.is_terminated():
            self.finished_reason = {"type": "stop", "matched": token}
            return
        if len(self.output_ids) >= sp.min_new_tokens:
            if token in sp.stop_token_set or (not sp.ignore_eos and token in eos_token_ids):
                self.finished_reason = {"type": "stop", "matched": token}
                return
            matched = self._matched_stop_str(tokenizer)
            if matched is not None:
                self.finished_reason = {"type": "stop", "matched": matched}
                return
            pattern = self._matched_stop_regex(tokenizer)
            if pattern is not None:
                self.finished_reason = {"type": "stop", "matched": pattern}
                self.stopped_by_regex = True
                return
        if len(self.output_ids) >= sp.max_new_tokens:
            self.finished_reason = {"type": "length", "length": len(self.output_ids)}
        elif self.seq_len >= context_len:
            self.finished_reason = {"type": "length", "length": len(self.output_ids)}

    def _matched_stop_str(self, tokenizer: Any) -> Optional[str]:
        stops = self.sampling_params.stop_strs
        if not stops:
            return None
        # Every token is at least one character, so this many tokens cover any
        # stop string that ends in the newest token, even across token borders.
        tail_len = self.sampling_params.max_stop_str_len + 1
        tail = tokenizer.decode(self.output_ids[-tail_len:], skip_special_tokens=False)
        newest = tokenizer.decode(self.output_ids[-tail_len:-1], skip_special_tokens=False)
        for stop in stops:
            # Only an occurrence that the newest token completed counts.
            if stop in tail and tail.count(stop) > newest.count(stop):
                return stop
        return None

    def _matched_stop_regex(self, tokenizer: Any) -> Optional[str]:
        """The first stop_regex found in the output's tail. The tail covers the
        longest text a pattern can match (each token is at least a character);
        a match that ended earlier was found at that earlier token."""
        sp = self.sampling_params
        if not sp.stop_regex_strs:
            return None
        width = sp.max_stop_regex_len
        ids = self.output_ids if width is None else self.output_ids[-(width + 1):]
        tail = tokenizer.decode(ids, skip_special_tokens=False)
        for pattern in sp.stop_regex_strs:
            if re.search(pattern, tail):
                return pattern
        return None
