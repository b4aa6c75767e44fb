"""What one agent publishes each rendezvous round, and the round's directive.

Once ranks are pinned, every agent publishes, under the round's fresh prefix, its pod's
snapshot manifests (``agent/<o>``: rank, step, shard key, bytes per snapshot), then its
plan (``plan/<o>``). A pod that holds no snapshot (it was replaced and rejoins) asks its
plan source, within the bound (``plan_timeout``; none in time means the in-band planner
decides), but only when some other pod holds a snapshot to recover from. Pods that hold
snapshots publish no plan without waiting, so an ordinary restart, or a job's first
start, is never slowed down.

Rank 0's agent also publishes the round's directive: whether a transfer failed in an
earlier round (a worker left ``load-checkpoint`` in the store; consumed here, once) and the
job's pods-per-replica. Workers read all of it through :mod:`peer_recovery.peer_restore`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, Final

from peer_recovery._env import nonnegative_seconds
from peer_recovery.plan_sources import (
    ENV_PLAN_TIMEOUT,
    PlanEntry,
    PlanSource,
    plan_source_from_config,
)
from peer_recovery.rendezvous import exchange

__all__ = [
    "DEFAULT_PLAN_TIMEOUT_S",
    "ENV_PODS_PER_REPLICA",
    "ManifestReader",
    "RoundPublisher",
    "directive_key",
    "plan_key",
]

log = logging.getLogger(__name__)

DEFAULT_PLAN_TIMEOUT_S: Final = 10.0
#: The job's ``peerrecovery.io/pods-per-replica``, passed to the pod as an env var.
ENV_PODS_PER_REPLICA: Final = "PEER_RECOVERY_PODS_PER_REPLICA"

#: Returns this pod's snapshot holdings as JSON-able dicts (rank, step, shard_key, nbytes).
ManifestReader = Callable[[], list[dict[str, Any]]]


def directive_key(prefix: str) -> str:
    return f"{prefix}directive"


def plan_key(prefix: str, ordinal: int) -> str:
    return f"{prefix}plan/{ordinal}"


def _positive_int(value: str | None, what: str) -> int | None:
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
        read_manifests: ManifestReader,
        plan_source: PlanSource,
        *,
        plan_timeout: float = DEFAULT_PLAN_TIMEOUT_S,
        pods_per_replica: int | None = None,
    ) -> None:
        self._read_manifests = read_manifests
        self._plan_source = plan_source
        self._plan_timeout = plan_timeout
        self._pods_per_replica = pods_per_replica

    @classmethod
    def from_config(cls, config: Mapping[str, Any], env: Mapping[str, str]) -> RoundPublisher:
        """From torchrun's ``--rdzv-conf`` (``plan_file``, ``plan_timeout``) and the env."""
        raw_timeout = config.get("plan_timeout") or env.get(ENV_PLAN_TIMEOUT)
        timeout = nonnegative_seconds(raw_timeout, "plan_timeout", DEFAULT_PLAN_TIMEOUT_S)
        return cls(
            _default_manifest_reader(env),
            plan_source_from_config(config, env),
            plan_timeout=timeout,
            pods_per_replica=_positive_int(env.get(ENV_PODS_PER_REPLICA), ENV_PODS_PER_REPLICA),
        )

    def publish(self, store: Any, run_id: str, round_no: int, ordinal: int, nnodes: int) -> None:
        prefix = exchange.round_prefix(run_id, round_no)
        if ordinal == 0:
            self._publish_directive(store, run_id, prefix)
        try:
            holdings = self._read_manifests()
        except Exception as exc:  # a broken store must not stop the job: it rejoins empty
            log.warning("peer-recovery: cannot read this pod's snapshot manifests: %s", exc)
            holdings = []
        record = {"ordinal": ordinal, "host": socket.gethostname(), "pid": os.getpid()}
        record["holdings"] = holdings
        store.set(exchange.agent_key(prefix, ordinal), exchange.encode(record))
        plan = (
            self._plan(store, run_id, round_no, ordinal, nnodes, prefix) if not holdings else None
        )
        store.set(plan_key(prefix, ordinal), exchange.encode({"plan": plan and plan.to_json()}))
        observer = getattr(self._plan_source, "round_published", None)
        if observer is not None:  # the cluster integration's status reporter (peer_recovery.kube)
            observer(store, run_id, round_no, ordinal, nnodes)

    def _plan(
        self, store: Any, run_id: str, round_no: int, ordinal: int, nnodes: int, prefix: str
    ) -> PlanEntry | None:
        """A rejoining pod's plan; asked for only when some other pod holds a snapshot."""
        keys = [exchange.agent_key(prefix, o) for o in range(nnodes)]
        agents = exchange.read_all(store, keys, self._plan_timeout + 60, "agent records")
        if not any(a.get("holdings") for a in agents):
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
        marker_key = exchange.load_checkpoint_key(run_id)
        load_checkpoint: str | None = None
        if store.check([marker_key]):
            try:
                marker = exchange.decode(store.get(marker_key), "load-checkpoint marker")
                load_checkpoint = str(marker.get("reason") or "a transfer failed")
            except exchange.ExchangeError as exc:
                load_checkpoint = f"a transfer failed (unreadable marker: {exc})"
            store.delete_key(marker_key)
        directive = {"load_checkpoint": load_checkpoint, "pods_per_replica": self._pods_per_replica}
        store.set(directive_key(prefix), exchange.encode(directive))


def _default_manifest_reader(env: Mapping[str, str]) -> ManifestReader:
    """This pod's snapshot holdings, read from the snapshot store's manifests (no torch)."""
    from peer_recovery.rendezvous.manifests import manifest_reader

    return manifest_reader(env)
