"""The periodic full resync: what a relist shows that the watches did not deliver.

A watch can miss things: after a ``410 Gone`` kopf relists and carries on, but an object
deleted meanwhile never produces a DELETED event, and a half-open connection delivers
nothing at all until a timeout ends it. So every ``resync_interval`` the engine relists
pods and PeerRecoveries and compares. Pure: these functions take what was known *before*
the list was requested and what the list returned, so an object that arrived by the watch
while the list was in flight is never taken for a vanished one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime, timedelta

from peer_recovery_operator.views import PodView

__all__ = ["WATCH_STALL_SECONDS", "Drift", "compare"]

#: A pod the list shows, created this long before the list, that the watch never delivered
#: means the pod watch is stalled (a watch normally delivers within a second).
WATCH_STALL_SECONDS = 30.0

RecoveryKey = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Drift:
    """What the relist shows that the state, as it was before the list, lacked."""

    #: Pods the state held as live that the list lacks: deleted during a watch gap.
    gone_pods: tuple[PodView, ...]
    #: PeerRecoveries the state held that the list lacks.
    gone_recoveries: tuple[RecoveryKey, ...]
    #: Listed pods the state never saw, old enough that the watch should have shown them.
    unseen_pods: tuple[PodView, ...]

    def __bool__(self) -> bool:
        return bool(self.gone_pods or self.gone_recoveries or self.unseen_pods)


def compare(
    *,
    live_before: Iterable[PodView],
    known_uids_before: Iterable[str],
    recoveries_before: Iterable[RecoveryKey],
    listed_pods: Iterable[PodView],
    listed_recoveries: Iterable[RecoveryKey],
    list_started: datetime,
) -> Drift:
    """Compare the state before the list with the list (see the module's docstring);
    ``listed_recoveries`` are the listed PeerRecoveries' (namespace, name)."""
    listed = list(listed_pods)
    listed_uids = {p.uid for p in listed}
    known = set(known_uids_before)
    horizon = list_started - timedelta(seconds=WATCH_STALL_SECONDS)
    listed_keys = set(listed_recoveries)
    return Drift(
        gone_pods=tuple(p for p in live_before if p.uid not in listed_uids),
        gone_recoveries=tuple(sorted(k for k in recoveries_before if k not in listed_keys)),
        unseen_pods=tuple(p for p in listed if p.uid not in known and p.created < horizon),
    )
