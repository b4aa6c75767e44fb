"""The engine end to end over the in-memory API: detection, planning, records, lifecycle.

Real kopf and a real API server are exercised in test_operator_cluster.py; here the seam at
:mod:`peer_recovery_operator.kube` is replaced by ``FakeApi`` so every rule can be driven
with fake time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from peer_recovery.contract import names
from peer_recovery_operator.config import OperatorConfig
from peer_recovery_operator.engine import Engine
from tests.fake_api import FakeApi
from tests.operator.bodies import T0, job_body, job_pod_bodies, pod_body


class Clock:
    def __init__(self) -> None:
        self.now = T0 + timedelta(seconds=30)

    def __call__(self) -> datetime:
        return self.now


def make(**config: Any) -> tuple[Engine, FakeApi, Clock]:
    fake, clock = FakeApi(), Clock()
    settings = {"namespaces": ("ns",), "catch_up_grace": 10.0, **config}
    return Engine(fake, OperatorConfig(**settings), clock=clock), fake, clock


async def settle(engine: Engine) -> None:
    for _ in range(200):
        await asyncio.sleep(0.01)
        if not (engine._running or engine._work or engine._lookups):
            return
    raise AssertionError("engine did not settle")


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def feed_back(engine: Engine, fake: FakeApi) -> None:
    """Deliver what the PeerRecovery watch would: every stored object's current version."""
    for body in list(fake.recoveries.values()):
        engine.recovery_event("MODIFIED", body)


def start_job(engine: Engine, *, enabled: bool = True, **job: Any) -> list[dict[str, Any]]:
    engine.job_event(None, job_body(enabled=enabled, **job))
    pods = job_pod_bodies(workers=job.get("workers", 3))
    for pod in pods:
        engine.pod_event(None, pod)
    return pods


def only(fake: FakeApi) -> dict[str, Any]:
    assert len(fake.recoveries) == 1, sorted(fake.recoveries)
    return next(iter(fake.recoveries.values()))


def test_replaced_pod_gets_exactly_one_planned_recovery_from_a_same_shard_peer() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        start_job(engine, annotations={names.ANNOTATION_PODS_PER_REPLICA: "2"})
        replacement = pod_body("train", "worker", 0, uid="new", created=40, node="node-1")
        engine.pod_event("ADDED", replacement)
        engine.pod_event("MODIFIED", replacement)  # a second event must not plan twice
        await settle(engine)
        rec = only(fake)
        spec, status = rec["spec"], rec["status"]
        assert spec["target"]["pod"] == "train-worker-0" and spec["target"]["podUID"] == "new"
        assert spec["target"]["ordinal"] == 1
        # k=2: ordinal 1 shares shards with ordinal 3 (worker-2) only
        assert spec["source"]["pod"] == "train-worker-2" and spec["source"]["ordinal"] == 3
        assert (spec["mode"], spec["reason"], spec["attempt"]) == ("Peer", "PodReplaced", 1)
        assert spec["plannedBy"] == "operator"
        assert status["phase"] == "Planned" and status["observedAttempt"] == 1
        assert rec["metadata"]["ownerReferences"][0]["uid"] == "job-uid-train"
        assert [e["reason"] for e in fake.events] == ["PeerRecoveryPlanned"]
        assert fake.events[0]["involved"]["kind"] == "PyTorchJob"

    run(scenario)


def test_unannotated_job_yields_nothing_until_annotated_without_restart() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        start_job(engine, enabled=False)
        engine.pod_event("ADDED", pod_body("train", "worker", 1, uid="w1-b", created=40))
        await settle(engine)
        assert fake.recoveries == {}
        engine.job_event("MODIFIED", job_body(enabled=True))
        engine.pod_event("ADDED", pod_body("train", "worker", 1, uid="w1-c", created=50))
        await settle(engine)
        assert only(fake)["spec"]["target"]["podUID"] == "w1-c"

    run(scenario)


