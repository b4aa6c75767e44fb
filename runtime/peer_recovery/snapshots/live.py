"""The live side: reading the registered ``Stateful`` objects and loading into them in place.

Restoring copies stored bytes straight into the tensors the objects' ``state_dict()``
returns (for a model, its parameters and buffers; for an optimizer, its state), then hands
each object a state dict rebuilt from the manifest's skeleton around those same tensors, so
that non-tensor values (step counters, learning rates, scheduler fields) are set too. One
copy per tensor, into memory that already exists: nothing is aliased to the slot file, so a
later snapshot can overwrite the slot safely.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

import torch

from peer_recovery.optim_state import materialize
from peer_recovery.shard_key import state_digest
from peer_recovery.snapshots.bulk_copy import copy_grouped, copy_to_device, slot_views
from peer_recovery.snapshots.manifest import Section
from peer_recovery.snapshots.store import dtype_name
from peer_recovery.snapshots.tree import Flat, flatten, path_name, unflatten

__all__ = ["LiveState", "Stateful", "flat_digest", "key_digest"]


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


def flat_digest(flat: Flat) -> str:
    """The shard-key digest of a flattened state (same result as ``Section.digest``)."""
    tensors = (
        (name, dtype_name(t.dtype), tuple(t.shape))
        for name, t in zip(flat.tensor_names, flat.tensors, strict=True)
    )
    return state_digest(tensors, (path_name(p) for p in flat.other_paths))


def key_digest(flat: Flat, optimizers: Collection[str]) -> str:
    """The shard-key digest: the state without the optimizers' per-parameter ``state``.

    An optimizer creates a parameter's state lazily, at the first step that parameter has a
    gradient; a parameter that requires grad but never gets one (an unused head, an idle
    expert) has none. Which parameters have state therefore depends on the data seen, not
    on the shard, so it must not enter the key: the model's tensors and the optimizers'
    ``param_groups`` identify the shard. Whether stored optimizer state fits the live
    parameters is checked when it is loaded (``LiveState.load``).
    """

    def lazy(path: tuple[Any, ...]) -> bool:
        return len(path) >= 2 and path[0] in optimizers and path[1] == "state"

    names = flat.tensor_names
    kept = [
        (i, p, t)
        for i, (p, t) in enumerate(zip(flat.tensor_paths, flat.tensors, strict=True))
        if not lazy(p)
    ]
    tensors = ((names[i], dtype_name(t.dtype), tuple(t.shape)) for i, _, t in kept)
    layouts = ((names[i], flat.layouts[i]) for i, _, _ in kept if i in flat.layouts)
    return state_digest(tensors, (path_name(p) for p in flat.other_paths if not lazy(p)), layouts)


class LiveState:
    """A named set of ``Stateful`` objects (the replicated state, or the rank-private one)."""

    def __init__(self, objects: Mapping[str, Stateful]) -> None:
        for name, obj in objects.items():
            if not (
                callable(getattr(obj, "state_dict", None))
                and callable(getattr(obj, "load_state_dict", None))
            ):
                raise TypeError(
                    f"state {name!r} is a {type(obj).__qualname__}, which has no "
                    "state_dict()/load_state_dict(); wrap it in an object that does"
                )
        self.objects = dict(objects)

    def flat(self) -> Flat:
        return flatten({name: obj.state_dict() for name, obj in self.objects.items()})

    def optimizer_names(self) -> frozenset[str]:
        """The names of the registered optimizers (their state is created lazily)."""
        return frozenset(
            name for name, obj in self.objects.items() if isinstance(obj, torch.optim.Optimizer)
        )

    def fresh_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            o for o in self.objects.values() if isinstance(o, torch.optim.Optimizer) and not o.state
        ]

    def materialize(self, *, zero: bool = True) -> Callable[[], None] | None:
        """Give every never-stepped optimizer its state; return one undo for all, or None.

        ``zero=False``: the created tensors may be left uninitialised (``optim_state``), for
        a restore that overwrites all of them or undoes.
        """
        fresh = self.fresh_optimizers()
        undos = [u for u in (materialize(o, zero=zero) for o in fresh) if u is not None]
        if not undos:
            return None

        def undo() -> None:
            for u in undos:
                u()

        return undo

    def check(self, flat: Flat, section: Section) -> tuple[list[torch.Tensor], Any]:
        """The live tensors a section loads into, and its state around them; raises
        ``ValueError`` naming what does not fit. Writes nothing, so it may run before the
        vote: a stored tensor without a live counterpart of its shape and dtype (optimizer
        state of a parameter that now has none) is refused here, not halfway through a load.
        """
        entries = [(e.path, e.dtype, e.shape) for e in section.tensors]
        return self.place(flat, entries, section.tree)

    def place(
        self, flat: Flat, entries: list[tuple[str, str, tuple[int, ...]]], tree: object
    ) -> tuple[list[torch.Tensor], Any]:
        """The live tensors that stored (or received) tensors ``entries`` (path, dtype,
        shape) go into, and the state ``tree`` rebuilt around the live leaves (a DTensor
        stays the live DTensor); raises ``ValueError`` naming what does not fit."""
        live = {
            name: (t, leaf)
            for name, t, leaf in zip(flat.tensor_names, flat.tensors, flat.leaves, strict=True)
        }
        targets, leaves = [], []
        for path, dtype, shape in entries:
            found = live.get(path)
            if found is None:
                raise ValueError(f"stored tensor {path} has no counterpart in the live state")
            target = found[0]
            if tuple(target.shape) != tuple(shape) or dtype_name(target.dtype) != dtype:
                raise ValueError(
                    f"stored tensor {path} is {dtype}{list(shape)}, the live one "
                    f"is {dtype_name(target.dtype)}{list(target.shape)}"
                )
            targets.append(target)
            leaves.append(found[1])
        state = unflatten(tree, leaves)
        missing = set(self.objects) - set(state)
        if missing:
            raise ValueError(f"the snapshot holds no state for {sorted(missing)}")
        return targets, state

    def load(self, flat: Flat, section: Section, stored: list[torch.Tensor]) -> int:
        """Copy ``stored`` (tensors laid out as ``section``) into the objects; return bytes."""
        targets, state = self.check(flat, section)
        copy_grouped(stored, targets)
        self._hand_over(state)
        return section.nbytes

    def load_received(self, flat: Flat, received: Flat) -> int:
        """Load a state received from a peer (``received``: flattened, in the stored form
        the template gave) into the objects, in place; return the bytes."""
        entries = [
            (name, dtype_name(t.dtype), tuple(t.shape))
            for name, t in zip(received.tensor_names, received.tensors, strict=True)
        ]
        targets, state = self.place(flat, entries, received.tree)
        moved = [
            (source, target)
            for source, target in zip(received.tensors, targets, strict=True)
            if source.data_ptr() != target.data_ptr() or source.shape != target.shape
        ]  # a tensor received in place is already there
        copy_grouped([s for s, _ in moved], [t for _, t in moved])
        self._hand_over(state)
        return sum(t.numel() * t.element_size() for t in received.tensors)

    def load_slot(
        self,
        flat: Flat,
        section: Section,
        buf: torch.Tensor,
        checked: tuple[list[torch.Tensor], Any] | None = None,
    ) -> int:
        """Copy ``section``'s tensors from ``buf`` (a mapped slot) into the objects; return
        bytes. ``checked``: what ``check`` returned for the same arguments, if it ran. CPU
        tensors are copied in one grouped call per dtype, GPU ones through pinned staging
        (``bulk_copy``)."""
        targets, state = checked if checked is not None else self.check(flat, section)
        entries = section.tensors
        host = [i for i, t in enumerate(targets) if not t.is_cuda]
        if len(host) == len(targets):
            copy_grouped(slot_views(buf, entries), targets)
        else:
            copy_grouped(slot_views(buf, [entries[i] for i in host]), [targets[i] for i in host])
            devices: dict[torch.device, list[int]] = {}
            for i, target in enumerate(targets):
                if target.is_cuda:
                    devices.setdefault(target.device, []).append(i)
            for indices in devices.values():
                copy_to_device(buf, [entries[i] for i in indices], [targets[i] for i in indices])
        self._hand_over(state)
        return section.nbytes

    def _hand_over(self, state: Any) -> None:
        """Give each object its state dict (its tensors already hold the stored values)."""
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
