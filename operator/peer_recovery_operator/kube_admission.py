"""The API-server calls of the webhook's side of the operator, apart from :mod:`kube`.

:mod:`peer_recovery_operator.kube` holds the calls of detection and planning, which never
write anything but PeerRecoveries and Events. The webhook's side writes three other
things, each under its own narrow right (docs/webhook.md): the ``caBundle`` of one named
MutatingWebhookConfiguration, and in each namespace with an opted-in job the runtime's
ServiceAccount and a RoleBinding to the runtime ClusterRole. Keeping those calls here
keeps the RBAC that grants them readable next to the code that needs it.

Invariants: synchronous (run in worker threads); creating what exists already is success;
deleting what is gone is success; the caBundle patch carries the resourceVersion read.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from peer_recovery.contract.errors import ApiError, Conflict

__all__ = ["AdmissionApi", "KubernetesAdmissionApi"]

logger = logging.getLogger(__name__)


class AdmissionApi(Protocol):
    def update_ca_bundle(self, name: str, merge: Callable[[bytes], bytes]) -> None:
        """Set every webhook's caBundle of configuration ``name`` to ``merge(current)``."""
        ...

    def ensure_service_account(
        self, namespace: str, name: str, labels: Mapping[str, str]
    ) -> None: ...

    def ensure_role_binding(
        self,
        namespace: str,
        name: str,
        *,
        cluster_role: str,
        service_account: str,
        labels: Mapping[str, str],
    ) -> None: ...

    def delete_role_binding(self, namespace: str, name: str) -> None: ...

    def delete_service_account(self, namespace: str, name: str) -> None: ...


class KubernetesAdmissionApi:
    """:class:`AdmissionApi` over the official client (plain dicts, as in :mod:`kube`)."""

    def __init__(self, kubeconfig: str | None = None) -> None:
        from kubernetes import client, config

        # The same resolution as peer_recovery_operator.kube: $KUBECONFIG, else in-cluster.
        configuration = client.Configuration()
        path = kubeconfig or os.environ.get("KUBECONFIG")
        if path or os.path.exists(os.path.expanduser("~/.kube/config")):
            config.load_kube_config(config_file=path, client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
        api_client = client.ApiClient(configuration)
        self._core = client.CoreV1Api(api_client)
        self._rbac = client.RbacAuthorizationV1Api(api_client)
        self._admission = client.AdmissionregistrationV1Api(api_client)
        self._errors = client.exceptions.ApiException

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            response = fn(*args, _preload_content=False, _request_timeout=30, **kwargs)
        except self._errors as error:
            if error.status == 404:
                return None
            if error.status == 409:
                raise Conflict(str(error.reason)) from None
            raise ApiError(f"{error.status} {_message(error)}") from None
        return json.loads(response.data)

    def update_ca_bundle(self, name: str, merge: Callable[[bytes], bytes]) -> None:
        for _ in range(5):  # a Conflict means another replica patched it meanwhile: re-read
            current = self._call(self._admission.read_mutating_webhook_configuration, name)
            if current is None:
                raise ApiError(f"MutatingWebhookConfiguration {name} does not exist")
            webhooks = current.get("webhooks") or []
            for webhook in webhooks:
                config = webhook.setdefault("clientConfig", {})
                bundle = base64.b64decode(config.get("caBundle") or "")
                config["caBundle"] = base64.b64encode(merge(bundle)).decode()
            patch = {
                "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                "webhooks": webhooks,
            }
            try:
                self._call(self._admission.patch_mutating_webhook_configuration, name, patch)
                return
            except Conflict:
                continue
        raise ApiError(f"MutatingWebhookConfiguration {name}: caBundle patch kept conflicting")

    def ensure_service_account(self, namespace: str, name: str, labels: Mapping[str, str]) -> None:
        body = {"metadata": {"name": name, "namespace": namespace, "labels": dict(labels)}}
        self._create(self._core.create_namespaced_service_account, namespace, body)

    def ensure_role_binding(
        self,
        namespace: str,
        name: str,
        *,
        cluster_role: str,
        service_account: str,
        labels: Mapping[str, str],
    ) -> None:
        body = {
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": cluster_role,
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
            ],
        }
        self._create(self._rbac.create_namespaced_role_binding, namespace, body)

    def delete_role_binding(self, namespace: str, name: str) -> None:
        self._call(self._rbac.delete_namespaced_role_binding, name, namespace)

    def delete_service_account(self, namespace: str, name: str) -> None:
        self._call(self._core.delete_namespaced_service_account, name, namespace)

    def _create(self, fn: Any, namespace: str, body: Mapping[str, Any]) -> None:
        with contextlib.suppress(Conflict):  # AlreadyExists: what we wanted
            self._call(fn, namespace, dict(body))


def _message(error: Any) -> str:
    try:
        return str(json.loads(error.body).get("message") or error.reason)
    except (TypeError, ValueError, AttributeError):
        return str(error.reason)
