"""Events on PyTorchJobs, aggregated into series as Kubernetes' own event recorder does.

One Event object per (object, type, reason) series: its first occurrence creates it, every
repeat bumps its ``count``, ``lastTimestamp`` and ``message`` instead of adding an object,
so a job whose pods restart all day has a handful of Events, not thousands. Pure: this
module decides names, bodies and patches; :mod:`peer_recovery_operator.kube` makes the
calls.

Invariants: a series' name is derived from its key (the object's UID, type and reason), so
a restarted operator that creates it again gets AlreadyExists and continues that series'
count; the memory of series is bounded (least recently used forgotten first).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from collections.abc import Mapping
from datetime import datetime
from typing import Any

__all__ = ["EventKey", "EventSeries", "Occurrence", "bump_patch", "event_body", "event_key"]

#: How many series are remembered; an older one is found again by its name (AlreadyExists).
SERIES_MEMORY = 4096
MESSAGE_LIMIT = 1024


@dataclasses.dataclass(frozen=True, slots=True)
class EventKey:
    """What makes two Events one series: the object they are about, type and reason."""

    namespace: str
    api_version: str
    kind: str
    name: str
    uid: str
    type_: str
    reason: str

    @property
    def event_name(self) -> str:
        """Deterministic, so every process that posts this series names it the same."""
        digest = hashlib.sha256(f"{self.kind}/{self.uid}/{self.type_}/{self.reason}".encode())
        return f"{self.name[:200]}.{digest.hexdigest()[:16]}"


@dataclasses.dataclass(frozen=True, slots=True)
class Occurrence:
    """One posting of a series: its count after this occurrence and when the series began."""

    key: EventKey
    count: int
    first: str

    @property
    def is_first(self) -> bool:
        return self.count == 1


def event_key(involved: Mapping[str, str], *, type_: str, reason: str) -> EventKey:
    return EventKey(
        namespace=str(involved.get("namespace", "")),
        api_version=str(involved.get("apiVersion", "")),
        kind=str(involved.get("kind", "")),
        name=str(involved.get("name", "")),
        uid=str(involved.get("uid", "")),
        type_=type_,
        reason=reason,
    )


class EventSeries:
    """The counts of the series this process posted; thread-safe (posted from workers)."""

    def __init__(self, capacity: int = SERIES_MEMORY) -> None:
        self._capacity = capacity
        self._known: collections.OrderedDict[EventKey, tuple[int, str]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def next(self, key: EventKey, now: datetime) -> Occurrence:
        """Count one more occurrence of ``key``."""
        with self._lock:
            count, first = self._known.pop(key, (0, _stamp(now)))
            self._known[key] = (count + 1, first)
            while len(self._known) > self._capacity:
                self._known.popitem(last=False)
            return Occurrence(key, count + 1, first)

    def continue_from(self, occurrence: Occurrence, stored: Mapping[str, Any]) -> Occurrence:
        """The series already exists (made by an earlier process): continue its count."""
        count = int(stored.get("count") or 1) + 1
        first = str(stored.get("firstTimestamp") or occurrence.first)
        with self._lock:
            self._known[occurrence.key] = (count, first)
        return Occurrence(occurrence.key, count, first)

    def restart(self, occurrence: Occurrence, now: datetime) -> Occurrence:
        """The series' object is gone (the API server expires Events): start it anew."""
        with self._lock:
            self._known[occurrence.key] = (1, _stamp(now))
        return Occurrence(occurrence.key, 1, _stamp(now))

    def __len__(self) -> int:
        return len(self._known)


def event_body(
    occurrence: Occurrence, message: str, now: datetime, component: str
) -> dict[str, Any]:
    """The core/v1 Event that starts (or restarts) a series."""
    key = occurrence.key
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": key.event_name, "namespace": key.namespace},
        "involvedObject": {
            "apiVersion": key.api_version,
            "kind": key.kind,
            "name": key.name,
            "namespace": key.namespace,
            "uid": key.uid,
        },
        "type": key.type_,
        "reason": key.reason,
        "message": message[:MESSAGE_LIMIT],
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": occurrence.first,
        "lastTimestamp": _stamp(now),
        "count": occurrence.count,
    }


def bump_patch(occurrence: Occurrence, message: str, now: datetime) -> dict[str, Any]:
    """The merge patch of a repeat: the latest message, count and time."""
    return {
        "message": message[:MESSAGE_LIMIT],
        "count": occurrence.count,
        "lastTimestamp": _stamp(now),
    }


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
