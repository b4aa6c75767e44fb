"""Plain records of the objects the operator reads: pods, PyTorchJobs and nodes.

Pure: each ``*_view`` function takes a body as the API server returns it (a mapping) and
returns a small frozen record, or raises :class:`BadInput` whose message names the object
and the field that was wrong. Everything downstream (detection, planning, lifecycle) works
on these records only, so it never touches raw bodies and never does I/O. PeerRecoveries
are read with the contract's one parser (:mod:`peer_recovery.contract.records`).
Invariant: a record holds only what decisions need (a few hundred bytes), which is what
keeps the operator's memory flat when it watches thousands of large pods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from peer_recovery.contract import names
from peer_recovery.contract.annotations import AnnotationError, JobSettings, parse_job_annotations
from peer_recovery.contract.ordinals import pod_ordinal
from peer_recovery.contract.records import RecordError, parse_time

__all__ = [
    "POD_LABEL_SELECTOR",
    "BadInput",
    "JobView",
    "NodeView",
    "PodView",
    "is_pytorchjob_pod",
    "job_name_of_pod",
    "job_view",
    "node_view",
    "pod_view",
    "slim_pod",
    "slim_recovery",
]

ZONE_LABEL = "topology.kubernetes.io/zone"
SHM_PATH = "/dev/shm"
#: The name the training-operator's PyTorchJob controller puts in the operator-name label
#: of every pod it creates (TFJob, MPIJob, ... pods carry their own controller's name).
PYTORCHJOB_CONTROLLER = "pytorchjob-controller"
#: The server-side label selector of the pod watch: the PyTorchJob controller's pods only.
POD_LABEL_SELECTOR = f"{names.LABEL_OPERATOR_NAME}={PYTORCHJOB_CONTROLLER}"


class BadInput(RecordError):
    """An object the operator cannot use; the message names the object and the field."""


def _time(value: object, what: str) -> datetime:
    try:
        return parse_time(value, what)
    except RecordError as error:
        raise BadInput(str(error)) from None


@dataclasses.dataclass(frozen=True, slots=True)
class PodView:
    """What detection and planning need from one pod."""

    namespace: str
    name: str
    uid: str
    job: str
    replica_type: str
    replica_index: int
    created: datetime
    restarts: int
    ready: bool
    terminating: bool
    node: str
    shm_in_memory: bool

    @property
    def slot(self) -> tuple[str, str, str, int]:
        """(namespace, job, type, index): the identity a replacement keeps."""
        return (self.namespace, self.job, self.replica_type, self.replica_index)


@dataclasses.dataclass(frozen=True, slots=True)
class JobView:
    """What the operator needs from one PyTorchJob: opt-in, replication and shape."""

    namespace: str
    name: str
    uid: str
    created: datetime
    enabled: bool
    #: None when the annotations are malformed; ``problem`` then says what is wrong.
    settings: JobSettings | None
    problem: str
    replica_types: frozenset[str]
    #: ``spec.runPolicy.suspend``: the controller deletes every pod while it is true.
    suspended: bool = False
    #: ``(type, replicas)`` per replica type, sorted: what elastic scaling changes.
    replicas: tuple[tuple[str, int], ...] = ()
    #: ``spec.elasticPolicy`` is set: its worker count may change while it runs.
    elastic: bool = False

    def replica_count(self, replica_type: str) -> int | None:
        """Pods of ``replica_type`` the spec asks for (None: the type is not in the spec)."""
        return dict(self.replicas).get(replica_type)

    @property
    def has_master(self) -> bool:
        return "master" in self.replica_types

    def ordinal(self, replica_type: str, index: int) -> int:
        """The pod ordinal (:func:`peer_recovery.contract.ordinals.pod_ordinal`)."""
        return pod_ordinal(replica_type, index, has_master=self.has_master)


@dataclasses.dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    ready: bool
    schedulable: bool
    zone: str


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = body.get("metadata")
    if not isinstance(meta, Mapping):
        raise BadInput("object has no metadata")
    return meta


def _where(kind: str, meta: Mapping[str, Any]) -> str:
    return f"{kind} {meta.get('namespace', '')}/{meta.get('name', '?')}".replace(" /", " ")


def is_pytorchjob_pod(body: Mapping[str, Any]) -> bool:
    """Was the pod made by the PyTorchJob controller (not a TFJob's, MPIJob's, ...)?"""
    labels = (body.get("metadata") or {}).get("labels") or {}
    return labels.get(names.LABEL_OPERATOR_NAME) == PYTORCHJOB_CONTROLLER


def job_name_of_pod(body: Mapping[str, Any]) -> str | None:
    """The pod's PyTorchJob: its job-name label, else its controller ownerReference."""
    meta = _meta(body)
    label = (meta.get("labels") or {}).get(names.LABEL_JOB_NAME)
    if label:
        return str(label)
    for ref in meta.get("ownerReferences") or ():
        if ref.get("kind") == names.PYTORCHJOB_KIND and ref.get("controller"):
            return str(ref.get("name"))
    return None


