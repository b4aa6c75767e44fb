"""peer-recovery's in-pod runtime.

Importing this package is cheap on purpose: the operator imports ``peer_recovery.api`` and
``peer_recovery.planning``, and torchrun loads the rendezvous plugin at start-up, none of
which may pay for importing torch. Public names are therefore resolved lazily, on first
attribute access, from the module that defines them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it. Modules are imported on first access only.
_LAZY_ATTRIBUTES: dict[str, str] = {
    "PGTransport": "peer_recovery.transport",
    "PeerRecovery": "peer_recovery.recovery",
    "RankPlan": "peer_recovery.recovery",
    "RestoreResult": "peer_recovery.recovery",
    # Peer restore under torchrun's peer-recovery rendezvous backend.
    "EXIT_TRANSFER_FAILED": "peer_recovery.peer_restore",
    "LocalPlanSource": "peer_recovery.plan_sources",
    "PlanEntry": "peer_recovery.plan_sources",
    "PlanSource": "peer_recovery.plan_sources",
    # The contract shared with the operator (torch-free).
    "Assignment": "peer_recovery.planning",
    "Phase": "peer_recovery.api",
    "PodRecord": "peer_recovery.planning",
    "build_peer_recovery": "peer_recovery.bodies",
    "check_transition": "peer_recovery.api",
    "parse_job_annotations": "peer_recovery.job_annotations",
    "plan_sources": "peer_recovery.planning",
}

__all__ = ["__version__", *sorted(_LAZY_ATTRIBUTES)]


def __getattr__(name: str) -> Any:
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'peer_recovery' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES))
