"""kopf registrations of the webhook's side: the server's start and stop, namespace access,
and the report of pods that came through unmutated.

Registered by the CLI next to :mod:`peer_recovery_operator.handlers` when the webhook or
the namespace access is configured (docs/webhook.md). Every replica serves the webhook
(the mutation is stateless); only the leader reports unmutated pods, which it learns from
the operator's pod watch (the audit returned by :func:`register_admission`); each handler
here is a few lines over the modules that decide (:mod:`~.mutation`, :mod:`~.namespace_access`, :mod:`~.unmutated`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import ssl
import tempfile
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import kopf

from peer_recovery.contract import names
from peer_recovery.contract.annotations import is_enabled
from peer_recovery.contract.errors import ApiError
from peer_recovery_operator import __version__, unmutated
from peer_recovery_operator.certs import make_self_signed, merge_bundle, server_context, write_files
from peer_recovery_operator.config import OperatorConfig, metrics_host_port
from peer_recovery_operator.engine import Engine
from peer_recovery_operator.kube import ClusterApi, KubernetesApi
from peer_recovery_operator.kube_admission import KubernetesAdmissionApi
from peer_recovery_operator.mutation import MutationSettings
from peer_recovery_operator.namespace_access import NamespaceAccess
from peer_recovery_operator.webhook import WebhookServer

__all__ = ["register_admission"]

logger = logging.getLogger(__name__)

#: How often a certificate from --webhook-cert-dir is re-read (cert-manager renews it).
CERT_RELOAD_SECONDS = 300.0


def register_admission(
    registry: kopf.OperatorRegistry, engine: Engine, config: OperatorConfig
) -> Callable[[str | None, Mapping[str, Any]], None] | None:
    """Register the webhook's handlers on ``registry``; return the audit of unmutated pods,
    for the operator's pod watch to call with each pod event (None without the webhook)."""
    cluster: ClusterApi = KubernetesApi()
    access = None
    if config.runtime_service_account:
        access = NamespaceAccess(
            KubernetesAdmissionApi(),
            service_account=config.runtime_service_account,
            cluster_role=config.runtime_cluster_role,
        )
    audit = unmutated.UnmutatedPods() if config.webhook_address else None
    running: list[Any] = []  # the server, its reload task, its temporary directory

    @kopf.on.startup(registry=registry)
    async def start_webhook(**_: Any) -> None:
        if not config.webhook_address:
            return
        context, files, directory = await asyncio.to_thread(_tls, config)
        host, port = metrics_host_port(config.webhook_address, "--webhook-address")
        settings = MutationSettings(config.runtime_service_account, version=__version__)
        server = WebhookServer(cluster, settings, context, host, port, access=access)
        await server.start()
        running.extend([server, directory])
        if files is not None:
            running.append(asyncio.get_running_loop().create_task(_reload(context, *files)))

    @kopf.on.cleanup(registry=registry)
    async def stop_webhook(**_: Any) -> None:
        for item in running:
            if isinstance(item, asyncio.Task):
                item.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await item
            elif isinstance(item, WebhookServer):
                await item.stop()
            elif isinstance(item, Path):
                shutil.rmtree(item, ignore_errors=True)

    @kopf.on.event(
        names.PYTORCHJOB_GROUP, names.PYTORCHJOB_VERSION, names.PYTORCHJOB_PLURAL, registry=registry
    )
    async def webhook_job(event: kopf.RawEvent, **_: Any) -> None:
        body, kind = event["object"], event.get("type")
        change = access.job_event(kind, body) if access is not None else None
        if change is not None and access is not None:
            try:
                await asyncio.to_thread(access.apply, change)
            except ApiError as error:
                logger.warning("runtime access in %s: %s", change.namespace, error)
        if audit is not None:
            meta = body.get("metadata") or {}
            enabled = kind != "DELETED" and is_enabled(meta.get("annotations"))
            found = audit.job_known(str(meta.get("namespace")), str(meta.get("name")), enabled)
            if found and engine.leading():  # one replica reports (the standby stays quiet)
                await asyncio.to_thread(_report, cluster, found, body)

    if audit is None:
        return None

    def webhook_pod(event_type: str | None, body: Mapping[str, Any]) -> None:
        found = audit.pod_event(event_type, body, _job_enabled(engine))
        if found and engine.leading():  # one replica reports (the standby stays quiet)
            job = engine.state.jobs.get((found[0].namespace, found[0].job))
            meta = {"metadata": _job_meta(job)}
            asyncio.get_running_loop().run_in_executor(None, _report, cluster, found, meta)

    return webhook_pod


def _job_enabled(engine: Engine) -> unmutated.JobEnabled:
    def enabled(namespace: str, job: str) -> bool | None:
        view = engine.state.jobs.get((namespace, job))
        return None if view is None else bool(view.enabled)

    return enabled


def _job_meta(view: Any) -> dict[str, str]:
    if view is None:
        return {}
    return {"name": view.name, "namespace": view.namespace, "uid": view.uid}


def _report(cluster: ClusterApi, found: list[unmutated.Unmutated], job: dict[str, Any]) -> None:
    meta = job.get("metadata") or {}
    for pod in found:
        involved = {
            "apiVersion": names.PYTORCHJOB_API_VERSION,
            "kind": names.PYTORCHJOB_KIND,
            "name": pod.job,
            "namespace": pod.namespace,
            "uid": str(meta.get("uid") or ""),
        }
        logger.warning("%s/%s: %s", pod.namespace, pod.job, unmutated.message(pod))
        cluster.post_event(
            involved, type_="Warning", reason=unmutated.REASON, message=unmutated.message(pod)
        )


def _tls(config: OperatorConfig) -> tuple[ssl.SSLContext, tuple[Path, Path] | None, Path | None]:
    """The server's TLS context; the files to re-read (cert-manager's) or the temporary
    directory of a self-signed pair (whose CA goes into the configuration's caBundle)."""
    if config.webhook_cert_dir:
        files = (
            Path(config.webhook_cert_dir) / "tls.crt",
            Path(config.webhook_cert_dir) / "tls.key",
        )
        return server_context(*files), files, None
    hosts = [host.strip() for host in config.webhook_hosts.split(",") if host.strip()]
    now = datetime.now(timezone.utc)
    cert = make_self_signed(hosts, now=now, common_name=hosts[0])
    directory = Path(tempfile.mkdtemp(prefix="peer-recovery-webhook-"))
    cert_file, key_file = write_files(cert, directory)
    if config.webhook_config_name:
        KubernetesAdmissionApi().update_ca_bundle(
            config.webhook_config_name, lambda current: merge_bundle(current, cert.ca_pem, now=now)
        )
        logger.info("caBundle of %s carries this replica's CA", config.webhook_config_name)
    return server_context(cert_file, key_file), None, directory


async def _reload(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    """Re-read a mounted certificate now and then: new handshakes use the renewed one."""
    while True:
        await asyncio.sleep(CERT_RELOAD_SECONDS)
        try:
            await asyncio.to_thread(context.load_cert_chain, cert_file, key_file)
        except (OSError, ssl.SSLError) as error:
            logger.warning("could not re-read the webhook certificate: %s", error)
