"""Putting the registered objects back exactly as they were when a restore does not go ahead.

A restore that returns ``None`` must leave every registered object bitwise as it was: the
script then loads its checkpoint or starts fresh, and whatever a failed restore left in the
objects would be trained on. Ranks that load their own slot load only after the vote passed,
so they need nothing from here. A receiver's state is written in place, before the vote;
its objects are copied to host memory first (one copy of its state, for the duration of the
restore) and put back when the vote fails.
"""

from __future__ import annotations

import torch

from peer_recovery.snapshots.live import LiveState
from peer_recovery.snapshots.tree import Flat, flatten, unflatten

__all__ = ["Backup"]


class Backup:
    """A host-memory copy of every object's ``state_dict()``, to load back on failure."""

    def __init__(self, live: LiveState) -> None:
        self._live = live
        self._saved: dict[str, Flat] = {}
        for name, obj in live.objects.items():
            flat = flatten(obj.state_dict())
            flat.tensors = [t.to("cpu", copy=True) for t in flat.tensors]
            self._saved[name] = flat

    def put_back(self) -> None:
        """Load every saved state back into its object (values copied, bit for bit).

        A DTensor (FSDP2) is put back by copying into its live local shard and handing the
        object the live DTensor, since ``load_state_dict`` takes no plain local shard.
        """
        with torch.no_grad():
            for name, obj in self._live.objects.items():
                saved = self._saved[name]
                if not saved.layouts:
                    obj.load_state_dict(unflatten(saved.tree, saved.tensors))
                    continue
                live = flatten(obj.state_dict())
                if live.tensor_paths != saved.tensor_paths:
                    raise ValueError(f"the state of {name!r} changed shape during the restore")
                for source, target in zip(saved.tensors, live.tensors, strict=True):
                    target.copy_(source)
                obj.load_state_dict(unflatten(saved.tree, live.leaves))
