"""Live weight updates and generation pauses in the scheduler (the RL rollout loop).

An update never lets one request mix weights: once asked, the scheduler admits
no new request, lets the running ones finish on the old weights (or aborts them
when asked), then swaps the weights, empties the prefix cache (its KV came from
the old weights) and reopens admission. Queued requests run on the new weights.
That holds for all three sources: disk, tensors in shared memory, and
broadcasts from a trainer over a process group (update_weights_from_distributed).

release_memory_occupation frees the KV pool (and on CUDA moves the weights to
host memory) while the trainer needs the accelerator; it is refused while any
request runs or waits. Until resume_memory_occupation nothing is scheduled:
requests that arrive meanwhile wait in the queue.
"""

from __future__ import annotations

import logging
import pickle
import traceback
from typing import TYPE_CHECKING, Optional, Union

from radixserve.managers import io_struct as io
from radixserve.model_executor.memory_saver import ReleasedMemory
from radixserve.model_executor.weight_sync import WeightUpdateGroups, drain

if TYPE_CHECKING:
    from radixserve.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)

WeightUpdate = Union[io.UpdateWeightsFromDiskReq, io.UpdateWeightsFromTensorReq, io.UpdateWeightsFromDistributedReq]


class SchedulerWeightsMixin:
    def init_weights(self: "Scheduler") -> None:
        self.weight_version = "default"
        self.num_weight_updates = 0
        self.pending_update: Optional[WeightUpdate] = None
        self.generation_paused = False  # pause_generation: nothing is scheduled until continue_generation
        self.weight_update_groups = WeightUpdateGroups(self.device)
        self.released_memory: Optional[ReleasedMemory] = None

    @property
    def paused(self: "Scheduler") -> bool:
        """Nothing is scheduled: by pause_generation, or while the memory is released."""
        return self.generation_paused or self.released_memory is not None

    def request_weight_update(self: "Scheduler", msg: WeightUpdate) -> None:
        if self.pending_update is not None:
            self.send_sock.send_pyobj(io.UpdateWeightsOut(False, "another weight update is in progress",
                                                          self.weight_version))
            return
        if isinstance(msg, io.UpdateWeightsFromDistributedReq):
            try:  # refuse bad arguments now, not after the running requests drain
                self.weight_update_groups.check_update(msg.names, msg.dtypes, msg.shapes, msg.group_name)
            except ValueError as e:
                self.send_sock.send_pyobj(io.UpdateWeightsOut(False, str(e), self.weight_version))
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
            elif isinstance(msg, io.UpdateWeightsFromDistributedReq):
                self.load_broadcast_weights(msg)
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
        self.generation_paused = True
        self.send_sock.send_pyobj(io.GenerationControlOut(True))

    def continue_generation(self: "Scheduler") -> None:
        self.generation_paused = False
        self.send_sock.send_pyobj(io.GenerationControlOut(True))

    def get_weights_by_name(self: "Scheduler", msg: io.GetWeightsByNameReq) -> None:
        try:
            out = io.GetWeightsByNameOut(values=self.runner.get_weights_by_name(msg.name, msg.truncate_size))
        except ValueError as e:
            out = io.GetWeightsByNameOut(error=str(e))
        self.send_sock.send_pyobj(out)

    # ---- weights broadcast by a trainer ----
    def load_broadcast_weights(self: "Scheduler", msg: io.UpdateWeightsFromDistributedReq) -> None:
        received = self.weight_update_groups.receive(msg.names, msg.dtypes, msg.shapes, msg.group_name)
        try:
            self.runner.update_weights_from_tensor(received)
        finally:
            drain(received)  # after a bad tensor, still take the rest, or the trainer blocks on us

    def init_weights_update_group(self: "Scheduler", msg: io.InitWeightsUpdateGroupReq) -> None:
        """Blocks this loop until the trainer joins (or the rendezvous times out)."""
        try:
            self.weight_update_groups.init_group(msg.master_address, msg.master_port, msg.rank_offset,
                                                 msg.world_size, msg.group_name, msg.backend)
        except Exception as e:  # a group that fails to form is reported; serving carries on
            logger.error("init_weights_update_group failed:\n%s", traceback.format_exc())
            self.send_sock.send_pyobj(io.WeightsUpdateGroupOut(False, f"{type(e).__name__}: {e}"))
            return
        self.send_sock.send_pyobj(io.WeightsUpdateGroupOut(True, f"joined group {msg.group_name!r}"))

    def destroy_weights_update_group(self: "Scheduler", msg: io.DestroyWeightsUpdateGroupReq) -> None:
        try:
            self.weight_update_groups.destroy_group(msg.group_name)
        except Exception as e:
            self.send_sock.send_pyobj(io.WeightsUpdateGroupOut(False, f"{type(e).__name__}: {e}"))
            return
        self.send_sock.send_pyobj(io.WeightsUpdateGroupOut(True, f"left group {msg.group_name!r}"))

    # ---- memory occupation ----
    def release_memory_occupation(self: "Scheduler") -> None:
        self.resolve_in_flight()
        refusal = self.release_refusal()
        if refusal:
            self.send_sock.send_pyobj(io.MemoryOccupationOut(False, refusal))
            return
        self.prefix_cache.reset()  # its KV is about to go
        self.released_memory = self.runner.release_memory_occupation()
        released = self.released_memory
        logger.info("memory released: %d bytes (KV %d, weights %d)", released.num_bytes,
                    released.kv_bytes, released.weight_bytes)
        self.send_sock.send_pyobj(io.MemoryOccupationOut(True, "", released.num_bytes))

    def release_refusal(self: "Scheduler") -> str:
        """Why memory cannot be released now ('' if it can)."""
        if self.released_memory is not None:
            return "memory is already released"
        busy = len(self.kv_holders()) + len(self.waiting_queue) + len(self.grammar_queue)
        if busy or self.pending_update is not None:
            return (f"{busy} request(s) are running or waiting; release_memory_occupation needs an idle "
                    f"engine: wait for them, or call pause_generation(mode='abort') first")
        return ""

    def resume_memory_occupation(self: "Scheduler") -> None:
        if self.released_memory is None:
            self.send_sock.send_pyobj(io.MemoryOccupationOut(False, "memory is not released"))
            return
        released = self.released_memory
        try:
            self.runner.resume_memory_occupation(released)
        except Exception as e:  # e.g. out of memory while the trainer still holds it: stay released, retry later
            logger.error("resume_memory_occupation failed:\n%s", traceback.format_exc())
            self.send_sock.send_pyobj(io.MemoryOccupationOut(False, f"{type(e).__name__}: {e}"))
            return
        self.released_memory = None
        logger.info("memory resumed: %d bytes", released.num_bytes)
        self.send_sock.send_pyobj(io.MemoryOccupationOut(True, "", released.num_bytes))
