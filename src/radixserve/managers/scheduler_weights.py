"""Live weight updates and generation pauses in the scheduler (the RL rollout loop).

An update never lets one request mix weights: once asked, the scheduler admits
no new request, lets the running ones finish on the old weights (or aborts them
when asked), then swaps the weights, empties the prefix cache (its KV came from
the old weights) and reopens admission. Queued requests run on the new weights.
"""

from __future__ import annotations

import logging
import pickle
import traceback
from typing import TYPE_CHECKING, Optional, Union

from radixserve.managers import io_struct as io

if TYPE_CHECKING:
    from radixserve.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)

WeightUpdate = Union[io.UpdateWeightsFromDiskReq, io.UpdateWeightsFromTensorReq]


class SchedulerWeightsMixin:
    def init_weights(self: "Scheduler") -> None:
        self.weight_version = "default"
        self.num_weight_updates = 0
        self.pending_update: Optional[WeightUpdate] = None
        self.paused = False  # pause_generation: nothing is scheduled until continue_generation

    def request_weight_update(self: "Scheduler", msg: WeightUpdate) -> None:
        if self.pending_update is not None:
            self.send_sock.send_pyobj(io.UpdateWeightsOut(False, "another weight update is in progress",
                                                          self.weight_version))
            return
        self.resolve_in_flight()
        if msg.abort_all_requests:
            self.abort(io.AbortReq(abort_all=True))
        self.pending_update = msg
        self.maybe_apply_weight_update()

    def maybe_apply_weight_update(self: "Scheduler") -> None:
        """Apply the pending update once no request holds KV computed with the old weights."""
        if self.pending_update is None or self.kv_holders() or self.in_flight is not None:
            return
        msg, self.pending_update = self.pending_update, None
        try:
            if isinstance(msg, io.UpdateWeightsFromDiskReq):
                self.runner.update_weights_from_disk(msg.model_path, msg.load_format)
            else:
                self.runner.update_weights_from_tensor(pickle.loads(msg.serialized_named_tensors))
        except Exception as e:  # a bad update is reported; the server keeps serving
            logger.error("weight update failed:\n%s", traceback.format_exc())
            self.send_sock.send_pyobj(io.UpdateWeightsOut(False, f"{type(e).__name__}: {e}", self.weight_version))
            return
        if getattr(msg, "flush_cache", True):
            self.prefix_cache.reset()
        self.num_weight_updates += 1
        self.weight_version = msg.weight_version or str(self.num_weight_updates)
        logger.info("weights updated: version %s", self.weight_version)
        self.send_sock.send_pyobj(io.UpdateWeightsOut(True, "", self.weight_version))

    def pause_generation(self: "Scheduler", msg: io.PauseGenerationReq) -> None:
        """Stop scheduling. in_place: running and queued requests wait with their
        KV (a weight update then waits for continue_generation); abort: every
        request ends now, so an update can apply at once."""
        if msg.mode not in ("in_place", "abort"):
            self.send_sock.send_pyobj(io.GenerationControlOut(False, f"mode must be in_place|abort, got {msg.mode!r}"))
            return
        self.resolve_in_flight()
        if msg.mode == "abort":
            self.abort(io.AbortReq(abort_all=True))
        self.paused = True
        self.send_sock.send_pyobj(io.GenerationControlOut(True))

    def continue_generation(self: "Scheduler") -> None:
        self.paused = False
        self.send_sock.send_pyobj(io.GenerationControlOut(True))

    def get_weights_by_name(self: "Scheduler", msg: io.GetWeightsByNameReq) -> None:
        try:
            out = io.GetWeightsByNameOut(values=self.runner.get_weights_by_name(msg.name, msg.truncate_size))
        except ValueError as e:
            out = io.GetWeightsByNameOut(error=str(e))
        self.send_sock.send_pyobj(out)
