"""The weight and memory controller: live weight updates, generation pauses,
and releasing/resuming the accelerator's memory (the RL rollout loop).

An update never lets one request mix weights: while updates are queued the
scheduler admits no new request, lets the running ones finish on the old
weights (or aborts them when asked), then applies the updates one after the
other, in arrival order (a second update waits for the first rather than
being refused); each swap empties the prefix cache (its KV came from the old
weights). Queued requests run on the new weights. That holds for all three
sources: disk, tensors in shared memory, and broadcasts from a trainer.

Every handler returns its reply (or None when it answers later); the caller
stamps the request's id on it and sends it.
"""

from __future__ import annotations

import logging
import pickle
import traceback
from collections import deque
from typing import Callable, Deque, List, Optional, Union

import torch

from radixserve.managers import io_struct as io
from radixserve.model_executor.memory_saver import ReleasedMemory
from radixserve.model_executor.weight_sync import WeightUpdateGroups, drain

logger = logging.getLogger(__name__)

WeightUpdate = Union[io.UpdateWeightsFromDiskReq, io.UpdateWeightsFromTensorReq, io.UpdateWeightsFromDistributedReq]


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class WeightController:
    def __init__(self, runner, prefix_cache, device: torch.device, rank: int = 0) -> None:
        """rank: this process's place among all the server's ranks (dp_rank *
        tp_size + tp_rank): which tensor pickle it opens, and its member rank in
        a trainer's weight-update group."""
        self.runner = runner
        self.rank = rank
        self.prefix_cache = prefix_cache
        self.version = "default"
        self.num_updates = 0
        self.pending: Deque[WeightUpdate] = deque()  # applied in order once no request holds KV
        self.generation_paused = False  # pause_generation: nothing is scheduled until continue_generation
        self.groups = WeightUpdateGroups(device)
        self.released: Optional[ReleasedMemory] = None

    @property
    def paused(self) -> bool:
        """Nothing is scheduled: by pause_generation, or while the memory is released."""
        return self.generation_paused or self.released is not None

    # ---- weight updates ----
    def request_update(self, msg: WeightUpdate) -> Optional[io.UpdateWeightsOut]:
        """Queue an update; a refusal now, or None (the answer comes from apply_ready)."""
        if isinstance(msg, io.UpdateWeightsFromDistributedReq):
            try:  # refuse bad arguments now, not after the running requests drain
                self.groups.check_update(msg.names, msg.dtypes, msg.shapes, msg.group_name)
            except ValueError as e:
                return io.UpdateWeightsOut(False, str(e), self.version)
        self.pending.append(msg)
        return None

    def apply_ready(self, kv_in_use: bool) -> List[io.UpdateWeightsOut]:
        """Apply the queued updates once no request holds KV computed with the old weights."""
        replies = []
        while self.pending and not kv_in_use:
            msg = self.pending.popleft()
            reply = self._apply(msg)
            reply.request_id = msg.request_id
            replies.append(reply)
        return replies

    def _apply(self, msg: WeightUpdate) -> io.UpdateWeightsOut:
        try:
            if isinstance(msg, io.UpdateWeightsFromDiskReq):
                self.runner.update_weights_from_disk(msg.model_path, msg.load_format)
            elif isinstance(msg, io.UpdateWeightsFromDistributedReq):
                self._load_broadcast(msg)
            else:
                self.runner.update_weights_from_tensor(pickle.loads(self._own_payload(msg)))
        except Exception as e:  # a bad update is reported; the server keeps serving
            logger.error("weight update failed:\n%s", traceback.format_exc())
            return io.UpdateWeightsOut(False, _error(e), self.version)
        if getattr(msg, "flush_cache", True):
            self.prefix_cache.reset()
        self.prefix_cache.on_weights_changed()
        self.num_updates += 1
        self.version = msg.weight_version or str(self.num_updates)
        logger.info("weights updated: version %s", self.version)
        return io.UpdateWeightsOut(True, "", self.version)

    def _own_payload(self, msg: io.UpdateWeightsFromTensorReq) -> bytes:
        """With tensor or data parallelism the Engine pickles the tensors once per rank:
        a shared-memory handle (a passed file descriptor on the CPU) can be
        opened by one process only, so each rank opens its own."""
        payload = msg.serialized_named_tensors
        return payload[self.rank] if isinstance(payload, list) else payload

    def _load_broadcast(self, msg: io.UpdateWeightsFromDistributedReq) -> None:
        received = self.groups.receive(msg.names, msg.dtypes, msg.shapes, msg.group_name)
        try:
            self.runner.update_weights_from_tensor(received)
        finally:
            drain(received)  # after a bad tensor, still take the rest, or the trainer blocks on us

    def get_weights_by_name(self, msg: io.GetWeightsByNameReq) -> io.GetWeightsByNameOut:
        try:
            return io.GetWeightsByNameOut(values=self.runner.get_weights_by_name(msg.name, msg.truncate_size))
        except ValueError as e:
            return io.GetWeightsByNameOut(error=str(e))

    # ---- process groups with a trainer ----
    def init_group(self, msg: io.InitWeightsUpdateGroupReq) -> io.WeightsUpdateGroupOut:
        """Blocks the loop until the trainer joins (or the rendezvous times out).
        Every rank of every replica joins as its own member, rank_offset + rank
        (the trainer passes world_size = its ranks + dp_size * tp_size), and receives
        every broadcast; the model's loader keeps this rank's shard of each."""
        try:
            self.groups.init_group(msg.master_address, msg.master_port, msg.rank_offset + self.rank,
                                   msg.world_size, msg.group_name, msg.backend)
        except Exception as e:  # a group that fails to form is reported; serving carries on
            logger.error("init_weights_update_group failed:\n%s", traceback.format_exc())
            return io.WeightsUpdateGroupOut(False, _error(e))
        return io.WeightsUpdateGroupOut(True, f"joined group {msg.group_name!r}")

    def destroy_group(self, msg: io.DestroyWeightsUpdateGroupReq) -> io.WeightsUpdateGroupOut:
        try:
            self.groups.destroy_group(msg.group_name)
        except Exception as e:
            return io.WeightsUpdateGroupOut(False, _error(e))
        return io.WeightsUpdateGroupOut(True, f"left group {msg.group_name!r}")

    # ---- pauses ----
    def pause(self, msg: io.PauseGenerationReq, abort_all: Callable[[], None]) -> io.GenerationControlOut:
        """in_place: running and queued requests wait with their KV (an update
        then waits for continue_generation); abort: every request ends now."""
        if msg.mode not in ("in_place", "abort"):
            return io.GenerationControlOut(False, f"mode must be in_place|abort, got {msg.mode!r}")
        if msg.mode == "abort":
            abort_all()
        self.generation_paused = True
        return io.GenerationControlOut(True)

    def resume_generation(self, msg: io.ContinueGenerationReq) -> io.GenerationControlOut:
        self.generation_paused = False
        return io.GenerationControlOut(True)

    # ---- memory occupation ----
    def release_memory(self, num_busy: int) -> io.MemoryOccupationOut:
        """Refused unless the engine is idle (num_busy requests run or wait)."""
        if self.released is not None:
            return io.MemoryOccupationOut(False, "memory is already released")
        if num_busy or self.pending:
            return io.MemoryOccupationOut(False, (
                f"{num_busy} request(s) are running or waiting; release_memory_occupation needs an idle "
                f"engine: wait for them, or call pause_generation(mode='abort') first"))
        self.prefix_cache.reset()  # its KV is about to go
        self.released = released = self.runner.release_memory_occupation()
        logger.info("memory released: %d bytes (KV %d, weights %d)", released.num_bytes,
                    released.kv_bytes, released.weight_bytes)
        return io.MemoryOccupationOut(True, "", released.num_bytes)

    def resume_memory(self, msg: io.ResumeMemoryOccupationReq) -> io.MemoryOccupationOut:
        if self.released is None:
            return io.MemoryOccupationOut(False, "memory is not released")
        released = self.released
        try:
            self.runner.resume_memory_occupation(released)
        except Exception as e:  # e.g. out of memory while the trainer still holds it: stay released, retry later
            logger.error("resume_memory_occupation failed:\n%s", traceback.format_exc())
            return io.MemoryOccupationOut(False, _error(e))
        self.released = None
        logger.info("memory resumed: %d bytes", released.num_bytes)
        return io.MemoryOccupationOut(True, "", released.num_bytes)
