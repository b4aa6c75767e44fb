"""Hand-made PyTorchJobs and pods for the KWOK control plane, where no training-operator
runs: for tests of our operator's watch and planning that need PyTorchJob-shaped objects but
no controller. They imitate the training-operator's conventions only in part (worker-only
jobs still get ``RANK``/``MASTER_*``; no ``PET_*`` elastic env, per-pod Services or
``init-pytorch``; pods are replaced with grace 0 on the same node); tests of what the real
controller does use ``real_controller_plane`` and ``testbed.controlplane.trainingjob``.

Invariants (the training-operator's conventions): pods are named ``<job>-<type>-<index>`` with
the replica type in lower case; they carry the ``training.kubeflow.org/*`` labels, the
``RANK``/``PET_NODE_RANK`` env (the master is rank 0, workers follow), and a controller
ownerReference to the job; each is bound to a fake node (``spec.nodeName``) so KWOK makes it
Running and Ready. Objects are returned as plain camelCase dicts, as the API serves them.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

from testbed.controlplane.cluster import FAKE_NODE_ANNOTATION

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

__all__ = [
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "create_job",
    "create_pods",
    "delete_job",
    "fake_node_names",
    "job_pods",
    "pod_name",
    "replace_pod",
    "wait_pod_gone",
    "wait_pod_ready",
]

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
LABEL_PREFIX = "training.kubeflow.org"
MASTER_PORT = 23456
DEFAULT_IMAGE = "peer-recovery/test-trainer:latest"
_POLL_S = 0.05


def pod_name(job: str, replica_type: str, index: int) -> str:
    """The name the training-operator gives replica ``index`` of ``replica_type``."""
    return f"{job}-{replica_type.lower()}-{index}"


def fake_node_names(api_client: ApiClient) -> list[str]:
    """Names of the KWOK-managed nodes, sorted."""
    from kubernetes.client import CoreV1Api

    nodes = CoreV1Api(api_client).list_node().items
    return sorted(
        n.metadata.name
        for n in nodes
        if (n.metadata.annotations or {}).get(FAKE_NODE_ANNOTATION) == "fake"
    )


def _template(pod_spec_overrides: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "pytorch", "image": DEFAULT_IMAGE}]}
    spec.update(copy.deepcopy(pod_spec_overrides or {}))
    return {"spec": spec}


def create_job(
    api_client: ApiClient,
    namespace: str,
    name: str,
    *,
    workers: int,
    master: bool = True,
    annotations: dict[str, str] | None = None,
    node_names: list[str] | None = None,
    pod_spec_overrides: dict[str, Any] | None = None,
    pods: bool = True,
) -> dict[str, Any]:
    """Create a PyTorchJob and, unless ``pods=False``, its pods (see ``create_pods``).

    Returns the job as stored (with its uid). ``pod_spec_overrides`` is merged shallowly into
    every replica's pod spec (a ``containers`` key replaces the default container).
    """
    from kubernetes.client import CustomObjectsApi

    if workers < 0 or (workers == 0 and not master):
        raise ValueError(f"a job needs at least one replica (workers={workers}, master={master})")
    replica_specs: dict[str, Any] = {}
    if master:
        replica_specs["Master"] = {
            "replicas": 1,
            "restartPolicy": "OnFailure",
            "template": _template(pod_spec_overrides),
        }
    if workers:
        replica_specs["Worker"] = {
            "replicas": workers,
            "restartPolicy": "OnFailure",
            "template": _template(pod_spec_overrides),
        }
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
        "spec": {"pytorchReplicaSpecs": replica_specs, "runPolicy": {"cleanPodPolicy": "None"}},
    }
    job = CustomObjectsApi(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )
    if pods:
        create_pods(api_client, job, node_names=node_names)
    return job


def _replicas(job: dict[str, Any]) -> list[tuple[str, int]]:
    """(replica type, index) for every replica, the master first, as ranks are numbered."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    order = sorted(specs, key=lambda t: (t != "Master", t))
    return [(t, i) for t in order for i in range(int(specs[t].get("replicas", 1)))]


def _pod_manifest(
    job: dict[str, Any], replica_type: str, index: int, rank: int, world: int, node: str
) -> dict[str, Any]:
    meta = job["metadata"]
    job_name, rtype = meta["name"], replica_type.lower()
    has_master = "Master" in job["spec"]["pytorchReplicaSpecs"]
    master_addr = pod_name(job_name, "master" if has_master else rtype, 0)
    labels = {
        f"{LABEL_PREFIX}/job-name": job_name,
        f"{LABEL_PREFIX}/operator-name": "pytorchjob-controller",
        f"{LABEL_PREFIX}/replica-type": rtype,
        f"{LABEL_PREFIX}/replica-index": str(index),
    }
    if rank == 0:
        labels[f"{LABEL_PREFIX}/job-role"] = "master"
    env = {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(MASTER_PORT),
        "WORLD_SIZE": str(world),
        "RANK": str(rank),
        "PET_MASTER_ADDR": master_addr,
        "PET_MASTER_PORT": str(MASTER_PORT),
        "PET_NNODES": str(world),
        "PET_NODE_RANK": str(rank),
        "PYTHONUNBUFFERED": "1",
    }
    replica = job["spec"]["pytorchReplicaSpecs"][replica_type]
    spec = copy.deepcopy(replica["template"]["spec"])
    for container in spec.get("containers", []):
        present = {e["name"] for e in container.get("env", [])}
        container["env"] = container.get("env", []) + [
            {"name": k, "value": v} for k, v in env.items() if k not in present
        ]
    spec["nodeName"] = node
    spec.setdefault("restartPolicy", replica.get("restartPolicy", "OnFailure"))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(job_name, rtype, index),
            "namespace": meta["namespace"],
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": KIND,
                    "name": job_name,
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }


