"""Taking snapshots: the copy blocks training; the commit may follow in a background thread.

Invariants:
- At most one commit is in flight: the next snapshot (and every reader of the store) first
  waits for it, so the two-slot rule of ``snapshots.store`` holds.
- A commit that fails (a full ``/dev/shm``, an I/O error) is logged and counted in
  ``SnapshotStats`` and never raised into the training loop: the rank is then simply not a
  holder of that step (its slot has no manifest), and training goes on.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable

from peer_recovery.shard_key import ShardKey
from peer_recovery.snapshots.metrics import SnapshotStats, log_snapshot, log_snapshot_failed
from peer_recovery.snapshots.store import SlotWrite, SnapshotStore, all_cpus
from peer_recovery.snapshots.tree import Flat

__all__ = ["SnapshotWriter"]


class SnapshotWriter:
    """One rank's snapshot taking, over its store, with its figures in ``stats``."""

    def __init__(self, store: SnapshotStore, stats: SnapshotStats) -> None:
        self.store, self.stats = store, stats
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future[None] | None = None

    def write(
        self,
        step: int,
        key: ShardKey,
        replicated: Flat,
        private: Flat | None,
        background: bool,
        *,
        job: str = "",
        lineage: str = "",
    ) -> float:
        """Copy into the store, then commit (in the background if ``background``); return
        the seconds training was blocked. ``job``, ``lineage``: the snapshot's identity."""
        self.wait()
        started = time.perf_counter()
        pending = self.store.write_data(step, key, replicated, private, job=job, lineage=lineage)
        stall = time.perf_counter() - started
        self.stats.last_step, self.stats.last_stall_seconds = step, stall
        self.stats.last_bytes = pending.manifest.data_bytes
        self.stats.total_stall_seconds += stall
        if background:
            self.submit(lambda: self._commit(pending, True))
        else:
            self._commit(pending, False)
        return stall

    def submit(self, work: Callable[[], None]) -> None:
        """Run ``work`` in the background thread (after what is queued there)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, "peer-recovery-snapshot")
        self._pending = self._executor.submit(work)

    def _commit(self, pending: SlotWrite, background: bool) -> None:
        started = time.perf_counter()
        try:
            manifest = self.store.commit(pending, threads=1 if background else all_cpus())
        except Exception as error:
            log_snapshot_failed(self.stats, pending.manifest.step, error)
            return
        self.stats.last_commit_seconds = time.perf_counter() - started
        self.stats.snapshots += 1
        log_snapshot(self.stats, manifest.slot, background)

    def wait(self) -> None:
        """Wait for the background work (a commit never raises; see the module docstring)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def shutdown(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