@pytest.mark.parametrize(("shm", "mode"), [(True, "Local"), (False, "Peer")])
def test_container_restart_is_detected_in_the_right_mode(shm: bool, mode: str) -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        engine.job_event(None, job_body())
        pods = job_pod_bodies(shm_memory=shm)
        for pod in pods:
            engine.pod_event(None, pod)
        engine.pod_event(
            "MODIFIED", pod_body("train", "worker", 2, restarts=1, shm_memory=shm, node="node-3")
        )
        await settle(engine)
        rec = only(fake)
        assert (rec["spec"]["reason"], rec["spec"]["mode"]) == ("ContainerRestarted", mode)
        assert rec["status"]["phase"] == "Planned"
        assert ("source" in rec["spec"]) == (mode == "Peer")
        # a second restart of the same pod incarnation is a new record, attempt 2
        feed_back(engine, fake)
        engine.pod_event(
            "MODIFIED", pod_body("train", "worker", 2, restarts=2, shm_memory=shm, node="node-3")
        )
        await settle(engine)
        attempts = sorted(r["spec"]["attempt"] for r in fake.recoveries.values())
        assert attempts == [1, 2]

    run(scenario)


def test_restarts_made_while_the_operator_was_down_are_its_baseline_and_the_next_is_recorded() -> (
    None
):
    """A relist cannot tell a restart nobody recorded from one the runtime already
    recovered in-band (its records carry restart count 0), so the restart count a fresh
    operator first lists is its baseline: no late plan; the next restart is recorded."""

    async def scenario() -> None:
        engine, fake, _ = make()
        engine.job_event(None, job_body())
        for pod in job_pod_bodies(shm_memory=True):
            if pod["metadata"]["name"] == "train-worker-2":
                pod = pod_body("train", "worker", 2, restarts=3, shm_memory=True)
            engine.pod_event(None, pod)  # the listing of a freshly started operator
        await settle(engine)
        assert fake.recoveries == {}
        engine.pod_event("MODIFIED", pod_body("train", "worker", 2, restarts=4, shm_memory=True))
        await settle(engine)
        rec = only(fake)
        assert (rec["spec"]["reason"], rec["spec"]["attempt"]) == ("ContainerRestarted", 1)
        assert rec["metadata"]["annotations"][names.ANNOTATION_RESTART_COUNT] == "4"

    run(scenario)


def test_no_qualifying_source_falls_back_with_the_planners_reason() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        engine.job_event(None, job_body(workers=1, master=False))
        engine.pod_event(None, pod_body("train", "worker", 0))
        engine.pod_event("ADDED", pod_body("train", "worker", 0, uid="new", created=40))
        await settle(engine)
        rec = only(fake)
        assert rec["status"]["phase"] == "FellBack"
        assert "no source" in rec["status"]["message"]
        assert [e["reason"] for e in fake.events] == ["PeerRecoveryFellBack"]

    run(scenario)


def test_operator_restart_neither_duplicates_nor_misses() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        start_job(engine)
        engine.pod_event("ADDED", pod_body("train", "worker", 0, uid="w0-b", created=40))
        await settle(engine)
        assert len(fake.recoveries) == 1
        # the operator restarts; meanwhile worker-1 is replaced
        fake.pods = {
            (p["metadata"]["namespace"], p["metadata"]["name"]): p for p in job_pod_bodies()
        }
        for key, uid in ((("ns", "train-worker-0"), "w0-b"), (("ns", "train-worker-1"), "w1-b")):
            fake.pods[key] = pod_body("train", "worker", int(key[1][-1]), uid=uid, created=60)
        fresh, _ = Engine(fake, engine.config, clock=engine._clock), None
        for pod in fake.pods.values():  # pods listed before the job: parked, then checked
            fresh.pod_event(None, pod)
        fresh.job_event(None, job_body())
        await settle(fresh)
        targets = sorted(r["spec"]["target"]["podUID"] for r in fake.recoveries.values())
        assert targets == ["w0-b", "w1-b"]

    run(scenario)


def test_pods_created_together_are_never_caught_up() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        fake.pods = {("ns", p["metadata"]["name"]): p for p in job_pod_bodies(created=500)}
        engine.job_event(None, job_body(created=0))
        for pod in fake.pods.values():
            engine.pod_event(None, pod)
        await settle(engine)
        assert fake.recoveries == {}
        assert "list_job_pods" in fake.calls  # late vs the job: verified, then refused

    run(scenario)


