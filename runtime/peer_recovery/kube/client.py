"""The one module of the runtime that talks to the API server (the test seam: ``RecoveryApi``).

``KubeRecoveryApi`` uses the official client with the pod's ServiceAccount: a kubeconfig
when ``KUBECONFIG`` is set (tests, people running outside a pod), in-cluster config
otherwise. ``kubernetes`` is imported inside functions only, so importing the runtime never
pulls it in. Every call has a short timeout and no client-side retries: callers own the
retry policy (the plan source polls within its bound, the status writer backs off), so an
unreachable or slow API server costs at most one timeout per call.

Errors are mapped to the contract's kinds (:mod:`peer_recovery.contract.errors`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Final, Protocol

from peer_recovery.contract import names
from peer_recovery.contract.errors import ApiError, Conflict, Forbidden, Unreachable

__all__ = ["ENV_KUBECONFIG", "KubeRecoveryApi", "RecoveryApi"]

ENV_KUBECONFIG: Final = "KUBECONFIG"
#: (connect, read) seconds for every call.
_TIMEOUT: Final = (3.0, 10.0)


class RecoveryApi(Protocol):
    """What the runtime asks of the API server; every method is synchronous."""

    def list_recoveries(
        self, namespace: str, job: str, *, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """This job's PeerRecoveries (by the ``peerrecovery.io/job-name`` label); ``timeout``
        caps the call (seconds) below the default."""
        ...

    def get_recovery(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def create_recovery(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """The created object, or None when one of that name exists already."""
        ...

    def patch_recovery_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str
    ) -> dict[str, Any]:
        """Merge-patch ``status`` with a resourceVersion precondition; Conflict when stale."""
        ...


class KubeRecoveryApi:
    """:class:`RecoveryApi` over the official client, as this pod's ServiceAccount."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        from kubernetes import client, config

        env = os.environ if env is None else env
        configuration = client.Configuration()
        path = env.get(ENV_KUBECONFIG)
        try:
            if path:
                config.load_kube_config(config_file=path, client_configuration=configuration)
            else:
                config.load_incluster_config(client_configuration=configuration)
        except Exception as error:  # ConfigException, OSError: say which source failed
            where = f"kubeconfig {path}" if path else "in-cluster config (ServiceAccount token)"
            raise ApiError(f"cannot load {where}: {error}") from None
        configuration.retries = 0
        self._host = configuration.host
        self._client = client.ApiClient(configuration)
        self._custom = client.CustomObjectsApi(self._client)
        self._authz = client.AuthorizationV1Api(self._client)
        self._errors = client.exceptions.ApiException

    def close(self) -> None:
        self._client.close()

    def _call(self, fn: Any, *args: Any, cap: float | None = None, **kwargs: Any) -> Any:
        import urllib3

        timeout = _TIMEOUT if cap is None else tuple(max(0.1, min(t, cap)) for t in _TIMEOUT)
        try:
            response = fn(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
        except self._errors as error:
            if error.status == 404:
                return None
            if error.status == 409:
                raise Conflict(_reason(error)) from None
            if error.status in (401, 403):
                raise Forbidden(f"{error.status} {_reason(error)}") from None
            if error.status is None or error.status >= 500 or error.status == 429:
                raise Unreachable(f"{error.status} {_reason(error)}") from None
            raise ApiError(f"{error.status} {_reason(error)}") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            cause = getattr(error, "reason", None) or error  # MaxRetryError wraps the cause
            text = str(cause).split(">: ", 1)[-1]  # drop urllib3's "<connection object>: "
            raise Unreachable(f"{self._host}: {text}") from None
        return json.loads(response.data)

    def list_recoveries(
        self, namespace: str, job: str, *, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        result = self._call(
            self._custom.list_namespaced_custom_object,
            names.GROUP, names.VERSION, namespace, names.PLURAL,
            label_selector=f"{names.LABEL_RECOVERY_JOB}={job}", cap=timeout,
        )  # fmt: skip
        return list((result or {}).get("items") or ())

    def get_recovery(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call(
            self._custom.get_namespaced_custom_object,
            names.GROUP, names.VERSION, namespace, names.PLURAL, name,
        )  # fmt: skip

    def create_recovery(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            return self._call(
                self._custom.create_namespaced_custom_object,
                names.GROUP, names.VERSION, namespace, names.PLURAL, dict(body),
            )  # fmt: skip
        except Conflict:
            return None  # AlreadyExists: the deterministic name did its job

    def patch_recovery_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str
    ) -> dict[str, Any]:
        patch = {"metadata": {"resourceVersion": resource_version}, "status": dict(status)}
        result = self._call(
            self._custom.patch_namespaced_custom_object_status,
            names.GROUP, names.VERSION, namespace, names.PLURAL, name, patch,
        )  # fmt: skip
        if result is None:
            raise Conflict(f"PeerRecovery {namespace}/{name} is gone")
        return dict(result)

    def can_i(self, namespace: str, verb: str, resource: str, subresource: str = "") -> bool:
        """SelfSubjectAccessReview: may this ServiceAccount ``verb`` ``resource`` here?"""
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {
                    "namespace": namespace,
                    "verb": verb,
                    "group": names.GROUP,
                    "resource": resource,
                    "subresource": subresource,
                }
            },
        }
        result = self._call(self._authz.create_self_subject_access_review, body)
        return bool(((result or {}).get("status") or {}).get("allowed"))


def _reason(error: Any) -> str:
    try:
        return str(json.loads(error.body).get("message") or error.reason)
    except (TypeError, ValueError, AttributeError):
        return str(error.reason)
