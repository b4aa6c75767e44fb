"""The runtime's rights in each namespace with an opted-in job, without a helm upgrade.

The chart installs one ClusterRole with the runtime's rights (PeerRecoveries: get, list,
watch, create; their status: patch). The operator binds it, with a RoleBinding, to the
runtime's ServiceAccount (which it creates) in every namespace where an opted-in job
appears, and removes both when the last opted-in job of that namespace is gone. Least
privilege: the operator may ``bind`` only that ClusterRole (``resourceNames``), so it
cannot hand out any other right, and the runtime's rights reach only namespaces that run
opted-in jobs.

:class:`OptedInJobs` is the pure bookkeeping (which namespaces need access);
:class:`NamespaceAccess` applies it through :class:`~.kube_admission.AdmissionApi`. The
webhook also calls :meth:`NamespaceAccess.ensure` before it sets the account on a pod, so a
pod created before the job's watch event arrived still finds its account in place.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from peer_recovery.contract.annotations import is_enabled
from peer_recovery.contract.errors import ApiError
from peer_recovery_operator.kube_admission import AdmissionApi

__all__ = ["AccessChange", "NamespaceAccess", "OptedInJobs"]

logger = logging.getLogger(__name__)

#: On the ServiceAccount and RoleBinding the operator makes, so they are easy to find.
MANAGED_LABEL = "app.kubernetes.io/managed-by"
MANAGED_VALUE = "peer-recovery-operator"
#: Seconds a namespace's access, once made sure of, is taken as still there.
ENSURED_TTL = 60.0


@dataclass(frozen=True)
class AccessChange:
    action: Literal["bind", "unbind"]
    namespace: str


class OptedInJobs:
    """Which opted-in jobs (by UID) each namespace has, from job watch events (pure)."""

    def __init__(self) -> None:
        self._jobs: dict[str, set[str]] = {}

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> AccessChange | None:
        """The change this event makes: the namespace's first opted-in job binds, the
        last one gone (deleted or opted out) unbinds; otherwise None."""
        meta = body.get("metadata") or {}
        namespace, uid = str(meta.get("namespace") or ""), str(meta.get("uid") or "")
        if not namespace or not uid:
            return None
        jobs = self._jobs.setdefault(namespace, set())
        had = bool(jobs)
        if event_type != "DELETED" and is_enabled(meta.get("annotations")):
            jobs.add(uid)
        else:
            jobs.discard(uid)
        if not jobs:
            del self._jobs[namespace]
        if jobs and not had:
            return AccessChange("bind", namespace)
        if had and not jobs:
            return AccessChange("unbind", namespace)
        return None

    def has_jobs(self, namespace: str) -> bool:
        return bool(self._jobs.get(namespace))


class NamespaceAccess:
    """Creates and removes the runtime's ServiceAccount and RoleBinding per namespace."""

    def __init__(
        self,
        api: AdmissionApi,
        *,
        service_account: str,
        cluster_role: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service_account = service_account
        self.cluster_role = cluster_role
        self.jobs = OptedInJobs()
        self._api = api
        self._clock = clock
        #: Namespace -> when its account and binding were last made sure of.
        self._bound: dict[str, float] = {}
        self._lock = threading.Lock()

    def job_event(self, event_type: str | None, body: Mapping[str, Any]) -> AccessChange | None:
        """Book the event (cheap, on the event loop); the caller applies the change."""
        with self._lock:
            return self.jobs.observe(event_type, body)

    def apply(self, change: AccessChange) -> None:
        """Run in a worker thread: API calls."""
        if change.action == "bind":
            self.ensure(change.namespace)
        else:
            self.release(change.namespace)

    def ensure(self, namespace: str) -> None:
        """The account and its binding exist in ``namespace`` (idempotent). Remembered for
        :data:`ENSURED_TTL` seconds only: another replica may have removed them meanwhile."""
        with self._lock:
            made = self._bound.get(namespace)
            if made is not None and self._clock() - made < ENSURED_TTL:
                return
            labels = {MANAGED_LABEL: MANAGED_VALUE}
            self._api.ensure_service_account(namespace, self.service_account, labels)
            self._api.ensure_role_binding(
                namespace,
                self.service_account,
                cluster_role=self.cluster_role,
                service_account=self.service_account,
                labels=labels,
            )
            self._bound[namespace] = self._clock()
            logger.info("bound %s to %s in %s", self.cluster_role, self.service_account, namespace)

    def release(self, namespace: str) -> None:
        """Remove both, unless an opted-in job appeared in ``namespace`` meanwhile."""
        with self._lock:
            if self.jobs.has_jobs(namespace):
                return
            try:
                self._api.delete_role_binding(namespace, self.service_account)
                self._api.delete_service_account(namespace, self.service_account)
            except ApiError as error:
                logger.warning("could not remove the runtime's access in %s: %s", namespace, error)
                return
            self._bound.pop(namespace, None)
            logger.info("unbound %s in %s: no opted-in job left", self.cluster_role, namespace)