def test_source_pod_deleted_replans_with_another_source_then_fails_at_the_limit() -> None:
    async def scenario() -> None:
        engine, fake, clock = make(max_attempts=2)
        start_job(engine)
        engine.pod_event(
            "ADDED", pod_body("train", "worker", 0, uid="new", created=40, node="node-1")
        )
        await settle(engine)
        feed_back(engine, fake)
        first = only(fake)
        source = first["spec"]["source"]
        gone = pod_body(
            "train", source["replicaType"], source["replicaIndex"], uid=source["podUID"]
        )
        engine.pod_event("DELETED", gone)
        await engine.sweep()
        await settle(engine)
        feed_back(engine, fake)
        phases = fake.by_phase()
        assert len(phases["Failed"]) == 1 and len(phases["Planned"]) == 1
        second = fake.recoveries[("ns", phases["Planned"][0])]
        assert second["spec"]["attempt"] == 2
        assert second["spec"]["source"]["podUID"] != source["podUID"]
        assert "re-planning" in fake.recoveries[("ns", phases["Failed"][0])]["status"]["message"]
        # attempt 2 stalls past the deadline: the limit (2) is reached, so it fails
        clock.now += timedelta(seconds=engine.config.plan_deadline + 1)
        await engine.sweep()
        await settle(engine)
        assert fake.recoveries[("ns", phases["Planned"][0])]["status"]["phase"] == "Failed"
        assert (
            "gave up after 2" in fake.recoveries[("ns", phases["Planned"][0])]["status"]["message"]
        )

    run(scenario)


def test_target_replaced_again_supersedes_its_older_recovery() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        start_job(engine)
        engine.pod_event("ADDED", pod_body("train", "worker", 0, uid="b", created=40))
        await settle(engine)
        feed_back(engine, fake)
        engine.pod_event("ADDED", pod_body("train", "worker", 0, uid="c", created=50))
        await settle(engine)
        by_uid = {r["spec"]["target"]["podUID"]: r["status"] for r in fake.recoveries.values()}
        assert by_uid["b"]["phase"] == "Failed" and "superseded" in by_uid["b"]["message"]
        assert by_uid["c"]["phase"] == "Planned"

    run(scenario)


def test_runtime_terminal_phase_posts_an_event_and_is_left_alone() -> None:
    async def scenario() -> None:
        engine, fake, clock = make()
        start_job(engine)
        engine.pod_event("ADDED", pod_body("train", "worker", 0, uid="b", created=40))
        await settle(engine)
        feed_back(engine, fake)
        name = next(iter(fake.recoveries))[1]
        engine.recovery_event("MODIFIED", fake.runtime_sets_phase("ns", name, "Succeeded"))
        clock.now += timedelta(hours=1)
        await engine.sweep()
        await settle(engine)
        await asyncio.sleep(0.1)
        assert fake.by_phase() == {"Succeeded": [name]}
        assert [e["reason"] for e in fake.events] == [
            "PeerRecoveryPlanned",
            "PeerRecoverySucceeded",
        ]

    run(scenario)


def test_malformed_input_is_reported_once_and_never_raises() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        engine.job_event(None, job_body(annotations={names.ANNOTATION_PODS_PER_REPLICA: "two"}))
        engine.job_event(None, job_body(annotations={names.ANNOTATION_PODS_PER_REPLICA: "two"}))
        bad_pod = pod_body("train", "worker", 0)
        del bad_pod["metadata"]["labels"][names.LABEL_REPLICA_INDEX]
        engine.pod_event(None, bad_pod)
        engine.job_event(
            None, {"metadata": {"name": "odd", "namespace": "ns", "uid": "u"}, "spec": {}}
        )
        engine.recovery_event(
            None, {"metadata": {"name": "x", "namespace": "ns"}, "status": {"phase": "Nope"}}
        )
        await settle(engine)
        await asyncio.sleep(0.1)
        warnings = {
            k[0][0]: v for k, v in _samples(engine, "peer_recovery_input_warnings_total").items()
        }
        assert warnings == {"annotation": 1.0, "pod": 1.0, "job": 1.0, "recovery": 1.0}
        messages = [e["message"] for e in fake.events if e["reason"] == "PeerRecoveryBadInput"]
        assert any("pods-per-replica" in m and "'two'" in m for m in messages)
        assert any("pytorchReplicaSpecs" in m for m in messages)
        assert fake.recoveries == {}

    run(scenario)


