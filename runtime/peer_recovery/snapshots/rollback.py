"""Putting the registered objects back exactly as they were when a restore does not go ahead.

A restore that returns ``None`` must leave every registered object bitwise as it was: the
script then loads its checkpoint or starts fresh, and whatever a failed restore left in the
objects would be trained on. Ranks that load their own slot load only after the vote passed,
so they need nothing from here. A receiver's state is written in place, before the vote;
its objects are copied to host memory first (one copy of its state, for the duration of the
restore) and put back when the vote fails.
"""

from __future__ import annotations

from typing import Any

import torch

from peer_recovery.snapshots.live import LiveState
from peer_recovery.snapshots.tree import flatten, unflatten

__all__ = ["Backup"]


class Backup:
    """A host-memory copy of every object's ``state_dict()``, to load back on failure."""

    def __init__(self, live: LiveState) -> None:
        self._live = live
        self._saved: dict[str, Any] = {}
        for name, obj in live.objects.items():
            flat = flatten(obj.state_dict())
            copies = [t.to("cpu", copy=True) for t in flat.tensors]
            self._saved[name] = unflatten(flat.tree, copies)

    def put_back(self) -> None:
        """Load every saved state back into its object (values copied, bit for bit)."""
        with torch.no_grad():
            for name, obj in self._live.objects.items():
                obj.load_state_dict(self._saved[name])
