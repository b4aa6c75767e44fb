"""What the operator currently knows about the cluster, fed by the watches.

One :class:`ClusterState` per process, touched only from kopf's event loop (so it needs no
locks); worker threads get immutable snapshots (lists of frozen records), never the state.
It holds small records (:mod:`peer_recovery_operator.views`), never raw bodies.

Invariants: a slot (namespace, job, replica type, replica index) keeps its last pod record
after that pod is deleted (marked terminating), so the replacement that takes the slot
under a new UID is recognised; everything of a job is forgotten when the job is deleted.

Indexes kept on every change, so the sweep and the rounds touch only what may matter:
the records a predicate (``actionable``, the lifecycle's "may need action") holds for;
the records of each episode (attempts for one target incarnation and restart) and of each
target UID; and the slots whose finished records changed since the retention rule last
looked (``take_retention_dirty``), by pod slot: the retention rule is per slot.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from peer_recovery.contract.records import RecoveryRecord
from peer_recovery_operator.views import JobView, NodeView, PodView

__all__ = ["ClusterState", "Episode", "JobKey", "Slot", "episode_of"]

Slot = tuple[str, str, str, int]
JobKey = tuple[str, str]
RecordKey = tuple[str, str]
#: (namespace, job, target UID, restart count, reason): the attempts for one target.
Episode = tuple[str, str, str, int, str]


def episode_of(record: RecoveryRecord) -> Episode:
    return record.episode


class ClusterState:
    def __init__(self, actionable: Callable[[RecoveryRecord], bool] = lambda record: True) -> None:
        self._is_actionable = actionable
        self._actionable: set[RecordKey] = set()
        # Small groups (a few attempts each) as tuples: a tuple of one key is a fifth of a set
        # of one, and the collector stops tracking tuples of strings.
        self._episodes: dict[Episode, tuple[RecordKey, ...]] = {}
        self._by_target: dict[tuple[str, str], tuple[RecordKey, ...]] = {}
        self._retention_dirty: set[Slot] = set()
        self._slot_records: defaultdict[Slot, set[RecordKey]] = defaultdict(set)
        self._job_live: defaultdict[JobKey, set[RecordKey]] = defaultdict(set)
        self.jobs: dict[JobKey, JobView] = {}
        self.nodes: dict[str, NodeView] = {}
        self.recoveries: dict[tuple[str, str], RecoveryRecord] = {}
        self._slots: dict[Slot, PodView] = {}
        self._job_slots: defaultdict[JobKey, set[Slot]] = defaultdict(set)
        self._by_name: dict[tuple[str, str], Slot] = {}
        self._job_recoveries: defaultdict[JobKey, set[tuple[str, str]]] = defaultdict(set)
        self._retired: dict[Slot, str] = {}  # the UID a slot held before its current one

    # --- pods -----------------------------------------------------------------------------

    def pod_in(self, slot: Slot) -> PodView | None:
        return self._slots.get(slot)

    def pod_named(self, namespace: str, name: str) -> PodView | None:
        slot = self._by_name.get((namespace, name))
        return None if slot is None else self._slots.get(slot)

    def upsert_pod(self, pod: PodView) -> PodView | None:
        """Record ``pod`` in its slot unless the slot already holds a newer pod; return the
        record the slot held before (None on first sight)."""
        previous = self._slots.get(pod.slot)
        if previous is not None and previous.uid != pod.uid:
            if pod.created < previous.created or self._retired.get(pod.slot) == pod.uid:
                return previous  # a late event about an older incarnation: keep the newer one
            self._retired[pod.slot] = previous.uid
        self._slots[pod.slot] = pod
        self._job_slots[(pod.namespace, pod.job)].add(pod.slot)
        self._by_name[(pod.namespace, pod.name)] = pod.slot
        return previous

    def pod_gone(self, pod: PodView) -> None:
        """The pod was deleted: keep its identity in the slot, marked terminating."""
        current = self._slots.get(pod.slot)
        if current is not None and current.uid == pod.uid:
            self._slots[pod.slot] = dataclasses.replace(current, terminating=True, ready=False)

    def forget_slot(self, slot: Slot) -> None:
        """Drop the slot's identity: the next pod in it is a first sight, not a replacement."""
        self._retired.pop(slot, None)
        pod = self._slots.pop(slot, None)
        self._job_slots.get(slot[:2], set()).discard(slot)
        if pod is not None and self._by_name.get((pod.namespace, pod.name)) == slot:
            del self._by_name[(pod.namespace, pod.name)]

    def job_slots(self, namespace: str, job: str) -> list[Slot]:
        return sorted(self._job_slots.get((namespace, job), ()))

    def all_pods(self) -> list[PodView]:
        """Every slot's current pod record, terminating ones included (for the resync)."""
        return list(self._slots.values())

    def job_pods(self, namespace: str, job: str) -> list[PodView]:
        return [self._slots[s] for s in sorted(self._job_slots.get((namespace, job), ()))]

    # --- recoveries -----------------------------------------------------------------------

    def upsert_recovery(self, view: RecoveryRecord) -> bool:
        """Record ``view`` unless a newer version is already known; True if recorded."""
        key = (view.namespace, view.name)
        previous = self.recoveries.get(key)
        if previous is not None and _older(view.resource_version, previous.resource_version):
            return False  # our own write was recorded before the watch caught up
        if previous is not None:
            self._unindex(key, previous)
        self.recoveries[key] = view
        self._job_recoveries[(view.namespace, view.job)].add(key)
        _add(self._episodes, episode_of(view), key)
        _add(self._by_target, (view.namespace, view.target_uid), key)
        self._slot_records[view.slot].add(key)
        if self._is_actionable(view):
            self._actionable.add(key)
        if not view.phase.terminal:
            self._job_live[(view.namespace, view.job)].add(key)
        if view.phase.terminal and (previous is None or not previous.phase.terminal):
            self._retention_dirty.add(view.slot)
        return True

    def drop_recovery(self, namespace: str, name: str) -> RecoveryRecord | None:
        view = self.recoveries.pop((namespace, name), None)
        if view is not None:
            self._job_recoveries[(namespace, view.job)].discard((namespace, name))
            self._unindex((namespace, name), view)
            if view.phase.terminal:
                self._retention_dirty.add(view.slot)
        return view

    def _unindex(self, key: RecordKey, view: RecoveryRecord) -> None:
        self._actionable.discard(key)
        _discard(self._job_live, (view.namespace, view.job), key)
        _remove(self._episodes, episode_of(view), key)
        _remove(self._by_target, (view.namespace, view.target_uid), key)
        _discard(self._slot_records, view.slot, key)

    def job_recoveries(self, namespace: str, job: str) -> list[RecoveryRecord]:
        keys = self._job_recoveries.get((namespace, job), ())
        return [self.recoveries[k] for k in sorted(keys) if k in self.recoveries]

    def actionable_recoveries(self) -> list[RecoveryRecord]:
        """The records the ``actionable`` predicate holds for (the sweep's work list)."""
        return [self.recoveries[k] for k in sorted(self._actionable)]

    def episode(self, record: RecoveryRecord) -> list[RecoveryRecord]:
        """Every known attempt of ``record``'s episode (itself included)."""
        return [self.recoveries[k] for k in self._episodes.get(episode_of(record), ())]

    def recoveries_for(
        self, namespace: str, job: str, target_uids: set[str]
    ) -> list[RecoveryRecord]:
        """The job's records that a round on ``target_uids`` may look at: every live one
        (planning avoids their sources and targets; supersession closes them) and every
        one of those targets, finished or not (attempt numbers, already recorded)."""
        keys = set(self._job_live.get((namespace, job), ()))
        for uid in target_uids:
            keys.update(
                k
                for k in self._by_target.get((namespace, uid), ())
                if self.recoveries[k].job == job
            )
        return [self.recoveries[k] for k in sorted(keys)]

    def slot_recoveries(self, slot: Slot) -> list[RecoveryRecord]:
        """Every record of one pod slot (the retention rule's unit)."""
        return [self.recoveries[k] for k in self._slot_records.get(slot, ())]

    def take_retention_dirty(self) -> set[Slot]:
        """The slots whose finished records changed since the last call (and forget them)."""
        dirty, self._retention_dirty = self._retention_dirty, set()
        return dirty

    # --- jobs -----------------------------------------------------------------------------

    def forget_job(self, namespace: str, job: str) -> list[RecoveryRecord]:
        """Drop everything of the job; returns the recoveries dropped (for the gauges)."""
        self.jobs.pop((namespace, job), None)
        for slot in self._job_slots.pop((namespace, job), set()):
            self._retired.pop(slot, None)
            pod = self._slots.pop(slot, None)
            if pod is not None and self._by_name.get((namespace, pod.name)) == slot:
                del self._by_name[(namespace, pod.name)]
        dropped = []
        for key in self._job_recoveries.pop((namespace, job), set()):
            record = self.recoveries.pop(key, None)
            if record is not None:
                self._unindex(key, record)
                dropped.append(record)
        self._retention_dirty = {s for s in self._retention_dirty if s[:2] != (namespace, job)}
        return dropped

    def sizes(self) -> dict[str, int]:
        return {
            "jobs": len(self.jobs),
            "pods": len(self._slots),
            "nodes": len(self.nodes),
            "recoveries": len(self.recoveries),
        }


def _discard(index: dict[Any, set[RecordKey]], at: Any, key: RecordKey) -> None:
    keys = index.get(at)
    if keys is not None:
        keys.discard(key)
        if not keys:
            del index[at]


def _add(index: dict[Any, tuple[RecordKey, ...]], at: Any, key: RecordKey) -> None:
    keys = index.get(at, ())
    if key not in keys:
        index[at] = (*keys, key)


def _remove(index: dict[Any, tuple[RecordKey, ...]], at: Any, key: RecordKey) -> None:
    keys = index.get(at)
    if keys is not None and key in keys:
        rest = tuple(k for k in keys if k != key)
        if rest:
            index[at] = rest
        else:
            del index[at]


def _older(candidate: str, current: str) -> bool:
    """resourceVersions are opaque, but etcd's are integers; compare them only then."""
    if candidate.isdigit() and current.isdigit():
        return int(candidate) < int(current)
    return False
