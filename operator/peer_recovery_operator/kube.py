"""Every API-server call the operator makes (besides kopf's own watching) goes through here.

:class:`ClusterApi` is the seam: the rest of the operator depends on this protocol only,
so tests substitute an in-memory implementation, and the real one,
:class:`KubernetesApi`, is a thin layer over the ``kubernetes`` client that speaks plain
dicts (``_preload_content=False`` + ``json``: the client's model classes cost far more
than the decisions made on them).

Every call that does not succeed is reported to ``on_error(verb, kind, code)`` (the
``peer_recovery_api_errors_total`` metric), ``code`` being the HTTP status or
``connection`` when no response came. Events are aggregated into series
(:mod:`peer_recovery_operator.events`).

Pods and PeerRecoveries are listed in pages and watched here too (for
:mod:`peer_recovery_operator.watcher`, not through kopf; the types are in
:mod:`peer_recovery_operator.kube_watch`): each page or watch event is decoded and at once
cut to the fields the operator reads (:func:`views.slim_pod`, :func:`views.slim_recovery`),
so a full body lives only while its page is decoded, and one page is decoded at a time.

Invariants: nothing here writes to pods or PyTorchJobs (the operator only observes them);
status writes carry the ``resourceVersion`` the caller read, and a mismatch raises
:class:`Conflict` instead of overwriting; calls are synchronous and run in worker
threads, never on kopf's event loop.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

from peer_recovery.contract import names
from peer_recovery.contract.errors import ApiError, Conflict
from peer_recovery_operator import events, views
from peer_recovery_operator.kube_watch import (
    PAGE_SIZE,
    SLIM,
    WATCH_CONNECT_TIMEOUT,
    Gone,
    Page,
    WatchEvent,
    lines,
)

__all__ = ["ClusterApi", "KubernetesApi"]

logger = logging.getLogger(__name__)
COMPONENT = "peer-recovery-operator"


class ClusterApi(Protocol):
    """What the operator asks of the API server; every method is synchronous."""

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def list_job_pods(self, namespace: str, job: str) -> Iterable[dict[str, Any]]:
        """The job's pods, slim (:func:`views.slim_pod`). The lists here may be read page
        by page as they are iterated: keep what is needed of each body, not the bodies."""
        ...

    def list_recoveries(self, namespace: str, *, job: str) -> Iterable[dict[str, Any]]: ...

    def list_pods(self, namespace: str | None) -> Iterable[dict[str, Any]]:
        """Every training pod in ``namespace`` (None: all namespaces), slim, for the resync."""
        ...

    def list_all_recoveries(self, namespace: str | None) -> Iterable[dict[str, Any]]:
        """Every PeerRecovery in ``namespace`` (None: all namespaces), for the resync."""
        ...

    def get_recovery(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def create_recovery(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """The created object, or None when one of that name already exists."""
        ...

    def patch_recovery_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str
    ) -> dict[str, Any]: ...

    def delete_recovery(self, namespace: str, name: str, resource_version: str) -> bool:
        """Delete the version read; False when it is gone or changed since (not deleted)."""
        ...

    def post_event(
        self, involved: Mapping[str, str], *, type_: str, reason: str, message: str
    ) -> None:
        """Best effort: failures are logged, never raised (an Event is not worth a crash)."""
        ...


class KubernetesApi:
    """:class:`ClusterApi` over the official client, from a kubeconfig or in-cluster config."""

    def __init__(
        self,
        kubeconfig: str | None = None,
        on_error: Callable[[str, str, str], None] | None = None,
    ) -> None:
        from kubernetes import client, config  # imported here: the seam's users need not

        path = kubeconfig or os.environ.get("KUBECONFIG")
        if path or os.path.exists(os.path.expanduser("~/.kube/config")):
            configuration = client.Configuration()
            config.load_kube_config(config_file=path, client_configuration=configuration)
        else:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
        self._client = client.ApiClient(configuration)
        self._core = client.CoreV1Api(self._client)
        self._custom = client.CustomObjectsApi(self._client)
        self._errors = client.exceptions.ApiException
        self._on_error = on_error or (lambda verb, kind, code: None)
        self._series = events.EventSeries()
        self._decoding = threading.Lock()

    def _call(self, verb: str, kind: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` raw; decode JSON; map NotFound to None and other errors to ours."""
        try:
            response = fn(*args, _preload_content=False, _request_timeout=30, **kwargs)
        except self._errors as error:
            self._on_error(verb, kind, str(error.status))
            if error.status == 404:
                return None
            if error.status == 409:
                raise Conflict(_reason(error)) from None
            if error.status == 410:
                raise Gone(_reason(error)) from None
            raise ApiError(f"{error.status} {_reason(error)}") from None
        except Exception:
            self._on_error(verb, kind, "connection")
            raise
        return json.loads(response.data)

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call(
            "get",
            "pytorchjobs",
            self._custom.get_namespaced_custom_object,
            names.PYTORCHJOB_GROUP,
            names.PYTORCHJOB_VERSION,
            namespace,
            names.PYTORCHJOB_PLURAL,
            name,
        )

    def list_job_pods(self, namespace: str, job: str) -> Iterator[dict[str, Any]]:
        return self._list_all("pods", namespace, f"{names.LABEL_JOB_NAME}={job}")

    def list_recoveries(self, namespace: str, *, job: str) -> Iterator[dict[str, Any]]:
        return self._list_all("peerrecoveries", namespace, f"{names.LABEL_RECOVERY_JOB}={job}")

    def _list_all(
        self, kind: str, namespace: str | None, selector: str = ""
    ) -> Iterator[dict[str, Any]]:
        """Every object of a paged list, slim; the next page is requested when the one
        before has been iterated."""
        token = ""
        while True:
            page = self.list_page(
                kind, namespace, limit=PAGE_SIZE, continue_token=token, selector=selector
            )
            yield from page.items
            token = page.continue_token
            if not token:
                return

    def list_page(
        self,
        kind: str,
        namespace: str | None,
        *,
        limit: int,
        continue_token: str = "",
        selector: str = "",
    ) -> Page:
        """One page of ``kind`` (pods: the pod watch's selector, and ``selector``)."""
        fn, args, kwargs = self._lister(kind, namespace, selector)
        if continue_token:
            kwargs["_continue"] = continue_token
        # One page decoded at a time in the whole process: the watchers, a resync and the
        # rounds' catch-up lists may all be listing at once (after a restart, they are).
        with self._decoding:
            result = self._call("list", kind, fn, *args, limit=limit, **kwargs) or {}
            meta = result.get("metadata") or {}
            slim = SLIM[kind]
            items = [slim(item) for item in result.get("items") or ()]
            del result
        return Page(items, str(meta.get("resourceVersion") or ""), str(meta.get("continue") or ""))

    def watch(
        self,
        kind: str,
        namespace: str | None,
        resource_version: str,
        *,
        timeout_seconds: int,
        read_timeout: float,
    ) -> Iterator[WatchEvent]:
        fn, args, kwargs = self._lister(kind, namespace)
        try:
            response = fn(
                *args,
                watch=True,
                resource_version=resource_version,
                timeout_seconds=timeout_seconds,
                allow_watch_bookmarks=True,
                _preload_content=False,
                _request_timeout=(WATCH_CONNECT_TIMEOUT, read_timeout),
                **kwargs,
            )
        except self._errors as error:
            self._on_error("watch", kind, str(error.status))
            if error.status == 410:
                raise Gone(_reason(error)) from None
            raise ApiError(f"{error.status} {_reason(error)}") from None
        except Exception:
            self._on_error("watch", kind, "connection")
            raise
        slim = SLIM[kind]
        try:
            for line in lines(response):
                event = json.loads(line)
                obj = event.get("object") or {}
                kind_of_event = str(event.get("type"))
                if kind_of_event == "ERROR":
                    self._on_error("watch", kind, str(obj.get("code")))
                    if obj.get("code") == 410:
                        raise Gone(str(obj.get("message")))
                    raise ApiError(f"{obj.get('code')} {obj.get('message')}")
                version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                body = None if kind_of_event == "BOOKMARK" else slim(obj)
                del event, obj  # the full body goes before the next line is read
                yield WatchEvent(kind_of_event, version, body)
        finally:
            response.release_conn()

    def _lister(
        self, kind: str, namespace: str | None, selector: str = ""
    ) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        """The client's list function for ``kind`` in ``namespace`` (None: every namespace),
        its positional arguments and its label selector."""
        if kind == "pods":
            labels = ",".join(s for s in (selector, views.POD_LABEL_SELECTOR) if s)
            if namespace is None:
                return self._core.list_pod_for_all_namespaces, (), {"label_selector": labels}
            return self._core.list_namespaced_pod, (namespace,), {"label_selector": labels}
        if kind != "peerrecoveries":
            raise ValueError(f"the operator does not list {kind}")
        extra = {"label_selector": selector} if selector else {}
        if namespace is None:
            custom = self._custom.list_cluster_custom_object
            return custom, (names.GROUP, names.VERSION, names.PLURAL), extra
        custom = self._custom.list_namespaced_custom_object
        return custom, (names.GROUP, names.VERSION, namespace, names.PLURAL), extra

    def get_recovery(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call(
            "get",
            "peerrecoveries",
            self._custom.get_namespaced_custom_object,
            names.GROUP,
            names.VERSION,
            namespace,
            names.PLURAL,
            name,
        )

    def create_recovery(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            return self._call(
                "create",
                "peerrecoveries",
                self._custom.create_namespaced_custom_object,
                names.GROUP,
                names.VERSION,
                namespace,
                names.PLURAL,
                dict(body),
            )
        except Conflict:
            return None  # 409 on create is AlreadyExists: the deterministic name did its job

    def patch_recovery_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str
    ) -> dict[str, Any]:
        patch = {"metadata": {"resourceVersion": resource_version}, "status": dict(status)}
        result = self._call(
            "patch",
            "peerrecoveries/status",
            self._custom.patch_namespaced_custom_object_status,
            names.GROUP,
            names.VERSION,
            namespace,
            names.PLURAL,
            name,
            patch,
        )
        if result is None:
            raise Conflict(f"PeerRecovery {namespace}/{name} is gone")
        return result

    def delete_recovery(self, namespace: str, name: str, resource_version: str) -> bool:
        from kubernetes.client import V1DeleteOptions, V1Preconditions

        options = V1DeleteOptions(preconditions=V1Preconditions(resource_version=resource_version))
        try:
            deleted = self._call(
                "delete",
                "peerrecoveries",
                self._custom.delete_namespaced_custom_object,
                names.GROUP,
                names.VERSION,
                namespace,
                names.PLURAL,
                name,
                body=options,
            )
        except Conflict:
            return False  # changed since it was read: the next sweep decides again
        return deleted is not None

    def list_pods(self, namespace: str | None) -> Iterator[dict[str, Any]]:
        """Every PyTorchJob pod (the pod watch's selector) in ``namespace``, or in all
        namespaces for None, slim: the periodic resync's relist."""
        return self._list_all("pods", namespace)

    def list_all_recoveries(self, namespace: str | None) -> Iterator[dict[str, Any]]:
        """Every PeerRecovery in ``namespace`` (all namespaces for None), slim: the resync's
        relist."""
        return self._list_all("peerrecoveries", namespace)

    # --- the leader-election Lease (peer_recovery_operator.lease.LeaseApi) ----------------

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call(
            "get", "leases", self._coordination().read_namespaced_lease, name, namespace
        )

    def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            return self._call(
                "create",
                "leases",
                self._coordination().create_namespaced_lease,
                namespace,
                dict(body),
            )
        except Conflict:
            return None  # another replica created it first

    def replace_lease(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        result = self._call(
            "update",
            "leases",
            self._coordination().replace_namespaced_lease,
            name,
            namespace,
            dict(body),
        )
        if result is None:
            raise Conflict(f"Lease {namespace}/{name} is gone")
        return result

    def _coordination(self) -> Any:
        from kubernetes.client import CoordinationV1Api

        return CoordinationV1Api(self._client)

    def post_event(
        self, involved: Mapping[str, str], *, type_: str, reason: str, message: str
    ) -> None:
        """Post one occurrence of the (object, type, reason) series: the first creates its
        Event, a repeat bumps that Event's count (:mod:`peer_recovery_operator.events`)."""
        key = events.event_key(involved, type_=type_, reason=reason)
        now = datetime.now(timezone.utc)
        occurrence = self._series.next(key, now)
        try:
            if not occurrence.is_first and self._bump(occurrence, message, now):
                return
            if occurrence.count > 1:
                occurrence = self._series.restart(occurrence, now)  # expired by the server
            body = events.event_body(occurrence, message, now, COMPONENT)
            try:
                self._call(
                    "create", "events", self._core.create_namespaced_event, key.namespace, body
                )
            except Conflict:  # an earlier process began this series: continue its count
                stored = self._call(
                    "get", "events", self._core.read_namespaced_event, key.event_name, key.namespace
                )
                if stored is not None:
                    self._bump(self._series.continue_from(occurrence, stored), message, now)
        except (ApiError, Conflict) as error:
            logger.warning("could not post Event %s on %s: %s", reason, involved.get("name"), error)

    def _bump(self, occurrence: events.Occurrence, message: str, now: datetime) -> bool:
        """Patch the series' Event; False when it is gone."""
        patched = self._call(
            "patch",
            "events",
            self._core.patch_namespaced_event,
            occurrence.key.event_name,
            occurrence.key.namespace,
            events.bump_patch(occurrence, message, now),
        )
        return patched is not None


def _reason(error: Any) -> str:
    try:
        return str(json.loads(error.body).get("message") or error.reason)
    except (TypeError, ValueError, AttributeError):
        return str(error.reason)
