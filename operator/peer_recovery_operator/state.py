"""What the operator currently knows about the cluster, fed by the watches.

One :class:`ClusterState` per process, touched only from kopf's event loop (so it needs no
locks); worker threads get immutable snapshots (lists of frozen records), never the state.
It holds small records (:mod:`peer_recovery_operator.views`), never raw bodies.

Invariants: a slot (namespace, job, replica type, replica index) keeps its last pod record
after that pod is deleted (marked terminating), so the replacement that takes the slot
under a new UID is recognised; everything of a job is forgotten when the job is deleted.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable

from peer_recovery.contract.records import RecoveryRecord
from peer_recovery_operator.views import JobView, NodeView, PodView

__all__ = ["ClusterState", "JobKey", "Slot"]

Slot = tuple[str, str, str, int]
JobKey = tuple[str, str]
RecoveryKey = tuple[str, str]
#: Attempts for one target incarnation and restart: (namespace, job, target UID, restart
#: count, reason).
EpisodeKey = tuple[str, str, str, int, str]


def episode_of(record: RecoveryRecord) -> EpisodeKey:
    return (
        record.namespace,
        record.job,
        record.target_uid,
        record.restart_count,
        record.reason.value,
    )


class ClusterState:
    def __init__(self, sweepable: Callable[[RecoveryRecord], bool] = lambda _: True) -> None:
        """``sweepable`` says which records the lifecycle sweep must look at; they are kept
        in an index so a sweep costs time in proportion to them, not to all records."""
        self._sweepable_rule = sweepable
        #: Records the sweep looks at (live ones, mostly), by key.
        self._sweepable: set[RecoveryKey] = set()
        #: Attempt numbers of every episode's records, by record key.
        self._episodes: dict[EpisodeKey, dict[RecoveryKey, int]] = {}
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

    def all_pods(self) -> list[PodView]:
        """Every slot's current pod record, terminating ones included."""
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
        self._episodes.setdefault(episode_of(view), {})[key] = view.attempt
        if self._sweepable_rule(view):
            self._sweepable.add(key)
        return True

    def drop_recovery(self, namespace: str, name: str) -> RecoveryRecord | None:
        view = self.recoveries.pop((namespace, name), None)
        if view is not None:
            self._job_recoveries[(namespace, view.job)].discard((namespace, name))
            self._unindex((namespace, name), view)
        return view

    def _unindex(self, key: RecoveryKey, view: RecoveryRecord) -> None:
        self._sweepable.discard(key)
        episode = self._episodes.get(episode_of(view))
        if episode is not None:
            episode.pop(key, None)
            if not episode:
                del self._episodes[episode_of(view)]

    def sweepable_recoveries(self) -> list[RecoveryRecord]:
        """The records the sweep must look at (a snapshot: a list of frozen records)."""
        return [self.recoveries[k] for k in self._sweepable]

    def episode_attempts(self, record: RecoveryRecord) -> list[int]:
        """The attempt numbers recorded in ``record``'s episode, its own included."""
        return list(self._episodes.get(episode_of(record), {}).values())

    def job_recoveries(self, namespace: str, job: str) -> list[RecoveryRecord]:
        keys = self._job_recoveries.get((namespace, job), ())
        return [self.recoveries[k] for k in sorted(keys) if k in self.recoveries]

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
        return dropped

    def sizes(self) -> dict[str, int]:
        return {
            "jobs": len(self.jobs),
            "pods": len(self._slots),
            "nodes": len(self.nodes),
            "recoveries": len(self.recoveries),
        }


def _older(candidate: str, current: str) -> bool:
    """resourceVersions are opaque, but etcd's are integers; compare them only then."""
    if candidate.isdigit() and current.isdigit():
        return int(candidate) < int(current)
    return False
