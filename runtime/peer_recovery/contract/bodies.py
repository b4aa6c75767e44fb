"""Bodies of ``PeerRecovery`` objects: the deterministic name, the target/source records,
and the ``metadata``/``spec``/``status`` both sides write.

Pure, torch-free and kubernetes-free; names come from :mod:`peer_recovery.contract.names`.
Invariants:

- One object per recovery attempt of one pod incarnation: the name is a function of
  (job, target pod, target UID, attempt), so creating it twice is an AlreadyExists, never a
  duplicate, and a re-plan (attempt + 1) is a new object (see
  :mod:`peer_recovery.contract.phases`).
- The body carries an ownerReference to the PyTorchJob, so it goes when the job goes.
- Bodies are built, never sent: the one module that talks to the API server sends them,
  with resourceVersion preconditions on every status write.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from peer_recovery.contract.names import (
    API_VERSION,
    KIND,
    LABEL_RECOVERY_JOB,
    LABEL_RECOVERY_TARGET_UID,
    PYTORCHJOB_API_VERSION,
    PYTORCHJOB_KIND,
    Mode,
    Phase,
    PlannedBy,
    Reason,
    parse_enum,
)

#: The largest ``spec.attempt`` (the CRD's int32 bound).
MAX_ATTEMPT: Final = 2**31 - 1

__all__ = ["MAX_ATTEMPT", "PodRef", "build_peer_recovery", "build_status", "recovery_name"]

# --- Names and bodies -----------------------------------------------------------------------

_NAME_MAX = 63  # a DNS-1123 label, so the name is also valid wherever a label is required
_HASH_CHARS = 10
_NOT_NAME_CHARS = re.compile(r"[^a-z0-9-]+")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def recovery_name(job_name: str, target_pod: str, target_uid: str, attempt: int) -> str:
    """The deterministic name of one recovery attempt of one pod incarnation.

    ``<target pod, sanitised and cut>-a<attempt>-<10 hex of sha256(job, pod, uid, attempt)>``:
    a valid DNS-1123 label of at most 63 characters. The same inputs always give the same
    name, so a second create is an AlreadyExists, never a duplicate; a new pod UID or a new
    attempt gives a new name. Kubeflow names pods ``<job>-<type>-<index>``, so the readable
    part shows the job too.
    """
    for what, text in (
        ("job name", job_name),
        ("target pod", target_pod),
        ("target UID", target_uid),
    ):
        _require_text(text, what)
    _require_attempt(attempt)
    digest = hashlib.sha256(
        "\x00".join((job_name, target_pod, target_uid, str(attempt))).encode()
    ).hexdigest()[:_HASH_CHARS]
    suffix = f"-a{attempt}-{digest}"
    readable = _NOT_NAME_CHARS.sub("-", target_pod.lower()).strip("-")
    readable = readable[: _NAME_MAX - len(suffix)].rstrip("-") or "precov"
    return readable + suffix


@dataclass(frozen=True, slots=True)
class PodRef:
    """``spec.target`` / ``spec.source``: one pod of the job, as the recovery records it."""

    pod: str
    pod_uid: str
    replica_type: str
    replica_index: int
    ordinal: int
    node: str = ""

    def __post_init__(self) -> None:
        _require_text(self.pod, "pod name")
        _require_text(self.pod_uid, f"UID of pod {self.pod!r}")
        _require_text(self.replica_type, f"replica type of pod {self.pod!r}")
        for what, number in (("replica index", self.replica_index), ("ordinal", self.ordinal)):
            if not isinstance(number, int) or isinstance(number, bool) or number < 0:
                raise ValueError(f"{what} of pod {self.pod!r} must be an int >= 0, got {number!r}")
        if not isinstance(self.node, str):
            raise ValueError(f"node of pod {self.pod!r} must be a string, got {self.node!r}")

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "pod": self.pod,
            "podUID": self.pod_uid,
            "replicaType": self.replica_type,
            "replicaIndex": self.replica_index,
            "ordinal": self.ordinal,
        }
        if self.node:
            spec["node"] = self.node
        return spec

    @classmethod
    def from_spec(cls, data: Mapping[str, Any], where: str = "spec.target") -> PodRef:
        """Parse ``spec.target`` or ``spec.source``; errors name the field that was wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be an object, got {data!r}")
        missing = [
            k for k in ("pod", "podUID", "replicaType", "replicaIndex", "ordinal") if k not in data
        ]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        try:
            return cls(
                pod=_shared(data["pod"]),
                pod_uid=data["podUID"],
                replica_type=_shared(data["replicaType"]),
                replica_index=data["replicaIndex"],
                ordinal=data["ordinal"],
                node=data.get("node", ""),
            )
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None


