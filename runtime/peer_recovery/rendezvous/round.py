"""What one agent publishes each rendezvous round, and the round's directive.

Once ranks are pinned, every agent publishes, under the round's fresh prefix, its pod's
snapshot holdings (``agent/<o>``), then its plan (``plan/<o>``). A pod that holds no
snapshot (it was replaced and rejoins) asks its plan source, within the bound
(``plan_timeout``; none in time means the in-band planner decides), but only when some
other pod holds a snapshot to recover from. Pods that hold snapshots publish no plan
without waiting, so an ordinary restart, or a job's first start, is never slowed down.

Rank 0's agent also publishes the round's directive: whether a transfer failed in an
earlier round (a worker left ``load-checkpoint`` in the store; consumed here, once) and the
job's pods-per-replica. Then every observer is told the round is published (the cluster
agent's status reporter, when the pod runs in a cluster). Keys and records are those of
:mod:`peer_recovery.protocol`; which plan source and observers are used is decided by the
plugin's wiring (:mod:`peer_recovery.plugin`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final

from peer_recovery._env import ENV_PODS_PER_REPLICA  # the job's pods-per-replica
from peer_recovery.plan_sources import PlanSource
from peer_recovery.protocol import keys
from peer_recovery.protocol.codec import ExchangeError, decode, publish, read_all
from peer_recovery.protocol.records import (
    AgentRecord,
    Directive,
    Holding,
    LoadCheckpointMarker,
    PlanEntry,
    PlanRecord,
)

__all__ = [
    "DEFAULT_PLAN_TIMEOUT_S",
    "ENV_PODS_PER_REPLICA",
    "HoldingsReader",
    "RoundObserver",
    "RoundPublisher",
    "positive_int",
]

log = logging.getLogger(__name__)

DEFAULT_PLAN_TIMEOUT_S: Final = 10.0

#: Returns this pod's snapshot holdings (read from its snapshot manifests).
HoldingsReader = Callable[[], list[Holding]]
#: Told after each round's publication: (store, run id, round, ordinal, nnodes) -> None.
RoundObserver = Callable[[Any, str, int, int, int], None]


def positive_int(value: str | None, what: str) -> int | None:
    """``value`` as an int >= 1, None when unset; a clear error otherwise."""
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"peer-recovery: {what}={value!r} is not an integer") from None
    if number < 1:
        raise ValueError(f"peer-recovery: {what}={number} must be at least 1")
    return number


class RoundPublisher:
    """Publishes one agent's part of each round (``publish`` is the handler's round hook)."""

    def __init__(
        self,
        read_holdings: HoldingsReader,
        plan_source: PlanSource,
        *,
        plan_timeout: float = DEFAULT_PLAN_TIMEOUT_S,
        pods_per_replica: int | None = None,
        observers: Sequence[RoundObserver] = (),
    ) -> None:
        self._read_holdings = read_holdings
        self._plan_source = plan_source
        self._plan_timeout = plan_timeout
        self._pods_per_replica = pods_per_replica
        self._observers = tuple(observers)

    def publish(self, store: Any, run_id: str, round_no: int, ordinal: int, nnodes: int) -> None:
        prefix = keys.round_prefix(run_id, round_no)
        if ordinal == 0:
            self._publish_directive(store, run_id, prefix)
        try:
            holdings = tuple(self._read_holdings())
        except Exception as exc:  # a broken store must not stop the job: it rejoins empty
            log.warning("peer-recovery: cannot read this pod's snapshot manifests: %s", exc)
            holdings = ()
        record = AgentRecord(ordinal, socket.gethostname(), os.getpid(), holdings)
        publish(store, keys.agent_key(prefix, ordinal), record)
        plan = (
            self._plan(store, run_id, round_no, ordinal, nnodes, prefix) if not holdings else None
        )
        publish(store, keys.plan_key(prefix, ordinal), PlanRecord(plan))
        for observer in self._observers:
            observer(store, run_id, round_no, ordinal, nnodes)

    def _plan(
        self, store: Any, run_id: str, round_no: int, ordinal: int, nnodes: int, prefix: str
    ) -> PlanEntry | None:
        """A rejoining pod's plan; asked for only when some other pod holds a snapshot."""
        agent_keys = [keys.agent_key(prefix, o) for o in range(nnodes)]
        raw = read_all(store, agent_keys, self._plan_timeout + 60, "agent records")
        agents = [AgentRecord.from_json(r, k) for r, k in zip(raw, agent_keys, strict=True)]
        if not any(a.holdings for a in agents):
            log.info("peer-recovery: no pod holds a snapshot this round; nothing to plan")
            return None
        plan = self._plan_source.plan_for(
            run_id=run_id, target=ordinal, round_no=round_no, timeout=self._plan_timeout
        )
        log.info(
            "peer-recovery: pod %d holds no snapshot; plan: %s",
            ordinal,
            plan.to_json() if plan else f"none within {self._plan_timeout:g}s, planned in-band",
        )
        return plan

    def _publish_directive(self, store: Any, run_id: str, prefix: str) -> None:
        marker_key = keys.load_checkpoint_key(run_id)
        load_checkpoint: str | None = None
        if store.check([marker_key]):
            try:
                raw = decode(store.get(marker_key), "load-checkpoint marker")
                load_checkpoint = LoadCheckpointMarker.from_json(raw, marker_key).reason
            except ExchangeError as exc:
                load_checkpoint = f"a transfer failed (unreadable marker: {exc})"
            store.delete_key(marker_key)
        directive = Directive(load_checkpoint, self._pods_per_replica)
        publish(store, keys.directive_key(prefix), directive)
