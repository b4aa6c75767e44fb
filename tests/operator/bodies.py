"""Bodies of PyTorchJobs and their pods, as the training-operator makes them, for the
operator's unit tests (the in-memory API server they are fed to is ``tests/fake_api.py``)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from peer_recovery.contract import names

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def ts(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


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
            names.LABEL_OPERATOR_NAME: "pytorchjob-controller",
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
