"""High availability and watch gaps with real operator processes on the real control plane.

Two replicas elect a leader on the chart's Lease under the chart's RBAC; the leader is
SIGKILLed mid-job (no cleanup, no release) and the standby must take over with nothing
missed or recorded twice. A pod deleted while an operator is partitioned (SIGSTOPped),
after an API server restart (so its watch resumes with 410 Gone and a relist that shows
no DELETED event), must not be chosen as a source once the periodic resync has run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from testbed.controlplane import pytorchjob as pj
from testbed.operator_process import (
    OperatorProcess,
    operator_under_rbac,
    operators_under_rbac,
    recoveries,
    wait_for,
)
from tests.operator.test_operator_cluster import ENABLED, custom, ready_job, wait_recovery

pytestmark = pytest.mark.cluster
__all__ = ["custom"]  # the fixture, used by name


def holder(client: Any, namespace: str, lease: str) -> str:
    from kubernetes.client import CoordinationV1Api

    return str(
        CoordinationV1Api(client).read_namespaced_lease(lease, namespace).spec.holder_identity
    )


def leader_of(procs: list[OperatorProcess]) -> OperatorProcess:
    def one_leads() -> OperatorProcess | None:
        leading = [p for p in procs if p.metric("peer_recovery_leader") == 1]
        return leading[0] if len(leading) == 1 else None

    return wait_for("exactly one replica to lead", one_leads, timeout=30)


def targets(custom: Any, namespace: str) -> list[tuple[str, int]]:
    return sorted(
        (r["spec"]["target"]["podUID"], r["spec"]["attempt"]) for r in recoveries(custom, namespace)
    )


def recorded_once_each(custom: Any, namespace: str, uids: list[str]) -> None:
    """Every replacement has its record and none has two of one attempt (names are
    deterministic). A later attempt is only a re-plan: the leader that died may have named
    as source a pod replaced while no replica led, and the new leader re-plans from another
    (an attempt closed with a 're-planning' reason)."""
    found = recoveries(custom, namespace)
    by_uid: dict[str, list[dict[str, Any]]] = {}
    for rec in found:
        by_uid.setdefault(rec["spec"]["target"]["podUID"], []).append(rec)
    assert sorted(by_uid) == sorted(uids), found
    for recs in by_uid.values():
        recs.sort(key=lambda r: r["spec"]["attempt"])
        assert [r["spec"]["attempt"] for r in recs] == list(range(1, len(recs) + 1)), recs
        for closed in recs[:-1]:
            status = closed.get("status") or {}
            assert status.get("phase") == "Failed", closed
            assert "re-planning" in status.get("message", ""), closed


def test_killing_the_leader_mid_job_the_standby_takes_over_missing_and_doubling_nothing(
    control_plane: Any, namespace: str, crd: None, client: Any, custom: Any, tmp_path: Path
) -> None:
    with operators_under_rbac(control_plane, namespace, tmp_path, 2) as (procs, lease):
        leader = leader_of(procs)
        (standby,) = [p for p in procs if p is not leader]
        assert holder(client, namespace, lease) == f"replica-{procs.index(leader)}"
        ready_job(client, namespace, "a", workers=3, annotations=ENABLED)
        first = pj.replace_pod(client, namespace, "a-worker-0")
        wait_recovery(custom, namespace, uid=first["metadata"]["uid"])
        assert standby.metric("peer_recovery_plans_total") == 0  # the standby wrote nothing

        # a replacement the leader may or may not have recorded when it dies, and one made
        # while no replica leads
        racing = pj.replace_pod(client, namespace, "a-worker-1")
        leader.kill()
        leaderless = pj.replace_pod(client, namespace, "a-worker-2")
        for pod in (racing, leaderless):
            wait_recovery(custom, namespace, uid=pod["metadata"]["uid"])
        wait_for(
            "the standby to hold the Lease",
            lambda: holder(client, namespace, lease) == f"replica-{procs.index(standby)}",
            timeout=30,
        )
        assert standby.metric("peer_recovery_leader") == 1
        time.sleep(3)  # give a duplicate the chance to appear
        uids = [p["metadata"]["uid"] for p in (first, racing, leaderless)]
        recorded_once_each(custom, namespace, uids)
        settled = targets(custom, namespace)
        # and the old leader, back as a standby, neither takes the Lease nor writes
        leader.start()
        time.sleep(3)
        assert leader.metric("peer_recovery_leader") == 0
        assert leader.metric("peer_recovery_plans_total") == 0
        assert targets(custom, namespace) == settled


def test_a_pod_deleted_while_the_operator_is_partitioned_is_not_chosen_as_source(
    control_plane: Any, namespace: str, crd: None, client: Any, custom: Any, tmp_path: Path
) -> None:
    from kubernetes.client import CoreV1Api

    ready_job(client, namespace, "a", workers=1, annotations=ENABLED)  # master-0, worker-0
    log = tmp_path / "operator.log"
    with operator_under_rbac(control_plane, namespace, log, "--resync-interval", "1") as proc:
        pods_seen = 'peer_recovery_watch_events_total{resource="pods"}'
        wait_for("the pod watch to list the job's pods", lambda: proc.metric(pods_seen) >= 2)
        proc.pause()
        try:
            # the API server restarts while the operator reads nothing (its watches die with
            # nothing buffered), then the only possible source goes away: the operator's
            # watch resumes from a resourceVersion older than the new watch cache, gets 410
            # Gone and relists, and no DELETED event ever reaches it
            control_plane.stop_apiserver()
            control_plane.start_apiserver()
            core = CoreV1Api(client)
            core.delete_namespaced_pod("a-master-0", namespace, grace_period_seconds=0)
            wait_for(
                "a-master-0 to be gone",
                lambda: (
                    "a-master-0"
                    not in [p.metadata.name for p in core.list_namespaced_pod(namespace).items]
                ),
                timeout=30,
            )
        finally:
            proc.resume()
        gone = f"resync: pod {namespace}/a-master-0 "
        wait_for("the resync to notice the vanished pod", lambda: gone in proc.log(), timeout=60)
        assert proc.metric("peer_recovery_resync_drift_total") >= 1
        new = pj.replace_pod(client, namespace, "a-worker-0")
        rec = wait_recovery(custom, namespace, uid=new["metadata"]["uid"], phase="FellBack")
        assert "source" not in rec["spec"], rec["spec"]
        assert proc.healthy()


def test_a_stalled_watch_fails_healthz_until_the_client_timeout_ends_it(
    control_plane: Any, namespace: str, crd: None, client: Any, tmp_path: Path
) -> None:
    from testbed.stalling_proxy import StallingProxy

    port = int(control_plane.server.rsplit(":", 1)[1])
    proxy = StallingProxy(port)
    via = lambda original: proxy.kubeconfig(original, tmp_path / "proxied.kubeconfig")  # noqa: E731
    log = tmp_path / "operator.log"
    try:
        with operator_under_rbac(
            control_plane, namespace, log, "--resync-interval", "2", via=via
        ) as proc:
            pods_seen = 'peer_recovery_watch_events_total{resource="pods"}'
            ready_job(client, namespace, "a", workers=1, annotations=ENABLED)
            wait_for("the pod watch to deliver the job's pods", lambda: proc.metric(pods_seen) >= 2)
            proxy.stall()  # every open connection, the watches' included, goes silent
            ready_job(client, namespace, "b", workers=1)
            wait_for(
                "/healthz to fail on the stalled pod watch",
                lambda: not proc.healthy(),
                timeout=120,
                why=lambda: proc.log()[-2000:],
            )
            assert "watch stalled?" in proc.log()
            # the client timeout ends the silent watch; kopf reconnects (new connections
            # pass) and the pod watch delivers again
            wait_for("/healthz to recover", proc.healthy, timeout=180)
    finally:
        proxy.close()
