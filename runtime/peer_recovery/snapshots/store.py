"""The snapshot store: two preallocated slot files per rank in a memory-backed directory.

Files, per rank, in ``<directory>``: ``slot-0.data``/``slot-1.data`` (tensor bytes, at
64-byte aligned offsets) and ``slot-0.json``/``slot-1.json`` (the manifests).

Invariants:
- A slot is a snapshot exactly when its manifest exists and decodes; the manifest is written
  last (temp file, fsync, rename, fsync of the directory), and a slot's manifest is removed
  *before* its data is overwritten. A crash at any point therefore leaves the other slot,
  and its manifest, untouched and restorable.
- A write always goes to the slot that does not hold the newest snapshot, so at most two
  copies of the state exist (memory bounded at two copies) and one of them is always whole.
- Slot files are preallocated with ``posix_fallocate`` after a sizing check, so a too-small
  ``/dev/shm`` fails at start-up with a clear message, never with SIGBUS mid-training. A
  failed preallocation gives back only what it added: a committed slot is never truncated.
- A commit that fails (e.g. a full filesystem) leaves its slot without a manifest and no
  temp file behind; the other slot is untouched.
- Every manifest carries the snapshot's identity (job, lineage, step, content checksum; see
  ``identity``). The content checksum covers the replicated state only (its tensor bytes,
  with the alignment padding zeroed, its layout and skeleton), so every holder of the same
  state publishes the same checksum; it is derived from the chunk checksums the commit
  computes anyway, so it costs no extra pass over the data when there is no rank-private
  state (and one pass over at most one chunk when there is).
- ``void`` quarantines every snapshot a predicate rejects and never deletes one.
- Data is mapped (``MAP_SHARED``) and copied with torch, so a snapshot costs one copy from
  the training tensors into the page cache of the memory filesystem, and restoring costs one
  copy back, with no serialisation on either side.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peer_recovery.shard_key import ShardKey
from peer_recovery.snapshots import sizing
from peer_recovery.snapshots.bulk_copy import slot_views
from peer_recovery.snapshots.checksum import crc32
from peer_recovery.snapshots.manifest import Manifest, ManifestError, Section, TensorEntry
from peer_recovery.snapshots.tree import Flat, path_name, unflatten

__all__ = [
    "SlotWrite",
    "SnapshotStore",
    "all_cpus",
    "dtype_from_name",
    "dtype_name",
    "plan_sections",
]

log = logging.getLogger("peer_recovery.snapshots")

_ALIGN = 64
_ROUND = 1 << 20  # slot files grow in whole MiB
CHUNK_BYTES = 64 << 20  # one CRC-32 per 64 MiB of data
_MAX_CHECKSUM_THREADS = 8


def all_cpus() -> int:
    """Checksum threads when the caller waits for the result (restore, a sync snapshot)."""
    return max(1, min(len(os.sched_getaffinity(0)), _MAX_CHECKSUM_THREADS))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ManifestError(f"manifest: unknown dtype {name!r}")
    return dtype


def _align(n: int, to: int = _ALIGN) -> int:
    return -(-n // to) * to


def plan_sections(replicated: Flat, private: Flat | None) -> tuple[Section, Section | None, int]:
    """Lay the tensors out, replicated first: pure, returns the sections and the data size."""
    offset = 0

    def section(flat: Flat) -> Section:
        nonlocal offset
        entries = []
        for tensor, path in zip(flat.tensors, flat.tensor_paths, strict=True):
            nbytes = tensor.numel() * tensor.element_size()
            entries.append(
                TensorEntry(
                    path_name(path), dtype_name(tensor.dtype), tuple(tensor.shape), offset, nbytes
                )
            )
            offset = _align(offset + nbytes)
        others = tuple(path_name(p) for p in flat.other_paths)
        return Section(flat.tree, tuple(entries), others)

    rep = section(replicated)
    priv = None if private is None else section(private)
    return rep, priv, offset


@dataclass
class SlotWrite:
    """A snapshot whose bytes are in its slot but whose manifest is not yet committed."""

    manifest: Manifest  # checksums still empty
    copy_seconds: float


def _content_checksum(section: Section, chunk_sums: Sequence[int]) -> str:
    """The content checksum of a replicated section from its chunks' CRC-32s (see above)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(list(chunk_sums)).encode())
    h.update(json.dumps(section.to_json(), sort_keys=True, separators=(",", ":")).encode())
    return "b2:" + h.hexdigest()


