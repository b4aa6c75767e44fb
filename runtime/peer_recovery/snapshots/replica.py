"""Slot replication: a rejoining rank copies a holder's committed slot into its own store.

The holder's state already lies flat in a committed slot (``snapshots.store``), so instead of
rebuilding it leaf by leaf in live tensors, the receiver fetches the slot's bytes in large
messages straight into its own mapped slot file, checks each chunk against the manifest's
CRC-32 as it lands, commits the manifest last, and then restores locally like every other
rank. It ends holding a snapshot, so the shard's redundancy is back at once.

Wire protocol, on a gloo process group (group ranks; every message a tensor):
1. holder -> receiver: the manifest's length (int64[1], tag ``HEADER_LEN_TAG``), then its
   bytes (uint8, ``HEADER_TAG``): JSON, decoded and validated like a manifest read from
   disk, never unpickled.
2. receiver -> holder: requests (int64[2] = ``[op, chunk]``, tag ``REQUEST_TAG + n`` for the
   holder's n-th request); ``op`` is ``FETCH`` or ``DONE``.
3. holder -> receiver: the chunk's bytes from its mapped slot (tag ``DATA_TAG + chunk``),
   into the same byte range of the receiver's slot.

Striping: several holders of the same shard at the same step, whose manifests agree on
layout and checksums, each serve chunks from one work queue (``snapshots.stripes``); a
holder that dies, times out or sends a chunk failing its checksum is dropped and its
chunks are fetched from the others. Only when none is left does the transfer fail.

Invariants:
- The receiving slot loses its manifest before any byte lands (``SnapshotStore.open_slot``)
  and gets the new one only after every chunk passed its checksum, so an interrupted
  transfer leaves no snapshot behind; live tensors are never touched here.
- The holder only reads its slot; the caller keeps that slot unchanged until ``serve``
  returns. Requests are checked against the holder's manifest (bad chunk numbers refused).
- The receiver's manifest is the holder's with its own slot and rank, and without the
  holder's rank-private section (those bytes are someone else's, never loaded).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import torch

from peer_recovery.snapshots.checksum import crc32
from peer_recovery.snapshots.manifest import Manifest, ManifestError
from peer_recovery.snapshots.store import SnapshotStore
from peer_recovery.snapshots.stripes import Range, StripePlan

__all__ = ["ReplicaError", "Replicated", "receive_slot", "same_snapshot", "serve_slot"]

HEADER_LEN_TAG: Final = 4
HEADER_TAG: Final = 5
REQUEST_TAG: Final = 1 << 16  # + the request's number at that holder
DATA_TAG: Final = 1 << 24  # + the chunk's index (>= the transport's data tags, too)
FETCH: Final = 1
DONE: Final = 0
WINDOW: Final = 2  # chunks in flight per holder: one lands while the next is on the wire
MAX_HEADER_BYTES: Final = 256 << 20


class ReplicaError(RuntimeError):
    """A slot transfer failed; says with whom and at which stage."""

    def __init__(self, peer: int | None, stage: str, detail: str) -> None:
        who = "" if peer is None else f"group rank {peer}: "
        super().__init__(f"slot replication: {who}{stage}: {detail}")
        self.peer, self.stage = peer, stage


@dataclass(frozen=True)
class Replicated:
    """A received slot: its manifest, who sent how much, and phase times. Committed (its
    manifest installed) unless ``receive_slot`` was told to leave that to the caller
    (``commit=False``), who then installs ``manifest``."""

    manifest: Manifest
    bytes_by_source: dict[int, int]
    lost: dict[int, str]  # sources dropped on the way, and why
    header_seconds: float
    data_seconds: float
    commit_seconds: float
    prepared: Any = None  # what ``overlap`` returned


def same_snapshot(a: Manifest, b: Manifest) -> str | None:
    """None when two holders' manifests describe the same replicated bytes (same step,
    shard, layout, and checksums of every chunk that holds only replicated bytes), else what
    differs. Chunks holding rank-private bytes differ between replicas by design. Pure."""
    for field in ("step", "shard_key", "data_bytes", "chunk_bytes", "replicated"):
        if getattr(a, field) != getattr(b, field):
            return f"{field} differs"
    shared = _replicated_chunks(a)
    if a.checksums[:shared] != b.checksums[:shared]:
        return "checksums of the replicated state differ"
    return None


def _replicated_chunks(manifest: Manifest) -> int:
    """How many leading chunks hold replicated bytes only."""
    private = manifest.private.tensors if manifest.private else ()
    start = min((t.offset for t in private), default=manifest.data_bytes)
    return min(start // manifest.chunk_bytes, len(manifest.checksums))


def serve_slot(pg: Any, peer: int, store: SnapshotStore, manifest: Manifest) -> int:
    """Serve ``manifest``'s slot to group rank ``peer`` until it says done; return the bytes
    sent. Raises ``ReplicaError`` on a failed message or a bad request."""
    try:
        return _serve(pg, peer, store, manifest)
    except ReplicaError:
        raise
    except Exception as error:  # a message could not even be posted: the peer is gone
        raise ReplicaError(
            peer, "serve", f"{type(error).__name__}: {error}".splitlines()[0]
        ) from error


def _serve(pg: Any, peer: int, store: SnapshotStore, manifest: Manifest) -> int:
    try:  # the committed manifest as written: no need to encode it again
        header = store.manifest_path(manifest.slot).read_bytes()
    except FileNotFoundError:
        raise ReplicaError(peer, "header", f"slot {manifest.slot} has no manifest") from None
    buf = store.mapped(manifest.slot)
    ranges = StripePlan(manifest.data_bytes, manifest.chunk_bytes, [peer]).ranges
    _wait(
        pg.send([torch.tensor([len(header)], dtype=torch.int64)], peer, HEADER_LEN_TAG),
        peer,
        "header",
    )
    _wait(
        pg.send([torch.frombuffer(bytearray(header), dtype=torch.uint8)], peer, HEADER_TAG),
        peer,
        "header",
    )
    sent, seq = 0, 0
    request = torch.empty(2, dtype=torch.int64)
    pending = pg.recv([request], peer, REQUEST_TAG)
    inflight: deque[Any] = deque()
    while True:
        _wait(pending, peer, "request")
        op, index = request.tolist()
        if op == DONE:
            break
        if op != FETCH or not 0 <= index < len(ranges):
            raise ReplicaError(
                peer, "request", f"bad request [{op}, {index}] ({len(ranges)} chunks)"
            )
        chunk = ranges[index]
        inflight.append(
            pg.send([buf[chunk.offset : chunk.offset + chunk.length]], peer, DATA_TAG + index)
        )
        sent += chunk.length
        seq += 1
        request = torch.empty(2, dtype=torch.int64)
        pending = pg.recv([request], peer, REQUEST_TAG + seq)
        while len(inflight) > WINDOW:
            _wait(inflight.popleft(), peer, "data")
    while inflight:
        _wait(inflight.popleft(), peer, "data")
    return sent


def receive_slot(
    pg: Any,
    sources: Sequence[int],
    store: SnapshotStore,
    accept: Callable[[Manifest], str | None],
    overlap: Callable[[Manifest], Any] | None = None,
    *,
    commit: bool = True,
) -> Replicated:
    """Fetch a slot from ``sources`` (group ranks holding the same snapshot) into ``store``
    and commit it. ``accept`` checks the first holder's manifest before any byte moves (the
    step, the shard key) and returns why it is refused, or None. ``overlap`` runs on the
    calling thread while the bytes are on the wire (e.g. checking the live state against
    the layout); its result is returned as ``Replicated.prepared``. ``commit=False``
    leaves the slot without a manifest (not a snapshot yet) for the caller to install later,
    off its critical path: a restore installs it once the job voted to resume.

    Raises ``ReplicaError`` when no holder is left or the snapshot is refused; the store
    then holds no new snapshot.
    """
    if not sources:
        raise ReplicaError(None, "plan", "no source to receive from")
    started = time.perf_counter()
    requests: dict[int, int] = dict.fromkeys(sources, 0)  # requests sent per source
    manifests, lost = _headers(pg, sources)
    reference = next(iter(manifests.values()), None)
    done: set[int] = set()
    try:
        if reference is None:
            raise ReplicaError(None, "header", _lost_line(lost))
        refused = accept(reference)
        if refused is not None:
            raise ReplicaError(None, "refused", refused)
        for source, manifest in list(manifests.items()):
            why = same_snapshot(reference, manifest)
            if why is not None:  # another snapshot: not one to stripe over
                lost[source] = f"holds another snapshot ({why})"
                del manifests[source]
                _say_done(pg, source, requests, done)
        header_seconds = time.perf_counter() - started
        slot, buf = store.open_slot(reference.data_bytes, only=True)  # the rest later
        plan = StripePlan(reference.data_bytes, reference.chunk_bytes, list(manifests))
        pump = _Pump(pg, plan, buf, {s: m.checksums for s, m in manifests.items()}, requests)
        pump.start()
        try:
            prepared = None if overlap is None else overlap(reference)
            # The manifest to commit, encoded while the bytes land (it is large for many
            # tensors); re-encoded below only if a chunk came with other checksums.
            draft = dataclasses.replace(reference, slot=slot, rank=store.rank, private=None)
            encoded = draft.encode() if commit else None
        except BaseException:
            pump.stop("the receiver gave up")
            raise
        finally:
            pump.join()
        data_seconds = time.perf_counter() - started - header_seconds
        lost.update(plan.lost)
        if not plan.finished:
            raise ReplicaError(None, "data", plan.describe())
    finally:  # every holder still listening stops serving (a dead one fails quietly)
        for source in requests:
            _say_done(pg, source, requests, done)
    # Each chunk's checksum is that of the bytes that landed (checked against their holder's
    # manifest): chunks with rank-private bytes differ between holders.
    sums = tuple(pump.landed[i] for i in range(len(plan.ranges)))
    mine = draft if sums == draft.checksums else dataclasses.replace(draft, checksums=sums)
    if commit:
        store.install(mine, encoded if mine is draft else None)
    total = time.perf_counter() - started
    return Replicated(
        mine,
        {s: n for s, n in plan.sent_by.items() if n},
        lost,
        header_seconds,
        data_seconds,
        total - header_seconds - data_seconds,
        prepared,
    )


# -- receiving ---------------------------------------------------------------------------


def _headers(pg: Any, sources: Sequence[int]) -> tuple[dict[int, Manifest], dict[int, str]]:
    """Every source's manifest (sources that fail here are lost, with why)."""
    lengths = {s: torch.zeros(1, dtype=torch.int64) for s in sources}
    works = {s: pg.recv([lengths[s]], s, HEADER_LEN_TAG) for s in sources}
    manifests: dict[int, Manifest] = {}
    lost: dict[int, str] = {}
    for source in sources:
        try:
            _wait(works[source], source, "header")
            n = int(lengths[source])
            if not 0 < n <= MAX_HEADER_BYTES:
                raise ReplicaError(source, "header", f"manifest length {n} out of range")
            raw = torch.empty(n, dtype=torch.uint8)
            _wait(pg.recv([raw], source, HEADER_TAG), source, "header")
            manifests[source] = Manifest.decode(raw.numpy().tobytes())
        except (ReplicaError, ManifestError) as error:
            lost[source] = str(error)
    return manifests, lost


