"""Where a resume's time goes: from a pod's replacement to the first training step after it.

A :class:`Watcher` polls, from the moment the replacement agent is started, what only the
driver can see: the round's directive in the rendezvous store (rank 0's agent publishes it
once the agents have rendezvoused and pinned their ranks; the new agent's first log output
is recorded too). The workers' restore reports add their own wall-clock times (process
start, imports done, process group up, restore call, restore end, first step).
:func:`phases` turns both into the table's rows; the slowest rank bounds each phase.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peer_recovery.protocol import keys

__all__ = ["Watcher", "phases", "table"]

_POLL_S = 0.01


class Watcher:
    """Times the replacement agent's start and the next round's directive (a thread)."""

    def __init__(self, store: Any, run_id: str, log: Path) -> None:
        self._store, self._run_id, self._log = store, run_id, log
        self.replaced_at = time.time()
        self._log_size = log.stat().st_size if log.exists() else 0
        rounds = keys.rounds_key(run_id)
        self._round = int(store.get(rounds)) if store.check([rounds]) else 0
        self.agent_up_at: float | None = None
        self.directive_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resume-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        directive = keys.directive_key(keys.round_prefix(self._run_id, self._round + 1))
        while not self._stop.is_set() and self.directive_at is None:
            now = time.time()
            grew = self._log.exists() and self._log.stat().st_size > self._log_size
            if self.agent_up_at is None and grew:
                self.agent_up_at = now
            if self._store.check([directive]):
                self.directive_at = now
            self._stop.wait(_POLL_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def phases(watcher: Watcher, reports: Sequence[dict[str, Any]]) -> list[tuple[str, float]]:
    """The resume's phases in order, seconds each; empty when a time is missing."""
    try:
        started = max(r["started_at"] for r in reports)
        imported = max(r["imported_at"] for r in reports)
        grouped = max(r["grouped_at"] for r in reports)
        called = max(r["restore_at"] for r in reports)
        restored = max(r["restored_at"] for r in reports)
        stepped = max(r["first_step_at"] for r in reports)
    except KeyError:
        return []
    if watcher.directive_at is None:
        return []
    return [
        ("agent restart and rendezvous (new torchrun agent, c10d round, ranks pinned, "
         "round published)", watcher.directive_at - watcher.replaced_at),
        ("worker start (spawned by the agents)", started - watcher.directive_at),
        ("worker imports (Python, torch)", imported - started),
        ("process group (init_process_group, new_group)", grouped - imported),
        ("model, optimizer, snapshot store, barrier of all ranks", called - grouped),
        ("restore (agreement through vote)", restored - called),
        ("first training step (after the demo hashes the restored state)", stepped - restored),
    ]  # fmt: skip


def table(rows: Sequence[tuple[str, float]]) -> str:
    total = sum(seconds for _, seconds in rows)
    lines = ["| phase | seconds | share |", "|---|---|---|"]
    for name, seconds in rows:
        lines.append(f"| {name} | {seconds:.2f} | {seconds / total:.0%} |")
    lines.append(f"| resume (replacement to first step) | {total:.2f} | 100% |")
    return "\n".join(lines)