def _shared(value: Any) -> Any:
    """One copy of a string that many records repeat (pod names, replica types)."""
    return sys.intern(value) if type(value) is str else value


def build_peer_recovery(
    *,
    namespace: str,
    job_name: str,
    job_uid: str,
    target: PodRef,
    mode: Mode | str,
    reason: Reason | str,
    attempt: int,
    planned_by: PlannedBy | str,
    source: PodRef | None = None,
) -> dict[str, Any]:
    """The body to create for one recovery attempt (no ``status``: the status subresource
    ignores it on create; write :func:`build_status` next, with a resourceVersion).

    Owned by the PyTorchJob, so it is garbage-collected with the job. ``source`` is None in
    Local mode, and in Peer mode while the recovery is still Pending.
    """
    _require_text(namespace, "namespace")
    _require_text(job_uid, "job UID")
    _require_label_value(job_name, "job name")
    _require_attempt(attempt)
    the_mode = parse_enum(Mode, mode, "spec.mode")
    spec: dict[str, Any] = {
        "jobName": job_name,
        "target": target.to_spec(),
        "mode": the_mode.value,
        "reason": parse_enum(Reason, reason, "spec.reason").value,
        "attempt": attempt,
        "plannedBy": parse_enum(PlannedBy, planned_by, "spec.plannedBy").value,
    }
    if source is not None:
        if the_mode is Mode.LOCAL:
            raise ValueError(
                f"a Local recovery of {target.pod!r} has no source, got {source.pod!r}"
            )
        if (source.pod, source.pod_uid) == (
            target.pod,
            target.pod_uid,
        ) or source.ordinal == target.ordinal:
            raise ValueError(f"pod {target.pod!r} cannot be its own source")
        spec["source"] = source.to_spec()
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": recovery_name(job_name, target.pod, target.pod_uid, attempt),
            "namespace": namespace,
            "labels": {LABEL_RECOVERY_JOB: job_name, LABEL_RECOVERY_TARGET_UID: target.pod_uid},
            "ownerReferences": [
                {
                    "apiVersion": PYTORCHJOB_API_VERSION,
                    "kind": PYTORCHJOB_KIND,
                    "name": job_name,
                    "uid": job_uid,
                    # False: the PyTorchJob's controller (the training-operator) does not
                    # manage this object; the reference is for garbage collection only.
                    "controller": False,
                    # False: deleting the job in the foreground need not wait for its
                    # records, and creators need no update rights on pytorchjobs/finalizers.
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": spec,
    }


def build_status(
    phase: Phase | str,
    *,
    attempt: int,
    message: str = "",
    step: int | None = None,
    bytes_moved: int | None = None,
    duration_seconds: float | None = None,
) -> dict[str, Any]:
    """A ``status`` object (for a merge patch of the status subresource) with the contract's
    keys; fields left as None are omitted so a patch does not clear them."""
    _require_attempt(attempt)
    status: dict[str, Any] = {
        "phase": parse_enum(Phase, phase, "status.phase").value,
        "observedAttempt": attempt,
    }
    if message:
        status["message"] = message
    for key, number in (("step", step), ("bytes", bytes_moved)):
        if number is not None:
            if not isinstance(number, int) or isinstance(number, bool) or number < 0:
                raise ValueError(f"status.{key} must be an int >= 0, got {number!r}")
            status[key] = number
    if duration_seconds is not None:
        if isinstance(duration_seconds, bool) or not duration_seconds >= 0:
            raise ValueError(f"status.durationSeconds must be >= 0, got {duration_seconds!r}")
        status["durationSeconds"] = float(duration_seconds)
    return status


def _require_text(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


def _require_label_value(value: object, what: str) -> None:
    _require_text(value, what)
    assert isinstance(value, str)
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise ValueError(f"{what} {value!r} is not a valid label value (<= 63 characters)")


def _require_attempt(attempt: object) -> None:
    if not isinstance(attempt, int) or isinstance(attempt, bool) or not 1 <= attempt <= MAX_ATTEMPT:
        raise ValueError(f"attempt must be an int in 1..{MAX_ATTEMPT}, got {attempt!r}")
