"""peer-recovery's in-pod runtime: the user API.

A training script needs only the names exported here: :class:`PeerRecovery` (register the
state, ``restore`` once at start-up, ``snapshot`` every few steps), what ``restore`` returns
(:class:`RestoreResult`, with its :class:`Role`), the rank-private state helpers
(:class:`RNGState`, :class:`DataPosition`: register them in ``private=``), and the errors a script may catch
(:class:`SizingError` when ``/dev/shm`` cannot hold two snapshots, :class:`TransferError`
from :class:`peer_recovery.transport.PGTransport`). Everything else is internal; the
contract shared with the operator is :mod:`peer_recovery.contract`.

Importing this package is cheap on purpose: the operator imports ``peer_recovery.contract``
and torchrun loads the rendezvous plugin at start-up, neither of which may pay for
importing torch. Public names are therefore resolved lazily, on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it. Modules are imported on first access only.
_LAZY_ATTRIBUTES: dict[str, str] = {
    "DataPosition": "peer_recovery.rank_state",
    "PeerRecovery": "peer_recovery.recovery",
    "RNGState": "peer_recovery.rank_state",
    "RestoreResult": "peer_recovery.recovery",
    "Role": "peer_recovery.recovery",
    "SizingError": "peer_recovery.snapshots.sizing",
    "TransferError": "peer_recovery.transport.errors",
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
