"""The one parser of ``PeerRecovery`` bodies, for the operator and the runtime alike.

:func:`parse_recovery` turns a body (a mapping as the API server returns it) into a small
frozen :class:`RecoveryRecord`, or raises :class:`RecordError` whose message names the
object and the field that was wrong. :func:`for_target` picks the records of one pod
incarnation, newest attempt first; :func:`job_uid` finds the PyTorchJob's UID in any
record's ownerReference. Pure, torch-free and kubernetes-free.

Invariant: a record holds only what decisions need (a few hundred bytes), which keeps the
operator's memory flat with thousands of records.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from peer_recovery.contract.bodies import PodRef
from peer_recovery.contract.names import (
    ANNOTATION_RESTART_COUNT,
    PYTORCHJOB_GROUP,
    PYTORCHJOB_KIND,
    Mode,
    Phase,
    PlannedBy,
    Reason,
    parse_enum,
)
from peer_recovery.contract.phases import phase_of

__all__ = ["RecordError", "RecoveryRecord", "for_target", "job_uid", "parse_recovery", "parse_time"]


class RecordError(ValueError):
    """A body that is not a usable PeerRecovery; the message names the object and field."""


@dataclasses.dataclass(frozen=True, slots=True)
class RecoveryRecord:
    """One PeerRecovery as both sides decide on it."""

    namespace: str
    name: str
    job: str
    target: PodRef
    #: None in Local mode, and in Peer mode while no source is planned.
    source: PodRef | None
    mode: Mode
    reason: Reason
    attempt: int
    planned_by: PlannedBy
    phase: Phase
    #: When the current phase began: its condition's time, else ``seen_at`` of the parse.
    phase_since: datetime
    restart_count: int
    resource_version: str
    #: ``reason`` of the condition of the current phase, if its writer left one.
    status_reason: str = ""
    message: str = ""

    # Flat accessors for the fields decisions compare most.
    @property
    def target_pod(self) -> str:
        return self.target.pod

    @property
    def target_uid(self) -> str:
        return self.target.pod_uid

    @property
    def target_type(self) -> str:
        return self.target.replica_type.lower()

    @property
    def target_index(self) -> int:
        return self.target.replica_index

    @property
    def target_ordinal(self) -> int:
        return self.target.ordinal

    @property
    def episode(self) -> tuple[str, str, str, int, str]:
        """The attempts for one target incarnation and restart share this key: (namespace,
        job, target UID, restart count, reason)."""
        return (self.namespace, self.job, self.target_uid, self.restart_count, self.reason.value)

    @property
    def source_pod(self) -> str:
        return "" if self.source is None else self.source.pod

    @property
    def source_uid(self) -> str:
        return "" if self.source is None else self.source.pod_uid

    @property
    def source_ordinal(self) -> int | None:
        return None if self.source is None else self.source.ordinal

    @property
    def slot(self) -> tuple[str, str, str, int]:
        """(namespace, job, type, index): the identity a replacement of the target keeps."""
        return (self.namespace, self.job, self.target_type, self.target_index)


def parse_time(value: object, what: str) -> datetime:
    """An RFC 3339 timestamp as the API server writes it, as an aware datetime."""
    if not isinstance(value, str) or not value:
        raise RecordError(f"{what} is missing")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise RecordError(f"{what}={value!r} is not an RFC 3339 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def parse_recovery(body: Mapping[str, Any], *, seen_at: datetime | None = None) -> RecoveryRecord:
    """The record of one PeerRecovery body; :class:`RecordError` names what is wrong.

    ``phase_since`` is the time of the current phase's condition if the writer left one,
    else ``seen_at`` (when the caller first saw the phase; now when not given).
    """
    meta = body.get("metadata")
    if not isinstance(meta, Mapping):
        raise RecordError("PeerRecovery has no metadata")
    where = f"PeerRecovery {meta.get('namespace', '?')}/{meta.get('name', '?')}"
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    if not isinstance(spec, Mapping) or not isinstance(status, Mapping):
        raise RecordError(f"{where}: spec and status must be objects")
    try:
        phase = phase_of(body)
        target = PodRef.from_spec(spec.get("target"), "spec.target")
        source = spec.get("source")
        source_ref = PodRef.from_spec(source, "spec.source") if source else None
        mode = parse_enum(Mode, spec.get("mode", Mode.PEER.value), "spec.mode")
        reason = parse_enum(Reason, spec.get("reason"), "spec.reason")
        planned_by = parse_enum(
            PlannedBy, spec.get("plannedBy", PlannedBy.OPERATOR.value), "spec.plannedBy"
        )
        attempt = spec.get("attempt", 1)
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
            raise ValueError(f"spec.attempt must be an int >= 1, got {attempt!r}")
    except ValueError as error:
        raise RecordError(f"{where}: {error}") from None
    since = seen_at or datetime.now(timezone.utc)
    status_reason = ""
    for condition in status.get("conditions") or ():
        if condition.get("type") == phase.value and condition.get("lastTransitionTime"):
            since = parse_time(condition["lastTransitionTime"], f"{where}: condition time")
            status_reason = str(condition.get("reason") or "")
    raw_restarts = str((meta.get("annotations") or {}).get(ANNOTATION_RESTART_COUNT, "0"))
    return RecoveryRecord(
        # Interned: thousands of records share these few strings (the operator keeps them).
        namespace=sys.intern(str(meta.get("namespace", ""))),
        name=str(meta.get("name", "")),
        job=sys.intern(str(spec.get("jobName", ""))),
        target=target,
        source=source_ref,
        mode=mode,
        reason=reason,
        attempt=attempt,
        planned_by=planned_by,
        phase=phase,
        phase_since=since,
        restart_count=int(raw_restarts) if raw_restarts.isdigit() else 0,
        resource_version=str(meta.get("resourceVersion", "")),
        status_reason=sys.intern(status_reason),
        message=str(status.get("message") or ""),
    )


def for_target(bodies: Iterable[Mapping[str, Any]], uid: str) -> list[RecoveryRecord]:
    """Records targeting pod incarnation ``uid``, newest attempt first (malformed: skipped)."""
    found = []
    for body in bodies:
        target = ((body.get("spec") or {}).get("target") or {}).get("podUID")
        if target != uid:
            continue
        try:
            found.append(parse_recovery(body))
        except RecordError:
            continue
    return sorted(found, key=lambda r: r.attempt, reverse=True)


def job_uid(bodies: Iterable[Mapping[str, Any]], job: str) -> str | None:
    """The PyTorchJob's UID, from the ownerReference of any record of the job."""
    for body in bodies:
        for ref in (body.get("metadata") or {}).get("ownerReferences") or ():
            if (
                ref.get("kind") == PYTORCHJOB_KIND
                and ref.get("name") == job
                and str(ref.get("apiVersion", "")).startswith(PYTORCHJOB_GROUP + "/")
                and ref.get("uid")
            ):
                return str(ref["uid"])
    return None
