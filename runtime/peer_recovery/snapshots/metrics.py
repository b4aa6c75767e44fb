"""Runtime figures of snapshots and restores, kept in memory and written as log lines.

The log lines are the stable interface (one line per snapshot and per restore, ``key=value``
pairs after a fixed prefix); ``SnapshotStats`` is what a script or a metrics exporter reads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

__all__ = ["PhaseClock", "SnapshotStats", "log_restore", "log_snapshot", "log_snapshot_failed"]

log = logging.getLogger("peer_recovery.snapshots")


@dataclass
class SnapshotStats:
    """Counters of this process's snapshots and restores."""

    snapshots: int = 0
    last_step: int | None = None
    last_bytes: int = 0
    last_stall_seconds: float = 0.0  # training was blocked this long (the copy)
    last_commit_seconds: float = 0.0  # checksums and manifest, possibly in the background
    total_stall_seconds: float = 0.0
    restore_seconds: float | None = None
    restore_bytes: int = 0
    #: Seconds of the last restore's phases, in order (see ``PhaseClock``).
    restore_phases: dict[str, float] = field(default_factory=dict)
    failed_snapshots: int = 0  # snapshots that were not committed (training went on)
    last_failure: str | None = None  # why the last failed snapshot failed


class PhaseClock:
    """Seconds spent in each named phase of one operation, in the order they ended.

    ``lap(name)`` closes the phase that ran since the previous lap (or since the clock
    started); a name given twice adds up."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now

    def describe(self) -> str:
        return " ".join(f"{name}={seconds:.4f}" for name, seconds in self.phases.items())


def log_snapshot(stats: SnapshotStats, slot: int, background: bool) -> None:
    log.info(
        "peer-recovery snapshot step=%s slot=%d bytes=%d stall_s=%.4f commit_s=%.4f mode=%s",
        stats.last_step,
        slot,
        stats.last_bytes,
        stats.last_stall_seconds,
        stats.last_commit_seconds,
        "async" if background else "sync",
    )


def log_restore(role: str, step: int, source: str, nbytes: int, seconds: float) -> None:
    log.info(
        "peer-recovery restore role=%s step=%d source=%s bytes=%d restore_s=%.4f",
        role,
        step,
        source,
        nbytes,
        seconds,
    )


def log_snapshot_failed(stats: SnapshotStats, step: int, error: BaseException) -> None:
    """Count and log a snapshot that was not committed; the rank holds no snapshot of it."""
    stats.failed_snapshots += 1
    stats.last_failure = f"{type(error).__name__}: {error}"
    log.error(
        "peer-recovery: snapshot of step %d failed, training goes on without it "
        "(this rank holds no snapshot of that step; %d failed so far): %s",
        step,
        stats.failed_snapshots,
        stats.last_failure,
        exc_info=(type(error), error, error.__traceback__),
    )
