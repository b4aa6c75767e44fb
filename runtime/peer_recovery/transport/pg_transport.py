"""PGTransport: a drop-in for ``torch.distributed.checkpoint._pg_transport.PGTransport``.

A transfer is: header (fixed 64 bytes) and metadata (tagged JSON) from the sender to each
destination; one acknowledgement back from each destination (so a refused step or
unacceptable metadata fails the sender too, and before any data moves); then the planned
data messages (buckets of small tensors, chunks of large ones; see :mod:`plan`).

Deliberate differences from PyTorch's transport (same values, dtypes, shapes, container
types and keys otherwise):

- Metadata is tagged JSON, never pickle. Leaves may be None, bool, int, float (inf/nan
  kept), str, bytes, torch.dtype, torch.device, tensors, DTensor, ShardedTensor, and
  dict / OrderedDict / list / tuple / torch.Size of these; anything else (namedtuples,
  numpy scalars, arbitrary objects) is refused at the sender with MetadataError.
- A view sends only the elements it covers; received tensors are contiguous (upstream
  keeps the sender's strides and storage offset, sending the whole storage).
- ``nn.Parameter`` leaves work and come back as parameters (upstream raises).
- A ``torch.Size`` leaf comes back as ``torch.Size`` (upstream's pytree returns a tuple).
- In-place targets must match dtype and shape exactly; in-place leaves are returned as the
  receiver's own objects (same ``data_ptr``). ShardedTensor can be received in place.
- Fresh (not in place) tensors come back on the transport's device (upstream copies them
  to the CPU). Fresh tensors of at most ``small_bytes`` are views into a shared bucket
  buffer (received into it, no copy): values and bytes are independent of their
  neighbours, but ``untyped_storage()`` is the bucket's and ``torch.save`` of one such
  tensor alone writes the whole bucket (``.clone()`` it to own its storage). DTensors are rebuilt on the receiver's own process groups with the
  receiver's coordinate, ShardedTensors with the receiver taking over the sender's shards.
- Every wait is bounded by ``timeout`` (a peer that stalls that long, or dies, raises
  TransferTimeout or TransferError). **After any failure the process group must not be
  reused**: posted operations may still land. Destroy it and make a new one.
- With ``integrity=True`` each data message carries a CRC32 that the receiver verifies
  (IntegrityError). Bytes of large tensors received in place land before their check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from peer_recovery._gc import gc_paused
from peer_recovery.transport.describe import (
    describe_state,
    index_targets,
    map_leaves,
)
from peer_recovery.transport.dist_tensors import rebuild_dtensor, rebuild_sharded
from peer_recovery.transport.engine import Wire, post, recv_messages, send_messages, wait_work
from peer_recovery.transport.errors import (
    IntegrityError,
    MetadataError,
    StepMismatchError,
    TransferError,
)
from peer_recovery.transport.header import (
    HEADER_BYTES,
    Header,
    Limits,
    metadata_crc,
    pack_header,
    unpack_header,
)
from peer_recovery.transport.messages import Bucket, Message, bucket_runs, plan_messages
from peer_recovery.transport.metadata import (
    Metadata,
    TensorLeaf,
    TensorSpec,
    decode_metadata,
    encode_metadata,
    keystr,
)
from peer_recovery.transport.torch_compat import ShardedTensor, local_tensor

__all__ = ["DEFAULT_INTEGRITY", "PGTransport", "TransferStats"]

# Off by default: benchmarks/transport.py measures the cost above 10% (docs/transport.md).
DEFAULT_INTEGRITY = False
_TAG_HEADER, _TAG_META, _TAG_ACK = 1, 2, 3
_IN_PLACE_TYPES: dict[str, tuple[type, ...]] = {
    "T": (torch.Tensor, torch.nn.Parameter),
    "D": (DTensor,),
    "S": (ShardedTensor,),
}
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_ACK_CODES: dict[type[TransferError], int] = {
    StepMismatchError: 1,
    MetadataError: 2,
    IntegrityError: 3,
}


class _Target(NamedTuple):
    """A receiver's leaf that can take a payload in place; for plain tensors, its dtype and
    shape are read up front (tensor attribute reads cost ~0.5 us each from Python)."""

    obj: Any
    dtype: torch.dtype | None
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class TransferStats:
    """What the last transfer moved. ``bytes`` counts every destination (sender side)."""

    bytes: int
    payload_bytes: int
    tensors: int
    messages: int
    seconds: float

    @property
    def throughput(self) -> float:
        """Bytes on the wire per second."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def _wire_device(pg: dist.ProcessGroup, device: torch.device) -> torch.device:
    if device.type != "cuda":
        return torch.device("cpu")
    try:
        backend = str(dist.get_backend(pg))
    except (RuntimeError, ValueError):
        backend = pg.name()
    return device if "nccl" in backend.lower() else torch.device("cpu")


