"""What moves between a prefill and a decode server, and the engine that moves it.

The engine is Mooncake's TransferEngine (PyPI mooncake-transfer-engine-non-cuda
for host memory; a CUDA build for GPU memory): each side registers its KV
pool's buffers once, and the prefill side writes straight into the decode
side's memory, TCP by default, RDMA with --disaggregation-ib-device. Peers find
each other by "host:rpc_port" (Mooncake's P2P handshake, no metadata server).

A KV slot is one contiguous row of every per-layer buffer (K and V, or MLA's
latent), so a request's KV is, per buffer, the runs of consecutive slots its
positions map to on both sides.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

# Top logprobs carried with the first token (OpenAI's maximum).
FIRST_TOKEN_TOP_K = 20
PAYLOAD_WIDTH = 2 + 2 * FIRST_TOKEN_TOP_K  # token, logprob, top ids, top logprobs (float64)


class TransferError(RuntimeError):
    pass


def kv_buffers(kv_pool) -> List[torch.Tensor]:
    """The pool's per-layer buffers in a fixed order: MLA's latent buffers, or every K then every V."""
    latent = getattr(kv_pool, "latent_buffers", None)
    return list(latent) if latent is not None else list(kv_pool.k_buffers) + list(kv_pool.v_buffers)


def slot_bytes(buffer: torch.Tensor) -> int:
    assert buffer.is_contiguous(), "a KV buffer's slot must be one contiguous row"
    return buffer.stride(0) * buffer.element_size()


def advertised_host(bind_host: str) -> str:
    """The address peers reach this server at: the bind address, or this host's
    own address when it binds every interface."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    try:
        # The interface of the default route (a UDP connect sends nothing);
        # the hostname may resolve to a loopback address (Debian's 127.0.1.1).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


@dataclass
class KVDestination:
    """Decode rank -> prefill rank (over ZMQ): where one request's KV and first token go."""

    room: int
    session: str  # the decode rank's transfer engine, host:rpc_port
    buffer_addrs: List[int]
    slot_bytes: List[int]
    start_pos: int  # positions before it are the decode side's own (its radix cache)
    slots: List[int]  # decode slots of positions [start_pos, prompt_len)
    prompt_len: int
    payload_addr: int  # the request's row of the decode side's FirstTokenBoard
    status_addr: int
    budget_s: float  # seconds left before the decode side gives up on it


def slot_runs(src: torch.Tensor, dst: torch.Tensor) -> Tuple[List[int], List[int], List[int]]:
    """(src start, dst start, length) of the maximal runs where both slot lists
    go up by one: each run is one write per buffer."""
    n = len(src)
    if n == 0:
        return [], [], []
    src, dst = src.to("cpu", torch.int64), dst.to("cpu", torch.int64)
    breaks = ((src[1:] - src[:-1]) != 1) | ((dst[1:] - dst[:-1]) != 1)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.nonzero(breaks).flatten() + 1])
    ends = torch.cat([starts[1:], torch.tensor([n])])
    return src[starts].tolist(), dst[starts].tolist(), (ends - starts).tolist()


def kv_write_list(src_addrs: List[int], src_slots: torch.Tensor, dest: KVDestination,
                  sizes: List[int]) -> Tuple[List[int], List[int], List[int]]:
    """(source addresses, destination addresses, lengths) of one request's KV."""
    src_starts, dst_starts, lengths = slot_runs(src_slots, torch.tensor(dest.slots, dtype=torch.int64))
    srcs, dsts, lens = [], [], []
    for src_base, dst_base, size in zip(src_addrs, dest.buffer_addrs, sizes):
        for s, d, n in zip(src_starts, dst_starts, lengths):
            srcs.append(src_base + s * size)
            dsts.append(dst_base + d * size)
            lens.append(n * size)
    return srcs, dsts, lens


