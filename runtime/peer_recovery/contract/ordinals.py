"""The pod ordinal: which node rank a pod of a PyTorchJob stands for (pure).

The training-operator gives master-0 node rank 0 and worker-i node rank i + 1 when the job
has a Master; without one, worker-i is i. The operator computes ordinals from a pod's
replica labels with :func:`pod_ordinal`; the runtime reads the same number from the env the
training-operator sets (``peer_recovery.rendezvous.identity``).
"""

from __future__ import annotations

__all__ = ["pod_ordinal"]


def pod_ordinal(replica_type: str, replica_index: int, *, has_master: bool) -> int:
    """The ordinal of replica ``replica_index`` of ``replica_type`` (lower-case)."""
    if replica_type == "master":
        return replica_index
    return replica_index + 1 if has_master else replica_index
