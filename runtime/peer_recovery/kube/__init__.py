"""Cluster integration of the runtime: the Kubernetes plan source and the status reporter.

Both run in the torchrun agent (the rendezvous plugin), never in workers: one reader per pod
reads this job's ``PeerRecovery`` objects with the pod's ServiceAccount, and the same agent
reports the recovery's progress back, since it survives worker restarts.

Workers never import this package: they publish their outcome as records of the round's
store protocol (:mod:`peer_recovery.protocol`), and the agent turns them into API writes.

Modules: ``identity`` (who this pod is, from the downward-API env), ``client`` (the only
module that talks to the API server; ``kubernetes`` is imported inside its functions),
``plans`` (the plan source), ``report`` (pure: which status writes a round's outcome calls
for), ``status`` (the writes, through the contract's checked move), ``agent`` (the
per-round hook and its background reporter thread), ``setup`` (choosing all of it for an
agent). Importing this package imports none of them.
"""

from __future__ import annotations

__all__: list[str] = []
