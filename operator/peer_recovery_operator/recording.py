"""Turning decisions into PeerRecovery objects: plan, create, write status, post Events.

Runs on worker threads, one job at a time, on immutable snapshots (:class:`JobSnapshot`);
every API call goes through :class:`~peer_recovery_operator.kube.ClusterApi`. Returns the
bodies it wrote so the caller can fold them into its state before the watch catches up.

Invariants: names are deterministic (``peer_recovery.contract.bodies.recovery_name``), so a
repeated create is an AlreadyExists, never a duplicate; every phase move is the contract's
checked move (:func:`peer_recovery.contract.moves.move_phase`): validated against the phase
of the version just read and written with that version's ``resourceVersion``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from peer_recovery.contract import names, phases
from peer_recovery.contract.bodies import PodRef, build_peer_recovery
from peer_recovery.contract.errors import Conflict
from peer_recovery.contract.moves import Move, Outcome, move_phase, status_for
from peer_recovery.contract.names import ANNOTATION_RESTART_COUNT, ConditionReason
from peer_recovery.contract.planning import Assignment, PodRecord, assign_sources
from peer_recovery.contract.records import RecoveryRecord
from peer_recovery_operator.detection import Detection
from peer_recovery_operator.kube import ClusterApi
from peer_recovery_operator.metrics import Metrics
from peer_recovery_operator.views import JobView, NodeView, PodView

__all__ = ["JobSnapshot", "Recorder"]

logger = logging.getLogger(__name__)

_RETRIES = 3


@dataclasses.dataclass(frozen=True)
class JobSnapshot:
    """What one round of work on a job may look at."""

    job: JobView
    pods: Sequence[PodView]
    nodes: Mapping[str, NodeView]
    recoveries: Sequence[RecoveryRecord]


class Recorder:
    def __init__(self, cluster: ClusterApi, metrics: Metrics, clock: Callable[[], datetime]):
        self._api = cluster
        self._metrics = metrics
        self._clock = clock

    # --- planning new recoveries ----------------------------------------------------------

    def record_detections(
        self, snap: JobSnapshot, detections: Sequence[tuple[Detection, float]]
    ) -> list[dict[str, Any]]:
        """Plan all ``detections`` of one job together (so simultaneous targets spread over
        sources) and record each; ``float`` is the monotonic time it was seen."""
        fresh = [(d, t) for d, t in detections if not _already_recorded(d, snap.recoveries)]
        targets = {d.target.uid for d, _ in fresh}
        plans = _plan(snap, [d.target for d, _ in fresh if d.mode is names.Mode.PEER], targets)
        written: list[dict[str, Any]] = []
        for detection, seen in fresh:
            plan = plans.get(detection.target.uid)
            written += self._record_one(snap, detection, plan, attempt=None)
            self._metrics.planning_seconds.observe(time.monotonic() - seen)
            written += self._supersede(snap, detection)
        return written

    def replan(self, snap: JobSnapshot, old: RecoveryRecord, why: str) -> list[dict[str, Any]]:
        """Close ``old`` (Failed, reason Replanning) and record attempt + 1 with another source."""
        written: list[dict[str, Any]] = []
        episode = [r for r in snap.recoveries if _same_episode(r, old)]
        if any(r.attempt > old.attempt for r in episode):
            return written  # already re-planned
        if old.phase is not names.Phase.FAILED:
            closed = self.move(
                old, names.Phase.FAILED, f"re-planning: {why}", ConditionReason.REPLANNING
            )
            if closed is None:
                return written  # someone else moved it first (runtime finished, or a re-plan)
            written.append(closed)
        target = _pod(snap, old.target_uid)
        if target is None:
            return written
        excluded = {r.source_uid for r in episode if r.source_uid}
        detection = Detection(target, names.Reason(old.reason), names.Mode(old.mode), why)
        plans = _plan(snap, [target], {target.uid}, excluded=excluded)
        attempt = max(r.attempt for r in episode) + 1
        written += self._record_one(
            snap, detection, plans.get(target.uid), attempt=attempt, restarts=old.restart_count
        )
        self._metrics.lifecycle.labels("replan").inc()
        return written

    def promote(self, snap: JobSnapshot, rec: RecoveryRecord) -> list[dict[str, Any]]:
        """Finish the status write of a recovery left Pending (the operator stopped in between)."""
        if rec.mode is names.Mode.LOCAL or rec.source_pod:
            phase, reason = names.Phase.PLANNED, ConditionReason.SOURCE_CHOSEN
        else:
            phase, reason = names.Phase.FELL_BACK, ConditionReason.NO_SOURCE
        body = self.move(
            rec, phase, rec.message or "status written after an operator restart", reason
        )
        self._metrics.lifecycle.labels("promote").inc()
        return [body] if body else []

    def fail(self, rec: RecoveryRecord, why: str, reason: ConditionReason) -> list[dict[str, Any]]:
        body = self.move(rec, names.Phase.FAILED, why, reason)
        if body is not None:
            self._metrics.lifecycle.labels(reason.value.lower()).inc()
            self._event(rec.namespace, rec.job, body, "Warning", "PeerRecoveryFailed", why)
        return [body] if body else []

    # --- the writes -----------------------------------------------------------------------

    def move(
        self, rec: RecoveryRecord, proposed: names.Phase, message: str, reason: ConditionReason
    ) -> dict[str, Any] | None:
        """The contract's checked move, re-decided on the object just read: None when it is
        no longer allowed, not needed, or ``rec`` (the view it was decided on) is stale."""
        result = move_phase(
            self._api,
            rec.namespace,
            rec.name,
            Move(proposed, reason, message),
            actor=names.Actor.OPERATOR,
            clock=self._clock,
            retries=_RETRIES,
            decided_on=rec.phase,
        )
        return result.body if result.outcome is Outcome.WRITTEN else None

    def _record_one(
        self,
        snap: JobSnapshot,
        detection: Detection,
        plan: Assignment | None,
        *,
        attempt: int | None,
        restarts: int | None = None,
    ) -> list[dict[str, Any]]:
        job, target = snap.job, detection.target
        source = None if plan is None or plan.source is None else _by_ordinal(snap, plan.source)
        restarts = target.restarts if restarts is None else restarts
        if attempt is None:
            same_uid = [r.attempt for r in snap.recoveries if r.target_uid == target.uid]
            attempt = max(same_uid, default=0) + 1
        body: dict[str, Any] | None = None
        for _ in range(_RETRIES):
            manifest = build_peer_recovery(
                namespace=job.namespace,
                job_name=job.name,
                job_uid=job.uid,
                target=_ref(job, target),
                mode=detection.mode,
                reason=detection.reason,
                attempt=attempt,
                planned_by=names.PlannedBy.OPERATOR,
                source=None if source is None else _ref(job, source),
            )
            manifest["metadata"]["annotations"] = {ANNOTATION_RESTART_COUNT: str(restarts)}
            body = self._api.create_recovery(job.namespace, manifest)
            if body is not None:
                break
            existing = self._api.get_recovery(job.namespace, manifest["metadata"]["name"])
            seen = ((existing or {}).get("metadata") or {}).get("annotations") or {}
            if existing is None or seen.get(ANNOTATION_RESTART_COUNT) == str(restarts):
                logger.info("%s already recorded", manifest["metadata"]["name"])
                return []
            attempt += 1  # an older restart of the same pod holds this attempt number
        if body is None:
            return []
        return self._write_plan(snap, detection, plan, source, body)

    def _write_plan(
        self,
        snap: JobSnapshot,
        detection: Detection,
        plan: Assignment | None,
        source: PodView | None,
        body: dict[str, Any],
    ) -> list[dict[str, Any]]:
        if detection.mode is names.Mode.LOCAL:
            phase, reason = names.Phase.PLANNED, ConditionReason.LOCAL_SNAPSHOT
            message = f"{detection.why}: load the local snapshot"
        elif source is not None and plan is not None:
            phase, reason, message = names.Phase.PLANNED, ConditionReason.SOURCE_CHOSEN, plan.reason
        else:
            phase, reason = names.Phase.FELL_BACK, ConditionReason.NO_SOURCE
            message = plan.reason if plan is not None else "no plan could be made"
        phases.require_transition(
            names.Phase.PENDING, phase, names.Actor.OPERATOR, planned_by=names.PlannedBy.OPERATOR
        )
        status = status_for(body, Move(phase, reason, message), self._clock())
        name = body["metadata"]["name"]
        try:
            written = self._api.patch_recovery_status(
                snap.job.namespace, name, status, body["metadata"]["resourceVersion"]
            )
        except Conflict:
            logger.warning("%s changed before its plan was written; the sweeper retries", name)
            return [body]
        self._metrics.plans.labels(phase.value, detection.mode.value, detection.reason.value).inc()
        kind = "Normal" if phase is names.Phase.PLANNED else "Warning"
        event_reason = "PeerRecoveryPlanned" if kind == "Normal" else "PeerRecoveryFellBack"
        text = f"{name}: {detection.why}; {message}"
        self._event(snap.job.namespace, snap.job.name, written, kind, event_reason, text)
        logger.info(
            "%s %s (%s, %s): %s",
            name,
            phase.value,
            detection.reason.value,
            detection.mode.value,
            message,
        )
        return [body, written]

    def _supersede(self, snap: JobSnapshot, detection: Detection) -> list[dict[str, Any]]:
        target = detection.target
        written: list[dict[str, Any]] = []
        for rec in snap.recoveries:
            if rec.phase.terminal or rec.planned_by is not names.PlannedBy.OPERATOR:
                continue
            if (rec.target_type, rec.target_index) != (target.replica_type, target.replica_index):
                continue
            older_restart = rec.target_uid == target.uid and rec.restart_count < target.restarts
            if rec.target_uid != target.uid or older_restart:
                why = f"superseded: {detection.why}"
                written += self.fail(rec, why, ConditionReason.SUPERSEDED)
        return written

    def _event(
        self, namespace: str, job: str, rec: Mapping[str, Any], kind: str, reason: str, text: str
    ) -> None:
        owner = ((rec.get("metadata") or {}).get("ownerReferences") or [{}])[0]
        involved = {
            "apiVersion": f"{names.PYTORCHJOB_GROUP}/{names.PYTORCHJOB_VERSION}",
            "kind": names.PYTORCHJOB_KIND,
            "name": job,
            "namespace": namespace,
            "uid": str(owner.get("uid", "")),
        }
        self._api.post_event(involved, type_=kind, reason=reason, message=text)


def _already_recorded(detection: Detection, recoveries: Sequence[RecoveryRecord]) -> bool:
    target = detection.target
    for rec in recoveries:
        if rec.target_uid != target.uid:
            continue
        if detection.reason is names.Reason.POD_REPLACED and rec.reason is detection.reason:
            return True
        if rec.reason is detection.reason and rec.restart_count == target.restarts:
            return True
    return False


def _same_episode(rec: RecoveryRecord, old: RecoveryRecord) -> bool:
    return rec.episode == old.episode


def _plan(
    snap: JobSnapshot,
    targets: Sequence[PodView],
    rejoining: set[str],
    *,
    excluded: set[str] = frozenset(),  # type: ignore[assignment]
) -> dict[str, Assignment]:
    """Run the shared planner on this job's pods; returns the assignment per target UID."""
    if not targets:
        return {}
    job = snap.job
    live = [r for r in snap.recoveries if not r.phase.terminal]
    rejoining = rejoining | {r.target_uid for r in live}
    busy = [
        o for r in live if r.source_uid and (o := _ordinal_of_uid(snap, r.source_uid)) is not None
    ]
    records = []
    for pod in snap.pods:
        if pod.uid in excluded:
            continue
        node = snap.nodes.get(pod.node)
        records.append(
            PodRecord(
                ordinal=job.ordinal(pod.replica_type, pod.replica_index),
                ready=pod.ready,
                terminating=pod.terminating,
                rejoining=pod.uid in rejoining,
                node=pod.node or None,
                node_ready=node.ready if node else True,
                node_schedulable=node.schedulable if node else True,
                zone=(node.zone or None) if node else None,
                name=pod.name,
            )
        )
    settings = job.settings
    try:
        assignments = assign_sources(
            [job.ordinal(t.replica_type, t.replica_index) for t in targets],
            records,
            pods_per_replica=settings.pods_per_replica if settings else None,
            busy_sources=busy,
        )
    except ValueError as error:
        return {
            t.uid: Assignment(job.ordinal(t.replica_type, t.replica_index), None, str(error))
            for t in targets
        }
    by_ordinal = {a.target: a for a in assignments}
    return {t.uid: by_ordinal[job.ordinal(t.replica_type, t.replica_index)] for t in targets}


def _ordinal_of_uid(snap: JobSnapshot, uid: str) -> int | None:
    pod = _pod(snap, uid)
    return None if pod is None else snap.job.ordinal(pod.replica_type, pod.replica_index)


def _pod(snap: JobSnapshot, uid: str) -> PodView | None:
    return next((p for p in snap.pods if p.uid == uid), None)


def _by_ordinal(snap: JobSnapshot, ordinal: int) -> PodView | None:
    job = snap.job
    return next(
        (p for p in snap.pods if job.ordinal(p.replica_type, p.replica_index) == ordinal), None
    )


def _ref(job: JobView, pod: PodView) -> PodRef:
    return PodRef(
        pod=pod.name,
        pod_uid=pod.uid,
        replica_type=pod.replica_type,
        replica_index=pod.replica_index,
        ordinal=job.ordinal(pod.replica_type, pod.replica_index),
        node=pod.node,
    )
