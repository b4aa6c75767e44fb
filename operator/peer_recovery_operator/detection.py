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

- :func:`job_change` recognises the changes of a PyTorchJob after which the controller
  deletes or creates pods that are *not* replacements: ``runPolicy.suspend`` turning true
  (every pod is deleted) or false again (every pod is created anew, with empty memory and a
  fresh start from the checkpoint), and a replica count changing (elastic scale-down or
  scale-up: pods leave, or join at new indexes). Each yields one Event on the job and no
  PeerRecovery; :func:`outside_job` says which pod events to drop meanwhile (every pod of a
  suspended job, and pods at an index the spec no longer has).
- An elastic job's late worker pod seen in a relist cannot be told from a scaled-up one, so
  the catch-up rule leaves it alone (the runtime's in-band fallback recovers it if it was a
  replacement).

Invariants: a terminating pod, or an event older than what is known (a stale event for an
old UID after the new one was seen), never yields a detection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime, timedelta

from peer_recovery.contract import names
from peer_recovery_operator.views import JobView, PodView

__all__ = [
    "Detection",
    "JobChange",
    "KnownPod",
    "burst_end",
    "detect_change",
    "detect_missed_replacement",
    "job_change",
    "mode_for",
    "outside_job",
]

#: Event reasons of the job changes :func:`job_change` recognises.
SUSPENDED = "PeerRecoveryJobSuspended"
RESUMED = "PeerRecoveryJobResumed"
SCALED = "PeerRecoveryJobScaled"


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


@dataclasses.dataclass(frozen=True, slots=True)
class JobChange:
    """A change of a job after which its pods come and go without being replaced."""

    reason: str
    why: str
    #: The job's pods are all deleted (suspend): forget every slot, not only the vanished.
    all_pods_leave: bool = False


def job_change(previous: JobView | None, current: JobView) -> JobChange | None:
    """Suspend, resume or a replica count change between two versions of a job, if any."""
    if previous is None:
        return None
    where = f"PyTorchJob {current.namespace}/{current.name}"
    if current.suspended and not previous.suspended:
        why = (
            f"{where} was suspended: the controller deletes its pods; "
            "peer-recovery records no recovery for them"
        )
        return JobChange(SUSPENDED, why, all_pods_leave=True)
    if previous.suspended and not current.suspended:
        why = (
            f"{where} was resumed: its pods are created anew and start from the checkpoint; "
            "they are not replacements, so no PeerRecovery is recorded"
        )
        return JobChange(RESUMED, why, all_pods_leave=True)
    if previous.replicas != current.replicas:
        before, after = dict(previous.replicas), dict(current.replicas)
        changes = ", ".join(
            f"{kind} {before.get(kind, 0)} -> {after.get(kind, 0)}"
            for kind in sorted(before.keys() | after.keys())
            if before.get(kind, 0) != after.get(kind, 0)
        )
        why = (
            f"{where} was scaled ({changes}): pods that leave or join are not replacements, "
            "so no PeerRecovery is recorded for them"
        )
        return JobChange(SCALED, why)
    return None


def outside_job(job: JobView, pod: PodView) -> bool:
    """Is this pod event none of the job's current shape (so detection must not see it)?

    Every pod of a suspended job is on its way out; a pod at an index the spec no longer
    has was scaled away, and one at an index the spec does not have yet was scaled up
    before this process saw the job's new count.
    """
    if job.suspended:
        return True
    count = job.replica_count(pod.replica_type)
    return count is not None and pod.replica_index >= count


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
    elastic: bool = False,
) -> Detection | None:
    """The catch-up rule for a slot first seen by this process (see the module docstring)."""
    if current.terminating or current.uid in set(recorded_uids):
        return None
    if elastic and current.replica_type == "worker":
        return None  # may have joined by scaling up: not a replacement we can tell apart
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
