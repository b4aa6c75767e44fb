"""kopf handlers: a few lines each, handing every event to the :class:`Engine`.

kopf watches PyTorchJobs and nodes; only ``@kopf.on.event`` is used: it is the one kopf
handler kind that keeps no progress and no diff-base on the object and adds no finalizer,
so the operator never writes to PyTorchJobs or nodes. Pods and PeerRecoveries, the many
and the large, are listed and watched by the operator's own
:class:`~peer_recovery_operator.watcher.Watcher` threads (started and stopped here), which
hand the loop slim bodies; pods with a server-side label selector on
``training.kubeflow.org/operator-name=pytorchjob-controller`` (the label the
training-operator's PyTorchJob controller sets on every pod it makes), so pods outside any
PyTorchJob, and those of TFJobs, MPIJobs and other kinds, never reach the operator at all.
The operator never writes to pods (a finalizer on a pod would stop the training-operator
from recreating it under the same name).

Besides the handlers, three background tasks run on kopf's loop: the lifecycle sweep (only
while this replica leads; its decisions are made on a worker thread), the periodic resync
(on every replica) and, with a :class:`~peer_recovery_operator.lease.LeaderElector`, the
Lease loop; two probes report watch health (raising, so ``/healthz`` answers 500) and
leadership.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import kopf

from peer_recovery.contract import names
from peer_recovery_operator.engine import Engine
from peer_recovery_operator.kube_watch import PAGE_SIZE, WatchApi
from peer_recovery_operator.lease import LeaderElector
from peer_recovery_operator.watcher import LoopHandoff, Watcher

__all__ = ["PodListener", "register"]

logger = logging.getLogger(__name__)

#: Objects per page of kopf's initial listings (of PyTorchJobs and nodes).
LIST_PAGE_SIZE = 250
#: Batches of watch events that may wait for the loop before a watcher stops reading.
HANDOFF_WINDOW = 16

#: Another consumer of the pod watch's events (the webhook's audit of unmutated pods).
PodListener = Callable[[str | None, Mapping[str, Any]], None]

#: Watch timeouts, kopf's and the watchers'. The server ends each watch after
#: ``SERVER_TIMEOUT`` (it is then resumed from the last resourceVersion); the client gives
#: up on a connection silent for ``CLIENT_TIMEOUT``, so a half-open connection (no data, no
#: FIN) ends within that instead of stalling the watch silently.
WATCH_SERVER_TIMEOUT = 60  # an integer: the API server refuses "60.0"
WATCH_CLIENT_TIMEOUT = 90.0
WATCH_CONNECT_TIMEOUT = 10.0


def register(
    registry: kopf.OperatorRegistry,
    engine: Engine,
    watch_api: WatchApi,
    elector: LeaderElector | None = None,
    pod_listeners: Sequence[PodListener] = (),
) -> None:
    """Register the handlers for one engine on ``registry``; with ``elector``, only the
    holder of its Lease acts, the other replicas watch and stand by. Pods and
    PeerRecoveries are watched through ``watch_api``; ``pod_listeners`` get each pod event
    after the engine."""
    tasks: list[asyncio.Task[None]] = []
    watchers: list[Watcher] = []
    if elector is not None:
        engine.leading = elector.leading
    engine.metrics.leader.set(1 if elector is None else 0)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # The initial listing (at start and after every relist) comes in pages, so its peak
        # memory is one page of bodies, not every object of the namespace at once.
        settings.watching.chunk_size = LIST_PAGE_SIZE
        settings.posting.enabled = False  # we post our own Events, on the job
        settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf")
        # Never used (no change handlers), but if a future handler needed them, they would
        # land in a status field, which the operator cannot write on pods (RBAC), not on
        # pods' annotations.
        settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(field="status.kopf")
        settings.watching.server_timeout = WATCH_SERVER_TIMEOUT
        settings.watching.client_timeout = WATCH_CLIENT_TIMEOUT
        settings.watching.connect_timeout = WATCH_CONNECT_TIMEOUT
        loop = asyncio.get_running_loop()
        watchers.extend(_start_watchers(engine, watch_api, pod_listeners, loop))
        tasks.append(loop.create_task(_sweeper(engine)))
        tasks.append(loop.create_task(_resyncer(engine)))
        if elector is not None:
            tasks.append(loop.create_task(_elect(engine, elector)))

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A registry of our own gets none of kopf's default login handlers: use the same
        # credentials as our client ($KUBECONFIG, else in-cluster).
        return kopf.login_via_client(**kwargs)

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        for watcher in watchers:
            watcher.stop()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if elector is not None:
            await asyncio.to_thread(elector.release)

    @kopf.on.probe(id="watching", registry=registry)
    def watching(**_: Any) -> str:
        # kopf answers /healthz with 500 when a probe raises: the kubelet restarts a
        # replica whose watches stalled.
        problem = engine.watch_problem()
        if problem is not None:
            raise kopf.PermanentError(problem)
        return "ok"

    @kopf.on.probe(id="leader", registry=registry)
    def leader(**_: Any) -> bool:
        return engine.leading()

    @kopf.on.event(
        names.PYTORCHJOB_GROUP, names.PYTORCHJOB_VERSION, names.PYTORCHJOB_PLURAL, registry=registry
    )
    async def job(event: kopf.RawEvent, **_: Any) -> None:
        engine.job_event(event.get("type"), event["object"])

    @kopf.on.event("v1", "nodes", registry=registry)
    async def node(event: kopf.RawEvent, **_: Any) -> None:
        engine.node_event(event.get("type"), event["object"])


def _start_watchers(
    engine: Engine,
    api: WatchApi,
    pod_listeners: Sequence[PodListener],
    loop: asyncio.AbstractEventLoop,
) -> list[Watcher]:
    """One pod and one PeerRecovery watcher per watched namespace (or one of each for all
    namespaces), with kopf's watch timeouts."""

    def pod(event_type: str | None, body: Mapping[str, Any]) -> None:
        engine.pod_event(event_type, body)
        for listener in pod_listeners:
            listener(event_type, body)

    config = engine.config
    scopes: list[str | None] = [None] if config.all_namespaces else list(config.namespaces)
    handlers: list[tuple[str, PodListener]] = [
        ("pods", pod),
        ("peerrecoveries", engine.recovery_event),
    ]
    return [
        Watcher(
            api,
            kind,
            namespace,
            LoopHandoff(loop, handle, HANDOFF_WINDOW),
            page_size=PAGE_SIZE,
            server_timeout=WATCH_SERVER_TIMEOUT,
            client_timeout=WATCH_CLIENT_TIMEOUT,
        ).start()
        for namespace in scopes
        for kind, handle in handlers
    ]


