"""The mutating admission webhook's HTTPS server: AdmissionReview in, JSON patch out.

A small aiohttp application on kopf's event loop (kopf's own admission server would make
us hand it the whole configuration and its certificate handling; ours patches only the
caBundle of the one configuration the chart names). ``POST /mutate-pods`` reads the pod
being created, fetches its PyTorchJob (worker thread), asks the pure
:func:`~peer_recovery_operator.mutation.mutate_pod` for the patch, and answers. Every
replica of the operator serves it: the mutation is stateless, so no leader is needed.

Invariants: the answer is always ``allowed: true`` (the webhook completes pods, it never
refuses one; with failure policy ``Ignore`` an outage lets pods through, which the
operator then reports); a request it cannot handle gets no patch, never an error status;
each warning is posted once per job as an Event.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from peer_recovery.contract import names
from peer_recovery_operator.kube import ClusterApi
from peer_recovery_operator.mutation import Mutation, MutationSettings, mutate_pod
from peer_recovery_operator.namespace_access import NamespaceAccess

__all__ = ["PATH", "WebhookServer", "review_response"]

logger = logging.getLogger(__name__)

PATH = "/mutate-pods"
#: Warnings remembered (so each is posted once per job).
_WARNED_MEMORY = 4096
REASON_WARNING = "PodMutationWarning"


def review_response(review: Mapping[str, Any], mutation: Mutation | None) -> dict[str, Any]:
    """The AdmissionReview answer to ``review`` (pure): allowed, with the patch if any."""
    request = review.get("request") or {}
    response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": True}
    if mutation is not None and mutation.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(mutation.patch).encode()).decode()
    if mutation is not None and mutation.warnings:
        response["warnings"] = [w[:256] for w in mutation.warnings]
    return {
        "apiVersion": review.get("apiVersion", "admission.k8s.io/v1"),
        "kind": "AdmissionReview",
        "response": response,
    }


def job_of(pod: Mapping[str, Any]) -> str | None:
    """The pod's PyTorchJob: its controller owner, else the job-name label."""
    meta = pod.get("metadata") or {}
    for owner in meta.get("ownerReferences") or ():
        if owner.get("kind") == names.PYTORCHJOB_KIND and owner.get("controller"):
            return str(owner.get("name"))
    label = (meta.get("labels") or {}).get(names.LABEL_JOB_NAME)
    return str(label) if label else None


class WebhookServer:
    def __init__(
        self,
        api: ClusterApi,
        settings: MutationSettings,
        context: ssl.SSLContext,
        host: str,
        port: int,
        *,
        access: NamespaceAccess | None = None,
        mutate: Callable[..., Mutation] = mutate_pod,
    ) -> None:
        self._api, self._settings, self._context = api, settings, context
        self._host, self._port = host, port
        self._access, self._mutate = access, mutate
        self._runner: Any = None
        self._warned: collections.OrderedDict[str, None] = collections.OrderedDict()

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post(PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._context)
        await site.start()
        logger.info("mutating webhook listening on https://%s:%d%s", self._host, self._port, PATH)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        try:
            review = await request.json()
        except ValueError:
            return web.json_response({"error": "the body is not JSON"}, status=400)
        if not isinstance(review, dict):
            return web.json_response({"error": "expected an AdmissionReview"}, status=400)
        mutation: Mutation | None = None
        try:
            mutation = await self._mutation(review.get("request") or {})
        except Exception:  # never refuse a pod because of our own failure
            logger.exception("pod mutation failed; the pod is admitted as it is")
        return web.json_response(review_response(review, mutation))

    async def _mutation(self, request: Mapping[str, Any]) -> Mutation | None:
        if request.get("operation") != "CREATE" or (request.get("kind") or {}).get("kind") != "Pod":
            return None
        pod = request.get("object") or {}
        namespace = str(request.get("namespace") or (pod.get("metadata") or {}).get("namespace"))
        job_name = job_of(pod)
        if not job_name:
            return None
        job = await asyncio.to_thread(self._api.get_job, namespace, job_name)
        if job is None:
            logger.warning("pod of unknown PyTorchJob %s/%s admitted as it is", namespace, job_name)
            return None
        mutation = self._mutate(pod, job, self._settings)
        account = self._access is not None and self._settings.service_account
        if mutation.patch and account and not request.get("dryRun"):  # NoneOnDryRun
            await asyncio.to_thread(self._access.ensure, namespace)  # type: ignore[union-attr]
        if mutation.patch:
            pod_name = (pod.get("metadata") or {}).get("name") or "(generated)"
            logger.info("completed pod %s/%s: %s", namespace, pod_name, ", ".join(mutation.added))
        if mutation.warnings:
            await asyncio.to_thread(self._post_warnings, job, mutation.warnings)
        return mutation

    def _post_warnings(self, job: Mapping[str, Any], warnings: list[str]) -> None:
        meta = job.get("metadata") or {}
        for warning in warnings:
            key = f"{meta.get('uid')}:{warning}"
            if key in self._warned:
                continue
            self._warned[key] = None
            while len(self._warned) > _WARNED_MEMORY:
                self._warned.popitem(last=False)
            self._api.post_event(
                {
                    "apiVersion": names.PYTORCHJOB_API_VERSION,
                    "kind": names.PYTORCHJOB_KIND,
                    "name": str(meta.get("name", "")),
                    "namespace": str(meta.get("namespace", "")),
                    "uid": str(meta.get("uid", "")),
                },
                type_="Warning",
                reason=REASON_WARNING,
                message=f"peer-recovery webhook: {warning}",
            )
