"""PeerRecovery bodies, as the runtime reads them (pure).

:func:`view` turns one body (a dict as the API server returns it) into a small frozen
:class:`RecordView`; :func:`for_pod` picks the records of one pod incarnation (by target
UID), newest attempt first; :func:`job_uid` finds the PyTorchJob's UID in any record's
ownerReference. Malformed bodies raise ``ValueError`` naming the object and field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from peer_recovery import api

__all__ = ["RecordView", "for_pod", "job_uid", "view"]


@dataclass(frozen=True)
class RecordView:
    name: str
    resource_version: str
    phase: api.Phase
    attempt: int
    planned_by: api.PlannedBy
    mode: api.Mode
    reason: str
    target_uid: str
    target_ordinal: int
    source_pod: str
    source_ordinal: int | None
    message: str = ""


def view(body: Mapping[str, Any]) -> RecordView:
    meta = body.get("metadata") or {}
    name = str(meta.get("name") or "?")
    where = f"PeerRecovery {meta.get('namespace', '?')}/{name}"
    spec = body.get("spec") or {}
    try:
        target = spec["target"]
        source = spec.get("source") or {}
        return RecordView(
            name=name,
            resource_version=str(meta.get("resourceVersion") or ""),
            phase=api.phase_of(body),
            attempt=int(spec.get("attempt", 1)),
            planned_by=api.parse_enum(
                api.PlannedBy, spec.get("plannedBy", "operator"), "spec.plannedBy"
            ),
            mode=api.parse_enum(api.Mode, spec.get("mode", "Peer"), "spec.mode"),
            reason=str(spec.get("reason") or ""),
            target_uid=str(target["podUID"]),
            target_ordinal=int(target["ordinal"]),
            source_pod=str(source.get("pod") or ""),
            source_ordinal=None if "ordinal" not in source else int(source["ordinal"]),
            message=str((body.get("status") or {}).get("message") or ""),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: malformed: {error}") from None


def for_pod(bodies: Iterable[Mapping[str, Any]], uid: str) -> list[RecordView]:
    """Records targeting pod incarnation ``uid``, newest attempt first (malformed: skipped)."""
    found = []
    for body in bodies:
        target = ((body.get("spec") or {}).get("target") or {}).get("podUID")
        if target != uid:
            continue
        try:
            found.append(view(body))
        except ValueError:
            continue
    return sorted(found, key=lambda r: r.attempt, reverse=True)


def job_uid(bodies: Iterable[Mapping[str, Any]], job: str) -> str | None:
    """The PyTorchJob's UID, from the ownerReference of any record of the job."""
    for body in bodies:
        for ref in (body.get("metadata") or {}).get("ownerReferences") or ():
            if (
                ref.get("kind") == api.PYTORCHJOB_KIND
                and ref.get("name") == job
                and str(ref.get("apiVersion", "")).startswith(api.PYTORCHJOB_GROUP + "/")
                and ref.get("uid")
            ):
                return str(ref["uid"])
    return None
