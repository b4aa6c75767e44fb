"""Suspend and resume through the real Kubeflow training-operator: the controller deletes every
pod of a suspended PyTorchJob and creates them anew on resume. The operator must read that as
one Event per change on the job, with no PeerRecovery and no Warning; a pod replaced after
the resume is still recovered (so the silence is recognition, not blindness: the pods the
real controller labels reach the operator through its label selector).

Real parts: the control plane, the training-operator, the scheduler, our operator as a
subprocess under the chart's RBAC. Played: the kubelet (the pods just sleep).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peer_recovery.contract import names
from testbed.controlplane import trainingjob as tj
from testbed.controlplane.cluster import ControlPlane
from testbed.operator_process import OperatorProcess, operator_under_rbac
from tests.cluster_fixtures import PEER_RECOVERY_CRD

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

JOB = "susp"
SLEEP = [sys.executable, "-c", "import time; time.sleep(3600)"]


@pytest.fixture
def operator(
    real_controller_plane: ControlPlane, real_namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    plane, ns = real_controller_plane, real_namespace
    plane.kubectl("apply", "-f", str(PEER_RECOVERY_CRD))
    plane.kubectl(
        "wait", "--for=condition=Established", "crd/peerrecoveries.peerrecovery.io", "--timeout=60s"
    )
    with operator_under_rbac(plane, ns, tmp_path / "operator.log") as proc:
        yield proc


def _running(plane: ControlPlane, ns: str, count: int, *, not_uids: set[str]) -> dict[str, str]:
    """Wait for ``count`` Running pods of the job, none with a UID in ``not_uids``."""

    def pods() -> dict[str, str] | None:
        with plane.api_client() as client:
            found = tj.job_pods(client, ns, JOB)
        live = {
            name: p["metadata"]["uid"]
            for name, p in found.items()
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        }
        fresh = len(live) == count and not set(live.values()) & not_uids
        return live if fresh else None

    return tj.wait_for(f"{count} Running pods of {JOB}", pods, timeout=240)


def _gone(plane: ControlPlane, ns: str) -> None:
    def empty() -> bool:
        with plane.api_client() as client:
            return not tj.job_pods(client, ns, JOB)

    tj.wait_for(f"every pod of {JOB} deleted", empty, timeout=240)


def _ours(plane: ControlPlane, ns: str) -> list[dict[str, Any]]:
    out = plane.kubectl("get", "events", "-n", ns, "-o", "json").stdout
    return [
        e
        for e in json.loads(out)["items"]
        if (e.get("source") or {}).get("component") == "peer-recovery-operator"
    ]


def _recoveries(plane: ControlPlane, ns: str) -> list[dict[str, Any]]:
    out = plane.kubectl("get", "peerrecoveries", "-n", ns, "-o", "json").stdout
    return list(json.loads(out)["items"])


def _suspend(plane: ControlPlane, ns: str, value: bool) -> None:
    patch = json.dumps({"spec": {"runPolicy": {"suspend": value}}})
    plane.kubectl("patch", "pytorchjob", JOB, "-n", ns, "--type=merge", "-p", patch)


def _pod_events(operator: OperatorProcess) -> float:
    for line in operator.metrics_text().splitlines():
        if line.startswith('peer_recovery_watch_events_total{resource="pods"}'):
            return float(line.split()[-1])
    return 0.0


def _quiet(operator: OperatorProcess) -> None:
    """Wait until the operator's count of pod events stays put for two seconds."""
    counts: list[float] = []

    def still() -> bool:
        counts.append(_pod_events(operator))
        return len(counts) > 10 and len(set(counts[-10:])) == 1

    tj.wait_for("the operator to handle every pod event", still, timeout=120)


def test_suspend_and_resume_yield_one_event_each_and_no_recovery(
    real_controller_plane: ControlPlane, real_namespace: str, operator: OperatorProcess
) -> None:
    plane, ns = real_controller_plane, real_namespace
    enabled = {names.ANNOTATION_ENABLED: names.ANNOTATION_ENABLED_VALUE}
    tj.apply(plane, ns, tj.pytorchjob(JOB, command=SLEEP, workers=2, annotations=enabled))
    first = _running(plane, ns, 3, not_uids=set())

    _suspend(plane, ns, True)
    _gone(plane, ns)
    _suspend(plane, ns, False)
    resumed = _running(plane, ns, 3, not_uids=set(first.values()))
    _quiet(operator)  # the operator has handled the resumed pods' events before we look
    reasons = lambda: sorted(e["reason"] for e in _ours(plane, ns))  # noqa: E731
    tj.wait_for(
        "the Resumed Event",
        lambda: "PeerRecoveryJobResumed" in reasons(),
        timeout=60,
        why=lambda: str(_ours(plane, ns)),
    )
    assert _recoveries(plane, ns) == []
    events = _ours(plane, ns)
    assert reasons() == ["PeerRecoveryJobResumed", "PeerRecoveryJobSuspended"], events
    assert all(e["type"] == "Normal" and e["count"] == 1 for e in events), events
    assert all(e["involvedObject"]["kind"] == "PyTorchJob" for e in events)

    # a pod replaced after the resume is recovered: the operator is watching these pods
    victim = f"{JOB}-worker-1"
    plane.kubectl("delete", "pod", victim, "-n", ns, "--wait=false")
    after = _running(plane, ns, 3, not_uids={resumed[victim]})
    record = tj.wait_for(
        "a PeerRecovery for the replaced worker",
        lambda: next(
            (r for r in _recoveries(plane, ns) if r["spec"]["target"]["podUID"] == after[victim]),
            None,
        ),
        timeout=120,
        why=operator.log,
    )
    assert record["spec"]["reason"] == "PodReplaced"
    assert len(_recoveries(plane, ns)) == 1