async def _sweeper(engine: Engine) -> None:
    """Run the lifecycle sweep (and retention) every ``sweep_interval`` seconds until
    cancelled; only while this replica leads."""
    while True:
        await asyncio.sleep(engine.config.sweep_interval)
        if not engine.leading():
            continue
        try:
            await engine.sweep()
        except Exception:  # one bad sweep must not end the sweeping
            logger.exception("lifecycle sweep failed")


async def _resyncer(engine: Engine) -> None:
    """Relist and reconcile every ``resync_interval`` seconds until cancelled (on every
    replica: a standby's caches must be right when it takes over)."""
    while True:
        await asyncio.sleep(engine.config.resync_interval)
        try:
            await engine.resync()
        except Exception:  # an unreachable API server: try again next time
            logger.exception("resync failed")


async def _elect(engine: Engine, elector: LeaderElector) -> None:
    """Read (and, leading, renew) the Lease every retry period; on winning it, resync and
    run the work queued while standing by."""
    was_leading = False
    horizon = 2 * elector.timing.duration + 2 * elector.timing.retry_period
    while True:
        try:
            leading = await asyncio.to_thread(elector.tick)
        except Exception:  # e.g. a reset connection: leading() lapses on its own
            logger.exception("leader election round failed")
            leading = elector.leading()
        if leading and not was_leading:
            engine.metrics.leader.set(1)
            try:
                await engine.resync()
            except Exception:
                logger.exception("resync on taking over failed")
            engine.start_leading()
        elif not leading:
            if was_leading:
                logger.warning("%s stopped leading: standing by", elector.identity)
            engine.metrics.leader.set(0)
            engine.prune_standby(horizon)
        was_leading = leading
        await asyncio.sleep(elector.timing.retry_period)
