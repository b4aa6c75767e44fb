"""Streaming a training state dict between ranks over a torch.distributed process group.

``PGTransport`` is a drop-in for PyTorch's private
``torch.distributed.checkpoint._pg_transport.PGTransport`` with enforced timeouts, no
unpickling from the wire, exact bytes for views, coalesced small tensors, integrity checks,
a step check, stats and progress. See ``docs/transport.md`` and the ``pg_transport`` module
docstring for the wire protocol and the deliberate differences from PyTorch's.
"""

from __future__ import annotations

from peer_recovery.transport.errors import (
    IntegrityError,
    MetadataError,
    StepMismatchError,
    TransferError,
    TransferTimeout,
)
from peer_recovery.transport.header import Limits
from peer_recovery.transport.pg_transport import DEFAULT_INTEGRITY, PGTransport, TransferStats

__all__ = [
    "DEFAULT_INTEGRITY",
    "IntegrityError",
    "Limits",
    "MetadataError",
    "PGTransport",
    "StepMismatchError",
    "TransferError",
    "TransferStats",
    "TransferTimeout",
]