def pod_view(body: Mapping[str, Any], job: str | None = None) -> PodView:
    """The record of a pod of a PyTorchJob; :class:`BadInput` names what is missing."""
    meta = _meta(body)
    where = _where("pod", meta)
    labels = meta.get("labels") or {}
    job = job or job_name_of_pod(body)
    if not job:
        raise BadInput(f"{where}: no label {names.LABEL_JOB_NAME} and no PyTorchJob owner")
    replica_type = labels.get(names.LABEL_REPLICA_TYPE)
    if not replica_type:
        raise BadInput(f"{where}: label {names.LABEL_REPLICA_TYPE} is missing")
    raw_index = labels.get(names.LABEL_REPLICA_INDEX)
    if raw_index is None or not str(raw_index).isdigit():
        raise BadInput(f"{where}: label {names.LABEL_REPLICA_INDEX}={raw_index!r} is not an index")
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    statuses = status.get("containerStatuses") or ()
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )
    return PodView(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        job=job,
        replica_type=str(replica_type).lower(),
        replica_index=int(raw_index),
        created=_time(meta.get("creationTimestamp"), f"{where}: metadata.creationTimestamp"),
        restarts=sum(
            int(c.get("restartCount") or 0)
            for c in statuses
            if c.get("name") == names.PYTORCH_CONTAINER
        ),
        ready=ready,
        terminating=bool(meta.get("deletionTimestamp")),
        node=str(spec.get("nodeName") or ""),
        shm_in_memory=shm_is_memory(spec),
    )