class PGTransport:
    """Streams a state dict from one rank to others over a process group (see module doc).

    Args:
        pg: the process group; ranks passed to send/recv are ranks in this group.
        timeout: bound on every wait (``timedelta`` or seconds).
        device: where fresh received tensors are put.
        state_dict: optional callable returning the receiver's state dict; tensors found at
            the same key path are received in place. Called once per receive, before the
            header arrives (its targets are indexed while the sender describes its state).
        integrity: per-message CRC32 checks (default ``DEFAULT_INTEGRITY``).
        progress: optional ``progress(bytes_done, bytes_total)`` callback.
        limits: caps on what a sender may announce (see ``header.Limits``).
    """

    def __init__(
        self,
        pg: dist.ProcessGroup,
        timeout: timedelta | float,
        device: torch.device | str,
        state_dict: Callable[[], object] | None = None,
        *,
        integrity: bool | None = None,
        progress: Callable[[int, int], None] | None = None,
        limits: Limits | None = None,
        bucket_bytes: int = 16 << 20,
        chunk_bytes: int = 32 << 20,
        small_bytes: int = 256 << 10,
    ) -> None:
        self._pg = pg
        self._timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=timeout)
        self._device = torch.device(device)
        self._state_dict = state_dict
        self._integrity = DEFAULT_INTEGRITY if integrity is None else integrity
        self._progress = progress
        self._limits = limits or Limits()
        if bucket_bytes % 16 or chunk_bytes % 16 or not 0 <= small_bytes <= bucket_bytes:
            raise ValueError("bucket/chunk sizes must be multiples of 16, small <= bucket")
        self._sizes = (bucket_bytes, chunk_bytes, small_bytes)
        self.stats: TransferStats | None = None

    def _wire(self) -> Wire:
        wire_device = _wire_device(self._pg, self._device)
        return Wire(self._pg, wire_device, self._timeout, self._integrity, self._progress)

    def _send_bytes(self, wire: Wire, raw: bytes, dst: int, tag: int) -> tuple[Any, torch.Tensor]:
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(wire.device)
        wire.wire_bytes += len(raw)
        return wire.pg.send([t], dst, tag), t

    def send_checkpoint(
        self, dst_ranks: Sequence[int], state_dict: object, *, step: int | None = None
    ) -> None:
        """Send ``state_dict`` to every rank in ``dst_ranks``; ``step`` is checked there."""
        if step is not None and type(step) is not int:
            raise TypeError(f"step must be an int or None, not {type(step).__name__}")
        with gc_paused():
            self._send(list(dst_ranks), state_dict, step)

    def _send(self, dst_ranks: list[int], state_dict: object, step: int | None) -> None:
        described = describe_state(state_dict, self._limits.max_depth)
        wire = self._wire()
        specs = described.specs
        bucket, chunk, small = self._sizes
        try:
            raw = encode_metadata(described.tree, specs, bucket=bucket, chunk=chunk, small=small)
        except (ValueError, TypeError) as exc:
            raise MetadataError(f"state cannot be encoded: {exc}", stage="encode") from None
        header = pack_header(Header(step, self._integrity, len(raw), metadata_crc(raw)))
        keep, acks = [], []
        for dst in dst_ranks:
            keep.append((*self._send_bytes(wire, header, dst, _TAG_HEADER), dst, "header"))
            keep.append((*self._send_bytes(wire, raw, dst, _TAG_META), dst, "metadata"))
            ack = torch.zeros(3, dtype=torch.int64, device=wire.device)
            acks.append((wire.pg.recv([ack], dst, _TAG_ACK), ack, dst))
        plan = _plan(specs, bucket, chunk, small)  # while the receivers decode
        for work, _, dst, stage in keep:
            wait_work(work, wire, dst, stage)
        for work, ack, dst in acks:
            wait_work(work, wire, dst, "acknowledgement")
            self._check_ack(ack.tolist(), dst, step)
        wire.total = sum(s.nbytes for s in specs)
        send_messages(wire, dst_ranks, described.payloads, specs, plan, described.name)
        self._finish(wire, len(specs), len(plan))

    @staticmethod
    def _check_ack(ack: list[int], dst: int, step: int | None) -> None:
        code, has_step, their_step = ack
        if code == 0:
            return
        theirs = their_step if has_step else None
        cls = next((c for c, n in _ACK_CODES.items() if n == code), TransferError)
        reason = {
            StepMismatchError: f"step mismatch: sent step {step}, receiver wants {theirs}",
            MetadataError: "receiver refused the metadata (its error says why)",
            IntegrityError: "receiver found the metadata corrupt",
        }.get(cls, f"receiver refused with code {code}")
        raise cls(reason, peer=dst, stage="acknowledgement")

    def _finish(self, wire: Wire, tensors: int, messages: int) -> None:
        seconds = time.perf_counter() - wire.started
        self.stats = TransferStats(wire.wire_bytes, wire.total, tensors, messages, seconds)

    def _recv_bytes(
        self, wire: Wire, nbytes: int, src: int, tag: int, stage: str
    ) -> Callable[[], bytes]:
        """Post a receive of ``nbytes``; the returned function waits for them."""
        t = torch.empty(nbytes, dtype=torch.uint8, device=wire.device)
        work = post(wire, "recv", t, src, tag, stage)

        def bytes_received() -> bytes:
            wait_work(work, wire, src, stage)
            wire.wire_bytes += nbytes
            return t.cpu().numpy().tobytes()

        return bytes_received

    def recv_checkpoint(self, src_rank: int, *, step: int | None = None) -> object:
        """Receive a state dict from ``src_rank``; with ``step``, refuse any other step."""
        with gc_paused():
            return self._recv(src_rank, step)

    def _recv(self, src_rank: int, step: int | None) -> object:
        wire = self._wire()
        first = self._recv_bytes(wire, HEADER_BYTES, src_rank, _TAG_HEADER, "header")
        # Index the in-place targets while the sender is still describing its state.
        targets = self._target_table() if self._state_dict else {}
        try:
            header = unpack_header(first(), self._limits)
            raw = self._recv_bytes(wire, header.metadata_bytes, src_rank, _TAG_META, "metadata")()
            meta = decode_metadata(raw, header, self._limits, targets)
            if step is not None and header.step != step:
                raise StepMismatchError(
                    f"sender is at step {header.step}, receiver wants step {step}",
                    stage="step check",
                )
            if self._integrity and not header.integrity:
                raise MetadataError(
                    "receiver requires integrity checks; sender did not enable them"
                )
            plan = _plan(meta.tensors, meta.bucket_bytes, meta.chunk_bytes, meta.small_bytes)
            dests, direct, result = self._prepare(meta, plan)
        except (MetadataError, StepMismatchError, IntegrityError) as exc:
            self._ack(wire, src_rank, _ACK_CODES[type(exc)], step, best_effort=True)
            raise exc.with_context(peer=src_rank, stage="metadata") from None
        self._ack(wire, src_rank, 0, step, best_effort=False)
        wire.integrity = header.integrity
        wire.total = sum(s.nbytes for s in meta.tensors)
        recv_messages(wire, src_rank, meta.tensors, dests, plan, _payload_names(meta), direct)
        self._finish(wire, len(meta.tensors), len(plan))
        return result

    def _ack(self, wire: Wire, src: int, code: int, step: int | None, *, best_effort: bool) -> None:
        ack = torch.tensor([code, step is not None, step or 0], dtype=torch.int64)
        try:
            wait_work(
                wire.pg.send([ack.to(wire.device)], src, _TAG_ACK), wire, src, "acknowledgement"
            )
        except TransferError:
            if not best_effort:
                raise

    def _prepare(
        self, meta: Metadata, plan: list[Message]
    ) -> tuple[list[torch.Tensor], dict[int, torch.Tensor], object]:
        """Choose a destination per payload and build the result around them, before data.

        Returns the destinations (one per payload), the fresh bucket buffers by position in
        ``plan`` (see ``_fresh_buckets``) and the result tree.
        """
        in_place = frozenset(
            i for leaf in meta.leaves if leaf.target is not None for i in leaf.indices
        )
        dests: list[torch.Tensor | None] = [None] * len(meta.tensors)
        direct = self._fresh_buckets(meta, plan, in_place, dests)

        def fresh(i: int) -> torch.Tensor:
            view = dests[i]
            if view is not None:  # a view into a fresh bucket buffer
                return view
            dests[i] = self._allocate(meta.tensors[i].shape, meta.tensors[i].dtype)
            return dests[i]

        def inplace(
            i: int, target: torch.Tensor, where: tuple[Any, ...] | str, known: _Target | None = None
        ) -> None:
            spec = meta.tensors[i]
            dtype, shape = (known.dtype, known.shape) if known else (target.dtype, target.shape)
            if dtype is not spec.dtype or shape != spec.shape:
                raise MetadataError(
                    f"sender announces {spec.dtype} {list(spec.shape)}, in-place target is "
                    f"{dtype} {list(shape)}",  # type: ignore[arg-type]
                    key_path=where if isinstance(where, str) else keystr(where),
                )
            dests[i] = target

        def build(path: tuple[Any, ...], leaf: TensorLeaf) -> object:
            known: _Target | None = leaf.target
            target = known.obj if known is not None else None
            usable = target is not None
            if usable and type(target) not in _IN_PLACE_TYPES[leaf.kind]:
                raise MetadataError(
                    f"sender has a {leaf.kind} leaf, in-place target is {type(target).__name__}",
                    key_path=keystr(path),
                )
            if leaf.kind == "T":
                if usable:
                    plain = known.dtype is not None  # dtype and shape were read up front
                    inplace(leaf.indices[0], target, path, known if plain else None)
                    return target
                t = fresh(leaf.indices[0])
                return torch.nn.Parameter(t, requires_grad=leaf.extra == 2) if leaf.extra else t
            where = keystr(path)
            if leaf.kind == "D":
                if usable:
                    if list(target.shape) != leaf.extra.get("shape"):
                        raise MetadataError("DTensor global shape differs", key_path=where)
                    inplace(leaf.indices[0], local_tensor(target), where)
                    return target
                return rebuild_dtensor(fresh(leaf.indices[0]), leaf.extra, where)
            if usable:
                shards = target.local_shards()
                if len(shards) != len(leaf.indices):
                    raise MetadataError("ShardedTensor local shard count differs", key_path=where)
                for i, shard in zip(leaf.indices, shards, strict=True):
                    inplace(i, shard.tensor, where)
                return target
            return rebuild_sharded([fresh(i) for i in leaf.indices], leaf.extra, where)

        result = map_leaves(meta.tree, build)
        return dests, direct, result  # type: ignore[return-value]

    def _usable(self, target: object) -> bool:
        """Whether a receiver's leaf can take a payload in place (else the payload is fresh)."""
        if not isinstance(target, torch.Tensor):
            return False
        kind = self._device.type
        if type(target) in _PLAIN:  # without building a torch.device per leaf
            if kind == "cpu":
                return target.is_cpu
            if kind == "cuda":
                return target.is_cuda
        return target.device.type == kind

    def _target_table(self) -> dict[Any, _Target]:
        """The receiver's leaves that can take a payload in place, by key path."""
        table: dict[Any, _Target] = {}
        for path, leaf in index_targets(self._state_dict()).items():  # type: ignore[misc]
            if self._usable(leaf):
                plain = type(leaf) in _PLAIN
                table[path] = _Target(
                    leaf, leaf.dtype if plain else None, tuple(leaf.shape) if plain else None
                )
        return table

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        try:
            return torch.empty(shape, dtype=dtype, device=self._device)
        except (RuntimeError, MemoryError) as exc:  # out of memory: refuse, do not hang
            nbytes = math.prod(shape) * dtype.itemsize
            raise MetadataError(f"cannot allocate {nbytes} bytes: {exc}") from None

    def _fresh_buckets(
        self,
        meta: Metadata,
        plan: list[Message],
        in_place: frozenset[int],
        dests: list[torch.Tensor | None],
    ) -> dict[int, torch.Tensor]:
        """Give each bucket of only fresh payloads its own buffer; its tensors are views.

        The bucket is then received straight into that buffer: no unpacking copy and one
        allocation per bucket instead of one per tensor. The views keep the buffer alive,
        so fresh memory is exactly the payload plus alignment padding (docs/transport.md).
        """
        specs, direct = meta.tensors, {}
        dtypes = [s.dtype for s in specs]
        for position, m in enumerate(plan):
            if not isinstance(m, Bucket):
                continue
            if in_place and any(i in in_place for i, _, _ in m.entries):
                continue  # mixed: received into a pool buffer and unpacked
            buf = self._allocate((m.nbytes,), torch.uint8)
            direct[position] = buf
            for run in bucket_runs(m, dtypes):
                size = run.key.itemsize  # type: ignore[attr-defined]
                typed = buf[run.start : run.end].view(run.key)
                pieces = typed.split([specs[i].nbytes // size for i in run.indices])
                for i, piece in zip(run.indices, pieces, strict=True):
                    shape = specs[i].shape
                    dests[i] = piece if len(shape) == 1 else piece.view(shape)
        return direct


def _plan(specs: list[TensorSpec], bucket: int, chunk: int, small: int) -> list[Message]:
    """The data messages, computed alike on both sides; bucket entries aligned to dtype."""
    sizes = [s.nbytes for s in specs]
    aligns = [s.dtype.itemsize for s in specs]
    return plan_messages(sizes, bucket=bucket, chunk=chunk, small=small, aligns=aligns)


def _payload_names(meta: Metadata) -> Callable[[int], str]:
    """Lazily render the key path of a payload (only errors need it)."""

    def name(index: int) -> str:
        for leaf in meta.leaves:
            if index in leaf.indices:
                j = leaf.indices.index(index)
                return keystr(leaf.path) + (f"<shard {j}>" if leaf.kind == "S" else "")
        return f"<payload {index}>"

    return name
