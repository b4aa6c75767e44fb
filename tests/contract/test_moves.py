"""The contract's checked phase move, one outcome at a time, over the in-memory API server."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from peer_recovery.contract.bodies import PodRef, build_peer_recovery, build_status
from peer_recovery.contract.moves import Move, Outcome, move_phase, status_for
from peer_recovery.contract.names import Actor, ConditionReason, Phase
from tests.fake_api import FakeApi

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)


def recovery(phase: str | None) -> dict[str, Any]:
    body = build_peer_recovery(
        namespace="ns",
        job_name="train",
        job_uid="job-uid",
        target=PodRef("train-worker-0", "new", "worker", 0, 1),
        mode="Peer",
        reason="PodReplaced",
        attempt=1,
        planned_by="operator",
        source=PodRef("train-worker-1", "src", "worker", 1, 2),
    )
    body["metadata"]["resourceVersion"] = "1"
    if phase is not None:
        body["status"] = build_status(phase, attempt=1)
    return body


FAIL = Move(Phase.FAILED, ConditionReason.DEADLINE_EXCEEDED, "stuck")


def move(fake: FakeApi, **kw: Any) -> Any:
    name = next(iter(fake.recoveries))[1]
    return move_phase(fake, "ns", name, FAIL, actor=Actor.OPERATOR, clock=lambda: NOW, **kw)


def test_written_with_the_condition_of_its_phase() -> None:
    fake = FakeApi(recovery("Planned"))
    result = move(fake)
    assert result.outcome is Outcome.WRITTEN
    status = result.body["status"]
    assert status["phase"] == "Failed" and status["observedAttempt"] == 1
    assert status["conditions"][-1]["reason"] == "DeadlineExceeded"


def test_already_refused_and_gone_write_nothing() -> None:
    assert move(FakeApi(recovery("Failed"))).outcome is Outcome.ALREADY
    refused = move(FakeApi(recovery("Succeeded")))
    assert refused.outcome is Outcome.REFUSED and "terminal" in refused.why
    fake = FakeApi(recovery("Planned"))
    name = next(iter(fake.recoveries))[1]
    fake.recoveries.clear()
    gone = move_phase(fake, "ns", name, FAIL, actor=Actor.OPERATOR, clock=lambda: NOW)
    assert gone.outcome is Outcome.GONE and fake.patches == []


def test_a_decision_made_on_another_phase_is_not_written() -> None:
    fake = FakeApi(recovery("Streaming"))
    stale = move(fake, decided_on=Phase.PLANNED)
    assert stale.outcome is Outcome.STALE and "Streaming" in stale.why
    assert fake.patches == []
    assert move(fake, decided_on=Phase.STREAMING).outcome is Outcome.WRITTEN


def test_a_conflict_is_re_read_and_re_validated_up_to_the_bound() -> None:
    class AlwaysRacing(FakeApi):
        def patch_recovery_status(self, *a: Any, **k: Any) -> dict[str, Any]:
            self.race = {"message": "someone else"}
            return super().patch_recovery_status(*a, **k)

    fake = AlwaysRacing(recovery("Planned"))
    assert move(fake, retries=3).outcome is Outcome.GAVE_UP
    assert fake.patches == []


def test_status_for_keeps_one_condition_per_phase() -> None:
    current = recovery("Planned")
    current["status"]["conditions"] = [{"type": "Failed", "reason": "old"}]
    status = status_for(current, FAIL, NOW)
    assert [c["reason"] for c in status["conditions"]] == ["DeadlineExceeded"]


def test_conditions_carry_the_generation_they_were_decided_on() -> None:
    current = recovery("Planned")
    assert "observedGeneration" not in status_for(current, FAIL, NOW)["conditions"][-1]
    current["metadata"]["generation"] = 3
    assert status_for(current, FAIL, NOW)["conditions"][-1]["observedGeneration"] == 3
