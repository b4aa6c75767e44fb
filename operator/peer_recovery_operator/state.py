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

from peer_recovery.contract.records import RecoveryRecord
from peer_recovery_operator.views import JobView, NodeView, PodView

__all__ = ["ClusterState", "JobKey", "Slot"]

Slot = tuple[str, str, str, int]
JobKey = tuple[str, str]


class ClusterState:
    def __init__(self) -> None:
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
        self.recoveries[key] = view
        self._job_recoveries[(view.namespace, view.job)].add(key)
        return True

    def drop_recovery(self, namespace: str, name: str) -> RecoveryRecord | None:
        view = self.recoveries.pop((namespace, name), None)
        if view is not None:
            self._job_recoveries[(namespace, view.job)].discard((namespace, name))
        return view

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
