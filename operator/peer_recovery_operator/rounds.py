"""One round of API work on one job, on a worker thread.

The engine queues work per job on the event loop (:class:`JobWork`) and hands one job's
work at a time, with a snapshot of what the state knew (:class:`JobSnapshot`), to
:meth:`RoundRunner.run` on a worker thread: catch-up candidates are verified against fresh
lists, detections recorded, lifecycle verdicts applied, and finished records deleted for
retention, last. What the round wrote and deleted goes back to the loop; the round never
touches the state.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from peer_recovery.contract.records import parse_recovery
from peer_recovery_operator import lifecycle
from peer_recovery_operator.detection import Detection, detect_missed_replacement
from peer_recovery_operator.kube import ClusterApi
from peer_recovery_operator.metrics import Metrics
from peer_recovery_operator.recording import JobSnapshot, Recorder
from peer_recovery_operator.retention import Expired
from peer_recovery_operator.views import BadInput, pod_view

__all__ = ["JobWork", "RoundRunner"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class JobWork:
    """One job's queued work: what the next round on it does."""

    detections: list[tuple[Detection, float]] = dataclasses.field(default_factory=list)
    candidates: dict[str, Any] = dataclasses.field(default_factory=dict)  # uid -> PodView
    lifecycle: dict[str, tuple[Any, lifecycle.Verdict]] = dataclasses.field(default_factory=dict)
    #: Finished records to delete under the retention policy, by name.
    expired: dict[str, Expired] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.detections or self.candidates or self.lifecycle or self.expired)

    def target_uids(self) -> set[str]:
        """The pods this work is about (a round needs their records, besides live ones)."""
        uids = {d.target.uid for d, _ in self.detections} | set(self.candidates)
        return uids | {rec.target_uid for rec, _ in self.lifecycle.values()}

    def keep_for_retry(self, newer: JobWork | None) -> JobWork:
        """What a failed round leaves to retry, merged with work queued meanwhile.

        Detections and catch-up candidates are edges: nothing re-derives them, so they are
        kept. Lifecycle verdicts are dropped: the next sweep decides them again on the
        state it then sees.
        """
        kept = JobWork(detections=list(self.detections), candidates=dict(self.candidates))
        if newer is not None:
            kept.detections += newer.detections
            kept.candidates.update(newer.candidates)
            kept.lifecycle.update(newer.lifecycle)
            kept.expired.update(newer.expired)
        return kept


class RoundRunner:
    """Runs rounds: owns the :class:`Recorder` and the API calls of a round."""

    def __init__(
        self,
        api: ClusterApi,
        metrics: Metrics,
        clock: Callable[[], datetime],
        catch_up_grace: float,
    ) -> None:
        self._api = api
        self._metrics = metrics
        self._clock = clock
        self._catch_up_grace = catch_up_grace
        self._recorder = Recorder(api, metrics, clock)

    def run(
        self, snap: JobSnapshot, work: JobWork
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """One job's API work, on a worker thread: the bodies written, the records deleted."""
        written: list[dict[str, Any]] = []
        deleted: list[tuple[str, str]] = []
        detections = list(work.detections)
        if work.candidates:
            candidates = list(work.candidates.values())
            snap, found = self._verify_catch_up(snap, candidates, work.target_uids())
            detections += found
        if detections:
            written += self._recorder.record_detections(snap, detections)
        for rec, verdict in work.lifecycle.values():
            if verdict.action in (lifecycle.Action.REPLAN, lifecycle.Action.RESUME_REPLAN):
                written += self._recorder.replan(snap, rec, verdict.why)
            elif verdict.action is lifecycle.Action.PROMOTE:
                written += self._recorder.promote(snap, rec)
            elif verdict.action is lifecycle.Action.FAIL:
                assert verdict.condition_reason is not None  # every FAIL verdict names one
                written += self._recorder.fail(rec, verdict.why, verdict.condition_reason)
        # Retention last: a replacement's record is never kept waiting behind the deletion
        # of finished ones (one API call each).
        for found in work.expired.values():
            rec = found.record
            if self._api.delete_recovery(rec.namespace, rec.name, rec.resource_version):
                logger.info("deleted %s/%s: %s", rec.namespace, rec.name, found.why)
                self._metrics.lifecycle.labels("retention").inc()
                deleted.append((rec.namespace, rec.name))
        return written, deleted

    def _verify_catch_up(
        self, snap: JobSnapshot, candidates: list[Any], targets: set[str]
    ) -> tuple[JobSnapshot, list[tuple[Detection, float]]]:
        """The catch-up rule against fresh lists of the job's pods and recoveries; the
        snapshot for the rest of the round, with the listed pods and, of the listed records,
        the live ones and those of ``targets``."""
        seen = time.monotonic()
        job = snap.job
        pods = []
        for body in self._api.list_job_pods(job.namespace, job.name):
            try:
                pods.append(pod_view(body, job.name))
            except BadInput:
                continue
        recorded: set[str] = set()
        views = []
        for body in self._api.list_recoveries(job.namespace, job=job.name):
            view = parse_recovery(body, seen_at=self._clock())
            recorded.add(view.target_uid)
            if not view.phase.terminal or view.target_uid in targets:
                views.append(view)  # what a round's snapshot holds (state.recoveries_for)
        grace = timedelta(seconds=self._catch_up_grace)
        found = []
        for pod in candidates:
            others = [p.created for p in pods if p.uid != pod.uid and not p.terminating]
            detection = detect_missed_replacement(
                pod, others, grace=grace, recorded_uids=recorded, elastic=job.elastic
            )
            if detection is not None:
                logger.info("caught up: %s", detection.why)
                found.append((detection, seen))
        fresh = dataclasses.replace(
            snap,
            pods=tuple(pods) or snap.pods,
            recoveries=tuple(views) if recorded else snap.recoveries,
        )
        return fresh, found
