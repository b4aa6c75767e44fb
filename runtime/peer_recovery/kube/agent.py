"""The agent's side of cluster integration: one hook per rendezvous round, one reporter
thread per round.

:class:`ClusterAgent` is created by the cluster integration (``setup``) when the pod has an
identity (``POD_NAME``/``POD_UID``/``POD_NAMESPACE``). The rendezvous plugin's
``RoundPublisher`` calls :meth:`ClusterAgent.round_published` after it has published this
pod's manifests and plan; the agent then

1. publishes this pod's identity under the round's prefix (``pod/<ordinal>``), so that the
   pod that rejoins can name its source in a runtime-planned PeerRecovery;
2. ends the previous round's reporter wait (its round is over);
3. starts a daemon thread that follows this pod's part of the round through its workers'
   ``outcome`` records, writes ``Streaming`` as soon as the agreement is in (one try),
   then the terminal phase once the results are in, retrying while the API server is
   unreachable, up to ``PEER_RECOVERY_STATUS_RETRY_S`` (default 120 s).

Why the agent reports: it outlives worker restarts (a failed transfer kills the worker, not
the agent), it is one process per pod (one writer per recovery), and it already holds the
ServiceAccount client of the plan reader. At exit (training over, or torchrun giving up) an
``atexit`` hook ends the waits and gives pending writes until their retry bound, so a
status owed while the API server was down is written once it is back, or the reason is
logged. Pods that do not rejoin make one attempt only (they report only on a recovery the
operator made for them, e.g. a container restart in Local mode).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

from peer_recovery._env import nonnegative_seconds
from peer_recovery.contract.records import for_target, job_uid
from peer_recovery.kube.client import RecoveryApi
from peer_recovery.kube.plans import KubePlanSource
from peer_recovery.kube.report import PodRound, moves, runtime_record
from peer_recovery.kube.status import apply_moves, create_or_get, deliver
from peer_recovery.protocol import keys
from peer_recovery.protocol.codec import ExchangeError, decode, publish, wait_records
from peer_recovery.protocol.records import AgentRecord, PodIdentity, RankAgreed, RankResult

__all__ = [
    "DEFAULT_REPORT_WAIT_S",
    "DEFAULT_STATUS_RETRY_S",
    "ENV_REPORT_WAIT",
    "ENV_STATUS_RETRY",
    "ClusterAgent",
]

log = logging.getLogger("peer_recovery.kube.agent")

ENV_STATUS_RETRY: Final = "PEER_RECOVERY_STATUS_RETRY_S"
DEFAULT_STATUS_RETRY_S: Final = 120.0
ENV_REPORT_WAIT: Final = "PEER_RECOVERY_REPORT_WAIT_S"
#: How long the reporter waits for its workers' agreement, then for their results.
DEFAULT_REPORT_WAIT_S: Final = 900.0
_STORE_WAIT_S: Final = 120.0


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    return nonnegative_seconds(env.get(name), name, default)


class ClusterAgent:
    """The per-round hook and its reporter threads (see the module docstring)."""

    def __init__(
        self,
        identity: PodIdentity,
        plan_source: KubePlanSource,
        *,
        retry_window: float = DEFAULT_STATUS_RETRY_S,
        report_wait: float = DEFAULT_REPORT_WAIT_S,
    ) -> None:
        self.identity = identity
        self.plan_source = plan_source
        self.retry_window = retry_window
        self.report_wait = report_wait
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._round_over: threading.Event | None = None
        self._exiting = threading.Event()
        self._flush_registered = False

    @classmethod
    def from_env(cls, identity: PodIdentity, source: KubePlanSource, env: Mapping[str, str]):
        return cls(
            identity,
            source,
            retry_window=_seconds(env, ENV_STATUS_RETRY, DEFAULT_STATUS_RETRY_S),
            report_wait=_seconds(env, ENV_REPORT_WAIT, DEFAULT_REPORT_WAIT_S),
        )

    # --- the hook ------------------------------------------------------------------------

    def round_published(
        self, store: Any, run_id: str, round_no: int, ordinal: int, nnodes: int
    ) -> None:
        prefix = keys.round_prefix(run_id, round_no)
        try:
            publish(store, keys.identity_key(prefix, ordinal), self.identity)
        except Exception as error:  # never stop the job for reporting
            log.warning("peer-recovery: cannot publish this pod's identity: %s", error)
        self._register_flush()
        over = threading.Event()
        with self._lock:
            if self._round_over is not None:
                self._round_over.set()
            self._round_over = over
            self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(
                target=self._report_round,
                args=(store, prefix, round_no, ordinal, nnodes, over),
                name=f"peer-recovery-report-{round_no}",
                daemon=True,
            )
            self._threads.append(thread)
        thread.start()

    def _register_flush(self) -> None:
        """Register :meth:`flush` at exit once, *after* the client is made: the kubernetes
        client deletes the CA file it wrote from a kubeconfig in its own ``atexit`` hook,
        and hooks run last-registered first, so the flush must come later to run first."""
        if self._flush_registered:
            return
        self._flush_registered = True
        try:
            self.plan_source.client()  # loads the config only; no request is made
        except Exception as error:
            log.warning("peer-recovery: cannot load the Kubernetes client config: %s", error)
        atexit.register(self.flush)

    def flush(self) -> None:
        """At exit: end the waits, then give pending writes until their retry bound."""
        self._exiting.set()
        with self._lock:
            if self._round_over is not None:
                self._round_over.set()
            threads = list(self._threads)
        deadline = time.monotonic() + self.retry_window + 5
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # --- the reporter thread -------------------------------------------------------------

    def _report_round(
        self,
        store: Any,
        prefix: str,
        round_no: int,
        ordinal: int,
        nnodes: int,
        over: threading.Event,
    ) -> None:
        try:
            self._report(store, prefix, round_no, ordinal, nnodes, over)
        except Exception:
            log.exception("peer-recovery: the status reporter of round %d failed", round_no)

    def _report(
        self,
        store: Any,
        prefix: str,
        round_no: int,
        ordinal: int,
        nnodes: int,
        over: threading.Event,
    ) -> None:
        agent_keys = [keys.agent_key(prefix, o) for o in range(nnodes)]
        raw_agents = wait_records(store, agent_keys, timeout=_STORE_WAIT_S, stop=over)
        if raw_agents is None:
            return
        agents = [AgentRecord.from_json(r, k) for r, k in zip(raw_agents, agent_keys, strict=True)]
        rejoining = not agents[ordinal].holdings and any(a.holdings for a in agents)
        wait = self.report_wait
        first_key = keys.agreed_key(prefix, ordinal, 0)
        first = wait_records(store, [first_key], timeout=wait, stop=over)
        if first is None:
            log.info("peer-recovery: round %d: no agreement from this pod's workers", round_no)
            return
        local_world = RankAgreed.from_json(first[0], first_key).local_world_size
        agreed_keys = [keys.agreed_key(prefix, ordinal, r) for r in range(local_world)]
        raw = wait_records(store, agreed_keys, timeout=wait, stop=over)
        if raw is None:
            return
        agreed = [RankAgreed.from_json(r, k) for r, k in zip(raw, agreed_keys, strict=True)]
        ledger = self.plan_source.ledger.get(round_no)
        identities = _identities(store, prefix, nnodes)
        pr = PodRound(
            round_no,
            agreed,
            plan_note=ledger[1] if ledger else "",
            pods={o: who.pod for o, who in identities.items()},
        )
        # Streaming now, one try: a slow or absent API server must not hold up the results.
        self._write(pr, ordinal, rejoining, identities, deadline=time.monotonic(),
                    then="it is written with the final status", level=logging.WARNING)  # fmt: skip
        results = None
        if all(a.ok for a in agreed):
            result_keys = [keys.result_key(prefix, ordinal, r) for r in range(local_world)]
            raw = wait_records(store, result_keys, timeout=wait, stop=over)
            if raw is not None:
                results = [
                    RankResult.from_json(r, k) for r, k in zip(raw, result_keys, strict=True)
                ]
        final = dataclasses.replace(pr, results=results, ended=results is None)
        window = self.retry_window if rejoining else 0.0
        self._write(final, ordinal, rejoining, identities, deadline=time.monotonic() + window)

    def _write(
        self,
        pr: PodRound,
        ordinal: int,
        rejoining: bool,
        identities: Mapping[int, PodIdentity],
        *,
        deadline: float,
        **how: Any,
    ) -> None:
        to_make = moves(pr)
        if not to_make:
            return
        me = self.identity

        def attempt() -> None:
            client: RecoveryApi = self.plan_source.client()
            bodies = client.list_recoveries(me.namespace, me.job)
            existing = for_target(bodies, me.uid)
            live = [r for r in existing if not r.phase.terminal]
            if live:
                apply_moves(client, me.namespace, live[0].name, to_make)
                return
            if not rejoining:
                return  # the operator made nothing for this pod; nothing to create
            made = runtime_record(
                me=me,
                ordinal=ordinal,
                pr=pr,
                existing=existing,
                sources=identities,
                job_uid=job_uid(bodies, me.job),
            )
            if made is None:
                return
            body, first = made
            name = create_or_get(client, me.namespace, body)["metadata"]["name"]
            rest = [m for m in to_make if m.phase is not first.phase]
            apply_moves(client, me.namespace, name, [first, *rest])

        deliver(attempt, deadline=deadline, what=f"the status of round {pr.round_no}", **how)


def _identities(store: Any, prefix: str, nnodes: int) -> dict[int, PodIdentity]:
    """The identities the round's agents published (those that are pods)."""
    found: dict[int, PodIdentity] = {}
    for ordinal in range(nnodes):
        key = keys.identity_key(prefix, ordinal)
        try:
            if store.check([key]):
                found[ordinal] = PodIdentity.from_json(decode(store.get(key), key), key)
        except (ValueError, ExchangeError) as error:
            log.warning("peer-recovery: ignoring %s: %s", key, error)
    return found
