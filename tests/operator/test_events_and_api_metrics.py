"""Events are aggregated into one series per (job, type, reason) with a count, and failed
API calls are counted by verb, resource and code.

The series logic is pure and tested alone; the aggregation and the error metric are then
checked through the real ``KubernetesApi`` against the real API server of the test control
plane, acting as the chart's operator ServiceAccount (so the RBAC it needs is checked too).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from peer_recovery_operator import events
from peer_recovery_operator.kube import KubernetesApi
from peer_recovery_operator.metrics import Metrics
from testbed.operator_process import render_rbac

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
JOB = {
    "apiVersion": "kubeflow.org/v1",
    "kind": "PyTorchJob",
    "name": "train",
    "namespace": "ns",
    "uid": "job-uid",
}


def key(reason: str = "PeerRecoveryPlanned", uid: str = "job-uid") -> events.EventKey:
    return events.event_key({**JOB, "uid": uid}, type_="Normal", reason=reason)


def test_repeats_of_one_series_count_up_and_other_series_start_at_one() -> None:
    series = events.EventSeries()
    first = series.next(key(), T0)
    again = series.next(key(), T0 + timedelta(seconds=5))
    other = series.next(key("PeerRecoveryFellBack"), T0)
    assert (first.count, again.count, other.count) == (1, 2, 1)
    assert first.is_first and not again.is_first
    assert again.first == first.first == "2025-01-01T00:00:00Z"  # the series' start is kept
    assert key().event_name == key().event_name != key("PeerRecoveryFellBack").event_name
    assert key().event_name != key(uid="another-job").event_name  # a new job of that name
    body = events.event_body(again, "m" * 5000, T0 + timedelta(seconds=5), "me")
    assert body["count"] == 2 and len(body["message"]) == events.MESSAGE_LIMIT
    assert body["lastTimestamp"] == "2025-01-01T00:00:05Z"
    assert events.bump_patch(again, "x", T0)["count"] == 2


def test_a_series_made_by_an_earlier_process_continues_its_count() -> None:
    series = events.EventSeries()
    fresh = series.next(key(), T0)
    assert series.continue_from(fresh, {"count": 7, "firstTimestamp": "then"}).count == 8
    assert series.next(key(), T0).count == 9
    assert series.restart(fresh, T0).count == 1 and series.next(key(), T0).count == 2


def test_the_memory_of_series_is_bounded() -> None:
    series = events.EventSeries(capacity=3)
    for i in range(10):
        series.next(key(uid=f"job-{i}"), T0)
    assert len(series) == 3
    assert series.next(key(uid="job-0"), T0).count == 1  # forgotten: found again by name


@pytest.fixture
def operator_api(
    control_plane: Any, namespace: str, tmp_path: Path
) -> Iterator[tuple[KubernetesApi, Metrics, str]]:
    """``KubernetesApi`` as the chart's operator ServiceAccount in ``namespace``, its
    metrics, and its kubeconfig (to make a fresh client: a restarted operator)."""
    release = f"ev-{uuid.uuid4().hex[:8]}"  # its cluster-wide objects are named after it
    manifest = render_rbac(
        control_plane.bin_dir / "helm", release, namespace, **{"watchNamespaces[0]": namespace}
    )
    control_plane.kubectl("apply", "-f", "-", input=manifest)
    try:
        kubeconfig = control_plane.service_account_kubeconfig(namespace, f"{release}-peer-recovery")
        metrics = Metrics()
        yield KubernetesApi(str(kubeconfig), on_error=metrics.api_error), metrics, str(kubeconfig)
    finally:
        control_plane.kubectl(
            "delete", "--ignore-not-found", "-f", "-", input=manifest, check=False
        )


def _events(control_plane: Any, namespace: str) -> list[dict[str, Any]]:
    import json

    out = control_plane.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    return [e for e in json.loads(out)["items"] if e["reason"].startswith("PeerRecovery")]


def _errors(metrics: Metrics) -> dict[tuple[str, ...], float]:
    return {
        tuple(s.labels.values()): s.value
        for m in metrics.registry.collect()
        for s in m.samples
        if s.name == "peer_recovery_api_errors_total"
    }


@pytest.mark.cluster
def test_repeated_events_are_one_object_with_a_count_on_the_real_api_server(
    control_plane: Any, namespace: str, operator_api: tuple[KubernetesApi, Metrics, str]
) -> None:
    api, metrics, kubeconfig = operator_api
    job = {**JOB, "namespace": namespace}
    for i in range(3):
        api.post_event(job, type_="Normal", reason="PeerRecoveryPlanned", message=f"plan {i}")
    api.post_event(job, type_="Warning", reason="PeerRecoveryFellBack", message="no source")
    posted = {e["reason"]: e for e in _events(control_plane, namespace)}
    assert sorted(posted) == ["PeerRecoveryFellBack", "PeerRecoveryPlanned"]
    planned = posted["PeerRecoveryPlanned"]
    assert (planned["count"], planned["message"]) == (3, "plan 2")
    assert planned["involvedObject"]["kind"] == "PyTorchJob"
    # a restarted operator (a fresh client, no memory) continues the series
    restarted = KubernetesApi(kubeconfig, on_error=metrics.api_error)
    restarted.post_event(job, type_="Normal", reason="PeerRecoveryPlanned", message="plan 3")
    planned = {e["reason"]: e for e in _events(control_plane, namespace)}["PeerRecoveryPlanned"]
    assert (planned["count"], planned["message"]) == (4, "plan 3")
    assert len(_events(control_plane, namespace)) == 2
    # the series' object expired (the API server's event TTL): it starts anew
    control_plane.kubectl("delete", "events", "-n", namespace, "--all")
    api.post_event(job, type_="Normal", reason="PeerRecoveryPlanned", message="plan 4")
    (planned,) = _events(control_plane, namespace)
    assert (planned["count"], planned["message"]) == (1, "plan 4")
    # AlreadyExists on the restarted client's create, NotFound on the expired series' patch
    assert _errors(metrics) == {("create", "events", "409"): 1.0, ("patch", "events", "404"): 1.0}


@pytest.mark.cluster
def test_failed_api_calls_are_counted_by_verb_kind_and_code(
    control_plane: Any, namespace: str, operator_api: tuple[KubernetesApi, Metrics, str]
) -> None:
    api, metrics, _ = operator_api
    assert api.get_recovery(namespace, "missing") is None
    with pytest.raises(Exception, match="403"):
        api.get_job("kube-system", "anything")  # outside the namespace the RBAC covers
    assert _errors(metrics) == {
        ("get", "peerrecoveries", "404"): 1.0,
        ("get", "pytorchjobs", "403"): 1.0,
    }