def test_missing_job_is_looked_up_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("peer_recovery_operator.engine.UNKNOWN_JOB_CHECK_SECONDS", 0.0)

    async def scenario() -> None:
        engine, fake, _ = make()
        engine.pod_event(None, pod_body("ghost", "worker", 0))
        await engine.sweep()
        await settle(engine)
        assert fake.calls.count("get_job") == 1
        assert _samples(engine, "peer_recovery_input_warnings_total") == {(("job",),): 1.0}

    run(scenario)


def _samples(engine: Engine, name: str) -> dict[Any, float]:
    found = {}
    for metric in engine.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                found[(tuple(sample.labels.values()),)] = sample.value
    return found


def test_a_late_event_about_the_replaced_uid_is_not_a_replacement() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        start_job(engine)
        new = pod_body("train", "worker", 0, uid="new", created=1)  # same second as the original
        engine.pod_event("ADDED", new)
        await settle(engine)
        engine.pod_event("MODIFIED", pod_body("train", "worker", 0, created=1))  # old UID, late
        await settle(engine)
        assert [r["spec"]["target"]["podUID"] for r in fake.recoveries.values()] == ["new"]

    run(scenario)


def test_pods_first_seen_live_are_never_caught_up() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        engine.job_event("ADDED", job_body(created=0))
        for pod in job_pod_bodies(created=500):  # created while the operator watched
            engine.pod_event("ADDED", pod)
        await settle(engine)
        assert fake.recoveries == {} and "list_job_pods" not in fake.calls

    run(scenario)


