"""The operator's own pod watch on the real API server: paged listing, live events, slim
bodies (the protocol's 410 and failure paths are in test_watcher.py)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from peer_recovery_operator import views
from peer_recovery_operator.kube import KubernetesApi
from peer_recovery_operator.watcher import Batch, Watcher
from testbed.controlplane import pytorchjob as pj
from testbed.operator_process import wait_for

pytestmark = pytest.mark.cluster


class Seen:
    def __init__(self) -> None:
        self.events: list[tuple[str | None, dict[str, Any]]] = []
        self.batches: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, batch: Batch) -> None:
        with self._lock:
            self.batches.append(len(batch))
            self.events += [(t, dict(b)) for t, b in batch]

    def names(self, event_type: str | None) -> list[str]:
        with self._lock:
            return sorted(b["metadata"]["name"] for t, b in self.events if t == event_type)


def test_pods_are_listed_in_pages_then_watched_and_arrive_slim(
    control_plane: Any, namespace: str, client: Any
) -> None:
    from kubernetes.client import CoreV1Api

    pj.create_job(client, namespace, "a", workers=4)  # 5 pods before the watch starts
    seen = Seen()
    api = KubernetesApi(str(control_plane.kubeconfig))
    watcher = Watcher(api, "pods", namespace, seen, page_size=2, server_timeout=5).start()
    try:
        listed = sorted(p["metadata"]["name"] for p in pj.job_pods(client, namespace, "a"))
        wait_for("the listing", lambda: seen.names(None) == listed, timeout=30)
        assert seen.batches[:3] == [2, 2, 1]  # one hand-over per page
        pj.create_job(client, namespace, "b", workers=0)  # b-master-0, live
        wait_for("the live ADDED", lambda: "b-master-0" in seen.names("ADDED"), timeout=30)
        CoreV1Api(client).delete_namespaced_pod("a-worker-3", namespace, grace_period_seconds=0)
        wait_for("the DELETED", lambda: "a-worker-3" in seen.names("DELETED"), timeout=30)
        # the server ends each watch after 5 s; the watcher resumes without listing again
        threading.Event().wait(6)
        assert watcher.lists == 1
        for _, body in seen.events:
            assert "managedFields" not in body["metadata"]
            assert "image" not in body["spec"]["containers"][0]
            assert views.pod_view(body).namespace == namespace
    finally:
        watcher.stop()


def test_peer_recoveries_are_watched_without_their_managed_fields(
    control_plane: Any, namespace: str, crd: None, client: Any
) -> None:
    from kubernetes.client import CustomObjectsApi

    from peer_recovery.contract import names
    from peer_recovery.contract.bodies import PodRef, build_peer_recovery

    seen = Seen()
    api = KubernetesApi(str(control_plane.kubeconfig))
    watcher = Watcher(api, "peerrecoveries", namespace, seen, server_timeout=5).start()
    try:
        wait_for("the (empty) listing", lambda: watcher.lists == 1, timeout=30)
        body = build_peer_recovery(
            namespace=namespace, job_name="j", job_uid="u", attempt=1,
            target=PodRef("j-worker-0", "p1", "worker", 0, 1),
            mode="Local", reason="ContainerRestarted", planned_by="runtime",
        )  # fmt: skip
        CustomObjectsApi(client).create_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.PLURAL, body
        )
        name = body["metadata"]["name"]
        wait_for("the ADDED", lambda: seen.names("ADDED") == [name], timeout=30)
        ((_, added),) = [e for e in seen.events if e[0] == "ADDED"]
        assert "managedFields" not in added["metadata"]
        assert added["spec"]["target"]["podUID"] == "p1"
    finally:
        watcher.stop()
