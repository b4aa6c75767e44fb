"""The one in-memory API server of the unit tests, for the operator and the runtime alike.

It serves the client seams: the operator's ``ClusterApi`` (jobs, pods, PeerRecoveries,
Events) and ``AdmissionApi`` (the runtime's ServiceAccounts and RoleBindings), and the
runtime's ``RecoveryApi`` (PeerRecoveries). It keeps objects with
increasing resourceVersions and enforces the preconditions the API server does
(AlreadyExists on create, Conflict on a stale resourceVersion; a status write merges into
the status like a merge patch), so retry and idempotence logic is exercised for real.
Faults a real API server cannot be made to show on cue: ``down`` makes every call
Unreachable; ``race`` lets another writer land between a read and the next write once.
Tests that cross the API use the real control plane instead (``testbed/controlplane``).
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Mapping
from typing import Any

from peer_recovery.contract import names
from peer_recovery.contract.errors import Conflict, Unreachable

Key = tuple[str, str]


class FakeApi:
    def __init__(self, *recoveries: Mapping[str, Any]) -> None:
        self.jobs: dict[Key, dict[str, Any]] = {}
        self.pods: dict[Key, dict[str, Any]] = {}
        self.recoveries: dict[Key, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        #: (namespace, name) of ServiceAccounts, and RoleBindings with their body.
        self.service_accounts: set[Key] = set()
        self.role_bindings: dict[Key, dict[str, Any]] = {}
        #: Every call by name (operator tests count them).
        self.calls: list[str] = []
        #: Every status write that landed: (name, phase).
        self.patches: list[tuple[str, str]] = []
        self.down = False
        #: Status fields another writer sets between the next read and write (a 409 then).
        self.race: dict[str, Any] | None = None
        self._rv = itertools.count(100)
        self._lock = threading.Lock()
        for body in recoveries:
            self.add(body)

    # --- test helpers ---------------------------------------------------------------------

    def add(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Store a PeerRecovery as it is (its resourceVersion kept when it has one)."""
        stored = copy.deepcopy(dict(body))
        meta = stored["metadata"]
        meta.setdefault("resourceVersion", str(next(self._rv)))
        self.recoveries[(meta.get("namespace", ""), meta["name"])] = stored
        return stored

    def recovery(self, name: str) -> dict[str, Any]:
        """The stored PeerRecovery of this name, whatever its namespace."""
        return next(body for (_, n), body in self.recoveries.items() if n == name)

    def runtime_sets_phase(self, namespace: str, name: str, phase: str) -> dict[str, Any]:
        """What the runtime would write (no operator condition)."""
        stored = self.recoveries[(namespace, name)]
        stored.setdefault("status", {})["phase"] = phase
        stored["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(stored)

    def by_phase(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        for (_, name), body in sorted(self.recoveries.items()):
            phase = (body.get("status") or {}).get("phase", "Pending")
            result.setdefault(phase, []).append(name)
        return result

    def _check(self, call: str) -> None:
        self.calls.append(call)
        if self.down:
            raise Unreachable("connection refused")

    # --- both seams -----------------------------------------------------------------------

    def list_recoveries(
        self, namespace: str, job: str | None = None, *, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        self._check("list_recoveries")
        return [
            copy.deepcopy(r)
            for (ns, _), r in self.recoveries.items()
            if ns == namespace and (job is None or r["spec"].get("jobName") == job)
        ]

    def get_recovery(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._check("get_recovery")
        return copy.deepcopy(self.recoveries.get((namespace, name)))

    def create_recovery(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        self._check("create_recovery")
        with self._lock:
            name = body["metadata"]["name"]
            if (namespace, name) in self.recoveries:
                return None
            stored = copy.deepcopy(dict(body))
            stored.pop("status", None)  # the status subresource ignores it on create
            stored["metadata"].update(
                namespace=namespace,
                resourceVersion=str(next(self._rv)),
                uid=f"uid-{name}",
                creationTimestamp="2025-01-01T00:00:00Z",
            )
            self.recoveries[(namespace, name)] = stored
            return copy.deepcopy(stored)

    def patch_recovery_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str
    ) -> dict[str, Any]:
        self._check("patch_recovery_status")
        with self._lock:
            stored = self.recoveries.get((namespace, name))
            if stored is None:
                raise Conflict(f"{name} is gone")
            if self.race is not None:
                stored.setdefault("status", {}).update(self.race)
                stored["metadata"]["resourceVersion"] = str(next(self._rv))
                self.race = None
            if stored["metadata"]["resourceVersion"] != resource_version:
                raise Conflict(f"{name}: resourceVersion {resource_version} is stale")
            stored.setdefault("status", {}).update(copy.deepcopy(dict(status)))
            stored["metadata"]["resourceVersion"] = str(next(self._rv))
            self.patches.append((name, str(status.get("phase"))))
            return copy.deepcopy(stored)

    def delete_recovery(self, namespace: str, name: str, resource_version: str) -> bool:
        self._check("delete_recovery")
        with self._lock:
            stored = self.recoveries.get((namespace, name))
            if stored is None or stored["metadata"]["resourceVersion"] != resource_version:
                return False
            del self.recoveries[(namespace, name)]
            return True

    # --- the operator's seam --------------------------------------------------------------

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._check("get_job")
        return copy.deepcopy(self.jobs.get((namespace, name)))

    def list_job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        self._check("list_job_pods")
        return [
            copy.deepcopy(p)
            for (ns, _), p in self.pods.items()
            if ns == namespace and p["metadata"]["labels"].get(names.LABEL_JOB_NAME) == job
        ]

    def list_pods(self, namespace: str | None) -> list[dict[str, Any]]:
        self._check("list_pods")
        return [
            copy.deepcopy(p)
            for (ns, _), p in self.pods.items()
            if namespace in (None, ns)
            and p["metadata"]["labels"].get(names.LABEL_OPERATOR_NAME) == "pytorchjob-controller"
        ]

    def list_all_recoveries(self, namespace: str | None) -> list[dict[str, Any]]:
        self._check("list_all_recoveries")
        return [
            copy.deepcopy(b) for (ns, _), b in self.recoveries.items() if namespace in (None, ns)
        ]

    def post_event(self, involved: Any, *, type_: str, reason: str, message: str) -> None:
        self.events.append(
            {"involved": dict(involved), "type": type_, "reason": reason, "message": message}
        )

    # --- the operator's admission seam ----------------------------------------------------

    def ensure_service_account(self, namespace: str, name: str, labels: Any) -> None:
        self._check("ensure_service_account")
        self.service_accounts.add((namespace, name))

    def ensure_role_binding(
        self, namespace: str, name: str, *, cluster_role: str, service_account: str, labels: Any
    ) -> None:
        self._check("ensure_role_binding")
        self.role_bindings.setdefault(
            (namespace, name), {"roleRef": cluster_role, "subject": service_account}
        )

    def delete_role_binding(self, namespace: str, name: str) -> None:
        self._check("delete_role_binding")
        self.role_bindings.pop((namespace, name), None)

    def delete_service_account(self, namespace: str, name: str) -> None:
        self._check("delete_service_account")
        self.service_accounts.discard((namespace, name))
