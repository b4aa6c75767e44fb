"""kopf handlers: a few lines each, handing every event to the :class:`Engine`.

Only ``@kopf.on.event`` is used, on every resource: it is the one kopf handler kind that
keeps no progress and no diff-base on the object and adds no finalizer, so the operator
never writes to pods, PyTorchJobs or nodes (a finalizer on a pod would stop the
training-operator from recreating it under the same name). Pods are watched with a
server-side label selector on ``training.kubeflow.org/operator-name=pytorchjob-controller``
(the label the training-operator's PyTorchJob controller sets on every pod it makes), so
pods outside any PyTorchJob, and those of TFJobs, MPIJobs and other kinds, never reach the
operator at all.
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

__all__ = ["register"]

logger = logging.getLogger(__name__)

POD_SELECTOR = ("v1", "pods")
#: Objects per page of kopf's initial listings (pods of 10-30 KB: a page is a few MB).
LIST_PAGE_SIZE = 250


def register(registry: kopf.OperatorRegistry, engine: Engine) -> None:
    """Register the handlers for one engine on ``registry``."""
    tasks: list[asyncio.Task[None]] = []

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
        tasks.append(asyncio.get_running_loop().create_task(_sweeper(engine)))

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
    """Run the lifecycle sweep every ``sweep_interval`` seconds until cancelled."""
    while True:
        await asyncio.sleep(engine.config.sweep_interval)
        try:
            engine.sweep()
        except Exception:  # one bad sweep must not end the sweeping
            logger.exception("lifecycle sweep failed")
