"""Cluster integration of the runtime: the Kubernetes plan source and the status reporter.

Both run in the torchrun agent (the rendezvous plugin), never in workers: one reader per pod
reads this job's ``PeerRecovery`` objects with the pod's ServiceAccount, and the same agent
reports the recovery's progress back, since it survives worker restarts.

Modules: ``identity`` (who this pod is, from the downward-API env), ``client`` (the only
module that talks to the API server; ``kubernetes`` is imported inside its functions),
``plans`` (the plan source), ``outcome`` (what workers publish about their restore, for the
agent), ``report`` (pure: which status writes a round's outcome calls for), ``status`` (the
writes, with resourceVersion preconditions), ``agent`` (the per-round hook and its
background reporter thread). Importing this package imports none of them.
"""

from __future__ import annotations

__all__: list[str] = []
