"""Choosing the Kubernetes plan source, and wiring its reporter, for the rendezvous plugin.

``plan_source_from_config`` (``peer_recovery.plan_sources``) asks :func:`cluster_plan_source`
when no plan file is configured. Precedence: rdzv-conf ``plan_source``, then
``$PEER_RECOVERY_PLAN_SOURCE``, then ``auto``:

- ``kubernetes``: required; a pod identity (``POD_NAME``, ``POD_UID``, ``POD_NAMESPACE``
  from the downward API) must be present, else the agent fails at start with the fix;
- ``auto``: used when the identity is present (a pod), skipped when it is absent;
- ``none``: never (plans are made in-band and nothing is reported).

The returned source answers ``plan_for`` (the reader) and ``round_published`` (the hook the
``RoundPublisher`` calls after each round's publication: the reporter).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from peer_recovery.kube.agent import ClusterAgent
from peer_recovery.kube.client import KubeRecoveryApi
from peer_recovery.kube.identity import IDENTITY_ENV, pod_identity
from peer_recovery.kube.plans import KubePlanSource
from peer_recovery.plan_sources import PlanEntry

__all__ = ["ENV_PLAN_SOURCE", "ClusterPlanSource", "cluster_plan_source"]

ENV_PLAN_SOURCE: Final = "PEER_RECOVERY_PLAN_SOURCE"
_CHOICES: Final = ("auto", "kubernetes", "none")


class ClusterPlanSource:
    """The Kubernetes reader plus the per-round reporter hook."""

    def __init__(self, reader: KubePlanSource, agent: ClusterAgent) -> None:
        self.reader, self.agent = reader, agent

    def plan_for(
        self, *, run_id: str, target: int, round_no: int, timeout: float
    ) -> PlanEntry | None:
        return self.reader.plan_for(
            run_id=run_id, target=target, round_no=round_no, timeout=timeout
        )

    def round_published(
        self, store: Any, run_id: str, round_no: int, ordinal: int, nnodes: int
    ) -> None:
        self.agent.round_published(store, run_id, round_no, ordinal, nnodes)


def cluster_plan_source(
    config: Mapping[str, Any], env: Mapping[str, str]
) -> ClusterPlanSource | None:
    """The cluster plan source for this agent, or None (see the module docstring)."""
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
    return ClusterPlanSource(reader, ClusterAgent.from_env(identity, reader, frozen))
