"""Plain records of the objects the operator reads: pods, PyTorchJobs, nodes, PeerRecoveries.

Pure: each ``*_view`` function takes a body as the API server returns it (a mapping) and
returns a small frozen record, or raises :class:`BadInput` whose message names the object
and the field that was wrong. Everything downstream (detection, planning, lifecycle) works
on these records only, so it never touches raw bodies and never does I/O.
Invariant: a record holds only what decisions need (a few hundred bytes), which is what
keeps the operator's memory flat when it watches thousands of large pods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from peer_recovery import api
from peer_recovery.job_annotations import AnnotationError, JobSettings, parse_job_annotations

__all__ = [
    "BadInput",
    "JobView",
    "NodeView",
    "PodView",
    "RecoveryView",
    "job_name_of_pod",
    "job_view",
    "node_view",
    "parse_time",
    "pod_view",
    "recovery_view",
]

ZONE_LABEL = "topology.kubernetes.io/zone"
SHM_PATH = "/dev/shm"
#: Our own annotation on a PeerRecovery: the target container's restartCount it serves, so
#: that repeated container restarts of one pod incarnation get distinct attempts.
ANNOTATION_RESTART_COUNT = "peerrecovery.io/restart-count"


class BadInput(ValueError):
    """An object the operator cannot use; the message names the object and the field."""


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

    @property
    def has_master(self) -> bool:
        return "master" in self.replica_types

    def ordinal(self, replica_type: str, index: int) -> int:
        """The pod ordinal (DESIGN.md): master-0 is 0, worker-i is i+1 with a Master, else i."""
        if replica_type == "master":
            return index
        return index + 1 if self.has_master else index


@dataclasses.dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    ready: bool
    schedulable: bool
    zone: str


@dataclasses.dataclass(frozen=True, slots=True)
class RecoveryView:
    """One PeerRecovery as the lifecycle sweeper and the planner see it."""

    namespace: str
    name: str
    job: str
    target_pod: str
    target_uid: str
    target_type: str
    target_index: int
    source_pod: str
    source_uid: str
    mode: str
    reason: str
    attempt: int
    planned_by: str
    phase: api.Phase
    phase_since: datetime
    restart_count: int
    resource_version: str
    #: ``reason`` of the condition of the current phase, if its writer left one.
    status_reason: str = ""
    message: str = ""

    @property
    def slot(self) -> tuple[str, str, str, int]:
        return (self.namespace, self.job, self.target_type, self.target_index)


def parse_time(value: object, what: str) -> datetime:
    """An RFC 3339 timestamp as the API server writes it, as an aware datetime."""
    if not isinstance(value, str) or not value:
        raise BadInput(f"{what} is missing")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(f"{what}={value!r} is not an RFC 3339 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = body.get("metadata")
    if not isinstance(meta, Mapping):
        raise BadInput("object has no metadata")
    return meta


def _where(kind: str, meta: Mapping[str, Any]) -> str:
    return f"{kind} {meta.get('namespace', '')}/{meta.get('name', '?')}".replace(" /", " ")


def job_name_of_pod(body: Mapping[str, Any]) -> str | None:
    """The pod's PyTorchJob: its job-name label, else its controller ownerReference."""
    meta = _meta(body)
    label = (meta.get("labels") or {}).get(api.LABEL_JOB_NAME)
    if label:
        return str(label)
    for ref in meta.get("ownerReferences") or ():
        if ref.get("kind") == api.PYTORCHJOB_KIND and ref.get("controller"):
            return str(ref.get("name"))
    return None


def pod_view(body: Mapping[str, Any], job: str | None = None) -> PodView:
    """The record of a pod of a PyTorchJob; :class:`BadInput` names what is missing."""
    meta = _meta(body)
    where = _where("pod", meta)
    labels = meta.get("labels") or {}
    job = job or job_name_of_pod(body)
    if not job:
        raise BadInput(f"{where}: no label {api.LABEL_JOB_NAME} and no PyTorchJob owner")
    replica_type = labels.get(api.LABEL_REPLICA_TYPE)
    if not replica_type:
        raise BadInput(f"{where}: label {api.LABEL_REPLICA_TYPE} is missing")
    raw_index = labels.get(api.LABEL_REPLICA_INDEX)
    if raw_index is None or not str(raw_index).isdigit():
        raise BadInput(f"{where}: label {api.LABEL_REPLICA_INDEX}={raw_index!r} is not an index")
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
        created=parse_time(meta.get("creationTimestamp"), f"{where}: metadata.creationTimestamp"),
        restarts=sum(int(c.get("restartCount") or 0) for c in statuses),
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
    for key, replica_spec in specs.items():
        replicas = (
            (replica_spec or {}).get("replicas", 1) if isinstance(replica_spec, Mapping) else None
        )
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise BadInput(f"{where}: spec.pytorchReplicaSpecs.{key}.replicas={replicas!r}")
        pod_count += replicas
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
        created=parse_time(meta.get("creationTimestamp"), f"{where}: metadata.creationTimestamp"),
        enabled=settings is not None and settings.enabled,
        settings=settings,
        problem=problem,
        replica_types=types,
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


def recovery_view(body: Mapping[str, Any], *, seen_at: datetime) -> RecoveryView:
    """The record of a PeerRecovery. ``phase_since`` is the newest condition of the current
    phase if the writer left one, else ``seen_at`` (when this process first saw the phase)."""
    meta = _meta(body)
    where = _where("PeerRecovery", meta)
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    target = spec.get("target") or {}
    source = spec.get("source") or {}
    try:
        phase = api.phase_of(body)
    except ValueError as error:
        raise BadInput(f"{where}: {error}") from None
    since, status_reason = seen_at, ""
    for condition in status.get("conditions") or ():
        if condition.get("type") == phase.value and condition.get("lastTransitionTime"):
            since = parse_time(condition["lastTransitionTime"], f"{where}: condition time")
            status_reason = str(condition.get("reason") or "")
    raw_restarts = (meta.get("annotations") or {}).get(ANNOTATION_RESTART_COUNT, "0")
    return RecoveryView(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        job=str(spec.get("jobName", "")),
        target_pod=str(target.get("pod", "")),
        target_uid=str(target.get("podUID", "")),
        target_type=str(target.get("replicaType", "")).lower(),
        target_index=int(target.get("replicaIndex", -1)),
        source_pod=str(source.get("pod", "")),
        source_uid=str(source.get("podUID", "")),
        mode=str(spec.get("mode", "")),
        reason=str(spec.get("reason", "")),
        attempt=int(spec.get("attempt", 1)),
        planned_by=str(spec.get("plannedBy", api.PlannedBy.OPERATOR.value)),
        phase=phase,
        phase_since=since,
        restart_count=int(raw_restarts) if str(raw_restarts).isdigit() else 0,
        resource_version=str(meta.get("resourceVersion", "")),
        status_reason=status_reason,
        message=str(status.get("message") or ""),
    )