def shm_is_memory(spec: Mapping[str, Any]) -> bool:
    """Does a container mount ``/dev/shm`` from a memory-backed emptyDir (survives restarts)?"""
    memory_volumes = {
        v.get("name")
        for v in spec.get("volumes") or ()
        if isinstance(v.get("emptyDir"), Mapping) and v["emptyDir"].get("medium") == "Memory"
    }
    return any(
        m.get("mountPath", "").rstrip("/") == SHM_PATH and m.get("name") in memory_volumes
        for c in spec.get("containers") or ()
        for m in c.get("volumeMounts") or ()
    )


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """The pod body cut to the fields the operator reads (a few hundred bytes of a 10-30 KB
    body): what :func:`is_pytorchjob_pod`, :func:`job_name_of_pod` and :func:`pod_view` read,
    the owners' UIDs (a deleted job's pods) and whether the webhook's annotation is there
    (:mod:`peer_recovery_operator.unmutated`). Invariant: every one of those functions
    returns the same for the slim body as for the full one."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    annotations = meta.get("annotations") or {}
    slim_meta = {
        key: meta[key]
        for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp", "labels")
        if key in meta
    }
    if meta.get("deletionTimestamp"):
        slim_meta["deletionTimestamp"] = meta["deletionTimestamp"]
    if meta.get("ownerReferences"):
        slim_meta["ownerReferences"] = [
            {k: ref[k] for k in ("kind", "name", "uid", "controller") if k in ref}
            for ref in meta["ownerReferences"]
        ]
    if names.ANNOTATION_MUTATED in annotations:
        slim_meta["annotations"] = {names.ANNOTATION_MUTATED: annotations[names.ANNOTATION_MUTATED]}
    return {
        "metadata": slim_meta,
        "spec": {
            "nodeName": spec.get("nodeName"),
            "volumes": [
                {"name": v.get("name"), "emptyDir": v["emptyDir"]}
                for v in spec.get("volumes") or ()
                if isinstance(v.get("emptyDir"), Mapping)
            ],
            "containers": [
                {"volumeMounts": [_mount(m) for m in c.get("volumeMounts") or ()]}
                for c in spec.get("containers") or ()
            ],
        },
        "status": {
            "conditions": [
                {"type": c.get("type"), "status": c.get("status")}
                for c in status.get("conditions") or ()
                if c.get("type") == "Ready"
            ],
            "containerStatuses": [
                {"name": c.get("name"), "restartCount": c.get("restartCount")}
                for c in status.get("containerStatuses") or ()
            ],
        },
    }


def _mount(mount: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": mount.get("name"), "mountPath": mount.get("mountPath", "")}


def slim_recovery(body: Mapping[str, Any]) -> dict[str, Any]:
    """A PeerRecovery body without ``metadata.managedFields`` (often the larger half of a
    record that the operator and the runtime both wrote); everything the contract's parser
    reads is kept."""
    meta = body.get("metadata") or {}
    if "managedFields" not in meta:
        return dict(body)
    return {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


def job_view(body: Mapping[str, Any]) -> JobView:
    """The record of a PyTorchJob. Its shape is the set of ``pytorchReplicaSpecs`` keys."""
    meta = _meta(body)
    where = _where("PyTorchJob", meta)
    annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
    specs = (body.get("spec") or {}).get("pytorchReplicaSpecs")
    if not isinstance(specs, Mapping) or not specs:
        raise BadInput(f"{where}: spec.pytorchReplicaSpecs is missing or empty")
    types = frozenset(str(k).lower() for k in specs)
    unknown = types - {"master", "worker"}
    if unknown:
        raise BadInput(f"{where}: spec.pytorchReplicaSpecs has unknown types {sorted(unknown)}")
    pod_count = 0
    counts = []
    for key, replica_spec in specs.items():
        replicas = (
            (replica_spec or {}).get("replicas", 1) if isinstance(replica_spec, Mapping) else None
        )
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise BadInput(f"{where}: spec.pytorchReplicaSpecs.{key}.replicas={replicas!r}")
        pod_count += replicas
        counts.append((str(key).lower(), replicas))
    spec = body.get("spec") or {}
    suspend = (spec.get("runPolicy") or {}).get("suspend", False)
    if not isinstance(suspend, bool):
        raise BadInput(f"{where}: spec.runPolicy.suspend={suspend!r} is not a boolean")
    settings: JobSettings | None = None
    problem = ""
    try:
        settings = parse_job_annotations(annotations, pod_count=pod_count or None)
    except AnnotationError as error:
        problem = f"{where}: {error}"
    return JobView(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        created=_time(meta.get("creationTimestamp"), f"{where}: metadata.creationTimestamp"),
        enabled=settings is not None and settings.enabled,
        settings=settings,
        problem=problem,
        replica_types=types,
        suspended=suspend,
        replicas=tuple(sorted(counts)),
        elastic=bool(spec.get("elasticPolicy")),
    )


def node_view(body: Mapping[str, Any]) -> NodeView:
    meta = _meta(body)
    conditions = (body.get("status") or {}).get("conditions") or ()
    return NodeView(
        name=str(meta.get("name", "")),
        ready=any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions),
        schedulable=not (body.get("spec") or {}).get("unschedulable", False),
        zone=str((meta.get("labels") or {}).get(ZONE_LABEL, "")),
    )
