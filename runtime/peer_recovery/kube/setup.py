"""Choosing the cluster integration for this agent: the Kubernetes plan reader and the
status reporter that rides on the same client.

The plugin's wiring (:mod:`peer_recovery.plugin`) asks :func:`cluster_integration` when no
plan file is configured. Precedence: rdzv-conf ``plan_source``, then
``$PEER_RECOVERY_PLAN_SOURCE``, then ``auto``:

- ``kubernetes``: required; a pod identity (``POD_NAME``, ``POD_UID``, ``POD_NAMESPACE``
  from the downward API) must be present, else the agent fails at start with the fix;
- ``auto``: used when the identity is present (a pod), skipped when it is absent;
- ``none``: never (plans are made in-band and nothing is reported).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from peer_recovery.kube.agent import ClusterAgent
from peer_recovery.kube.client import KubeRecoveryApi
from peer_recovery.kube.identity import IDENTITY_ENV, pod_identity
from peer_recovery.kube.plans import KubePlanSource

__all__ = ["ENV_PLAN_SOURCE", "ClusterIntegration", "cluster_integration"]

ENV_PLAN_SOURCE: Final = "PEER_RECOVERY_PLAN_SOURCE"
_CHOICES: Final = ("auto", "kubernetes", "none")


@dataclass(frozen=True)
class ClusterIntegration:
    """The plan source to ask, and the agent to tell when each round is published."""

    plan_source: KubePlanSource
    agent: ClusterAgent


def cluster_integration(
    config: Mapping[str, Any], env: Mapping[str, str]
) -> ClusterIntegration | None:
    """The cluster integration for this agent, or None (see the module docstring)."""
    choice = str(config.get("plan_source") or env.get(ENV_PLAN_SOURCE) or "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(
            f"peer-recovery: plan source {choice!r} is not one of {', '.join(_CHOICES)} "
            f"(rdzv-conf plan_source or ${ENV_PLAN_SOURCE})"
        )
    if choice == "none":
        return None
    identity = pod_identity(env)
    if identity is None:
        if choice == "kubernetes":
            needed = ", ".join(f"{k} (from {v})" for k, v in IDENTITY_ENV.items())
            raise ValueError(
                f"peer-recovery: the kubernetes plan source needs the pod identity env, set "
                f"through the downward API: {needed}"
            )
        return None
    frozen = dict(env)
    reader = KubePlanSource(identity, lambda: KubeRecoveryApi(frozen))
    return ClusterIntegration(reader, ClusterAgent.from_env(identity, reader, frozen))