def create_pods(
    api_client: ApiClient,
    job: dict[str, Any],
    *,
    node_names: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Create every replica's pod of ``job`` (a dict as returned by ``create_job``).

    Pods are bound round-robin, in rank order, to ``node_names`` (default: all fake nodes).
    Returns the created pods in rank order.
    """
    from kubernetes.client import CoreV1Api

    nodes = node_names or fake_node_names(api_client)
    if not nodes:
        raise ValueError("no node to bind pods to: pass node_names or start KWOK's fake nodes")
    core = CoreV1Api(api_client)
    replicas = _replicas(job)
    created = []
    for rank, (replica_type, index) in enumerate(replicas):
        manifest = _pod_manifest(
            job, replica_type, index, rank, len(replicas), nodes[rank % len(nodes)]
        )
        pod = core.create_namespaced_pod(job["metadata"]["namespace"], manifest)
        created.append(api_client.sanitize_for_serialization(pod))
    return created


def job_pods(api_client: ApiClient, namespace: str, job: str) -> list[dict[str, Any]]:
    """The job's pods (by the job-name label), sorted by name."""
    from kubernetes.client import CoreV1Api

    pods = CoreV1Api(api_client).list_namespaced_pod(
        namespace, label_selector=f"{LABEL_PREFIX}/job-name={job}"
    )
    return sorted(
        (api_client.sanitize_for_serialization(p) for p in pods.items),
        key=lambda p: p["metadata"]["name"],
    )


def delete_job(api_client: ApiClient, namespace: str, name: str) -> None:
    """Delete the job in the background; the garbage collector removes what it owns."""
    from kubernetes.client import CustomObjectsApi

    CustomObjectsApi(api_client).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, body={"propagationPolicy": "Background"}
    )


def _read_pod(api_client: ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    try:
        pod = CoreV1Api(api_client).read_namespaced_pod(name, namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return api_client.sanitize_for_serialization(pod)


def _is_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def wait_pod_ready(
    api_client: ApiClient,
    namespace: str,
    name: str,
    *,
    uid: str | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Wait until the pod (with ``uid``, if given) is Running and Ready; return it."""
    deadline = time.monotonic() + timeout
    pod = None
    while time.monotonic() < deadline:
        pod = _read_pod(api_client, namespace, name)
        if pod and (uid is None or pod["metadata"]["uid"] == uid) and _is_ready(pod):
            return pod
        time.sleep(_POLL_S)
    seen = (pod or {}).get("status") if pod else "absent"
    raise TimeoutError(
        f"pod {namespace}/{name} not Running and Ready after {timeout:.0f}s; last status: {seen}"
    )


def wait_pod_gone(
    api_client: ApiClient, namespace: str, name: str, uid: str, *, timeout: float = 60.0
) -> None:
    """Wait until no pod ``name`` with ``uid`` exists (absent, or replaced by a new uid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pod = _read_pod(api_client, namespace, name)
        if pod is None or pod["metadata"]["uid"] != uid:
            return
        time.sleep(_POLL_S)
    raise TimeoutError(f"pod {namespace}/{name} (uid {uid}) still present after {timeout:.0f}s")


# Fields the API server or its admission plugins fill in; a recreated pod gets them afresh.
_SERVER_SET_METADATA = (
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "managedFields",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
_SA_VOLUME_PREFIX = "kube-api-access-"


def _recreatable(pod: dict[str, Any]) -> dict[str, Any]:
    new = copy.deepcopy(
        {"apiVersion": "v1", "kind": "Pod", "metadata": pod["metadata"], "spec": pod["spec"]}
    )
    for key in _SERVER_SET_METADATA:
        new["metadata"].pop(key, None)
    spec = new["spec"]
    spec.pop("priority", None)
    injected = {
        v["name"] for v in spec.get("volumes") or [] if v["name"].startswith(_SA_VOLUME_PREFIX)
    }
    spec["volumes"] = [v for v in spec.get("volumes") or [] if v["name"] not in injected]
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        mounts = [m for m in container.get("volumeMounts") or [] if m["name"] not in injected]
        container["volumeMounts"] = mounts
    return new


def replace_pod(
    api_client: ApiClient, namespace: str, pod_name: str, *, timeout: float = 60.0
) -> dict[str, Any]:
    """Delete the pod, wait until it is gone, and create it again with the same name, labels,
    owner and spec (as the training-operator does after a failure); return the new pod, whose
    uid differs. Does not wait for it to be Ready (``wait_pod_ready`` does)."""
    from kubernetes.client import CoreV1Api

    old = _read_pod(api_client, namespace, pod_name)
    if old is None:
        raise LookupError(f"pod {namespace}/{pod_name} does not exist; nothing to replace")
    from kubernetes.client import V1DeleteOptions, V1Preconditions

    # Delete at once (grace 0) and only this uid. A graceful delete would leave the pod
    # Terminating for KWOK's delete stage, and KWOK deletes by name: a delete it queued for
    # the old pod could then remove the replacement created under the same name.
    old_uid = old["metadata"]["uid"]
    options = V1DeleteOptions(grace_period_seconds=0, preconditions=V1Preconditions(uid=old_uid))
    CoreV1Api(api_client).delete_namespaced_pod(pod_name, namespace, body=options)
    wait_pod_gone(api_client, namespace, pod_name, old_uid, timeout=timeout)
    created = CoreV1Api(api_client).create_namespaced_pod(namespace, _recreatable(old))
    return api_client.sanitize_for_serialization(created)
