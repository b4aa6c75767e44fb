"""The retention rule for finished PeerRecoveries, one rule at a time (pure)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from peer_recovery.contract.bodies import PodRef, build_peer_recovery, build_status
from peer_recovery.contract.records import parse_recovery
from peer_recovery_operator.retention import expired
from tests.operator.bodies import T0, ts

DAY = 24 * 3600.0


def rec(phase: str, *, attempt: int = 1, uid: str = "u1", index: int = 0, at: float = 0,
        restarts: int = 0, condition: str = "Restored") -> Any:  # fmt: skip
    body = build_peer_recovery(
        namespace="ns", job_name="train", job_uid="job", attempt=attempt,
        target=PodRef(f"train-worker-{index}", uid, "worker", index, index + 1),
        mode="Local", reason="ContainerRestarted", planned_by="operator",
    )  # fmt: skip
    body["metadata"]["annotations"] = {"peerrecovery.io/restart-count": str(restarts)}
    body["status"] = build_status(phase, attempt=attempt)
    body["status"]["conditions"] = [
        {"type": phase, "status": "True", "reason": condition, "lastTransitionTime": ts(at)}
    ]
    return parse_recovery(body)


def names(found: list[Any]) -> list[str]:
    return sorted(e.record.name for e in found)


def of(*records: Any) -> list[str]:
    return sorted(r.name for r in records)


def test_only_finished_records_beyond_the_newest_few_of_a_pod_go() -> None:
    history = [rec("Succeeded", restarts=i, at=i) for i in range(7)]
    live = rec("Streaming", restarts=7, at=100)
    found = expired([*history, live], now=T0 + timedelta(seconds=200), keep=5, ttl=DAY)
    assert names(found) == of(history[0], history[1])
    assert all("newer finished records" in e.why for e in found)


def test_slots_are_counted_apart() -> None:
    records = [rec("Succeeded", restarts=i, index=i % 2, at=i) for i in range(6)]
    found = expired(records, now=T0 + timedelta(seconds=10), keep=3, ttl=DAY)
    assert found == []


def test_old_records_go_whatever_their_rank() -> None:
    old = rec("FellBack", at=0)
    fresh = rec("Succeeded", restarts=1, at=2 * DAY)
    found = expired([old, fresh], now=T0 + timedelta(seconds=2 * DAY + 5), keep=5, ttl=DAY)
    assert [e.record.name for e in found] == [old.name] and "retention" in found[0].why


def test_an_attempt_closed_for_re_planning_waits_for_its_successor() -> None:
    closed = rec("Failed", at=0, condition="Replanning")
    now = T0 + timedelta(seconds=3 * DAY)
    assert expired([closed], now=now, keep=1, ttl=DAY) == []
    successor = rec("Succeeded", attempt=2, at=10)
    assert names(expired([closed, successor], now=now, keep=1, ttl=DAY)) == of(closed, successor)


def test_bad_policies_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="keep must be >= 1"):
        expired([], now=T0, keep=0, ttl=DAY)
    with pytest.raises(ValueError, match="ttl must be > 0"):
        expired([], now=T0, keep=1, ttl=0)
