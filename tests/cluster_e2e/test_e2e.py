"""End to end on the real control plane: a PyTorchJob's pod is replaced, the operator plans
(or not), the runtime streams, and the PeerRecovery ends Succeeded with step, bytes and
duration.

Real parts: etcd, kube-apiserver (RBAC, ServiceAccount tokens), the controller manager,
KWOK nodes, the operator as a subprocess under the chart's RBAC, the chart's runtime Role
(``helm template``), and four torchrun agents with the peer-recovery plugin and gloo
workers training a small transformer. Only the kubelet is played: the harness starts the
agent of each Pod with that Pod's identity in its env.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.operator_process import operator_under_rbac
from tests.cluster_e2e.support import (
    ClusterJob,
    job_events,
    recovery_for,
    render_runtime_rbac,
    wait_controllers_settled,
    wait_for,
)

pytestmark = [pytest.mark.cluster, pytest.mark.multiproc, pytest.mark.slow]

REPLACED = 2  # ordinal 2: ddp-worker-1


@pytest.fixture
def runtime_rbac(control_plane: Any, namespace: str, crd: None) -> None:
    manifest = render_runtime_rbac(control_plane.bin_dir / "helm", "pr", namespace)
    control_plane.kubectl("apply", "-f", "-", input=manifest)


@pytest.fixture
def operator(control_plane: Any, namespace: str, crd: None, tmp_path: Path) -> Iterator[Any]:
    # Deadlines far beyond the tests' length: a slow shared machine must not make the
    # operator re-plan a recovery whose report is merely late (the API-server-down test).
    deadlines = ("--plan-deadline", "900", "--stream-deadline", "900")
    with operator_under_rbac(
        control_plane, namespace, tmp_path / "operator.log", *deadlines
    ) as proc:
        yield proc


@pytest.fixture
def shm_root() -> Iterator[Path]:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    root = Path(tempfile.mkdtemp(prefix="peer-recovery-e2e-", dir=base))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_job(
    control_plane: Any, client: Any, namespace: str, tmp_path: Path, shm: Path, **env: str
) -> ClusterJob:
    return ClusterJob(control_plane, client, namespace, tmp_path, shm, env=dict(env))


def assert_exact(job: ClusterJob, paused: list[dict[str, Any]]) -> list[dict[str, Any]]:
    final, restored = job.finish()
    codes = job.job.wait(180)
    assert all(code == 0 for code in codes.values()), (codes, job.job.logs()[-6000:])
    healthy = {p["hash"] for r, p in enumerate(paused) if r != REPLACED}
    assert len(healthy) == 1
    assert {r["hash"] for r in restored} == healthy, restored
    assert restored[REPLACED]["role"] == "receive"
    assert all(r["step"] == paused[0]["step"] for r in restored)
    assert len({f["hash"] for f in final}) == 1
    return restored


def assert_succeeded(rec: dict[str, Any], restored: list[dict[str, Any]]) -> dict[str, Any]:
    status = rec["status"]
    assert status["phase"] == "Succeeded", status
    assert status["step"] == restored[REPLACED]["step"]
    assert status["bytes"] == restored[REPLACED]["bytes"] > 0
    assert status["durationSeconds"] > 0
    assert status["observedAttempt"] == rec["spec"]["attempt"]
    types = [c["type"] for c in status["conditions"]]
    assert "Streaming" in types and "Succeeded" in types
    return status


def test_operator_plans_runtime_streams_and_reports_succeeded(
    control_plane: Any, namespace: str, runtime_rbac: None, operator: Any, client: Any,
    tmp_path: Path, shm_root: Path,
) -> None:  # fmt: skip
    job = make_job(control_plane, client, namespace, tmp_path, shm_root,
                   PEER_RECOVERY_PLAN_TIMEOUT="60")  # fmt: skip
    try:
        paused = job.train_to_pause()
        new = job.lose_pod(REPLACED)
        uid = new["metadata"]["uid"]
        planned = wait_for(
            "the operator's plan",
            lambda: recovery_for(client, namespace, uid, "Planned"),
            timeout=60,
        )
        job.rejoin(REPLACED)
        restored = assert_exact(job, paused)
    finally:
        job.close()
    rec = wait_for(
        "a Succeeded PeerRecovery",
        lambda: recovery_for(client, namespace, uid, "Succeeded"),
        timeout=60,
        why=lambda: str(recovery_for(client, namespace, uid)),
    )
    assert rec["metadata"]["name"] == planned["metadata"]["name"]
    assert rec["spec"]["plannedBy"] == "operator"
    assert rec["spec"]["target"]["pod"] == "ddp-worker-1"
    assert_succeeded(rec, restored)
    # the operator's source was the one used
    source = rec["spec"]["source"]["ordinal"]
    assert restored[REPLACED]["source"] == f"rank {source}"
    reasons = wait_for(
        "the job's Events",
        lambda: (
            r
            if {"PeerRecoveryPlanned", "PeerRecoverySucceeded"}
            <= (r := {e["reason"] for e in job_events(client, namespace, "ddp")})
            else None
        ),
        timeout=30,
    )
    assert "PeerRecoveryPlanned" in reasons


def test_operator_down_runtime_plans_in_band_and_records_planned_by_runtime(
    control_plane: Any, namespace: str, runtime_rbac: None, client: Any,
    tmp_path: Path, shm_root: Path,
) -> None:  # fmt: skip
    job = make_job(control_plane, client, namespace, tmp_path, shm_root,
                   PEER_RECOVERY_PLAN_TIMEOUT="3")  # fmt: skip
    try:
        paused = job.train_to_pause()
        new = job.lose_pod(REPLACED)
        uid = new["metadata"]["uid"]
        job.rejoin(REPLACED)
        restored = assert_exact(job, paused)
    finally:
        job.close()
    rec = recovery_for(client, namespace, uid)
    assert rec is not None, job.job.logs()[-6000:]
    assert rec["spec"]["plannedBy"] == "runtime"
    assert (rec["spec"]["mode"], rec["spec"]["reason"], rec["spec"]["attempt"]) == (
        "Peer", "PodReplaced", 1,
    )  # fmt: skip
    source = rec["spec"]["source"]
    assert restored[REPLACED]["source"] == f"rank {source['ordinal']}"
    assert source["pod"] == job.pods[source["ordinal"]]["metadata"]["name"]
    assert source["podUID"] == job.pods[source["ordinal"]]["metadata"]["uid"]
    status = assert_succeeded(rec, restored)
    assert "no operator plan within 3s" in status["message"]
    assert [c["type"] for c in status["conditions"]] == ["Planned", "Streaming", "Succeeded"]


def test_api_server_down_recovers_in_band_and_writes_status_once_back(
    control_plane: Any, namespace: str, runtime_rbac: None, operator: Any, client: Any,
    tmp_path: Path, shm_root: Path,
) -> None:  # fmt: skip
    job = make_job(control_plane, client, namespace, tmp_path, shm_root,
                   PEER_RECOVERY_PLAN_TIMEOUT="3", PEER_RECOVERY_STATUS_RETRY_S="150")  # fmt: skip
    stopped = False
    try:
        paused = job.train_to_pause()
        new = job.lose_pod(REPLACED)
        uid = new["metadata"]["uid"]
        planned = wait_for(
            "the operator's plan",
            lambda: recovery_for(client, namespace, uid, "Planned"),
            timeout=60,
        )
        control_plane.stop_apiserver()
        stopped = True
        job.rejoin(REPLACED)
        final, restored = job.finish()  # recovered and trained on with no API server
        control_plane.start_apiserver()
        stopped = False
        codes = job.job.wait(200)  # the rejoined agent exits once its status is written
    finally:
        if stopped:
            control_plane.start_apiserver()
        job.close()
        wait_controllers_settled(client)
    assert all(code == 0 for code in codes.values()), codes
    healthy = {p["hash"] for r, p in enumerate(paused) if r != REPLACED}
    assert {r["hash"] for r in restored} == healthy and len(healthy) == 1
    assert len({f["hash"] for f in final}) == 1
    rec = recovery_for(client, namespace, uid)
    assert rec is not None and rec["metadata"]["name"] == planned["metadata"]["name"]
    logs = job.job.logs()
    assert rec["status"]["phase"] == "Succeeded", (rec["status"], logs[-8000:])
    status = assert_succeeded(rec, restored)
    assert "the API server was unreachable" in status["message"], status["message"]
    assert "API server is unreachable" in logs  # the reporter said why it waited
