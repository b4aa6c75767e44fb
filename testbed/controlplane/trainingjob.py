"""Helpers for PyTorchJobs run by the real training-operator on ``real_controller_plane``:
a manifest in the style of manifests/examples/, applied with the real kubectl, and waits on
what the controller and the test kubelet do with it.

Invariants: every wait has a deadline and its error shows what was last seen; a job's
master port is a free loopback port (every pod of the test kubelet shares 127.0.0.1).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from testbed.controlplane._support import free_ports
from testbed.controlplane.cluster import ControlPlane
from testbed.waiting import wait_for

__all__ = [
    "JOB_NAME_LABEL",
    "REPLICA_INDEX_LABEL",
    "REPLICA_TYPE_LABEL",
    "apply",
    "condition",
    "job_pods",
    "pod_volume_dir",
    "pytorchjob",
    "read_job",
    "wait_for",
]


JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"


def pytorchjob(
    name: str,
    *,
    command: list[str],
    masters: int = 1,
    workers: int = 1,
    restart_policy: str = "OnFailure",
    env: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    service_account: str | None = None,
    port: int | None = None,
) -> dict[str, Any]:
    """A PyTorchJob whose every pod runs ``command`` in container ``pytorch`` with the pod's
    identity from the downward API and a memory ``emptyDir`` at /dev/shm."""
    container: dict[str, Any] = {
        "name": "pytorch",
        "image": "local",  # the test kubelet runs the command on this machine
        "command": command,
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            *({"name": k, "value": v} for k, v in (env or {}).items()),
        ],
        "ports": [{"name": "pytorchjob-port", "containerPort": port or free_ports(1)[0]}],
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
    }
    template: dict[str, Any] = {
        "spec": {
            "containers": [container],
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
        }
    }
    if service_account:
        template["spec"]["serviceAccountName"] = service_account
    specs: dict[str, Any] = {}
    if masters:
        specs["Master"] = {
            "replicas": masters,
            "restartPolicy": restart_policy,
            "template": copy.deepcopy(template),
        }
    if workers:
        specs["Worker"] = {
            "replicas": workers,
            "restartPolicy": restart_policy,
            "template": copy.deepcopy(template),
        }
    metadata: dict[str, Any] = {"name": name}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata,
        "spec": {"runPolicy": {"cleanPodPolicy": "None"}, "pytorchReplicaSpecs": specs},
    }


def apply(plane: ControlPlane, namespace: str, manifest: dict[str, Any]) -> str:
    """``kubectl apply`` the manifest in ``namespace``; kubectl's output."""
    result = plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
    return result.stdout


def read_job(plane: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    """The PyTorchJob as the API server has it."""
    out = plane.kubectl("get", "pytorchjob", name, "-n", namespace, "-o", "json").stdout
    return json.loads(out)


def job_pods(client: Any, namespace: str, job: str) -> dict[str, dict[str, Any]]:
    """The job's pods (as dicts, by name), including ones being deleted."""
    from kubernetes.client import CoreV1Api

    pods = CoreV1Api(client).list_namespaced_pod(
        namespace, label_selector=f"{JOB_NAME_LABEL}={job}"
    )
    return {p.metadata.name: client.sanitize_for_serialization(p) for p in pods.items}


def condition(job: dict[str, Any], kind: str) -> bool:
    """Whether the job's status has condition ``kind`` True."""
    return any(
        c.get("type") == kind and c.get("status") == "True"
        for c in (job.get("status") or {}).get("conditions") or []
    )


def pod_volume_dir(plane: ControlPlane, pod: dict[str, Any], volume: str = "shm") -> Path:
    """Where the test kubelet keeps ``pod``'s emptyDir ``volume``."""
    meta = pod["metadata"]
    name = f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
    return plane.work_dir / "kubelet" / "pods" / name / "volumes" / volume
