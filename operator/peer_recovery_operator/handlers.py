"""kopf handlers: a few lines each, handing every event to the :class:`Engine`.

Only ``@kopf.on.event`` is used, on every resource: it is the one kopf handler kind that
keeps no progress and no diff-base on the object and adds no finalizer, so the operator
never writes to pods, PyTorchJobs or nodes (a finalizer on a pod would stop the
training-operator from recreating it under the same name). Pods are watched with a
server-side label selector on ``training.kubeflow.org/operator-name=pytorchjob-controller``
(the label the training-operator's PyTorchJob controller sets on every pod it makes), so
pods outside any PyTorchJob, and those of TFJobs, MPIJobs and other kinds, never reach the
operator at all.

Besides the handlers, three background tasks run on kopf's loop: the lifecycle sweep (only
while this replica leads), the periodic resync (on every replica) and, with a
:class:`~peer_recovery_operator.lease.LeaderElector`, the Lease loop; two probes report
watch health (raising, so ``/healthz`` answers 500) and leadership.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from peer_recovery.contract import names
from peer_recovery_operator import views
from peer_recovery_operator.engine import Engine
from peer_recovery_operator.lease import LeaderElector

__all__ = ["register"]

logger = logging.getLogger(__name__)

POD_SELECTOR = ("v1", "pods")
#: Objects per page of kopf's initial listings (pods of 10-30 KB: a page is a few MB).
LIST_PAGE_SIZE = 250

#: Watch timeouts. The server ends each watch after ``SERVER_TIMEOUT`` (kopf then resumes it
#: from the last resourceVersion); the client gives up on a connection after
#: ``CLIENT_TIMEOUT``, so a half-open connection (no data, no FIN) ends within that instead
#: of stalling the watch silently.
WATCH_SERVER_TIMEOUT = 60  # an integer: the API server refuses "60.0"
WATCH_CLIENT_TIMEOUT = 90.0
WATCH_CONNECT_TIMEOUT = 10.0


def register(
    registry: kopf.OperatorRegistry, engine: Engine, elector: LeaderElector | None = None
) -> None:
    """Register the handlers for one engine on ``registry``; with ``elector``, only the
    holder of its Lease acts, the other replicas watch and stand by."""
    tasks: list[asyncio.Task[None]] = []
    if elector is not None:
        engine.leading = elector.leading
    engine.metrics.leader.set(1 if elector is None else 0)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.watching.label_selectors[POD_SELECTOR] = views.POD_LABEL_SELECTOR
        # The initial listing (at start and after every relist) comes in pages, so its peak
        # memory is one page of bodies, not every pod of the namespace at once.
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

    @kopf.on.event(*POD_SELECTOR, registry=registry)
    async def pod(event: kopf.RawEvent, **_: Any) -> None:
        engine.pod_event(event.get("type"), event["object"])

    @kopf.on.event(
        names.PYTORCHJOB_GROUP, names.PYTORCHJOB_VERSION, names.PYTORCHJOB_PLURAL, registry=registry
    )
    async def job(event: kopf.RawEvent, **_: Any) -> None:
        engine.job_event(event.get("type"), event["object"])

    @kopf.on.event("v1", "nodes", registry=registry)
    async def node(event: kopf.RawEvent, **_: Any) -> None:
        engine.node_event(event.get("type"), event["object"])

    @kopf.on.event(names.GROUP, names.VERSION, names.PLURAL, registry=registry)
    async def recovery(event: kopf.RawEvent, **_: Any) -> None:
        engine.recovery_event(event.get("type"), event["object"])


async def _sweeper(engine: Engine) -> None:
    """Run the lifecycle sweep (and retention) every ``sweep_interval`` seconds until
    cancelled; only while this replica leads."""
    while True:
        await asyncio.sleep(engine.config.sweep_interval)
        if not engine.leading():
            continue
        try:
            engine.sweep()
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
