"""The detokenizer process: token ids in, incremental text out.

It never decides when a request ends (the scheduler does); it only turns ids
into text, correct for multi-byte UTF-8 split across tokens, and trims a
matched stop string or stop token from the text unless no_stop_trim.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List

import zmq

from radixserve.managers import io_struct as io
from radixserve.managers.ipc import PortArgs, die_with_parent, make_socket

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class DecodeState:
    ids: List[int] = field(default_factory=list)
    # ids[prefix_offset:read_offset] were decoded already; decoding from
    # prefix_offset keeps the tokenizer's spacing rules right at the seam.
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""
    sent_chars: int = 0


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: Dict[str, DecodeState] = {}

    def _decode(self, ids: List[int], out: io.ReqOutput) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=out.skip_special_tokens,
            spaces_between_special_tokens=out.spaces_between_special_tokens,
        )

    def _advance(self, state: DecodeState, out: io.ReqOutput, final: bool) -> None:
        prefix = self._decode(state.ids[state.prefix_offset:state.read_offset], out)
        full = self._decode(state.ids[state.prefix_offset:], out)
        # An incomplete UTF-8 sequence decodes to U+FFFD: wait for the next token.
        if full.endswith(REPLACEMENT_CHAR) and not final:
            return
        state.text += full[len(prefix):]
        state.prefix_offset, state.read_offset = state.read_offset, len(state.ids)

    def step(self, out: io.ReqOutput) -> io.ReqOutput:
        """Fill out.new_text with text ready to show since the last step."""
        state = self.states.setdefault(out.rid, DecodeState())
        finished = out.finished_reason is not None
        matched = (out.finished_reason or {}).get("matched")
        new_ids = out.new_token_ids
        if finished and isinstance(matched, int) and not out.no_stop_trim and new_ids:
            new_ids = new_ids[:-1]  # the stop token is not part of the text
        state.ids.extend(new_ids)
        self._advance(state, out, final=finished)
        if finished and isinstance(matched, str) and not out.no_stop_trim:
            cut = state.text.rfind(matched)
            if cut >= state.sent_chars:
                state.text = state.text[:cut]
        ready = len(state.text) if finished else max(len(state.text) - out.stop_hold_back, 0)
        if ready > state.sent_chars:
            out.new_text = state.text[state.sent_chars:ready]
            state.sent_chars = ready
        if finished:
            del self.states[out.rid]
        return out


def run_detokenizer_process(server_args, port_args: PortArgs, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    logging.basicConfig(
        level=server_args.log_level.upper(),
        format="[%(asctime)s detokenizer] %(levelname)s %(message)s",
    )
    from radixserve.model_loader.source import resolve_model_source
    from radixserve.utils.hf_utils import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_source(server_args.model_path), server_args.tokenizer_path)
    detok = IncrementalDetokenizer(tokenizer)
    ctx = zmq.Context(2)
    recv = make_socket(ctx, zmq.PULL, port_args.scheduler_to_detokenizer, bind=True)
    send = make_socket(ctx, zmq.PUSH, port_args.detokenizer_to_tokenizer, bind=False)
    while True:
        msg = recv.recv_pyobj()
        if not isinstance(msg, io.BatchTokenIDOut):
            send.send_pyobj(msg)  # control replies pass through, in order
            continue
        outs = []
        for out in msg.outputs:
            try:
                outs.append(detok.step(out))
            except Exception:  # one request's bad decode must not kill the others
                logger.error("detokenize failed for %s:\n%s", out.rid, traceback.format_exc())
                detok.states.pop(out.rid, None)
                out.finished_reason = {"type": "abort", "message": "detokenization failed"}
                outs.append(out)
        send.send_pyobj(io.BatchStrOut(outs))
