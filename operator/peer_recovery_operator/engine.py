"""The operator's reactions to watch events, and the lifecycle sweep, on kopf's event loop.

The kopf handlers and the operator's own watchers (:mod:`peer_recovery_operator.handlers`)
hand each event here. Cheap work (parsing into records, updating
:class:`~peer_recovery_operator.state.ClusterState`, detection) happens inline on the loop;
the sweep's decisions are made on a thread of their own over records gathered on the loop
(:mod:`peer_recovery_operator.sweeping`); anything that calls the API server is queued per
job and run on a worker thread by :class:`~peer_recovery_operator.rounds.RoundRunner`, one
round per job at a time. Queuing per job is what lets several pods replaced together be
planned together (spread over sources), and keeps two rounds from racing on one job.

Invariants: a malformed object is reported once (log line, Event where it has an owner we
may post on, metric) and otherwise ignored; no exception from one job's round stops other
jobs or the loop; pods are only read.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from peer_recovery.contract import names
from peer_recovery.contract.names import is_operator_reason
from peer_recovery.contract.records import RecordError, parse_recovery, parse_time
from peer_recovery_operator import lifecycle, sweeping
from peer_recovery_operator.config import OperatorConfig
from peer_recovery_operator.detection import (
    JobChange,
    KnownPod,
    detect_change,
    job_change,
    outside_job,
)
from peer_recovery_operator.kube import ClusterApi
from peer_recovery_operator.metrics import Metrics
from peer_recovery_operator.recording import JobSnapshot
from peer_recovery_operator.relisting import relist
from peer_recovery_operator.resync import WATCH_STALL_SECONDS, Drift, compare
from peer_recovery_operator.rounds import JobWork, RoundRunner
from peer_recovery_operator.state import ClusterState, JobKey, Slot
from peer_recovery_operator.views import (
    BadInput,
    JobView,
    is_pytorchjob_pod,
    job_name_of_pod,
    job_view,
    node_view,
    pod_view,
)

__all__ = ["Engine"]

logger = logging.getLogger(__name__)

#: A job still unknown this long after its first pod was seen is looked up directly (the
#: PyTorchJob watch may be missing because the CRD is not installed).
UNKNOWN_JOB_CHECK_SECONDS = 10.0
#: How long the pods of a deleted job are recognised as such (the garbage collector deletes
#: them within seconds; their events then carry nothing to act on).
DELETED_JOB_MEMORY_SECONDS = 600.0
#: How many reported problems are remembered (so each is reported once).
WARNED_MEMORY = 4096


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Engine:
    def __init__(
        self,
        cluster: ClusterApi,
        config: OperatorConfig,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.state = ClusterState(actionable=lifecycle.may_need_action)
        #: When the retention rule must look at a job again although nothing changed (its
        #: oldest finished record reaches the time to live).
        self._retention_due: dict[Slot, datetime] = {}
        self._api = cluster
        self._clock = clock
        self._rounds = RoundRunner(cluster, self.metrics, clock, config.catch_up_grace)
        self._work: dict[JobKey, JobWork] = {}
        self._running: dict[JobKey, asyncio.Task[None]] = {}
        self._parked: dict[JobKey, tuple[float, set[tuple[Slot, bool]]]] = {}
        self._lookups: dict[JobKey, asyncio.Task[None]] = {}
        #: What was reported already (oldest first), so each problem is reported once; bounded
        #: so a stream of distinct bad objects cannot grow it without end.
        self._warned: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: Deleted jobs: (UID, deletion time, when forgotten) by key; their pods are ignored.
        self._deleted: dict[JobKey, tuple[str, datetime, float]] = {}
        self._events = concurrent.futures.ThreadPoolExecutor(1, "peer-recovery-events")
        #: The sweep's decisions are made here, off the loop (never queued behind rounds).
        self._sweeps = concurrent.futures.ThreadPoolExecutor(1, "peer-recovery-sweep")
        #: Seconds before retrying a failed round: the first delay, doubled up to the cap.
        self.retry_backoff: tuple[float, float] = (0.5, 30.0)
        #: Whether this replica may act (write, sweep, post Events): the leader-election
        #: Lease's verdict (:mod:`peer_recovery_operator.lease`); always True without one.
        self.leading: Callable[[], bool] = lambda: True
        #: When a resync found pods the pod watch never delivered; cleared by the next event.
        self._watch_stalled_since: float | None = None
        #: Whether the pod watch has delivered anything yet: before kopf has started it, a
        #: relist naturally shows pods the state lacks, which is no sign of a stall.
        self._pod_watch_started = False
        #: Pods a relist showed before the pod watch did (UID -> when first listed): the
        #: watch should deliver them within WATCH_STALL_SECONDS, or it is stalled.
        self._awaiting_watch: dict[str, float] = {}

    # --- leadership -----------------------------------------------------------------------

    def start_leading(self) -> None:
        """This replica just became the leader: run the work queued while standing by (a
        replacement the old leader saw but had not recorded is recorded now; one it did
        record is an AlreadyExists, as names are deterministic)."""
        for key, work in list(self._work.items()):
            if work and key not in self._running:
                self._running[key] = asyncio.get_running_loop().create_task(self._drain(key))

    def prune_standby(self, horizon: float) -> None:
        """While standing by, forget detections older than ``horizon`` seconds: the leader
        has recorded them by then, or has been replaced by this replica (which ran them).
        Bounds the standby's queue; catch-up candidates are bounded by the pods already."""
        oldest = time.monotonic() - horizon
        for key, work in list(self._work.items()):
            if key in self._running:
                continue
            work.detections = [(d, seen) for d, seen in work.detections if seen >= oldest]
            work.lifecycle.clear()  # decided by the leader's sweep; ours re-decides on takeover
            work.expired.clear()
            if not work:
                del self._work[key]

    # --- watch events ---------------------------------------------------------------------

    def pod_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        self.metrics.watch_events.labels("pods").inc()
        self._watch_stalled_since = None  # the pod watch delivers
        self._pod_watch_started = True
        self._awaiting_watch.pop(str((body.get("metadata") or {}).get("uid")), None)
        self._apply_pod(event_type, body)

    def _apply_pod(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        if not is_pytorchjob_pod(body):
            return  # a TFJob's, MPIJob's, ... pod (the label selector normally keeps these away)
        job_name = job_name_of_pod(body)
        if job_name is None:
            return  # not a training pod (the label selector normally keeps these away)
        try:
            pod = pod_view(body, job_name)
        except BadInput as error:
            self._warn(f"pod:{(body.get('metadata') or {}).get('uid')}", "pod", str(error))
            return
        if self._of_deleted_job(pod, body):
            return  # the garbage collector is removing a deleted job's pods
        key = (pod.namespace, pod.job)
        job = self.state.jobs.get(key)
        if job is not None and outside_job(job, pod):
            self.state.forget_slot(pod.slot)  # suspended or scaled away: not a replacement
            return
        if event_type == "DELETED":
            self.state.pod_gone(pod)
            return
        previous = self.state.upsert_pod(pod)
        current = self.state.pod_in(pod.slot)
        if current is not None and current.uid != pod.uid:
            return  # a late event about an incarnation the slot has moved past
        if previous is None:
            # Only pods from a listing (type None) predate this process.
            self._first_sight(key, pod, listed=event_type is None)
            return
        detection = detect_change(KnownPod.of(previous), pod)
        if detection is not None and job is not None and job.enabled:
            logger.info("detected: %s", detection.why)
            self._enqueue(key).detections.append((detection, time.monotonic()))

    def job_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        self.metrics.watch_events.labels("pytorchjobs").inc()
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        if event_type == "DELETED":
            self._forget_job(key, meta)
            return
        self._deleted.pop(key, None)  # a job of this name exists (again)
        try:
            job = job_view(body)
        except BadInput as error:
            self._warn(f"job:{meta.get('uid')}:{error}", "job", str(error), body)
            return
        if job.problem:
            self._warn(f"job:{job.uid}:{job.problem}", "annotation", job.problem, body)
        change = job_change(self.state.jobs.get(key), job)
        self.state.jobs[key] = job
        if change is not None:
            self._job_changed(job, change)
        _, parked = self._parked.pop(key, (0.0, set()))
        for slot, listed in parked:
            pod = self.state.pod_in(slot)
            if pod is not None:
                self._first_sight(key, pod, listed=listed)

    def _job_changed(self, job: JobView, change: JobChange) -> None:
        """Suspend, resume or scaling: the pods that come and go are no replacements."""
        key = (job.namespace, job.name)
        logger.info("%s", change.why)
        self.metrics.job_changes.labels(change.reason).inc()
        for slot in self.state.job_slots(*key):
            pod = self.state.pod_in(slot)
            if change.all_pods_leave or (pod is not None and outside_job(job, pod)):
                self.state.forget_slot(slot)
        work = self._work.get(key)
        if work is not None:
            work.detections = [(d, t) for d, t in work.detections if not outside_job(job, d.target)]
            work.candidates = {
                uid: p for uid, p in work.candidates.items() if not outside_job(job, p)
            }
        involved = _job_ref(job.namespace, job.name, job.uid)
        self._post_event(involved, "Normal", change.reason, change.why)

    def _forget_job(self, key: JobKey, meta: Mapping[str, Any]) -> None:
        """Free everything of a deleted job: state, queued work, parked pods, gauges."""
        self._parked.pop(key, None)
        self._work.pop(key, None)
        for slot in [s for s in self._retention_due if s[:2] == key]:
            del self._retention_due[slot]
        for record in self.state.forget_job(*key):
            self.metrics.recovery_changed(record, None)
        try:
            deleted_at = parse_time(meta.get("deletionTimestamp"), "deletionTimestamp")
        except RecordError:
            deleted_at = self._clock()
        self._deleted[key] = (str(meta.get("uid") or ""), deleted_at, time.monotonic())

    def _of_deleted_job(self, pod: Any, body: Mapping[str, Any]) -> bool:
        """Is ``pod`` one of a deleted job's (by its owner's UID, else by its age)?"""
        deleted = self._deleted.get((pod.namespace, pod.job))
        if deleted is None:
            return False
        uid, deleted_at, _ = deleted
        owners = [
            str(ref.get("uid"))
            for ref in (body.get("metadata") or {}).get("ownerReferences") or ()
            if ref.get("kind") == names.PYTORCHJOB_KIND and ref.get("uid")
        ]
        if owners:
            return uid in owners
        return pod.created <= deleted_at

    def node_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        name = str((body.get("metadata") or {}).get("name", ""))
        if event_type == "DELETED":
            self.state.nodes.pop(name, None)
        else:
            self.state.nodes[name] = node_view(body)

    def recovery_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        if event_type == "DELETED":
            old = self.state.drop_recovery(str(meta.get("namespace")), str(meta.get("name")))
            self.metrics.recovery_changed(old, None)
            return
        self._fold(body)

    def _fold(self, body: Mapping[str, Any]) -> None:
        """Take a PeerRecovery body (from the watch or our own write) into the state."""
        meta = body.get("metadata") or {}
        previous = self.state.recoveries.get((str(meta.get("namespace")), str(meta.get("name"))))
        seen_at = previous.phase_since if previous else self._clock()
        try:
            view = parse_recovery(body, seen_at=seen_at)
        except RecordError as error:
            self._warn(f"precov:{meta.get('uid')}", "recovery", str(error))
            return
        if previous is not None and previous.phase is not view.phase and not view.status_reason:
            view = dataclasses.replace(view, phase_since=self._clock())
        if not self.state.upsert_recovery(view):
            return
        self.metrics.recovery_changed(previous, view)
        if (
            previous is not None
            and previous.resource_version != view.resource_version
            and not previous.phase.terminal
            and view.phase.terminal
            and not is_operator_reason(view.status_reason)
        ):
            self._post_terminal(view)

    # --- first sight and the catch-up rule ------------------------------------------------

    def _first_sight(self, key: JobKey, pod: Any, *, listed: bool) -> None:
        job = self.state.jobs.get(key)
        if job is None:
            _since, slots = self._parked.setdefault(key, (time.monotonic(), set()))
            slots.add((pod.slot, listed))
            return
        grace = timedelta(seconds=self.config.catch_up_grace)
        if listed and job.enabled and not pod.terminating and pod.created - job.created > grace:
            self._enqueue(key).candidates[pod.uid] = pod  # verified against the API in a round

    # --- the lifecycle sweep --------------------------------------------------------------

    async def sweep(self) -> None:
        """Check the operator's live recoveries against their deadlines and their pods, and
        closed attempts whose re-plan may be missing, and apply the retention policy to
        finished records; queue what needs acting.

        Touches only what may need acting: the state keeps the records the lifecycle may act
        on, and each record's episode, indexed as the watch reports them; finished records
        are looked at only by the retention rule, and only in pod slots whose finished
        records changed or whose oldest one reaches the time to live. The loop gathers
        those (index look-ups); the decisions are made on the sweep's own thread
        (:mod:`peer_recovery_operator.sweeping`) and applied back on the loop.
        """
        began = time.perf_counter()
        gathered = self._gather_sweep()
        try:
            decisions = await asyncio.get_running_loop().run_in_executor(
                self._sweeps, sweeping.decide, gathered
            )
        except BaseException:
            for slot, _ in gathered.slots:  # not looked at after all: due at once
                self._retention_due[slot] = gathered.now
            raise
        self._apply_sweep(decisions)
        self._check_parked()
        self.metrics.sweep_seconds.observe(time.perf_counter() - began)

    def _gather_sweep(self) -> sweeping.SweepInput:
        """On the loop: what the sweep's decisions depend on, as frozen records."""
        now = self._clock()
        candidates = []
        for rec in self.state.actionable_recoveries():
            if (rec.namespace, rec.job) not in self.state.jobs:
                continue
            source = self.state.pod_named(rec.namespace, rec.source_pod) if rec.source_pod else None
            candidates.append(
                sweeping.Candidate(
                    rec, self.state.pod_in(rec.slot), source, tuple(self.state.episode(rec))
                )
            )
        due = self.state.take_retention_dirty()
        due |= {slot for slot, when in self._retention_due.items() if when <= now}
        slots = []
        for slot in due:
            self._retention_due.pop(slot, None)
            if (slot[0], slot[1]) not in self.state.jobs:
                self._retention_due[slot] = now  # records seen before their job: look later
                continue
            slots.append((slot, tuple(self.state.slot_recoveries(slot))))
        return sweeping.SweepInput(now, self.config, tuple(candidates), tuple(slots))

    def _apply_sweep(self, decisions: sweeping.SweepDecisions) -> None:
        """On the loop: queue the verdicts and deletions of jobs still known."""
        for rec, verdict in decisions.verdicts:
            key = (rec.namespace, rec.job)
            if key in self.state.jobs:
                self._enqueue(key).lifecycle.setdefault(rec.name, (rec, verdict))
        for slot, found in decisions.expired:
            key = (slot[0], slot[1])
            if key in self.state.jobs:
                for item in found:
                    self._enqueue(key).expired.setdefault(item.record.name, item)
        for slot, when in decisions.due:
            if (slot[0], slot[1]) in self.state.jobs:
                self._retention_due[slot] = min(when, self._retention_due.get(slot, when))

    def _check_parked(self) -> None:
        horizon = time.monotonic() - DELETED_JOB_MEMORY_SECONDS
        for key in [k for k, (_, _, forgotten) in self._deleted.items() if forgotten < horizon]:
            del self._deleted[key]
        for key, (since, _slots) in list(self._parked.items()):
            if time.monotonic() - since > UNKNOWN_JOB_CHECK_SECONDS and key not in self._lookups:
                self._parked[key] = (time.monotonic() + 1e9, _slots)  # look it up once
                self._lookups[key] = asyncio.get_running_loop().create_task(self._lookup_job(key))

    async def _lookup_job(self, key: JobKey) -> None:
        try:
            body = await asyncio.to_thread(self._api.get_job, *key)
        except Exception as error:
            body = None
            logger.warning("looking up PyTorchJob %s/%s failed: %s", *key, error)
        finally:
            self._lookups.pop(key, None)
        if body is None:
            self._warn(
                f"nojob:{key}",
                "job",
                f"pods name PyTorchJob {key[0]}/{key[1]} (label {names.LABEL_JOB_NAME}), which does "
                "not exist or cannot be read (is the PyTorchJob CRD installed?)",
            )
        elif key not in self.state.jobs:
            self.job_event("ADDED", body)

    # --- the periodic full resync ---------------------------------------------------------

    async def resync(self) -> Drift:
        """Relist pods and PeerRecoveries and reconcile what the watches did not deliver:
        vanished pods are marked gone (never chosen as a source), vanished records dropped,
        pods and records the watch missed taken in as a listing would."""
        live = [p for p in self.state.all_pods() if not p.terminating]
        known = {p.uid for p in self.state.all_pods()}
        versions = {key: rec.resource_version for key, rec in self.state.recoveries.items()}
        started = self._clock()
        scopes: list[str | None] = (
            [None] if self.config.all_namespaces else list(self.config.namespaces)
        )
        relisted = await asyncio.to_thread(relist, self._api, scopes, known, versions)
        listed = relisted.pods
        drift = compare(
            live_before=live,
            known_uids_before=known,
            recoveries_before=list(versions),
            listed_pods=listed,
            listed_recoveries=relisted.recovery_keys,
            list_started=started,
        )
        logger.debug(
            "resync: %d pods and %d PeerRecoveries listed; %d pods gone, %d records gone, "
            "%d pods never delivered",
            len(listed),
            len(relisted.recovery_keys),
            len(drift.gone_pods),
            len(drift.gone_recoveries),
            len(drift.unseen_pods),
        )
        for pod in drift.gone_pods:
            logger.info("resync: pod %s/%s (%s) is gone", pod.namespace, pod.name, pod.uid)
            self.state.pod_gone(pod)
        for namespace, name in drift.gone_recoveries:
            self.recovery_event("DELETED", {"metadata": {"namespace": namespace, "name": name}})
        for body in relisted.unknown_pods:
            self._apply_pod(None, body)  # as a listing would have shown it
        for body in relisted.changed_recoveries:
            self._fold(body)
        overdue = self._overdue_for_the_watch(listed, known)
        if (drift.unseen_pods or overdue) and self._pod_watch_started:
            logger.warning(
                "resync: the pod watch never delivered %d pod(s) a relist shows: watch stalled?",
                len(drift.unseen_pods) + len(overdue),
            )
            self._watch_stalled_since = self._watch_stalled_since or time.monotonic()
        self.metrics.resync_drift.inc(
            len(drift.gone_pods) + len(drift.gone_recoveries) + len(drift.unseen_pods)
        )
        return drift

    def _overdue_for_the_watch(self, listed: list[Any], known: set[str]) -> list[str]:
        """Note the listed pods the watch has not delivered; return (and forget) those it
        has not delivered for WATCH_STALL_SECONDS since a relist first showed them."""
        now = time.monotonic()
        listed_uids = {p.uid for p in listed}
        for uid in [u for u in self._awaiting_watch if u not in listed_uids]:
            del self._awaiting_watch[uid]  # gone before the watch said anything
        for pod in listed:
            if pod.uid not in known:
                self._awaiting_watch.setdefault(pod.uid, now)
        overdue = [u for u, t in self._awaiting_watch.items() if now - t > WATCH_STALL_SECONDS]
        for uid in overdue:
            del self._awaiting_watch[uid]  # reported once
        return overdue

    def watch_problem(self) -> str | None:
        """Why the watches look stalled (for /healthz), or None."""
        if self._watch_stalled_since is None:
            return None
        return (
            "the pod watch has not delivered pods a relist shows "
            f"(for {time.monotonic() - self._watch_stalled_since:.0f}s)"
        )

    # --- per-job rounds on worker threads -------------------------------------------------

    def _enqueue(self, key: JobKey) -> JobWork:
        work = self._work.setdefault(key, JobWork())
        if key not in self._running and self.leading():
            self._running[key] = asyncio.get_running_loop().create_task(self._drain(key))
        return work

    async def _drain(self, key: JobKey) -> None:
        delay, cap = self.retry_backoff
        try:
            await asyncio.sleep(0)  # let the events of this loop iteration join the round
            while self._work.get(key) and self.leading():
                work = self._work.pop(key)
                job = self.state.jobs.get(key)
                if job is None:
                    continue
                snap = JobSnapshot(
                    job=job,
                    pods=tuple(self.state.job_pods(*key)),
                    nodes=dict(self.state.nodes),
                    recoveries=tuple(self.state.recoveries_for(*key, work.target_uids())),
                )
                began = time.perf_counter()
                try:
                    written, deleted = await asyncio.to_thread(self._rounds.run, snap, work)
                except Exception:
                    self.metrics.rounds.labels("failed").inc()
                    self.metrics.round_seconds.observe(time.perf_counter() - began)
                    # Any failure (an API error, a reset connection, a timeout): the round's
                    # detections go back on the queue, so a replacement is never dropped.
                    logger.exception(
                        "round for PyTorchJob %s/%s failed; retrying in %.1fs", *key, delay
                    )
                    self.metrics.round_failures.inc()
                    self._work[key] = work.keep_for_retry(self._work.get(key))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, cap)
                    continue
                self.metrics.rounds.labels("ok").inc()
                self.metrics.round_seconds.observe(time.perf_counter() - began)
                delay = self.retry_backoff[0]
                for body in written:
                    self._fold(body)
                for namespace, name in deleted:
                    self.recovery_event(
                        "DELETED", {"metadata": {"namespace": namespace, "name": name}}
                    )
        finally:
            self._running.pop(key, None)

    # --- reporting ------------------------------------------------------------------------

    def _post_terminal(self, view: Any) -> None:
        if not self.leading():
            return  # the leader posts it
        kind = "Normal" if view.phase is names.Phase.SUCCEEDED else "Warning"
        message = f"{view.name} {view.phase.value}" + (f": {view.message}" if view.message else "")
        job = self.state.jobs.get((view.namespace, view.job))
        involved = _job_ref(view.namespace, view.job, job.uid if job else "")
        self._post_event(involved, kind, f"PeerRecovery{view.phase.value}", message)

    def _warn(
        self, once_key: str, kind: str, message: str, job_body: Mapping[str, Any] | None = None
    ) -> None:
        """Report bad input once: a log line, a metric, and an Event on the job if we have it."""
        if once_key in self._warned:
            return
        self._warned[once_key] = None
        while len(self._warned) > WARNED_MEMORY:
            self._warned.popitem(last=False)
        self.metrics.input_warnings.labels(kind).inc()
        logger.warning("ignoring malformed input: %s", message)
        if job_body is not None and self.leading():
            meta = job_body.get("metadata") or {}
            involved = _job_ref(
                str(meta.get("namespace")), str(meta.get("name")), str(meta.get("uid"))
            )
            self._post_event(involved, "Warning", "PeerRecoveryBadInput", message)

    def _post_event(self, involved: dict[str, str], kind: str, reason: str, message: str) -> None:
        """Post an Event from the Events' own thread: a burst of them (thousands of records
        finishing at once) never queues ahead of the rounds on the shared worker threads."""
        self._events.submit(
            self._api.post_event, involved, type_=kind, reason=reason, message=message
        )


def _job_ref(namespace: str, name: str, uid: str) -> dict[str, str]:
    return {
        "apiVersion": f"{names.PYTORCHJOB_GROUP}/{names.PYTORCHJOB_VERSION}",
        "kind": names.PYTORCHJOB_KIND,
        "name": name,
        "namespace": namespace,
        "uid": uid,
    }