class _Pump:
    """One thread per source, each fetching chunks from the shared plan (see the module
    docstring); the calling thread waits until the plan is finished or failed."""

    def __init__(
        self,
        pg: Any,
        plan: StripePlan,
        buf: torch.Tensor,
        sums: dict[int, Sequence[int]],
        requests: dict[int, int],
    ) -> None:
        self.pg, self.plan, self.buf, self.sums, self.requests = pg, plan, buf, sums, requests
        self.landed: dict[int, int] = {}  # chunk -> checksum of the bytes that landed
        self.view = memoryview(buf.numpy())
        self.cond = threading.Condition()

    def start(self) -> None:
        self.threads = [
            threading.Thread(target=self._source, args=(s,), name=f"slot-fetch-{s}", daemon=True)
            for s in self.plan.alive
        ]
        for thread in self.threads:
            thread.start()

    def stop(self, why: str) -> None:
        """Take no more chunks from anyone (those in flight still land or fail)."""
        with self.cond:
            for source in self.plan.alive:
                self.plan.lose(source, why)
            self.cond.notify_all()

    def join(self) -> None:
        for thread in self.threads:
            thread.join()

    def _next(self, source: int, inflight: int) -> Range | bool | None:
        """The next chunk to post, None to wait on the oldest in flight, False to stop."""
        plan = self.plan
        with self.cond:
            while True:
                if source not in plan.alive:
                    return False
                nxt = plan.next_for(source) if inflight < WINDOW else None
                if nxt is not None or inflight:
                    return nxt
                if plan.finished or plan.failed:
                    return False
                self.cond.wait(0.5)  # nothing queued now: a lost source may give some back

    def _source(self, source: int) -> None:
        inflight: deque[tuple[Range, Any, Any]] = deque()
        why = ""
        try:
            while True:
                nxt = self._next(source, len(inflight))
                if nxt is False:
                    return
                if isinstance(nxt, Range):
                    inflight.append(self._post(source, nxt))
                    if len(inflight) < WINDOW:
                        continue  # keep the next one on the wire before waiting
                chunk, sent, received = inflight.popleft()
                _wait(sent, source, "request")
                _wait(received, source, "data")
                actual = crc32(self.view[chunk.offset : chunk.offset + chunk.length])
                if actual != self.sums[source][chunk.index]:
                    why = f"chunk {chunk.index} (byte {chunk.offset}) failed its checksum"
                    return
                with self.cond:
                    self.plan.landed(source, chunk.index)
                    self.landed[chunk.index] = actual
                    self.cond.notify_all()
        except Exception as error:  # a dead or stuck holder: its chunks go to the others
            why = f"{type(error).__name__}: {error}".splitlines()[0]
        finally:
            for _, sent, received in inflight:  # nothing posted here may land later
                for work in (sent, received):
                    _quiet_wait(work)
            if why:
                with self.cond:
                    self.plan.lose(source, why)
                    self.cond.notify_all()

    def _post(self, source: int, chunk: Range) -> tuple[Range, Any, Any]:
        seq = self.requests[source]
        self.requests[source] = seq + 1
        request = torch.tensor([FETCH, chunk.index], dtype=torch.int64)
        sent = self.pg.send([request], source, REQUEST_TAG + seq)
        target = self.buf[chunk.offset : chunk.offset + chunk.length]
        received = self.pg.recv([target], source, DATA_TAG + chunk.index)
        return chunk, sent, received


def _say_done(pg: Any, source: int, requests: dict[int, int], done: set[int]) -> None:
    """Tell a holder to stop serving (best effort: it may be gone)."""
    if source in done:
        return
    done.add(source)
    seq = requests[source]
    requests[source] = seq + 1
    try:
        _quiet_wait(
            pg.send([torch.tensor([DONE, 0], dtype=torch.int64)], source, REQUEST_TAG + seq)
        )
    except Exception:  # best effort: the holder may be gone
        return


def _lost_line(lost: dict[int, str]) -> str:
    return "; ".join(f"source {s}: {why}" for s, why in sorted(lost.items())) or "no source"


# -- waiting -----------------------------------------------------------------------------


def _wait(work: Any, peer: int, stage: str) -> None:
    try:
        work.wait()
    except Exception as error:
        raise ReplicaError(
            peer, stage, f"{type(error).__name__}: {error}".splitlines()[0]
        ) from error


def _quiet_wait(work: Any) -> None:
    try:
        work.wait()
    except Exception:  # best effort: the peer may be gone
        return
