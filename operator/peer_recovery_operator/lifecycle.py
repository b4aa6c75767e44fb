"""Lifecycle of the operator's own recoveries: deadlines, vanished sources, supersession.

Pure: :func:`decide` takes one recovery, the pods now in its target's slot and its
source's name, the clock, and the settings, and returns an :class:`Verdict` with a
human-readable reason (it ends up in ``status.message`` and in an Event on the job).

Rules, in the order they apply (only to recoveries with ``spec.plannedBy: operator``; the
runtime owns the ones it planned in-band):

1. A target replaced again (its slot now holds a newer pod UID) supersedes the recovery:
   ``Failed``. The new UID gets its own recovery from detection.
2. ``Pending`` longer than ``sweep_interval``: the operator stopped between creating the
   object and writing its status; finish that write (``PROMOTE``).
3. ``Planned`` or ``Streaming`` in ``Peer`` mode whose source pod is gone (deleted,
   terminating, or replaced by a new UID), or stuck past its phase's deadline: re-plan
   with another source (``attempt + 1``) while the episode has attempts left, else
   ``Failed``. ``Local`` recoveries have no other source: past the deadline they fail.
4. A re-plan closes the old attempt first (``Failed``, condition reason ``Replanning``)
   and then creates the next one, so two attempts never run at once. If the operator
   stops between the two writes, the closed attempt with no successor is re-planned on
   the next sweep (``RESUME_REPLAN``).
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime

from peer_recovery.contract import names
from peer_recovery.contract.names import ConditionReason
from peer_recovery.contract.records import RecoveryRecord
from peer_recovery_operator.config import OperatorConfig
from peer_recovery_operator.views import PodView

__all__ = ["Action", "Verdict", "decide", "may_need_action"]


class Action(str, enum.Enum):
    KEEP = "keep"
    PROMOTE = "promote"
    REPLAN = "replan"
    RESUME_REPLAN = "resume-replan"
    FAIL = "fail"


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    why: str = ""
    condition_reason: ConditionReason | None = None


_KEEP = Verdict(Action.KEEP)


def may_need_action(recovery: RecoveryRecord) -> bool:
    """False when :func:`decide` would say KEEP whatever the pods and the clock: a record the
    runtime planned, or a finished one other than an attempt closed for re-planning (rule 4).
    Lets the sweep skip the bulk of records, which are finished."""
    if recovery.planned_by is not names.PlannedBy.OPERATOR:
        return False
    if recovery.phase.terminal:
        return (
            recovery.phase is names.Phase.FAILED
            and recovery.status_reason == ConditionReason.REPLANNING
        )
    return True


def decide(
    recovery: RecoveryRecord,
    *,
    now: datetime,
    slot_pod: PodView | None,
    source_pod: PodView | None,
    attempts_in_episode: int,
    newer_attempt_exists: bool,
    config: OperatorConfig,
) -> Verdict:
    """What the operator should do about ``recovery`` now (see the module docstring).

    ``slot_pod`` is the pod now in the target's slot (None if none is known);
    ``source_pod`` the pod now carrying the source's name (None if none is known);
    ``attempts_in_episode`` counts the attempts already made for this target incarnation
    and restart, this one included.
    """
    if recovery.planned_by is not names.PlannedBy.OPERATOR:
        return _KEEP
    if recovery.phase.terminal:
        if (
            recovery.phase is names.Phase.FAILED
            and recovery.status_reason == ConditionReason.REPLANNING
            and not newer_attempt_exists
            and slot_pod is not None
            and slot_pod.uid == recovery.target_uid
        ):
            return Verdict(Action.RESUME_REPLAN, recovery.message or "re-plan was interrupted")
        return _KEEP
    if slot_pod is not None and slot_pod.uid != recovery.target_uid:
        return Verdict(
            Action.FAIL,
            f"superseded: pod {recovery.target_pod} was replaced again "
            f"(UID {recovery.target_uid} -> {slot_pod.uid})",
            ConditionReason.SUPERSEDED,
        )
    age = (now - recovery.phase_since).total_seconds()
    if recovery.phase is names.Phase.PENDING:
        if age > config.sweep_interval:
            return Verdict(Action.PROMOTE, "its status was never written")
        return _KEEP
    why = _trouble(recovery, source_pod, age, config)
    if not why:
        return _KEEP
    if recovery.mode is names.Mode.PEER and attempts_in_episode < config.max_attempts:
        return Verdict(Action.REPLAN, why, ConditionReason.REPLANNING)
    return Verdict(
        Action.FAIL,
        f"gave up after {attempts_in_episode} attempt(s): {why}",
        ConditionReason.ATTEMPTS_EXHAUSTED
        if recovery.mode is names.Mode.PEER
        else ConditionReason.DEADLINE_EXCEEDED,
    )


def _trouble(
    recovery: RecoveryRecord, source_pod: PodView | None, age: float, config: OperatorConfig
) -> str:
    """Why a live attempt cannot go on, or "" when it can."""
    if recovery.mode is names.Mode.PEER and recovery.source_pod:
        if source_pod is None:
            return f"source pod {recovery.source_pod} is gone"
        if source_pod.uid != recovery.source_uid:
            return f"source pod {recovery.source_pod} was replaced (UID {source_pod.uid})"
        if source_pod.terminating:
            return f"source pod {recovery.source_pod} is terminating"
    deadline = config.deadline_for(recovery.phase.value)
    if deadline is not None and age > deadline:
        return f"stuck in {recovery.phase.value} for {age:.0f}s (deadline {deadline:.0f}s)"
    return ""