class _FlakyCreate(FakeApi):
    """The first ``failures`` creates die with a connection reset (not an API error)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def create_recovery(self, namespace: str, body: Any) -> dict[str, Any] | None:
        if self.failures:
            self.failures -= 1
            raise ConnectionResetError("connection reset by peer")
        return super().create_recovery(namespace, body)


def test_a_replacement_is_not_lost_when_one_api_call_fails() -> None:
    async def scenario() -> None:
        fake, clock = _FlakyCreate(failures=1), Clock()
        engine = Engine(fake, OperatorConfig(namespaces=("ns",), catch_up_grace=10.0), clock=clock)
        engine.retry_backoff = (0.01, 0.05)  # seconds: first delay, cap
        start_job(engine)
        engine.pod_event("ADDED", pod_body("train", "worker", 0, uid="new", created=40))
        await settle(engine)
        rec = only(fake)
        assert rec["spec"]["target"]["podUID"] == "new"
        assert rec["status"]["phase"] == "Planned"
        assert engine.metrics.round_failures._value.get() == 1

    run(scenario)


def test_a_sweep_decision_on_a_stale_view_does_not_touch_a_moved_recovery() -> None:
    async def scenario() -> None:
        engine, fake, clock = make()
        start_job(engine)
        engine.pod_event("ADDED", pod_body("train", "worker", 0, uid="new", created=40))
        await settle(engine)
        feed_back(engine, fake)
        rec = only(fake)
        name = rec["metadata"]["name"]
        # Past the plan deadline in the operator's cached view (still Planned) ...
        clock.now += timedelta(seconds=engine.config.plan_deadline + 1)
        # ... but the runtime has just moved it to Streaming; the watch has not caught up.
        fake.runtime_sets_phase("ns", name, "Streaming")
        await engine.sweep()
        await settle(engine)
        assert fake.recovery(name)["status"]["phase"] == "Streaming"
        assert "Failed" not in fake.by_phase()

    run(scenario)


def _gauge(engine: Engine, phase: str) -> float:
    labels = {"phase": phase, "mode": "Peer", "reason": "PodReplaced"}
    return engine.metrics.registry.get_sample_value("peer_recovery_recoveries", labels) or 0.0


def test_deleting_a_job_frees_its_state_and_gauges_and_ignores_its_dying_pods() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        pods = start_job(engine)
        engine.pod_event("ADDED", pod_body("train", "worker", 0, uid="new", created=40))
        await settle(engine)
        feed_back(engine, fake)
        assert _gauge(engine, "Planned") == 1
        assert engine.metrics.active._value.get() == 1
        engine.job_event("DELETED", job_body())
        assert _gauge(engine, "Planned") == 0 and engine.metrics.active._value.get() == 0
        assert engine.state.sizes()["recoveries"] == 0 and engine.state.sizes()["pods"] == 0
        # The garbage collector now deletes the pods: their events are the job's last words.
        for pod in pods:
            pod["metadata"]["deletionTimestamp"] = "2025-01-01T00:10:00Z"
            engine.pod_event("MODIFIED", pod)
            engine.pod_event("DELETED", pod)
        assert engine._parked == {} and engine.state.sizes()["pods"] == 0
        # A new job of the same name starts over.
        start_job(engine)
        assert engine.state.sizes()["pods"] == 4

    run(scenario)


def test_each_problem_is_reported_once_and_the_memory_of_them_is_bounded() -> None:
    async def scenario() -> None:
        engine, _, _ = make()
        bad = pod_body("train", "worker", 0)
        del bad["metadata"]["labels"][names.LABEL_REPLICA_TYPE]
        for uid in ("x", "x", "y"):
            bad["metadata"]["uid"] = uid
            engine.pod_event("ADDED", bad)
        assert engine.metrics.input_warnings.labels("pod")._value.get() == 2
        for i in range(5000):
            bad["metadata"]["uid"] = f"u{i}"
            engine.pod_event("ADDED", bad)
        assert len(engine._warned) <= 4096

    run(scenario)


def test_finished_records_beyond_the_retention_policy_are_deleted() -> None:
    from tests.operator.test_retention import rec

    async def scenario() -> None:
        engine, fake, _ = make(keep_finished=2)
        start_job(engine)
        uid = "train-worker-0-uid-1"  # the pod in the slot (so nothing is superseded)
        history = [rec("Succeeded", attempt=i + 1, restarts=i, at=i, uid=uid) for i in range(5)]
        for record in history:
            body = fake.add(_body_of(record))
            engine.recovery_event("ADDED", body)
        live = fake.add(_body_of(rec("Streaming", attempt=9, restarts=9, at=20, uid=uid)))
        engine.recovery_event("ADDED", live)
        await engine.sweep()
        await settle(engine)
        kept = sorted(n for (_, n) in fake.recoveries)
        assert kept == sorted([history[3].name, history[4].name, live["metadata"]["name"]])
        assert engine.state.sizes()["recoveries"] == 3
        assert engine.metrics.lifecycle.labels("retention")._value.get() == 3
        await engine.sweep()  # nothing more to do
        await settle(engine)
        assert len(fake.recoveries) == 3

    run(scenario)


def test_a_replacement_is_recorded_before_the_rounds_retention_deletions() -> None:
    """Retention work and a replacement in one round: the replacement's record is created
    first, not after one delete call per finished record."""
    from tests.operator.test_retention import rec

    async def scenario() -> None:
        engine, fake, _ = make(keep_finished=1)
        start_job(engine)
        uid = "train-worker-0-uid-1"
        for i in range(4):
            record = rec("Succeeded", attempt=i + 1, restarts=i, at=i, uid=uid)
            engine.recovery_event("ADDED", fake.add(_body_of(record)))
        await engine.sweep()  # queues the deletions on the job's round...
        replacement = pod_body("train", "worker", 1, uid="new", created=40, node="node-1")
        engine.pod_event("ADDED", replacement)  # ...which this replacement joins
        await settle(engine)
        writes = [c for c in fake.calls if c in ("create_recovery", "delete_recovery")]
        assert writes.count("delete_recovery") == 3, writes
        assert writes[0] == "create_recovery", writes

    run(scenario)


def _body_of(record: Any) -> dict[str, Any]:
    """A stored body for a parsed record of tests/operator/test_retention.py."""
    from peer_recovery.contract.bodies import build_peer_recovery, build_status

    body = build_peer_recovery(
        namespace=record.namespace, job_name=record.job, job_uid="job-uid-train",
        target=record.target, mode=record.mode, reason=record.reason,
        attempt=record.attempt, planned_by=record.planned_by,
    )  # fmt: skip
    body["metadata"]["annotations"] = {"peerrecovery.io/restart-count": str(record.restart_count)}
    body["status"] = build_status(record.phase, attempt=record.attempt)
    stamp = record.phase_since.strftime("%Y-%m-%dT%H:%M:%SZ")
    body["status"]["conditions"] = [
        {"type": record.phase.value, "status": "True", "reason": record.status_reason,
         "lastTransitionTime": stamp}
    ]  # fmt: skip
    return body
