"""The torchrun plugin's wiring: the ``torchrun.handlers`` entry point ``peer-recovery``.

``torchrun --rdzv-backend=peer-recovery`` finds :func:`handler_creator` through the entry
point, calls it, and registers what it returns as the backend's creator. This module is the
top of the runtime's layers: it is the one place that decides, per agent, where plans come
from and who is told about each round, and hands that to the rendezvous handler:

1. a plan file (rdzv-conf ``plan_file``, then ``$PEER_RECOVERY_PLAN_FILE``): plans from it;
2. else the cluster integration when the pod has an identity (``peer_recovery.kube``): plans
   from the operator's PeerRecovery objects, and its agent reports each round's status;
3. else no plan source: every plan is made in-band.

Importing it is cheap (standard library only); torch's rendezvous machinery, which torchrun
has already loaded by then, and the Kubernetes client are imported when a handler is made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["handler_creator", "round_publisher"]


def round_publisher(config: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    """The agent's :class:`~peer_recovery.rendezvous.round.RoundPublisher`, wired."""
    from peer_recovery._env import nonnegative_seconds
    from peer_recovery.plan_sources import (
        ENV_PLAN_FILE,
        ENV_PLAN_TIMEOUT,
        LocalPlanSource,
        NoPlanSource,
        PlanSource,
    )
    from peer_recovery.rendezvous.manifests import manifest_reader
    from peer_recovery.rendezvous.round import (
        DEFAULT_PLAN_TIMEOUT_S,
        ENV_PODS_PER_REPLICA,
        RoundObserver,
        RoundPublisher,
        positive_int,
    )

    observers: list[RoundObserver] = []
    source: PlanSource
    path = config.get("plan_file") or env.get(ENV_PLAN_FILE)
    if path:
        source = LocalPlanSource(path)
    else:
        from peer_recovery.kube.setup import cluster_integration

        cluster = cluster_integration(config, env)
        if cluster is None:
            source = NoPlanSource()
        else:
            source = cluster.plan_source
            observers.append(cluster.agent.round_published)
    raw_timeout = config.get("plan_timeout") or env.get(ENV_PLAN_TIMEOUT)
    return RoundPublisher(
        manifest_reader(env),
        source,
        plan_timeout=nonnegative_seconds(raw_timeout, "plan_timeout", DEFAULT_PLAN_TIMEOUT_S),
        pods_per_replica=positive_int(env.get(ENV_PODS_PER_REPLICA), ENV_PODS_PER_REPLICA),
        observers=observers,
    )


def _create(params: Any) -> Any:
    from peer_recovery.rendezvous.handler import create_handler

    return create_handler(params, lambda config, env: round_publisher(config, env).publish)


def handler_creator() -> Callable[[Any], Any]:
    """What the ``torchrun.handlers`` entry point resolves to: returns the handler creator."""
    return _create
