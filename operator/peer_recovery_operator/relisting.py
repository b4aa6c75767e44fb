"""The periodic resync's relist, on a worker thread: what it keeps of the listed bodies.

The decision on what a relist shows is pure (:mod:`peer_recovery_operator.resync`); this
module does the listing, page by page, and keeps only what that decision and the engine
need, so a relist of thousands of large pods never holds them all at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from peer_recovery_operator.kube import ClusterApi
from peer_recovery_operator.state import RecordKey
from peer_recovery_operator.views import BadInput, PodView, job_name_of_pod, pod_view

__all__ = ["Relisted", "relist"]


@dataclasses.dataclass
class Relisted:
    """What a resync keeps of its relist (:func:`relist`)."""

    pods: list[PodView] = dataclasses.field(default_factory=list)
    unknown_pods: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    recovery_keys: list[RecordKey] = dataclasses.field(default_factory=list)
    changed_recoveries: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def relist(
    api: ClusterApi,
    scopes: list[str | None],
    known: set[str],
    versions: Mapping[RecordKey, str],
) -> Relisted:
    """On a worker thread: list page by page, keeping of each body only what the resync
    uses (a record per pod; the bodies of pods not ``known`` and of PeerRecoveries whose
    resourceVersion differs from ``versions``), so a relist of thousands of objects never
    holds them all."""
    relisted = Relisted()
    for namespace in scopes:
        for body in api.list_pods(namespace):
            job_name = job_name_of_pod(body)
            if job_name is None:
                continue
            try:
                relisted.pods.append(pod_view(body, job_name))
            except BadInput:
                continue  # reported when the watch delivers it
            if str(body["metadata"].get("uid")) not in known:
                relisted.unknown_pods.append(body)
        for body in api.list_all_recoveries(namespace):
            meta = body.get("metadata") or {}
            key = (str(meta.get("namespace")), str(meta.get("name")))
            relisted.recovery_keys.append(key)
            if versions.get(key) != meta.get("resourceVersion"):
                relisted.changed_recoveries.append(body)
    return relisted