class FirstTokenBoard:
    """Registered host memory, one row per request-table row: on the decode side
    the prefill side writes a request's first token and logprobs there, then,
    in a write of its own, the status (so a status seen means the KV and the
    payload are complete); on the prefill side the same rows stage what is sent."""

    DONE, FAILED = 0, 1

    def __init__(self, rows: int) -> None:
        self.payload = torch.zeros((rows, PAYLOAD_WIDTH), dtype=torch.float64)
        self.status = torch.zeros((rows, 2), dtype=torch.int64)

    def tensors(self) -> List[torch.Tensor]:
        return [self.payload, self.status]

    def payload_addr(self, row: int) -> int:
        return self.payload.data_ptr() + row * PAYLOAD_WIDTH * 8

    def status_addr(self, row: int, column: int = 0) -> int:
        return self.status.data_ptr() + (row * 2 + column) * 8

    def clear(self, row: int) -> None:
        self.status[row] = 0

    def stage(self, row: int, token: int, logprob: float, top: Optional[List[Tuple[float, int]]]) -> None:
        k = FIRST_TOKEN_TOP_K
        self.payload[row].zero_()
        self.payload[row, 0], self.payload[row, 1] = float(token), float(logprob)
        for i, (value, token_id) in enumerate((top or [])[:k]):
            self.payload[row, 2 + i], self.payload[row, 2 + k + i] = float(token_id), float(value)

    def read(self, row: int, top_n: int) -> Tuple[int, float, List[Tuple[float, int]]]:
        """(token, its logprob, top_n (logprob, token) pairs) as the prefill side wrote them."""
        k, values = FIRST_TOKEN_TOP_K, self.payload[row].tolist()
        top = [(values[2 + k + i], int(values[2 + i])) for i in range(min(top_n, k))]
        return int(values[0]), values[1], top


def room_tag(room: int) -> int:
    """A room as a status word: never 0 (a cleared row), fits int64."""
    return room % (1 << 62) + 1


class MooncakeEngine:
    """One TransferEngine per rank."""

    def __init__(self, hostname: str, ib_device: Optional[str]) -> None:
        try:
            from mooncake.engine import TransferEngine
        except ImportError as e:
            raise ImportError("prefill/decode disaggregation needs the mooncake-transfer-engine-non-cuda package "
                              "(or a CUDA build of it): pip install 'radixserve[pd]'") from e
        self.engine = TransferEngine()
        protocol = "rdma" if ib_device else "tcp"
        rc = self.engine.initialize(hostname, "P2PHANDSHAKE", protocol, ib_device or "")
        if rc != 0:
            raise RuntimeError(f"Mooncake transfer engine failed to start on {hostname} ({protocol}, code {rc})")
        self.session_id = f"{hostname}:{self.engine.get_rpc_port()}"

    def register(self, tensors: List[torch.Tensor]) -> None:
        if any(t.is_cuda for t in tensors) and _is_host_only_build():
            raise RuntimeError("the KV cache is in GPU memory, which the installed mooncake-transfer-engine-non-cuda "
                               "cannot read or write; install the CUDA build (pip install mooncake-transfer-engine)")
        for t in tensors:
            rc = self.engine.register_memory(t.data_ptr(), t.numel() * t.element_size())
            if rc != 0:
                raise RuntimeError(f"Mooncake could not register {t.numel() * t.element_size()} bytes (code {rc})")

    def write(self, session: str, srcs: List[int], dsts: List[int], lengths: List[int]) -> None:
        """Synchronous: the bytes are in the peer's memory when it returns."""
        if not srcs:
            return
        rc = self.engine.batch_transfer_sync_write(session, srcs, dsts, lengths)
        if rc != 0:
            raise TransferError(f"Mooncake write to {session} failed (code {rc})")


def _is_host_only_build() -> bool:
    """Only the -non-cuda wheel is installed (the CUDA one, mooncake-transfer-engine, is not)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> bool:
        try:
            version(name)
            return True
        except PackageNotFoundError:
            return False

    return installed("mooncake-transfer-engine-non-cuda") and not installed("mooncake-transfer-engine")
