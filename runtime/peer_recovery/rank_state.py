"""Rank-private state a recovered rank needs to continue the same streams: RNG and data.

Register these in ``PeerRecovery(..., private={...})``: they are snapshotted with the rank's
own snapshot and loaded with it (``RestoreResult.private_restored``), never streamed to
another rank, since another rank's random stream and data position are not this rank's.

- :class:`RNGState` captures Python's ``random``, NumPy's global generator (when NumPy is
  installed), torch's CPU generator and the current CUDA device's (when CUDA is available;
  not the other devices': a rank should not create contexts on them). Generators a script
  creates itself (``torch.Generator``, ``numpy.random.default_rng``) are its own objects:
  wrap them in a ``Stateful`` of the script's.
- :class:`DataPosition` counts the batches handed to the training loop in the current
  epoch, and after a restore skips as many, so the loop continues with the next batch. The
  sampler's order must depend only on the seed and epoch (``DistributedSampler`` with
  ``set_epoch(position.epoch)``, or a generator seeded from them), as it does after any
  restart.

Every value is a tensor or a plain number: snapshots hold no pickled objects.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch

__all__ = ["DataPosition", "RNGState"]

T = TypeVar("T")


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


class RNGState:
    """The process-wide random generators, as a ``Stateful`` (see the module docstring)."""

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        state: dict[str, Any] = {
            "python": {
                "version": version,
                "internal": torch.tensor(internal, dtype=torch.int64),
                "gauss": gauss,
            },
            "torch": torch.get_rng_state(),
        }
        numpy = _numpy()
        if numpy is not None:
            kind, keys, pos, has_gauss, cached = numpy.random.get_state()
            state["numpy"] = {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(numpy.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached": float(cached),
            }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()  # the current device's: this rank's
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        python = state["python"]
        internal = tuple(int(v) for v in python["internal"].tolist())
        random.setstate((int(python["version"]), internal, python["gauss"]))
        torch.set_rng_state(state["torch"])
        if "numpy" in state:
            numpy = _numpy()
            if numpy is None:
                raise RuntimeError("the snapshot holds NumPy's RNG state; NumPy is not installed")
            saved = state["numpy"]
            keys = saved["keys"].numpy().astype(numpy.uint32)
            numpy.random.set_state(
                (saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["cached"])
            )
        if "cuda" in state:
            if not torch.cuda.is_available():
                raise RuntimeError("the snapshot holds a CUDA RNG state; CUDA is not available")
            torch.cuda.set_rng_state(state["cuda"].cpu())


class DataPosition:
    """Where this rank is in its data: the epoch and the batches consumed in it.

    Iterate the loader through :meth:`iterate`: a batch counts once it is handed to the
    loop (a prefetching loader's batches in flight do not), and after a restore the first
    ``batch`` batches of the epoch are skipped. Skipping draws them from the loader, which
    costs their loading time but works with any loader and any number of workers.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.batch = 0  # batches of this epoch handed to the loop
        self._skip = 0

    def iterate(self, batches: Iterable[T]) -> Iterator[T]:
        """The batches of the current epoch, from where this rank left off."""
        iterator = iter(batches)
        for _ in range(self._skip):
            if next(iterator, _END) is _END:
                raise RuntimeError(
                    f"epoch {self.epoch} ended while skipping to batch {self._skip}: the "
                    "loader is shorter than when the position was saved"
                )
        self._skip = 0
        for item in iterator:
            self.batch += 1  # counted before the loop sees it: a snapshot inside counts it
            yield item

    def next_epoch(self) -> None:
        """The current epoch is done: the next starts at batch 0."""
        self.epoch, self.batch, self._skip = self.epoch + 1, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, batch = state["epoch"], state["batch"]
        if not (isinstance(epoch, int) and isinstance(batch, int) and epoch >= 0 and batch >= 0):
            raise ValueError(f"a data position needs epoch and batch >= 0, got {state!r}")
        self.epoch, self.batch, self._skip = epoch, batch, batch


_END: Any = object()
