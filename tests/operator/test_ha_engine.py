"""A standby engine, the periodic resync and the sweep's bounds, over the in-memory API.

The watch gaps here (a DELETED event never delivered, a pod never delivered) are faults the
real API server cannot be made to show on cue; the same behaviour across the real API is
in test_ha_cluster.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from peer_recovery_operator.engine import Engine
from peer_recovery_operator.resync import compare
from tests.fake_api import FakeApi
from tests.operator.bodies import T0, job_body, job_pod_bodies, pod_body
from tests.operator.test_engine import Clock, feed_back, make, run, settle, start_job


def stored(fake: FakeApi, *pods: dict[str, Any]) -> None:
    fake.pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in pods}


def test_a_standby_acts_on_nothing_until_it_leads_then_records_what_the_leader_missed() -> None:
    async def scenario() -> None:
        standby, fake, _ = make()
        standby.leading = lambda: False
        start_job(standby)
        replacement = pod_body("train", "worker", 0, uid="new", created=40)
        standby.pod_event("ADDED", replacement)
        await standby.sweep()
        await asyncio.sleep(0.05)
        assert fake.recoveries == {} and fake.calls == []
        assert standby._work  # kept for a takeover
        # the leader died before recording it: the standby takes over and records it
        standby.leading = lambda: True
        standby.start_leading()
        await settle(standby)
        assert [r["spec"]["target"]["podUID"] for r in fake.recoveries.values()] == ["new"]

    run(scenario)


def test_a_replacement_the_leader_recorded_is_not_recorded_twice_on_takeover() -> None:
    async def scenario() -> None:
        leader, fake, clock = make()
        standby = Engine(fake, leader.config, clock=clock)
        standby.leading = lambda: False
        for engine in (leader, standby):
            start_job(engine)
            engine.pod_event("ADDED", pod_body("train", "worker", 0, uid="new", created=40))
        await settle(leader)
        assert len(fake.recoveries) == 1
        fake.calls.clear()
        # the standby takes over before the watch brought it the leader's record
        standby.leading = lambda: True
        standby.start_leading()
        await settle(standby)
        assert len(fake.recoveries) == 1
        feed_back(standby, fake)
        await standby.sweep()
        await settle(standby)
        assert len(fake.recoveries) == 1

    run(scenario)


def test_a_standby_forgets_detections_older_than_the_horizon() -> None:
    async def scenario() -> None:
        standby, _, _ = make()
        standby.leading = lambda: False
        start_job(standby)
        standby.pod_event("ADDED", pod_body("train", "worker", 0, uid="new", created=40))
        standby.prune_standby(60.0)
        assert standby._work
        (work,) = standby._work.values()
        work.detections = [(d, time.monotonic() - 61) for d, _ in work.detections]
        standby.prune_standby(60.0)
        assert not standby._work

    run(scenario)


def test_a_pod_deleted_during_a_watch_gap_is_never_chosen_as_source_after_a_resync() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        engine.job_event(None, job_body(workers=1))
        pods = job_pod_bodies(workers=1)  # master-0 and worker-0
        for pod in pods:
            engine.pod_event(None, pod)
        # master-0 is deleted while the watch is away: no DELETED event ever arrives
        stored(fake, pods[1])
        drift = await engine.resync()
        assert [p.name for p in drift.gone_pods] == ["train-master-0"]
        engine.pod_event("ADDED", pod_body("train", "worker", 0, uid="new", created=40))
        await settle(engine)
        (rec,) = fake.recoveries.values()
        assert "source" not in rec["spec"], rec["spec"]  # only the vanished pod could serve
        assert rec["status"]["phase"] == "FellBack"
        assert engine.metrics.resync_drift._value.get() == 1

    run(scenario)


def test_a_resync_takes_in_missed_pods_and_drops_vanished_records() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        start_job(engine)
        engine.pod_event("ADDED", pod_body("train", "worker", 0, uid="new", created=40))
        await settle(engine)
        feed_back(engine, fake)
        (name,) = [n for _, n in fake.recoveries]
        assert engine.metrics.active._value.get() == 1
        # a record deleted and a replacement made while the watches were away
        fake.recoveries.clear()
        pods = job_pod_bodies()
        pods[2] = pod_body("train", "worker", 1, uid="w1-b", created=41)
        pods[1] = pod_body("train", "worker", 0, uid="new", created=40)
        stored(fake, *pods)
        drift = await engine.resync()
        assert drift.gone_recoveries == (("ns", name),)
        assert engine.metrics.active._value.get() == 0
        await settle(engine)
        assert any(r["spec"]["target"]["podUID"] == "w1-b" for r in fake.recoveries.values())

    run(scenario)


def test_pods_a_relist_shows_but_the_watch_never_delivered_mark_it_stalled() -> None:
    async def scenario() -> None:
        engine, fake, clock = make()
        engine.job_event(None, job_body(workers=1))
        stored(fake, *job_pod_bodies(workers=1))
        clock.now = T0.replace(minute=5)  # both pods are minutes old, never delivered
        drift = await engine.resync()
        assert len(drift.unseen_pods) == 2
        assert engine.watch_problem() is None  # the pod watch has not started yet
        other = pod_body("other", "worker", 0, uid="o")
        engine.pod_event(None, other)  # now it has: a pod the relist shows is overdue
        engine.job_event("MODIFIED", job_body(workers=2))  # (a pod outside the spec is ignored)
        stored(fake, *job_pod_bodies(workers=2), other)
        drift = await engine.resync()
        assert [p.name for p in drift.unseen_pods] == ["train-worker-1"]
        assert "has not delivered" in (engine.watch_problem() or "")
        engine.pod_event("MODIFIED", other)
        assert engine.watch_problem() is None
        # a young pod the relist shows first: taken in, and overdue if the watch stays silent
        young = pod_body("train", "worker", 2, uid="young", created=299)
        stored(fake, *job_pod_bodies(workers=2), other, young)
        await engine.resync()
        assert engine.watch_problem() is None
        engine._awaiting_watch["young"] -= 31  # as if the relist had shown it 31 s ago
        await engine.resync()
        assert "has not delivered" in (engine.watch_problem() or "")
        engine.pod_event("MODIFIED", job_pod_bodies(workers=1)[0])  # the watch delivers again
        assert engine.watch_problem() is None

    run(scenario)


def test_compare_never_takes_what_arrived_during_the_list_for_vanished() -> None:
    from peer_recovery_operator.views import pod_view

    pods = [pod_view(b, "train") for b in job_pod_bodies(workers=1)]
    drift = compare(
        live_before=pods[:1],  # worker-0 arrived by the watch after the list was requested
        known_uids_before=[pods[0].uid],
        recoveries_before=[],
        listed_pods=pods[:1],
        listed_recoveries=[],
        list_started=Clock()(),
    )
    assert not drift


class _Untouchable(dict[Any, Any]):
    """The records, refusing to be walked whole (what the sweep must not do on the loop)."""

    def values(self) -> Any:
        raise AssertionError("the sweep walked every record on the event loop")

    def items(self) -> Any:
        raise AssertionError("the sweep walked every record on the event loop")

    def __iter__(self) -> Any:
        raise AssertionError("the sweep walked every record on the event loop")


def test_the_sweep_touches_live_records_only_and_retention_runs_off_the_loop() -> None:
    async def scenario() -> None:
        engine, fake, _ = make(keep_finished=1)
        start_job(engine)
        for i, uid in enumerate(("w0-b", "w0-c", "w0-d")):
            engine.pod_event("ADDED", pod_body("train", "worker", 0, uid=uid, created=40 + i))
            await settle(engine)
            feed_back(engine, fake)
        for body in list(fake.recoveries.values()):  # the first two finish
            if body["spec"]["target"]["podUID"] != "w0-d":
                engine.recovery_event("MODIFIED", fake.runtime_sets_phase(
                    "ns", body["metadata"]["name"], "Succeeded"))  # fmt: skip
        real = engine.state.recoveries
        engine.state.recoveries = _Untouchable(real)
        try:
            await engine.sweep()
        finally:
            engine.state.recoveries = real
        await settle(engine)
        # retention (keep 1 finished per slot) ran on a worker thread over a snapshot
        left = sorted(b["spec"]["target"]["podUID"] for b in fake.recoveries.values())
        assert len(left) == 2 and "w0-d" in left  # the live one, and one finished

    run(scenario)


def test_the_sweeps_decisions_are_made_off_the_event_loop(monkeypatch: Any) -> None:
    from peer_recovery_operator import sweeping

    threads: list[int] = []
    decide = sweeping.decide

    def recording(gathered: sweeping.SweepInput) -> sweeping.SweepDecisions:
        threads.append(threading.get_ident())
        return decide(gathered)

    monkeypatch.setattr(sweeping, "decide", recording)

    async def scenario() -> None:
        engine, fake, _ = make(max_attempts=2)
        start_job(engine)
        new = pod_body("train", "worker", 0, uid="w0-b", created=40)
        engine.pod_event("ADDED", new)
        await settle(engine)
        feed_back(engine, fake)
        (planned,) = fake.recoveries.values()
        engine.pod_event("DELETED", pod_body("train", "master", 0))  # its source goes away
        await engine.sweep()
        await settle(engine)
        feed_back(engine, fake)
        assert threads and threading.get_ident() not in threads
        attempts = sorted(b["spec"]["attempt"] for b in fake.recoveries.values())
        assert attempts == [1, 2], fake.by_phase()  # the verdict made there was applied
        assert planned["spec"]["source"]["pod"] == "train-master-0"

    run(scenario)
