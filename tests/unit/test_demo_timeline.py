"""The demo's resume timeline: the watcher on a real TCPStore and a real log file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from torch.distributed import TCPStore

from peer_recovery.demo.timeline import Watcher, phases, table
from peer_recovery.protocol import keys


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not seen in time"
        time.sleep(0.01)


def test_the_watcher_sees_the_new_agent_then_the_next_rounds_directive(tmp_path: Path) -> None:
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    store.add(keys.rounds_key("demo"), 3)  # three rounds so far: the next one is round 4
    log = tmp_path / "agent.log"
    log.write_text("=== pod 2 generation 2 ===\n")
    watcher = Watcher(store, "demo", log)
    try:
        time.sleep(0.05)
        assert watcher.agent_up_at is None  # the header the driver wrote is not the agent
        store.set(keys.directive_key(keys.round_prefix("demo", 3)), b"{}")  # an old round's
        with log.open("a") as f:
            f.write("torchrun: starting\n")
        _wait(lambda: watcher.agent_up_at is not None)
        time.sleep(0.05)
        assert watcher.directive_at is None
        store.set(keys.directive_key(keys.round_prefix("demo", 4)), b"{}")
        _wait(lambda: watcher.directive_at is not None)
    finally:
        watcher.stop()
    assert watcher.replaced_at <= watcher.agent_up_at <= watcher.directive_at
    base = watcher.directive_at
    reports = [
        {"started_at": base + 1, "imported_at": base + 1.5, "grouped_at": base + 2.5,
         "restore_at": base + 3, "restored_at": base + 4, "first_step_at": base + 4.5},
        {"started_at": base + 2, "imported_at": base + 2.2, "grouped_at": base + 2.4,
         "restore_at": base + 2.5, "restored_at": base + 3, "first_step_at": base + 5},
    ]  # fmt: skip
    rows = phases(watcher, reports)
    assert [name.split(" (")[0] for name, _ in rows] == [
        "agent restart and rendezvous", "worker start", "worker imports", "process group",
        "model, optimizer, snapshot store, barrier of all ranks", "restore",
        "first training step",
    ]  # fmt: skip
    # The slowest rank bounds each phase; the phases add up to replacement -> first step.
    assert [round(s, 6) for _, s in rows[1:]] == [2.0, 0.2, 0.3, 0.5, 1.0, 1.0]
    assert sum(s for _, s in rows) == pytest.approx(base + 5 - watcher.replaced_at)
    assert "| resume (replacement to first step) |" in table(rows)


def test_no_phases_when_a_rank_never_reached_its_first_step(tmp_path: Path) -> None:
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    watcher = Watcher(store, "demo", tmp_path / "agent.log")
    watcher.stop()
    assert phases(watcher, [{"started_at": 1.0, "restore_at": 2.0, "restored_at": 3.0}]) == []
