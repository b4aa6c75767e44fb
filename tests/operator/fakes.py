"""An in-memory :class:`ClusterApi` and body builders for the operator's unit tests.

The fake keeps PeerRecoveries with increasing resourceVersions and enforces the same
preconditions the API server does (AlreadyExists on create, Conflict on a stale
resourceVersion), so the recorder's retry and idempotence logic is exercised for real.
"""

from __future__ import annotations

import copy
import itertools
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

from peer_recovery.contract import names
from peer_recovery.contract.errors import Conflict

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def ts(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeApi:
    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.recoveries: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.calls: list[str] = []
        self._rv = itertools.count(100)
        self._lock = threading.Lock()

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append("get_job")
        return copy.deepcopy(self.jobs.get((namespace, name)))

    def list_job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        self.calls.append("list_job_pods")
        return [
            copy.deepcopy(p)
            for (ns, _), p in self.pods.items()
            if ns == namespace and p["metadata"]["labels"].get(names.LABEL_JOB_NAME) == job
        ]

    def list_recoveries(self, namespace: str, *, job: str) -> list[dict[str, Any]]:
        self.calls.append("list_recoveries")
        return [
            copy.deepcopy(r)
            for (ns, _), r in self.recoveries.items()
            if ns == namespace and r["spec"]["jobName"] == job
        ]

    def get_recovery(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.recoveries.get((namespace, name)))

    def create_recovery(self, namespace: str, body: Any) -> dict[str, Any] | None:
        with self._lock:
            self.calls.append("create_recovery")
            name = body["metadata"]["name"]
            if (namespace, name) in self.recoveries:
                return None
            stored = copy.deepcopy(dict(body))
            stored.pop("status", None)
            stored["metadata"].update(
                resourceVersion=str(next(self._rv)), uid=f"uid-{name}", creationTimestamp=ts(0)
            )
            self.recoveries[(namespace, name)] = stored
            return copy.deepcopy(stored)

    def patch_recovery_status(
        self, namespace: str, name: str, status: Any, resource_version: str
    ) -> dict[str, Any]:
        with self._lock:
            self.calls.append("patch_recovery_status")
            stored = self.recoveries.get((namespace, name))
            if stored is None:
                raise Conflict(f"{name} is gone")
            if stored["metadata"]["resourceVersion"] != resource_version:
                raise Conflict(f"{name}: resourceVersion {resource_version} is stale")
            stored.setdefault("status", {}).update(copy.deepcopy(dict(status)))
            stored["metadata"]["resourceVersion"] = str(next(self._rv))
            return copy.deepcopy(stored)

    def post_event(self, involved: Any, *, type_: str, reason: str, message: str) -> None:
        self.events.append(
            {"involved": dict(involved), "type": type_, "reason": reason, "message": message}
        )

    # --- test helpers ---------------------------------------------------------------------

    def runtime_sets_phase(self, namespace: str, name: str, phase: str) -> dict[str, Any]:
        """What the runtime would write (no operator condition)."""
        stored = self.recoveries[(namespace, name)]
        stored.setdefault("status", {})["phase"] = phase
        stored["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(stored)

    def by_phase(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        for (_, name), body in sorted(self.recoveries.items()):
            phase = (body.get("status") or {}).get("phase", "Pending")
            result.setdefault(phase, []).append(name)
        return result


def job_body(
    name: str = "train",
    *,
    namespace: str = "ns",
    workers: int = 3,
    master: bool = True,
    enabled: bool = True,
    annotations: dict[str, str] | None = None,
    created: float = 0,
) -> dict[str, Any]:
    notes = {names.ANNOTATION_ENABLED: names.ANNOTATION_ENABLED_VALUE} if enabled else {}
    notes.update(annotations or {})
    specs: dict[str, Any] = {"Worker": {"replicas": workers}}
    if master:
        specs["Master"] = {"replicas": 1}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"job-uid-{name}",
            "creationTimestamp": ts(created),
            "annotations": notes,
            "resourceVersion": "1",
        },
        "spec": {"pytorchReplicaSpecs": specs},
    }


def pod_body(
    job: str = "train",
    replica_type: str = "worker",
    index: int = 0,
    *,
    namespace: str = "ns",
    uid: str | None = None,
    created: float = 1,
    restarts: int = 0,
    ready: bool = True,
    node: str = "node-0",
    shm_memory: bool = False,
    terminating: bool = False,
) -> dict[str, Any]:
    name = f"{job}-{replica_type}-{index}"
    spec: dict[str, Any] = {
        "nodeName": node,
        "containers": [{"name": "pytorch", "image": "x", "volumeMounts": []}],
        "volumes": [],
    }
    if shm_memory:
        spec["volumes"].append({"name": "shm", "emptyDir": {"medium": "Memory"}})
        spec["containers"][0]["volumeMounts"].append({"name": "shm", "mountPath": "/dev/shm"})
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": uid or f"{name}-uid-1",
        "creationTimestamp": ts(created),
        "labels": {
            names.LABEL_JOB_NAME: job,
            names.LABEL_REPLICA_TYPE: replica_type,
            names.LABEL_REPLICA_INDEX: str(index),
        },
    }
    if terminating:
        meta["deletionTimestamp"] = ts(created + 100)
    return {
        "metadata": meta,
        "spec": spec,
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [{"name": "pytorch", "restartCount": restarts}],
        },
    }


def job_pod_bodies(
    job: str = "train", *, workers: int = 3, master: bool = True, **kw: Any
) -> list[dict[str, Any]]:
    pods = [pod_body(job, "master", 0, node="node-0", **kw)] if master else []
    pods += [pod_body(job, "worker", i, node=f"node-{i + 1}", **kw) for i in range(workers)]
    return pods
