"""The send/recv engine: moves planned data messages over a process group, bounded in time.

Both sides walk the same plan (see :mod:`plan`). Each message is posted asynchronously
(``pg.send``/``pg.recv`` return a Work) and finished later with ``work.wait(timeout)``, so
several messages are in flight: the sender packs bucket k+1 while bucket k is on the wire,
and the receiver unpacks bucket k while bucket k+1 arrives. Extra memory is a pool of at
most two reusable buffers (bucket or staging size), plus at most ``_DEPTH`` temporary
contiguous copies; large payloads go straight from and into tensor memory when it lives on
the wire device and is contiguous, and up to ``_DIRECT_DEPTH`` of those may be in flight.

Every wait is bounded by the timeout; a wait that fails or times out raises TransferError
or TransferTimeout naming the peer and the message. After that the process group must not
be reused: posted operations may still complete into their buffers.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from peer_recovery.transport._views import byte_view, checksum
from peer_recovery.transport.errors import IntegrityError, TransferError, TransferTimeout
from peer_recovery.transport.messages import Bucket, Chunk, Message, bucket_runs
from peer_recovery.transport.metadata import TensorSpec

__all__ = ["DATA_TAG", "Wire", "post", "recv_messages", "send_messages", "wait_work"]

DATA_TAG = 16  # message i uses tags DATA_TAG + 2i (data) and DATA_TAG + 2i + 1 (checksum)
_DEPTH = 3  # messages in flight while one holds a staging buffer or a temporary copy
# Messages straight from and into tensor memory hold nothing extra, so more may be in
# flight: measured on the model and large workloads in place, 32 instead of 3 is 7-10%
# faster (the sender's next message is posted before the previous one completes).
_DIRECT_DEPTH = 32
_BUFFERS = 2  # reusable bucket/staging buffers per transfer


@dataclass
class Wire:
    """What both directions need to talk to the peer."""

    pg: dist.ProcessGroup
    device: torch.device  # where wire buffers live: cuda for NCCL, else cpu
    timeout: timedelta
    integrity: bool
    progress: Callable[[int, int], None] | None = None
    done: int = 0
    total: int = 0
    wire_bytes: int = 0
    started: float = field(default_factory=time.perf_counter)

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.progress is not None:
            self.progress(self.done, self.total)


def _failure(exc: Exception, peer: int, stage: str, key: str | None) -> TransferError:
    text = str(exc)
    cls = TransferTimeout if "timed out" in text.lower() else TransferError
    return cls(
        f"{text} (the process group must not be reused)", peer=peer, stage=stage, key_path=key
    )


def post(wire: Wire, op: str, tensor: torch.Tensor, peer: int, tag: int, stage: str) -> Any:
    """Post ``pg.send`` or ``pg.recv``; a broken connection is a TransferError here too."""
    try:
        return getattr(wire.pg, op)([tensor], peer, tag)
    except Exception as exc:
        raise _failure(exc, peer, stage, None) from exc


def wait_work(work: Any, wire: Wire, peer: int, stage: str, key: str | None = None) -> None:
    """Wait for one Work within the timeout, turning failures into transport errors."""
    try:
        finished = work.wait(wire.timeout)
    except Exception as exc:
        raise _failure(exc, peer, stage, key) from exc
    if finished is False:
        raise TransferTimeout(
            f"no completion within {wire.timeout}", peer=peer, stage=stage, key_path=key
        )


class _Pool:
    """At most ``count`` reusable uint8 buffers of ``nbytes``, allocated on first use."""

    def __init__(self, count: int, nbytes: int, device: torch.device, pin: bool) -> None:
        self._free: list[torch.Tensor] = []
        self._left = count
        self._nbytes, self._device, self._pin = nbytes, device, pin

    def acquire(self) -> torch.Tensor | None:
        if self._free:
            return self._free.pop()
        if self._left == 0:
            return None
        self._left -= 1
        return torch.empty(
            self._nbytes, dtype=torch.uint8, device=self._device, pin_memory=self._pin
        )

    def release(self, buf: torch.Tensor) -> None:
        self._free.append(buf)


def _pool_for(
    plan: Sequence[Message],
    staged: Callable[[int, Message], bool],
    wire: Wire,
    tensors: Sequence[torch.Tensor],
) -> _Pool:
    """Two buffers of the largest message that goes through one; pinned for GPU memory."""
    size = max((m.nbytes for i, m in enumerate(plan) if staged(i, m)), default=0)
    pin = (
        wire.device.type == "cpu"
        and torch.cuda.is_initialized()  # no CUDA tensor can exist otherwise
        and any(t.device.type == "cuda" for t in tensors)
    )
    return _Pool(_BUFFERS, size, wire.device, pin)


@dataclass
class _Flight:
    index: int
    message: Message
    works: list[tuple[Any, int]]  # (work, peer)
    data: torch.Tensor
    buf: torch.Tensor | None = None
    crc: torch.Tensor | None = None
    land: torch.Tensor | None = None  # receiver: where staged chunk bytes go


def _stage(i: int, n: int, m: Message) -> str:
    kind = f"bucket of {len(m.entries)} tensors" if isinstance(m, Bucket) else "chunk"
    return f"data message {i + 1}/{n} ({kind})"


def _message_keys(m: Message, name: Callable[[int], str]) -> str:
    if isinstance(m, Chunk):
        return name(m.index)
    first, last = name(m.entries[0][0]), name(m.entries[-1][0])
    return first if first == last else f"{first}..{last}"


def _wait_all(f: _Flight, wire: Wire, n: int, name: Callable[[int], str]) -> None:
    """Wait for a message's works; errors name the message's key paths (rendered lazily)."""
    for work, peer in f.works:
        try:
            wait_work(work, wire, peer, _stage(f.index, n, f.message))
        except TransferError as exc:
            raise type(exc)(
                exc.detail, peer=exc.peer, stage=exc.stage, key_path=_message_keys(f.message, name)
            ) from exc.__cause__


def _drain_until(inflight: deque[_Flight], finish: Callable[[_Flight], None], depth: int) -> None:
    while len(inflight) > depth:
        finish(inflight.popleft())


def _acquire(
    pool: _Pool, inflight: deque[_Flight], finish: Callable[[_Flight], None]
) -> torch.Tensor:
    buf = pool.acquire()
    while buf is None:
        finish(inflight.popleft())
        buf = pool.acquire()
    return buf


def _pack(
    data: torch.Tensor,
    m: Bucket,
    dtypes: Sequence[torch.dtype],
    specs: Sequence[TensorSpec],
    sources: Sequence[torch.Tensor],
) -> None:
    """Copy a bucket's payloads into ``data``: one ``torch.cat`` per run of one dtype.

    ``cat`` of 1-D inputs into a typed view of the run is a tight copy loop in C++ (per
    tensor it costs a tenth of a ``copy_``); only n-D sources need a flattening view here.
    Sources on another device than ``data`` (GPU state, CPU wire) take one batched copy.
    """
    with torch.no_grad():
        for run in bucket_runs(m, dtypes):
            srcs = [sources[i] for i in run.indices]
            out = data[run.start : run.end].view(run.key)  # type: ignore[arg-type]
            if torch.cuda.is_initialized() and any(s.device != out.device for s in srcs):
                torch._foreach_copy_(_shaped(out, run.indices, specs), srcs)
                continue
            flat = [
                t if len(specs[i].shape) == 1 else t.reshape(-1)
                for i, t in zip(run.indices, srcs, strict=True)
            ]
            torch.cat(flat, out=out)


def _unpack(
    data: torch.Tensor,
    m: Bucket,
    dtypes: Sequence[torch.dtype],
    specs: Sequence[TensorSpec],
    dests: Sequence[torch.Tensor],
) -> None:
    """Copy a received bucket into its destinations: one batched copy per run of one dtype."""
    with torch.no_grad():
        for run in bucket_runs(m, dtypes):
            targets = [dests[i] for i in run.indices]
            src = data[run.start : run.end].view(run.key)  # type: ignore[arg-type]
            if targets[0].device != src.device:  # e.g. GPU targets, CPU wire: one transfer
                src = src.to(targets[0].device)
            torch._foreach_copy_(targets, _shaped(src, run.indices, specs))


def _shaped(
    run: torch.Tensor, indices: list[int], specs: Sequence[TensorSpec]
) -> list[torch.Tensor]:
    """Views of a typed run cut into its payloads' shapes (``split`` in C++, then 1 view
    per n-D payload: 1-D payloads, the common case, cost no Python call)."""
    pieces = run.split([specs[i].nbytes // run.element_size() for i in indices])
    return [
        p if len(specs[i].shape) == 1 else p.view(specs[i].shape)
        for i, p in zip(indices, pieces, strict=True)
    ]


def send_messages(
    wire: Wire,
    dsts: Sequence[int],
    payloads: Sequence[torch.Tensor],
    specs: Sequence[TensorSpec],
    plan: Sequence[Message],
    name: Callable[[int], str],
) -> None:
    """Send every planned message to every destination."""
    dtypes = [s.dtype for s in specs]

    def staged(i: int, m: Message) -> bool:
        return isinstance(m, Bucket) or payloads[m.index].device != wire.device

    pool = _pool_for(plan, staged, wire, payloads)
    inflight: deque[_Flight] = deque()
    contiguous: dict[int, tuple[torch.Tensor, bool]] = {}  # payload -> (source, is a copy)

    def finish(f: _Flight) -> None:
        _wait_all(f, wire, len(plan), name)
        if f.buf is not None:
            pool.release(f.buf)
        wire.advance(f.message.payload_bytes)

    for i, m in enumerate(plan):
        buf, copied = None, False
        if isinstance(m, Bucket):
            buf = _acquire(pool, inflight, finish)
            data = buf[: m.nbytes]
            _pack(data, m, dtypes, specs, payloads)
        else:
            if m.index not in contiguous:
                payload = payloads[m.index]
                contiguous[m.index] = (payload.detach().contiguous(), not payload.is_contiguous())
            src, copied = contiguous[m.index]
            data = byte_view(src)[m.start : m.end]
            if m.end == src.numel() * src.element_size():
                del contiguous[m.index]  # in-flight records keep it alive until sent
            if data.device != wire.device:
                buf = _acquire(pool, inflight, finish)
                buf[: m.nbytes].copy_(data)
                data = buf[: m.nbytes]
        flight = _Flight(i, m, [], data, buf)
        tag = DATA_TAG + 2 * i
        if wire.integrity:
            flight.crc = torch.tensor([checksum(data)], dtype=torch.int64, device=wire.device)
        stage = _stage(i, len(plan), m)
        for dst in dsts:
            flight.works.append((post(wire, "send", data, dst, tag, stage), dst))
            if flight.crc is not None:
                flight.works.append((post(wire, "send", flight.crc, dst, tag + 1, stage), dst))
            wire.wire_bytes += m.nbytes + (8 if flight.crc is not None else 0)
        inflight.append(flight)
        _drain_until(inflight, finish, _DEPTH if buf is not None or copied else _DIRECT_DEPTH)
    _drain_until(inflight, finish, 0)


def recv_messages(
    wire: Wire,
    src: int,
    specs: Sequence[TensorSpec],
    dests: Sequence[torch.Tensor],
    plan: Sequence[Message],
    name: Callable[[int], str],
    direct: Mapping[int, torch.Tensor] | None = None,
) -> None:
    """Receive every planned message from ``src`` into ``dests`` (one per payload).

    ``direct`` maps the position of a bucket in ``plan`` to a buffer of its size that its
    destinations are views of (fresh tensors): that bucket is received straight into it
    (or staged and copied in whole, when the buffer is not on the wire device), never
    unpacked.
    """
    direct = direct or {}
    dtypes = [s.dtype for s in specs]
    landing: dict[int, torch.Tensor] = {}

    def land_of(idx: int) -> torch.Tensor:
        land = landing.get(idx)
        if land is None:
            dest = dests[idx]
            land = (
                dest
                if dest.is_contiguous()
                else torch.empty_like(dest, memory_format=torch.contiguous_format)
            )
            landing[idx] = land
        return land

    def staged(i: int, m: Message) -> bool:
        if isinstance(m, Chunk):
            return dests[m.index].device != wire.device
        return i not in direct or direct[i].device != wire.device

    pool = _pool_for(plan, staged, wire, dests)
    inflight: deque[_Flight] = deque()

    def finish(f: _Flight) -> None:
        m = f.message
        _wait_all(f, wire, len(plan), name)
        if f.crc is not None and int(f.crc.item()) != checksum(f.data):
            raise IntegrityError(
                "checksum mismatch",
                peer=src,
                stage=_stage(f.index, len(plan), m),
                key_path=_message_keys(m, name),
            )
        with torch.no_grad():
            if f.land is not None:
                f.land.copy_(f.data)
            if isinstance(m, Bucket):
                if f.index not in direct:
                    _unpack(f.data, m, dtypes, specs, dests)
            elif m.end == specs[m.index].nbytes:
                land = landing.pop(m.index)
                if land is not dests[m.index]:
                    dests[m.index].copy_(land)
        if f.buf is not None:
            pool.release(f.buf)
        wire.advance(m.payload_bytes)

    for i, m in enumerate(plan):
        buf = land = None
        if isinstance(m, Bucket) and i not in direct:
            buf = _acquire(pool, inflight, finish)
            data = buf[: m.nbytes]
        else:
            if isinstance(m, Bucket):
                target = direct[i]
            else:
                target = byte_view(land_of(m.index))[m.start : m.end]
            if target.device == wire.device:
                data = target
            else:
                buf = _acquire(pool, inflight, finish)
                data, land = buf[: m.nbytes], target
        flight = _Flight(i, m, [], data, buf, land=land)
        tag = DATA_TAG + 2 * i
        stage = _stage(i, len(plan), m)
        flight.works.append((post(wire, "recv", data, src, tag, stage), src))
        if wire.integrity:
            flight.crc = torch.zeros(1, dtype=torch.int64, device=wire.device)
            flight.works.append((post(wire, "recv", flight.crc, src, tag + 1, stage), src))
        wire.wire_bytes += m.nbytes
        inflight.append(flight)
        extra = buf is not None or (isinstance(m, Chunk) and landing[m.index] is not dests[m.index])
        _drain_until(inflight, finish, _DEPTH if extra else _DIRECT_DEPTH)
    _drain_until(inflight, finish, 0)
