"""The state's indexes, which keep the sweep and the rounds off the bulk of finished records:
they must always agree with the records themselves (pure, no I/O)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

from peer_recovery.contract.bodies import PodRef, build_peer_recovery, build_status
from peer_recovery.contract.names import Phase
from peer_recovery_operator import lifecycle
from peer_recovery_operator.state import ClusterState
from tests.operator.bodies import job_body
from tests.operator.test_engine import make, run, settle
from tests.operator.test_retention import rec


def names(records: list[Any]) -> list[str]:
    return sorted(r.name for r in records)


def test_only_records_that_may_need_action_are_swept_and_rounds_see_only_theirs() -> None:
    state = ClusterState(actionable=lifecycle.may_need_action)
    history = [rec("Succeeded", uid=f"old-{i}", restarts=i, at=i) for i in range(50)]
    first = rec("Failed", uid="u1", attempt=1, condition="Replanning")
    second = rec("Planned", uid="u1", attempt=2)
    for record in [*history, first, second]:
        state.upsert_recovery(record)
    assert names(state.actionable_recoveries()) == names([first, second])
    assert names(state.episode(second)) == names([first, second])
    assert names(state.recoveries_for("ns", "train", {"u1"})) == names([first, second])
    assert names(state.recoveries_for("ns", "train", {"old-3"})) == names([history[3], second])
    assert state.take_retention_dirty() == {r.slot for r in history} | {first.slot}
    assert state.take_retention_dirty() == set()
    # the live attempt finishes: no longer swept, and the retention rule must look again
    done = dataclasses.replace(second, phase=Phase.SUCCEEDED, resource_version="999")
    state.upsert_recovery(done)
    assert names(state.actionable_recoveries()) == names([first])
    assert names(state.recoveries_for("ns", "train", set())) == []
    assert state.take_retention_dirty() == {second.slot}
    assert names(state.slot_recoveries(("ns", "train", "worker", 0))) == names(
        [*history, first, second]
    )
    state.drop_recovery("ns", history[0].name)
    assert state.take_retention_dirty() == {history[0].slot}
    assert state.recoveries_for("ns", "train", {"old-0"}) == []
    state.forget_job("ns", "train")
    assert state.actionable_recoveries() == [] and state.episode(first) == []


def test_retention_looks_again_when_the_oldest_record_reaches_its_time_to_live() -> None:
    async def scenario() -> None:
        engine, fake, clock = make(finished_ttl=3600.0)
        engine.job_event(None, job_body())
        body = build_peer_recovery(
            namespace="ns", job_name="train", job_uid="job-uid-train", attempt=1,
            target=PodRef("train-worker-0", "u1", "worker", 0, 1),
            mode="Local", reason="ContainerRestarted", planned_by="runtime",
        )  # fmt: skip
        body["status"] = build_status("Succeeded", attempt=1)
        stored = fake.add(body)
        engine.recovery_event("ADDED", stored)  # seen finished at the clock's time
        await engine.sweep()  # within the time to live: nothing to delete
        await settle(engine)
        assert fake.recoveries
        clock.now += timedelta(seconds=3601)  # no change since: only the time to live
        await engine.sweep()
        await settle(engine)
        assert fake.recoveries == {} and engine.state.recoveries == {}

    run(scenario)
