"""Slot replication on the round's recovery group: global ranks in, failures handled.

:mod:`peer_recovery.peer_restore` attaches a :class:`SlotStreams` to the transport it builds
for a round; :class:`peer_recovery.recovery.PeerRecovery` then replicates the holder's slot
(:mod:`peer_recovery.snapshots.replica`) instead of receiving in place into live tensors.

Failure handling, like the in-place transport's: a transfer that breaks (a holder dies and
no other is left, the receiver goes away) calls ``fail``, which ends the process with the
transfer-failed exit status so that torchrun restarts the round and every rank loads the
checkpoint; a group with a dead member cannot hold the vote. A snapshot refused before any
byte moved (another step or shard) is an ordinary failure of this rank's part: it votes no.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from peer_recovery.snapshots.manifest import Manifest
from peer_recovery.snapshots.replica import ReplicaError, Replicated, receive_slot, serve_slot
from peer_recovery.snapshots.store import SnapshotStore

__all__ = ["Refused", "Serving", "SlotStreams"]

log = logging.getLogger("peer_recovery.peer_restore")


class Refused(RuntimeError):
    """The holder's snapshot is not the one the plan needs; no byte moved."""


class Serving:
    """Slot serving running in the background, one thread per receiver."""

    def __init__(self, threads: list[threading.Thread], errors: list[BaseException]) -> None:
        self._threads, self._errors = threads, errors

    def join(self) -> list[BaseException]:
        """Wait for every receiver to finish; the errors of those that failed."""
        for thread in self._threads:
            thread.join()
        return list(self._errors)


class SlotStreams:
    """Slot replication between global ranks over a group of ``members`` (see the module
    docstring)."""

    def __init__(self, pg: Any, members: Sequence[int], fail: Callable[[BaseException], None]):
        self._pg, self._members, self._fail = pg, list(members), fail

    def serve(self, dst_ranks: Sequence[int], store: SnapshotStore, manifest: Manifest) -> Serving:
        """Start serving ``manifest``'s slot to each of ``dst_ranks``; returns at once."""
        errors: list[BaseException] = []
        threads = []
        for dst in dst_ranks:
            peer = self._members.index(dst)

            def run(peer: int = peer, dst: int = dst) -> None:
                started = time.perf_counter()
                try:
                    sent = serve_slot(self._pg, peer, store, manifest)
                except BaseException as error:
                    errors.append(error)
                    return
                log.info(
                    "peer-recovery: served step %d's slot to rank %d: %d bytes in %.2fs",
                    manifest.step,
                    dst,
                    sent,
                    time.perf_counter() - started,
                )

            thread = threading.Thread(target=run, name=f"slot-serve-{dst}", daemon=True)
            thread.start()
            threads.append(thread)
        return Serving(threads, errors)

    def finish(self, serving: Serving) -> None:
        """Wait for ``serving``; a failed receiver ends this process (``fail``)."""
        errors = serving.join()
        if errors:
            self._fail(errors[0])

    def receive(
        self,
        src_ranks: Sequence[int],
        store: SnapshotStore,
        accept: Callable[[Manifest], str | None],
        overlap: Callable[[Manifest], Any] | None = None,
        *,
        commit: bool = True,
    ) -> Replicated:
        """Replicate the slot of ``src_ranks`` (holders of one snapshot) into ``store``.

        Several ``src_ranks`` stripe: each serves chunks from one work queue, and a source
        that is lost on the way has its chunks fetched from the others. The answer's
        ``bytes_by_source`` and ``lost`` are keyed by global rank.

        Raises ``Refused`` when ``accept`` refuses the snapshot; an error of ``overlap``
        (run while the bytes land) propagates; any other failure (no source left, the
        receiver's own side broken) ends the process (``fail``).
        """
        sources = [self._members.index(r) for r in src_ranks]
        try:
            got = receive_slot(self._pg, sources, store, accept, overlap, commit=commit)
        except ReplicaError as error:
            if error.stage == "refused":
                raise Refused(str(error)) from None
            self._fail(error)
            raise  # unreachable: fail() exits
        by_rank = {self._members[s]: n for s, n in got.bytes_by_source.items()}
        lost = {self._members[s]: why for s, why in got.lost.items()}
        for source, why in lost.items():
            log.warning("peer-recovery: slot source rank %d dropped: %s", source, why)
        log.info(
            "peer-recovery: replicated step %d's slot (%d bytes from ranks %s): header %.3fs, "
            "data %.3fs, commit %.3fs",
            got.manifest.step,
            got.manifest.data_bytes,
            by_rank,
            got.header_seconds,
            got.data_seconds,
            got.commit_seconds,
        )
        return dataclasses.replace(got, bytes_by_source=by_rank, lost=lost)
