"""What the mutating webhook adds to a pod of an opted-in PyTorchJob (pure: no I/O).

:func:`mutate_pod` takes the pod being created and its job, both as API dicts, and returns
a :class:`Mutation`: the JSON patch (RFC 6902) that completes the pod, the warnings the
operator posts as Events on the job, and a human-readable list of what it added. It adds
only what is missing and never changes what the user set:

1. The job is not opted in (or its opt-in annotation is malformed): no patch at all.
2. In the training container (``pytorch``, else the first one), each env var below that the
   container does not set already: ``POD_NAME``, ``POD_UID``, ``POD_NAMESPACE``,
   ``NODE_NAME`` (downward API: who the pod is), ``PEER_RECOVERY_REPLICA_INDEX`` (the
   replica-index label: the pod ordinal in a job without a Master), ``PEER_RECOVERY_JOB_UID``
   (the job's UID: part of every snapshot's job identity) and, when the job has
   ``peerrecovery.io/pods-per-replica``, ``PEER_RECOVERY_PODS_PER_REPLICA``.
3. ``/dev/shm``: when nothing is mounted there, a memory ``emptyDir`` and its mount, with
   the ``sizeLimit`` of :func:`shm_size` (the rule is documented there and in
   docs/webhook.md). A user's own ``/dev/shm`` volume is kept as it is.
4. The ServiceAccount: when the pod runs as the namespace's ``default`` account (or names
   none), the runtime's account, which the operator binds to the runtime ClusterRole.
5. The annotation ``peerrecovery.io/mutated``, so the operator can tell pods that came
   through while the webhook was down (failure policy ``Ignore``) from completed ones.

Warnings (never refusals: the webhook must not block training): the memory limit cannot
hold two snapshots, ``/dev/shm`` is smaller than two snapshots, a malformed size annotation,
no ServiceAccount token mounted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from peer_recovery.contract import names
from peer_recovery.contract.annotations import AnnotationError, parse_job_annotations

__all__ = [
    "ANNOTATION_SHM_SIZE",
    "ANNOTATION_SNAPSHOT_SIZE",
    "DOWNWARD_ENV",
    "ENV_PODS_PER_REPLICA",
    "SHM_VOLUME",
    "Mutation",
    "MutationSettings",
    "ShmSize",
    "mutate_pod",
    "shm_size",
]

#: Env var -> downward-API field: who the pod is (the runtime's peer_recovery.kube.identity
#: and peer_recovery.rendezvous.identity read these names; a test checks they agree).
DOWNWARD_ENV: Final = {
    "POD_NAME": "metadata.name",
    "POD_UID": "metadata.uid",
    "POD_NAMESPACE": "metadata.namespace",
    "NODE_NAME": "spec.nodeName",
    "PEER_RECOVERY_REPLICA_INDEX": f"metadata.labels['{names.LABEL_REPLICA_INDEX}']",
}
#: The job's pods-per-replica, read by the runtime (peer_recovery.rendezvous.round).
ENV_PODS_PER_REPLICA: Final = "PEER_RECOVERY_PODS_PER_REPLICA"
#: Name of the volume the webhook adds at /dev/shm.
SHM_VOLUME: Final = "peer-recovery-shm"
SHM_PATH: Final = "/dev/shm"
ANNOTATION_SNAPSHOT_SIZE: Final = names.ANNOTATION_SNAPSHOT_SIZE
ANNOTATION_SHM_SIZE: Final = names.ANNOTATION_SHM_SIZE
_DEFAULT_ACCOUNTS: Final = ("", "default")


@dataclass(frozen=True)
class MutationSettings:
    """What the mutation needs besides the pod and the job."""

    #: The runtime's ServiceAccount, set on pods running as ``default``; "" sets none.
    service_account: str = ""
    #: Written into the ``peerrecovery.io/mutated`` annotation.
    version: str = "1"


@dataclass(frozen=True)
class Mutation:
    #: JSON patch operations; empty when nothing is to change.
    patch: list[dict[str, Any]] = field(default_factory=list)
    #: Problems worth an Event on the job (the pod is admitted regardless).
    warnings: list[str] = field(default_factory=list)
    #: What was added, for the log line.
    added: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ShmSize:
    """The /dev/shm sizeLimit (None: no limit) and why."""

    size: int | None
    reason: str
    warnings: tuple[str, ...] = ()


def shm_size(annotations: Mapping[str, str], memory_limit: int | None) -> ShmSize:
    """The rule for the sizeLimit of the /dev/shm emptyDir, first match wins:

    1. the job's ``peerrecovery.io/shm-size``, as given;
    2. twice the job's ``peerrecovery.io/snapshot-size`` (two snapshot slots);
    3. half the training container's memory limit (tmpfs pages count against the pod's
       memory: the other half is left to the training process);
    4. none (the node's memory bounds it), with a warning.

    Warns when the memory limit cannot hold two snapshots, or the chosen size is smaller
    than two snapshots.
    """
    warnings: list[str] = []
    explicit = _quantity_annotation(annotations, ANNOTATION_SHM_SIZE, warnings)
    snapshot = _quantity_annotation(annotations, ANNOTATION_SNAPSHOT_SIZE, warnings)
    need = None if snapshot is None else 2 * snapshot
    if need is not None and memory_limit is not None and need >= memory_limit:
        warnings.append(
            f"the memory limit {_format(memory_limit)} cannot hold two snapshots of "
            f"{_format(snapshot or 0)} ({ANNOTATION_SNAPSHOT_SIZE}) besides the training "
            "process: raise limits.memory"
        )
    if explicit is not None:
        size, reason = explicit, f"{ANNOTATION_SHM_SIZE}"
    elif need is not None:
        size, reason = need, f"twice {ANNOTATION_SNAPSHOT_SIZE}"
    elif memory_limit is not None:
        size, reason = memory_limit // 2, "half the container's memory limit"
    else:
        warnings.append(
            "no memory limit and no size annotation: /dev/shm has no sizeLimit; set "
            f"limits.memory or {ANNOTATION_SNAPSHOT_SIZE}"
        )
        return ShmSize(None, "no limit known", tuple(warnings))
    if need is not None and size < need:
        warnings.append(
            f"/dev/shm of {_format(size)} cannot hold two snapshots of {_format(snapshot or 0)}"
        )
    return ShmSize(size, reason, tuple(warnings))


def mutate_pod(
    pod: Mapping[str, Any], job: Mapping[str, Any], settings: MutationSettings
) -> Mutation:
    """The patch that completes ``pod`` (being created) for ``job``; see the module's rules."""
    job_annotations = (job.get("metadata") or {}).get("annotations") or {}
    try:
        job_settings = parse_job_annotations(job_annotations)
    except AnnotationError as error:
        return Mutation(warnings=[f"pod left as it is: {error}"])
    if not job_settings.enabled:
        return Mutation()
    spec = pod.get("spec") or {}
    containers: Sequence[Mapping[str, Any]] = spec.get("containers") or ()
    if not containers:
        return Mutation(warnings=["pod left as it is: it has no containers"])
    index = next(
        (i for i, c in enumerate(containers) if c.get("name") == names.PYTORCH_CONTAINER), 0
    )
    container = containers[index]
    at = f"/spec/containers/{index}"
    patch: list[dict[str, Any]] = []
    added: list[str] = []
    warnings: list[str] = []

    wanted: list[dict[str, Any]] = [
        {"name": env, "valueFrom": {"fieldRef": {"fieldPath": path}}}
        for env, path in DOWNWARD_ENV.items()
    ]
    job_uid = (job.get("metadata") or {}).get("uid")
    if job_uid:
        wanted.append({"name": names.ENV_JOB_UID, "value": str(job_uid)})
    if job_settings.pods_per_replica is not None:
        wanted.append({"name": ENV_PODS_PER_REPLICA, "value": str(job_settings.pods_per_replica)})
    have = {item.get("name") for item in container.get("env") or ()}
    missing = [item for item in wanted if item["name"] not in have]
    _append(patch, f"{at}/env", container.get("env"), missing)
    added += [f"env {item['name']}" for item in missing]

    mounts = container.get("volumeMounts") or ()
    user_shm = next((m for m in mounts if _is_shm(m.get("mountPath"))), None)
    memory_limit = _memory_limit(container, warnings)
    sizing = shm_size(job_annotations, memory_limit)
    warnings += sizing.warnings
    if user_shm is None:
        volume_name = _free_name(SHM_VOLUME, {v.get("name") for v in spec.get("volumes") or ()})
        empty_dir: dict[str, Any] = {"medium": "Memory"}
        if sizing.size is not None:
            empty_dir["sizeLimit"] = _format(sizing.size)
        _append(patch, "/spec/volumes", spec.get("volumes"),
                [{"name": volume_name, "emptyDir": empty_dir}])  # fmt: skip
        _append(patch, f"{at}/volumeMounts", container.get("volumeMounts"),
                [{"name": volume_name, "mountPath": SHM_PATH}])  # fmt: skip
        limit = empty_dir.get("sizeLimit", "no sizeLimit")
        added.append(f"/dev/shm memory emptyDir ({limit}: {sizing.reason})")
    else:
        warnings += _user_shm_warnings(spec, user_shm, job_annotations)

    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or ""
    if settings.service_account and account in _DEFAULT_ACCOUNTS:
        op = "replace" if "serviceAccountName" in spec else "add"
        patch.append({"op": op, "path": "/spec/serviceAccountName",
                      "value": settings.service_account})  # fmt: skip
        if "serviceAccount" in spec:  # the deprecated alias must agree, or the API refuses
            patch.append({"op": "replace", "path": "/spec/serviceAccount",
                          "value": settings.service_account})  # fmt: skip
        added.append(f"serviceAccountName {settings.service_account}")

    if spec.get("automountServiceAccountToken") is False:
        warnings.append(
            "the pod mounts no ServiceAccount token (automountServiceAccountToken: false): "
            "its runtime can neither read its plans nor report progress; recovery is "
            "planned in-band only"
        )

    meta = pod.get("metadata") or {}
    if meta.get("annotations") is None:
        patch.append({"op": "add", "path": "/metadata/annotations",
                      "value": {names.ANNOTATION_MUTATED: settings.version}})  # fmt: skip
    else:
        patch.append({"op": "add", "path": f"/metadata/annotations/{_escape(names.ANNOTATION_MUTATED)}",
                      "value": settings.version})  # fmt: skip
    return Mutation(patch=patch, warnings=warnings, added=added)


def _append(
    patch: list[dict[str, Any]], path: str, current: object, items: list[dict[str, Any]]
) -> None:
    """Append ``items`` to the list at ``path``, creating the list when it is absent."""
    if not items:
        return
    if current is None:
        patch.append({"op": "add", "path": path, "value": items})
        return
    patch += [{"op": "add", "path": f"{path}/-", "value": item} for item in items]


def _is_shm(path: object) -> bool:
    return isinstance(path, str) and path.rstrip("/") == SHM_PATH


def _free_name(name: str, taken: set[object]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _memory_limit(container: Mapping[str, Any], warnings: list[str]) -> int | None:
    raw = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    if raw is None:
        return None
    try:
        return _parse_quantity(raw)
    except ValueError:
        warnings.append(f"limits.memory={raw!r} is not a quantity; /dev/shm sized without it")
        return None


def _user_shm_warnings(
    spec: Mapping[str, Any], mount: Mapping[str, Any], annotations: Mapping[str, str]
) -> list[str]:
    """The user's own /dev/shm is kept; say when it cannot serve as the snapshot store."""
    volume = next((v for v in spec.get("volumes") or () if v.get("name") == mount.get("name")), {})
    empty = volume.get("emptyDir")
    if empty is None or (empty or {}).get("medium") != "Memory":
        return [
            f"/dev/shm is the volume {mount.get('name')!r}, not a memory emptyDir: a "
            "snapshot does not survive a container restart on it as it would in memory"
        ]
    warnings: list[str] = []
    snapshot = _quantity_annotation(annotations, ANNOTATION_SNAPSHOT_SIZE, warnings)
    limit = (empty or {}).get("sizeLimit")
    if snapshot is not None and limit is not None:
        try:
            size = _parse_quantity(limit)
        except ValueError:
            return warnings
        if size < 2 * snapshot:
            warnings.append(
                f"/dev/shm ({mount.get('name')!r}, {limit}) cannot hold two snapshots of "
                f"{_format(snapshot)}"
            )
    return warnings


def _quantity_annotation(
    annotations: Mapping[str, str], key: str, warnings: list[str]
) -> int | None:
    raw = annotations.get(key)
    if raw is None:
        return None
    try:
        value = _parse_quantity(raw)
    except ValueError:
        warnings.append(f"annotation {key}={raw!r} is not a quantity such as 8Gi; ignored")
        return None
    if value <= 0:
        warnings.append(f"annotation {key}={raw!r} must be more than 0; ignored")
        return None
    return value


def _parse_quantity(raw: object) -> int:
    """A Kubernetes quantity in bytes (the client's own parser), rounded up."""
    from kubernetes.utils.quantity import parse_quantity  # pure; the operator depends on it

    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise ValueError(f"{raw!r} is not a quantity")
    try:
        return math.ceil(parse_quantity(raw))
    except (ValueError, TypeError, ArithmeticError):
        raise ValueError(f"{raw!r} is not a quantity") from None


def _format(size: int) -> str:
    """Bytes as the shortest exact quantity (8Gi, 512Mi, or plain bytes)."""
    for suffix, unit in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def _escape(key: str) -> str:
    """A JSON-pointer token (RFC 6901): ``~`` and ``/`` escaped."""
    return key.replace("~", "~0").replace("/", "~1")
