"""Detection: did this pod event mean a pod needs recovering? Pure, no I/O.

Two questions, both answered from plain records (:mod:`peer_recovery_operator.views`):

- :func:`detect_change` compares the last identity this process knew for a slot
  (namespace, job, replica type, replica index) with the pod now in that slot. A new UID is
  ``PodReplaced`` (``Peer`` mode: the new pod's memory is empty); a rising restart count on
  the same UID is ``ContainerRestarted``, in ``Local`` mode when the pod mounts ``/dev/shm``
  from a memory emptyDir (the snapshot survived the container) and ``Peer`` mode otherwise.
- :func:`detect_missed_replacement` is the catch-up rule for a pod that already existed
  when this process started (it arrives in the watch's initial listing) in a slot this
  process has never seen. The job's original pods are created in one burst by the
  training-operator: sorting the creation times of the job's other pods, the burst runs
  from the oldest for as long as each next pod follows the previous one within ``grace``.
  A pod created more than ``grace`` after the end of that burst, with no PeerRecovery for
  its UID, is a replacement made while nobody watched. Handled replacements have their
  record, so they are never planned twice. Pods first seen through a live ``ADDED`` event
  were created while the operator watched, so they are originals (or new slots), never
  caught up. Container restarts that happened while the operator was down are not caught
  up: the current restart count becomes the baseline (the runtime's in-band fallback still
  recovers those, with ``plannedBy: runtime``).

Invariants: a terminating pod, or an event older than what is known (a stale event for an
old UID after the new one was seen), never yields a detection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime, timedelta

from peer_recovery.contract import names
from peer_recovery_operator.views import PodView

__all__ = [
    "Detection",
    "KnownPod",
    "burst_end",
    "detect_change",
    "detect_missed_replacement",
    "mode_for",
]


@dataclasses.dataclass(frozen=True, slots=True)
class KnownPod:
    """The identity this process last knew for one slot."""

    uid: str
    created: datetime
    restarts: int

    @classmethod
    def of(cls, pod: PodView) -> KnownPod:
        return cls(uid=pod.uid, created=pod.created, restarts=pod.restarts)


@dataclasses.dataclass(frozen=True, slots=True)
class Detection:
    """A pod that needs a recovery, and why, in words for Events and logs."""

    target: PodView
    reason: names.Reason
    mode: names.Mode
    why: str
    previous_uid: str = ""


def mode_for(reason: names.Reason, pod: PodView) -> names.Mode:
    """``Local`` only when the same pod restarted a container and its ``/dev/shm`` survived."""
    if reason is names.Reason.CONTAINER_RESTARTED and pod.shm_in_memory:
        return names.Mode.LOCAL
    return names.Mode.PEER


def detect_change(previous: KnownPod | None, current: PodView) -> Detection | None:
    """Compare the known identity of a slot with the pod now in it."""
    if previous is None or current.terminating:
        return None
    if current.uid != previous.uid:
        if current.created < previous.created:
            return None  # a late event about the pod this one replaced
        return Detection(
            target=current,
            reason=names.Reason.POD_REPLACED,
            mode=names.Mode.PEER,
            why=f"pod {current.name} was replaced: UID {previous.uid} -> {current.uid}",
            previous_uid=previous.uid,
        )
    if current.restarts > previous.restarts:
        reason = names.Reason.CONTAINER_RESTARTED
        mode = mode_for(reason, current)
        where = (
            "its /dev/shm snapshot survived" if mode is names.Mode.LOCAL else "no memory /dev/shm"
        )
        return Detection(
            target=current,
            reason=reason,
            mode=mode,
            why=(
                f"a container of pod {current.name} restarted "
                f"(restarts {previous.restarts} -> {current.restarts}; {where})"
            ),
        )
    return None


def detect_missed_replacement(
    current: PodView,
    others_created: Iterable[datetime],
    *,
    grace: timedelta,
    recorded_uids: Iterable[str],
) -> Detection | None:
    """The catch-up rule for a slot first seen by this process (see the module docstring)."""
    if current.terminating or current.uid in set(recorded_uids):
        return None
    end = burst_end(others_created, grace)
    if end is None or current.created - end <= grace:
        return None
    late = (current.created - end).total_seconds()
    return Detection(
        target=current,
        reason=names.Reason.POD_REPLACED,
        mode=names.Mode.PEER,
        why=(
            f"pod {current.name} was created {late:.0f}s after its job's other pods "
            f"(grace {grace.total_seconds():.0f}s) and has no PeerRecovery: "
            "replaced while the operator was not watching"
        ),
    )


def burst_end(created: Iterable[datetime], grace: timedelta) -> datetime | None:
    """The creation time of the last pod of the job's initial creation burst."""
    ordered = sorted(created)
    if not ordered:
        return None
    end = ordered[0]
    for moment in ordered[1:]:
        if moment - end > grace:
            break
        end = moment
    return end
