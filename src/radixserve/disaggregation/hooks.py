"""The scheduler's one handle on prefill/decode disaggregation: it builds the
side its --disaggregation-mode asks for and is called at the few points where
a disaggregated request differs from an ordinary one (arrival, each step,
abort, KV accounting). Requests without a bootstrap_room are served as on an
ordinary server in every mode.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from radixserve.disaggregation.decode import DecodeReceiver, first_token_host_lists, to_running_batch
from radixserve.disaggregation.prefill import PrefillSender
from radixserve.disaggregation.transfer import FIRST_TOKEN_TOP_K
from radixserve.managers import io_struct as io
from radixserve.managers.req import Req
from radixserve.managers.scheduler.outputs import release_kv


def check_disaggregated(recv: io.TokenizedGenerateReqInput) -> None:
    """What a disaggregated request cannot ask for yet, refused alike on both
    sides (ValueError: a 400), so neither half waits for the other in vain."""
    sp = recv.sampling_params
    if sp.json_schema or sp.regex or sp.ebnf:
        raise ValueError("structured outputs (json_schema, regex, ebnf) are not supported with "
                         "prefill/decode disaggregation yet")
    if recv.mm_inputs is not None:  # the decode side would need the images' M-RoPE offsets too
        raise ValueError("image_data is not supported with prefill/decode disaggregation yet")
    if recv.top_logprobs_num > FIRST_TOKEN_TOP_K:
        raise ValueError(f"top_logprobs_num must be <= {FIRST_TOKEN_TOP_K} with prefill/decode "
                         f"disaggregation, got {recv.top_logprobs_num}")


class NoDisaggregation:
    """An ordinary server (--disaggregation-mode null): every hook does nothing."""

    def on_arrival(self, recv: io.TokenizedGenerateReqInput) -> bool:
        return False

    def step(self) -> None:
        pass

    def abort(self, matches: Callable[[Req], bool]) -> List[Req]:
        return []

    def has_work(self) -> bool:
        return False

    def kv_holders(self) -> List[Req]:
        return []

    def report(self, drain: bool = False) -> None:
        return None


def make_disaggregation(scheduler: Any, tp_size: int):
    """The scheduler's handle for its --disaggregation-mode."""
    if scheduler.server_args.disaggregated:
        return Disaggregation(scheduler, tp_size)
    return NoDisaggregation()


class Disaggregation:
    def __init__(self, scheduler: Any, tp_size: int) -> None:
        """scheduler: the Scheduler (its pools, admission, running batch, results, emit, resolve_in_flight)."""
        self.s = scheduler
        args = scheduler.server_args
        self.mode = args.disaggregation_mode
        self.prefill: Optional[PrefillSender] = None
        self.decode: Optional[DecodeReceiver] = None
        if self.mode == "prefill":
            self.prefill = PrefillSender(args, scheduler.pools, scheduler.tp_rank, tp_size, self._end)
            scheduler.results.hand_off = self.prefill.hand_off
        else:
            self.decode = DecodeReceiver(args, scheduler.pools, scheduler.tp_rank, tp_size,
                                         scheduler.runner.max_running_requests)

    def on_arrival(self, recv: io.TokenizedGenerateReqInput) -> bool:
        """True when the request is taken here (the decode side's KV wait);
        False: the ordinary admission takes it. ValueError: refused (400)."""
        if recv.bootstrap is None:
            return False
        check_disaggregated(recv)
        if self.prefill is not None:
            self.prefill.on_arrival(recv)
            return False
        if recv.sampling_params.max_new_tokens == 0:
            return False  # nothing to decode: the prompt alone is served here
        req = self.s.admission.new_req(recv)
        if len(req.origin_input_ids) + 1 > self.s.runner.max_total_num_tokens:
            raise ValueError(f"the prompt has {len(req.origin_input_ids)} tokens and can never fit the KV cache "
                             f"({self.s.runner.max_total_num_tokens} tokens)")
        self.decode.add(req)
        return True

    def step(self) -> None:
        if self.prefill is not None:
            self.prefill.step()
            return
        arrived, failed = self.decode.step(len(self.s.running))
        self.s.emit(failed)
        if arrived:
            self._start_decoding(arrived)

    def _start_decoding(self, arrived: List[Req]) -> None:
        """The KV and first token are here: the requests continue as if prefilled here."""
        s = self.s
        s.resolve_in_flight()  # the running batch changes: its in-flight step is processed first
        for req in arrived:
            token, logprob, top = self.decode.board.read(req.req_pool_idx, req.top_logprobs_num)
            s.prefix_cache.cache_unfinished(req)  # the prompt joins the decode side's radix cache, if any
            s.results.append_token(req, 0, token, first_token_host_lists(logprob, top))
        finished = [r for r in arrived if r.finished]
        release_kv(s.prefix_cache, finished)
        live = [r for r in arrived if not r.finished]
        if live:
            s.running.absorb(to_running_batch(live, s.pools, s.device))
        s.emit(arrived)

    def _end(self, reqs: List[Req]) -> None:
        """Prefill side: the write is done (or failed): release the KV and answer."""
        release_kv(self.s.prefix_cache, reqs)
        self.s.emit(reqs)

    def abort(self, matches: Callable[[Req], bool]) -> List[Req]:
        if self.prefill is not None:
            self.prefill.abort(matches)
            return []
        return self.decode.abort(matches)

    def has_work(self) -> bool:
        side = self.prefill or self.decode
        return side.has_work()

    def kv_holders(self) -> List[Req]:
        return (self.prefill or self.decode).kv_holders()

    def report(self, drain: bool = False) -> Dict[str, Any]:
        """Transfer counters for server info (drain=False) and the stats messages (drain=True)."""
        side = self.prefill or self.decode
        waiting = self.decode.num_waiting() if self.decode is not None else len(self.prefill.held)
        return side.stats.report(self.mode, waiting, drain)
