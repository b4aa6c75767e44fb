"""Pods of opted-in jobs that came through without the webhook (pure bookkeeping).

The webhook's failure policy is ``Ignore``: while it is down (or not installed), pods are
created as the user wrote them. Every pod it completes carries the annotation
``peerrecovery.io/mutated``; a pod of an opted-in job without it came through unmutated,
and the operator reports it with an Event on the job (once per pod). Pod events may arrive
before their job's: such pods wait here until the job is known.

Rules: 1. a pod with the annotation, or of a job known not to be opted in, is fine;
2. a pod without it, of an opted-in job, is reported once; 3. of a job not known yet, it
waits for the job's event (bounded: the oldest waiting pods are forgotten first).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from peer_recovery.contract import names

__all__ = ["REASON", "Unmutated", "UnmutatedPods", "message"]

REASON = "PodNotMutated"
_MEMORY = 4096

#: (namespace, job) -> True / False when the job is known, None when not yet.
JobEnabled = Callable[[str, str], bool | None]


@dataclass(frozen=True)
class Unmutated:
    namespace: str
    job: str
    pod: str
    uid: str


def message(found: Unmutated) -> str:
    return (
        f"pod {found.pod} was created without the peer-recovery webhook's changes (the "
        "webhook was unreachable, and its failure policy Ignore let the pod through): it may "
        "lack the downward-API env, the /dev/shm volume and the ServiceAccount that recovery "
        "needs. `peer-recovery doctor --pod-yaml` on the pod names what is missing; deleting "
        "the pod once the webhook is up has it recreated complete."
    )


class UnmutatedPods:
    def __init__(self) -> None:
        self._reported: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._waiting: collections.OrderedDict[str, Unmutated] = collections.OrderedDict()

    def pod_event(
        self, event_type: str | None, pod: Mapping[str, Any], job_enabled: JobEnabled
    ) -> list[Unmutated]:
        """What to report now for this pod event (zero or one pod)."""
        meta = pod.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        if event_type == "DELETED":
            self._waiting.pop(uid, None)
            return []
        job = (meta.get("labels") or {}).get(names.LABEL_JOB_NAME)
        annotations = meta.get("annotations") or {}
        if not uid or not job or names.ANNOTATION_MUTATED in annotations:
            return []
        if uid in self._reported:
            return []
        found = Unmutated(str(meta.get("namespace") or ""), str(job), str(meta.get("name")), uid)
        enabled = job_enabled(found.namespace, found.job)
        if enabled is None:
            self._waiting[uid] = found
            _bound(self._waiting)
            return []
        return self._report(found) if enabled else []

    def job_known(self, namespace: str, job: str, enabled: bool) -> list[Unmutated]:
        """The waiting pods of this job to report now that it is known."""
        ready = [w for w in self._waiting.values() if (w.namespace, w.job) == (namespace, job)]
        reports: list[Unmutated] = []
        for found in ready:
            del self._waiting[found.uid]
            if enabled:
                reports += self._report(found)
        return reports

    def _report(self, found: Unmutated) -> list[Unmutated]:
        self._reported[found.uid] = None
        _bound(self._reported)
        return [found]


def _bound(entries: collections.OrderedDict[str, Any]) -> None:
    while len(entries) > _MEMORY:
        entries.popitem(last=False)