def _section_end(section: Section) -> int:
    """Where a section's data ends, padding included (where the next section starts)."""
    return max((_align(t.offset + t.nbytes) for t in section.tensors), default=0)


class SnapshotStore:
    """One rank's two slots (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        rank: int,
        probe: Callable[[Path, int, int], sizing.Sizing] = sizing.probe,
    ) -> None:
        self.directory = Path(directory)
        self.rank = rank
        self._probe = probe  # injectable so tests can state a filesystem's free space
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as error:
            raise sizing.SizingError(
                f"snapshot store {self.directory}: cannot create it: {error}"
            ) from None
        self._maps: dict[int, torch.Tensor] = {}
        self._newest_slot: int | None = None
        self._scanned = False
        self.sizing_line: str | None = None

    # -- files ---------------------------------------------------------------------------
    def data_path(self, slot: int) -> Path:
        return self.directory / f"slot-{slot}.data"

    def manifest_path(self, slot: int) -> Path:
        return self.directory / f"slot-{slot}.json"

    def capacity(self, slot: int) -> int:
        try:
            return self.data_path(slot).stat().st_size
        except FileNotFoundError:
            return 0

    def _map(self, slot: int) -> torch.Tensor:
        mapped = self._maps.get(slot)
        size = self.capacity(slot)
        if mapped is None or mapped.numel() != size:
            mapped = torch.from_file(
                str(self.data_path(slot)), shared=True, size=size, dtype=torch.uint8
            )
            self._maps[slot] = mapped
        return mapped

    def complete_capacity(self, data_bytes: int) -> None:
        """Allocate what ``ensure_capacity(slots=...)`` left out and fault both slots in.
        Run in the background: a failure is logged, and the next snapshot meets it again
        (with its clear error) when it opens a slot."""
        try:
            self.ensure_capacity(data_bytes, prefault=False)
            self.prefault()
        except Exception as error:
            log.warning("peer-recovery: could not preallocate the snapshot slots: %s", error)

    def prefault(self) -> None:
        """Map both slots and fault their pages in now, so no snapshot stalls on page faults."""
        for slot in (0, 1):
            if self.capacity(slot):
                _populate_write(self._map(slot))

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove_slot(self, slot: int) -> None:
        """Forget a slot: manifest first (so a half-removed slot is never a snapshot)."""
        self._maps.pop(slot, None)
        for path in (self.manifest_path(slot), self.data_path(slot)):
            path.unlink(missing_ok=True)
        if self._newest_slot == slot:
            self._newest_slot = None

    def quarantine_dir(self) -> Path:
        return self.directory / "quarantine"

    def quarantine_slot(self, slot: int, step: int, why: str) -> Path:
        """Move a slot aside, whole, instead of deleting it; return where it went.

        The names (``quarantine/step-<S>-slot-<N>.manifest`` and ``.data``) match nothing
        that is scanned, published or loaded. The manifest moves first, so the slot stops
        being a snapshot before its data leaves. One quarantined snapshot is kept per slot
        number (a later one replaces it), so at most two extra copies ever take memory.
        """
        self._maps.pop(slot, None)
        target = self.quarantine_dir()
        target.mkdir(exist_ok=True, mode=0o700)
        for old in target.glob(f"step-*-slot-{slot}.*"):
            old.unlink(missing_ok=True)
        base = target / f"step-{step}-slot-{slot}"
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.manifest_path(slot), base.with_suffix(".manifest"))
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.data_path(slot), base.with_suffix(".data"))
        self._fsync_dir()
        if self._newest_slot == slot:
            self._newest_slot = None
        log.warning(
            "peer-recovery: rank %d: slot %d (step %d) quarantined as %s.*: %s",
            self.rank,
            slot,
            step,
            base,
            why,
        )
        return base

    def void(self, keep: Callable[[Manifest], bool], why: Callable[[Manifest], str]) -> list[int]:
        """Quarantine every snapshot ``keep`` rejects (``why`` says why); return their steps.

        Rescans afterwards, so the next write never lands in the slot that remains.
        """
        self._scanned = False
        voided = []
        for manifest in self.scan()[0]:
            if not keep(manifest):
                self.quarantine_slot(manifest.slot, manifest.step, why(manifest))
                voided.append(manifest.step)
        self.scan()
        return voided

    def remove_all(self) -> None:
        for slot in (0, 1):
            self.remove_slot(slot)
        if self.quarantine_dir().is_dir():
            for quarantined in self.quarantine_dir().iterdir():
                quarantined.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.quarantine_dir().rmdir()
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.directory.rmdir()

    # -- manifests -----------------------------------------------------------------------
    def read_manifest(self, slot: int) -> Manifest | None:
        """The slot's manifest, ``None`` if it has none; raises ``ManifestError`` if damaged."""
        try:
            raw = self.manifest_path(slot).read_bytes()
        except FileNotFoundError:
            return None
        manifest = Manifest.decode(raw)
        if manifest.slot != slot:
            raise ManifestError(f"manifest: says slot {manifest.slot} but is slot {slot}'s")
        if manifest.data_bytes > self.capacity(slot):
            raise ManifestError(
                f"manifest: needs {manifest.data_bytes} bytes, slot file has {self.capacity(slot)}"
            )
        return manifest

    def scan(self) -> tuple[list[Manifest], list[str]]:
        """Every readable manifest, newest step first, and why the others were skipped."""
        found: list[Manifest] = []
        problems: list[str] = []
        for slot in (0, 1):
            try:
                manifest = self.read_manifest(slot)
            except (ManifestError, OSError) as error:
                problems.append(f"slot {slot} skipped: {error}")
                continue
            if manifest is not None:
                found.append(manifest)
        found.sort(key=lambda m: m.step, reverse=True)
        self._newest_slot = found[0].slot if found else None
        self._scanned = True
        return found, problems

    # -- capacity ------------------------------------------------------------------------
    def ensure_capacity(
        self, data_bytes: int, *, slots: Sequence[int] = (0, 1), prefault: bool = True
    ) -> None:
        """Preallocate ``slots`` (both by default) for ``data_bytes`` after the sizing check
        of both; clear errors. ``slots=()`` only decides whether the directory can hold
        them (cheap: no byte is allocated); ``prefault=False`` leaves the pages to fault in
        as they are first written."""
        per_slot = max(_ROUND, _align(data_bytes, _ROUND))
        if all(self.capacity(slot) >= per_slot for slot in (0, 1)):
            return
        allocated = sum(self.capacity(slot) for slot in (0, 1))
        decision_input = self._probe(self.directory, 2 * per_slot, allocated)
        ok, line = sizing.decide(decision_input, str(self.directory))
        self.sizing_line = line
        if not ok:
            log.error("peer-recovery: %s", line)
            raise sizing.SizingError(line)
        log.info("peer-recovery: %s", line)
        for slot in [slot for slot in slots if self.capacity(slot) < per_slot]:
            self._maps.pop(slot, None)
            fd = os.open(self.data_path(slot), os.O_RDWR | os.O_CREAT, 0o600)
            size_before = os.fstat(fd).st_size  # a committed snapshot may live in it
            try:
                os.posix_fallocate(fd, 0, per_slot)
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    # Give back what was reserved beyond the old size; never cut into it.
                    os.ftruncate(fd, size_before)
                    raise sizing.SizingError(
                        f"{line}: preallocating {sizing.format_bytes(per_slot)} for slot {slot} "
                        f"failed: {os.strerror(error.errno)}"
                    ) from None
                raise
            finally:
                os.close(fd)
        if prefault:
            self.prefault()

    # -- writing -------------------------------------------------------------------------
    def write_data(
        self,
        step: int,
        shard_key: ShardKey,
        replicated: Flat,
        private: Flat | None,
        *,
        job: str = "",
        lineage: str = "",
    ) -> SlotWrite:
        """Copy the tensors into the older slot (the training-blocking part of a snapshot).

        ``job`` and ``lineage`` are the snapshot's identity (``identity``).
        """
        rep, priv, data_bytes = plan_sections(replicated, private)
        slot, buf = self.open_slot(data_bytes)
        started = time.perf_counter()
        tensors = [*replicated.tensors, *(private.tensors if private else ())]
        entries = [*rep.tensors, *(priv.tensors if priv else ())]
        for tensor, entry in zip(tensors, entries, strict=True):
            _copy_into(buf, entry, tensor)
        for entry in rep.tensors:  # padding is content too: make it the same on every holder
            end = entry.offset + entry.nbytes
            if _align(end) > end:
                buf[end : _align(end)].zero_()
        if any(t.is_cuda for t in tensors):
            torch.cuda.synchronize()
        manifest = Manifest(
            step=step,
            slot=slot,
            rank=self.rank,
            shard_key=shard_key,
            replicated=rep,
            private=priv,
            data_bytes=data_bytes,
            chunk_bytes=CHUNK_BYTES,
            checksums=(),
            created_unix=time.time(),
            job=job,
            lineage=lineage,
        )
        return SlotWrite(manifest, time.perf_counter() - started)

    def open_slot(self, data_bytes: int, *, only: bool = False) -> tuple[int, torch.Tensor]:
        """The slot the next snapshot goes to, no longer a snapshot, and its mapped bytes.

        Never the slot of the newest snapshot (also one left by an earlier process); its
        manifest is removed (and the removal made durable) before any byte is written.
        ``only``: allocate just this slot, unfaulted (a peer's bytes are about to fill it;
        ``complete_capacity`` does the rest later, off the restore's critical path).
        """
        if not self._scanned:
            self.scan()  # never overwrite a newest snapshot left by an earlier process
        slot = 1 if self._newest_slot == 0 else 0
        if only:
            self.ensure_capacity(data_bytes, slots=(slot,), prefault=False)
        else:
            self.ensure_capacity(data_bytes)
        self.manifest_path(slot).unlink(missing_ok=True)  # the slot stops being a snapshot
        self._fsync_dir()
        return slot, self._map(slot)

    def install(self, manifest: Manifest, encoded: bytes | None = None) -> None:
        """Write ``manifest`` as its slot's manifest, atomically and last: the slot's bytes
        must already be in place (checked by the caller). Also the commit of a slot whose
        bytes came from a peer (``snapshots.replica``). ``encoded``: ``manifest.encode()``,
        when the caller has it already."""
        manifest.validate()
        final = self.manifest_path(manifest.slot)
        temp = final.with_name(final.name + ".tmp")
        try:
            with open(temp, "wb") as handle:
                handle.write(manifest.encode() if encoded is None else encoded)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)  # the slot stays without a manifest: not a snapshot
            raise
        self._fsync_dir()
        self._newest_slot = manifest.slot

    def mapped(self, slot: int) -> torch.Tensor:
        """The slot's bytes, mapped (``uint8``): valid while the slot file is unchanged."""
        return self._map(slot)

    def commit(self, pending: SlotWrite, *, threads: int = 1) -> Manifest:
        """Checksum the slot and write its manifest atomically (may run in the background).

        ``threads``: checksum threads; one in the background, beside training.
        """
        draft = pending.manifest
        sums = tuple(self._checksums(draft.slot, draft.data_bytes, draft.chunk_bytes, threads))
        manifest = Manifest(
            **{**draft.__dict__, "checksums": sums, "content": self._content(draft, sums)}
        )
        self.install(manifest)
        return manifest

    def _content(self, draft: Manifest, sums: Sequence[int]) -> str:
        """The content checksum: the chunks of the replicated section, reusing ``sums``."""
        end, chunk = _section_end(draft.replicated), draft.chunk_bytes
        whole = end // chunk
        rep_sums = list(sums[:whole])
        if end % chunk:
            if end == draft.data_bytes:
                rep_sums.append(sums[whole])
            else:  # the last chunk is shared with the rank-private section
                rep_sums.append(
                    crc32(memoryview(self._map(draft.slot).numpy())[whole * chunk : end])
                )
        return _content_checksum(draft.replicated, rep_sums)

    # -- reading -------------------------------------------------------------------------
    def _checksums(self, slot: int, data_bytes: int, chunk: int, threads: int = 1) -> list[int]:
        """One CRC-32 per chunk; ``threads`` > 1 spreads the chunks (zlib drops the GIL)."""
        view = memoryview(self._map(slot).numpy())
        pieces = [view[at : min(at + chunk, data_bytes)] for at in range(0, data_bytes, chunk)]
        if threads <= 1 or len(pieces) <= 1:
            return [crc32(piece) for piece in pieces]
        with concurrent.futures.ThreadPoolExecutor(min(threads, len(pieces))) as pool:
            return list(pool.map(crc32, pieces))

    def verify(self, manifest: Manifest) -> str | None:
        """``None`` when the slot's bytes match the manifest's checksums, else why not."""
        if self.capacity(manifest.slot) < manifest.data_bytes:
            return f"slot {manifest.slot} file is shorter than its manifest says"
        # Restore waits for this and nothing else runs: use the CPUs this process may use.
        actual = self._checksums(
            manifest.slot, manifest.data_bytes, manifest.chunk_bytes, all_cpus()
        )
        bad = [i for i, (a, b) in enumerate(zip(actual, manifest.checksums, strict=True)) if a != b]
        if bad:
            return (
                f"slot {manifest.slot} (step {manifest.step}) failed its checksum in "
                f"{len(bad)} of {len(actual)} chunks (first bad chunk at byte {bad[0] * manifest.chunk_bytes})"
            )
        return None

    def tensors(self, manifest: Manifest, section: Section) -> list[torch.Tensor]:
        """Views of a section's tensors on the mapped slot: valid while the slot is unchanged."""
        return slot_views(self._map(manifest.slot), section.tensors)

    def read_state_dict(self, manifest: Manifest, *, copy: bool = True) -> Any:
        """The replicated state as stored, as CPU tensors (copies unless ``copy=False``)."""
        views = self.tensors(manifest, manifest.replicated)
        return unflatten(manifest.replicated.tree, [v.clone() for v in views] if copy else views)


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; older kernels answer EINVAL and we skip it


def _populate_write(mapped: torch.Tensor) -> None:
    """Fault a mapping's pages in writable (content unchanged); best effort."""
    if mapped.numel() == 0 or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(
            ctypes.c_void_p(mapped.data_ptr()),
            ctypes.c_size_t(mapped.numel()),
            _MADV_POPULATE_WRITE,
        )


def _view(buf: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    raw = buf[entry.offset : entry.offset + entry.nbytes]
    return raw.view(dtype_from_name(entry.dtype)).view(entry.shape)


def _copy_into(buf: torch.Tensor, entry: TensorEntry, tensor: torch.Tensor) -> None:
    """Copy one tensor into its place in the slot (device-to-host when it is on a GPU)."""
    _view(buf, entry).copy_(tensor, non_blocking=False)


def copy_out(views: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
    """Copy stored tensors into live ones, in place (host-to-device when on a GPU)."""
    for view, target in zip(views, targets, strict=True):
        target.copy_(view)
