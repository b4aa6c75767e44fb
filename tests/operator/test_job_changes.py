"""Detection stays as wide as the real PyTorchJob controller's pods, and no wider: pods of
other kinds of job are ignored; suspend/resume and elastic scaling (pods deleted and made
again without being replaced) yield one Event on the job and no PeerRecovery.

Driven over the in-memory API (``tests/fake_api.py``) with fake time; the real training-
operator's suspend and resume are in ``tests/real_controller_e2e/test_job_changes.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from peer_recovery.contract import names
from peer_recovery_operator import detection
from peer_recovery_operator.views import BadInput, job_view
from tests.fake_api import FakeApi
from tests.operator.bodies import job_body, job_pod_bodies, pod_body
from tests.operator.test_engine import _samples, make, run, settle, start_job


def suspended(body: dict[str, Any], value: bool = True) -> dict[str, Any]:
    body["spec"]["runPolicy"] = {"suspend": value}
    return body


def elastic(workers: int) -> dict[str, Any]:
    body = job_body(workers=workers, master=False)
    body["spec"]["elasticPolicy"] = {"minReplicas": 1, "maxReplicas": 8}
    return body


def event_reasons(fake: FakeApi) -> list[str]:
    return [e["reason"] for e in fake.events]


async def posted(fake: FakeApi, count: int) -> None:
    """Events are posted from a worker thread: wait for them."""
    import asyncio

    for _ in range(200):
        if len(fake.events) >= count:
            return
        await asyncio.sleep(0.01)


def test_pods_of_other_job_kinds_are_ignored() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        start_job(engine)
        # A TFJob of the same name in the namespace: its pods carry the same job-name label.
        for uid in ("tf-1", "tf-2"):
            tf_pod = pod_body("train", "worker", 0, uid=uid, created=40)
            tf_pod["metadata"]["labels"][names.LABEL_OPERATOR_NAME] = "tfjob-controller"
            engine.pod_event("ADDED", tf_pod)
        mpi_pod = pod_body("train", "worker", 1, uid="mpi", created=40)
        del mpi_pod["metadata"]["labels"][names.LABEL_OPERATOR_NAME]
        engine.pod_event("ADDED", mpi_pod)
        await settle(engine)
        assert fake.recoveries == {}
        assert engine.state.pod_in(("ns", "train", "worker", 0)).uid == "train-worker-0-uid-1"

    run(scenario)


def test_suspend_and_resume_yield_one_event_each_and_no_recovery() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        pods = start_job(engine)
        engine.job_event("MODIFIED", suspended(job_body()))
        for pod in pods:  # the controller deletes every pod
            pod["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:50Z"
            engine.pod_event("MODIFIED", pod)
            engine.pod_event("DELETED", pod)
        engine.job_event("MODIFIED", suspended(job_body()))  # a status update: no new Event
        engine.job_event("MODIFIED", suspended(job_body(), False))
        for pod in job_pod_bodies(created=90):  # made anew, with new UIDs
            pod["metadata"]["uid"] += "-resumed"
            engine.pod_event("ADDED", pod)
            engine.pod_event("MODIFIED", pod)
        await settle(engine)
        await posted(fake, 2)
        assert fake.recoveries == {}
        assert event_reasons(fake) == [detection.SUSPENDED, detection.RESUMED]
        assert "suspended" in fake.events[0]["message"]
        assert fake.events[0]["involved"]["kind"] == "PyTorchJob"
        assert _samples(engine, "peer_recovery_job_changes_total") == {
            ((detection.SUSPENDED,),): 1.0,
            ((detection.RESUMED,),): 1.0,
        }
        # a replacement after the resume is recovered as usual
        engine.pod_event("ADDED", pod_body("train", "worker", 1, uid="later", created=200))
        await settle(engine)
        assert [r["spec"]["target"]["podUID"] for r in fake.recoveries.values()] == ["later"]

    run(scenario)


def test_pods_of_a_resumed_job_seen_before_the_resume_are_not_replacements() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        pods = start_job(engine)
        engine.job_event("MODIFIED", suspended(job_body()))
        for pod in pods:
            engine.pod_event("DELETED", pod)
        # the pod watch runs ahead of the job watch: new pods before the resume event
        fresh = job_pod_bodies(created=90)
        for pod in fresh:
            pod["metadata"]["uid"] += "-resumed"
            engine.pod_event("ADDED", pod)
        engine.job_event("MODIFIED", suspended(job_body(), False))
        for pod in fresh:
            engine.pod_event("MODIFIED", pod)
        await settle(engine)
        assert fake.recoveries == {}

    run(scenario)


def test_elastic_scale_down_then_up_yields_events_and_no_recovery() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        engine.job_event(None, elastic(4))
        pods = job_pod_bodies(workers=4, master=False)
        for pod in pods:
            engine.pod_event(None, pod)
        engine.job_event("MODIFIED", elastic(2))
        for pod in pods[2:]:
            engine.pod_event("DELETED", pod)
        engine.job_event("MODIFIED", elastic(4))
        for index in (2, 3):
            joined = pod_body("train", "worker", index, uid=f"joined-{index}", created=300)
            engine.pod_event("ADDED", joined)
            engine.pod_event("MODIFIED", joined)
        await settle(engine)
        await posted(fake, 2)
        assert fake.recoveries == {}
        assert event_reasons(fake) == [detection.SCALED, detection.SCALED]
        assert "worker 4 -> 2" in fake.events[0]["message"]
        assert "worker 2 -> 4" in fake.events[1]["message"]

    run(scenario)


def test_a_scaled_up_pod_seen_before_the_new_count_is_not_a_replacement() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        engine.job_event(None, elastic(2))
        for pod in job_pod_bodies(workers=2, master=False):
            engine.pod_event(None, pod)
        joined = pod_body("train", "worker", 2, uid="joined", created=300)
        engine.pod_event("ADDED", joined)  # before the job's new replica count arrives
        engine.job_event("MODIFIED", elastic(3))
        engine.pod_event("MODIFIED", joined)
        joined_again = pod_body("train", "worker", 2, uid="joined", created=300, restarts=0)
        engine.pod_event("MODIFIED", joined_again)
        await settle(engine)
        assert fake.recoveries == {}

    run(scenario)


def test_a_scaled_up_pod_in_a_relist_is_not_caught_up() -> None:
    async def scenario() -> None:
        engine, fake, _ = make()
        pods = job_pod_bodies(workers=3, master=False)
        pods.append(pod_body("train", "worker", 3, uid="joined", created=300))
        fake.pods = {("ns", p["metadata"]["name"]): p for p in pods}
        engine.job_event(None, elastic(4))
        for pod in pods:  # the operator starts after the scale-up
            engine.pod_event(None, pod)
        await settle(engine)
        assert fake.recoveries == {}

    run(scenario)


def test_job_change_rule_names_what_changed() -> None:
    base = job_view(job_body())
    assert detection.job_change(None, job_view(suspended(job_body()))) is None
    assert detection.job_change(base, job_view(job_body())) is None
    change = detection.job_change(base, job_view(job_body(workers=5)))
    assert change is not None and change.reason == detection.SCALED
    assert "worker 3 -> 5" in change.why and not change.all_pods_leave


def test_a_non_boolean_suspend_is_refused_naming_the_field() -> None:
    body = job_body()
    body["spec"]["runPolicy"] = {"suspend": "yes"}
    with pytest.raises(BadInput, match=r"spec\.runPolicy\.suspend='yes' is not a boolean"):
        job_view(body)
