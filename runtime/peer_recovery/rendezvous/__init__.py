"""torchrun's ``peer-recovery`` rendezvous backend (entry point group ``torchrun.handlers``).

``torchrun --rdzv-backend=peer-recovery`` finds :func:`handler_creator` through the entry
point, calls it, and registers what it returns as the backend's creator. Importing this
package is cheap (standard library only); torch's rendezvous machinery, which torchrun has
already loaded by then, is imported when a handler is actually created.

Modules: ``identity`` (pod ordinal from the env), ``launch`` (torchrun settings checks),
``handler`` (the wrapped c10d handler that pins ranks), ``exchange`` (store keys and JSON
values shared by agents and workers), ``round`` (what an agent publishes each round).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["BACKEND_NAME", "handler_creator"]

BACKEND_NAME = "peer-recovery"


def _create(params: Any) -> Any:
    from peer_recovery.rendezvous.handler import create_handler

    return create_handler(params)


def handler_creator() -> Callable[[Any], Any]:
    """What the ``torchrun.handlers`` entry point resolves to: returns the handler creator."""
    return _create
