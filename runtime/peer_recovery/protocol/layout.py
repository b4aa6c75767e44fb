"""Which global ranks run in which pod (pure).

The rendezvous plugin pins every agent's group rank to its pod ordinal, and torchrun gives
each agent the same number of workers, so pod ``o`` runs ranks ``o * per_pod`` up to
``(o + 1) * per_pod - 1``. Every piece of rank <-> ordinal arithmetic goes through
:class:`Layout`, so it is written once.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    nnodes: int
    world_size: int

    def __post_init__(self) -> None:
        if self.nnodes < 1 or self.world_size < self.nnodes or self.world_size % self.nnodes:
            raise ValueError(
                f"a world of {self.world_size} ranks cannot be spread evenly over "
                f"{self.nnodes} pods"
            )

    @property
    def per_pod(self) -> int:
        return self.world_size // self.nnodes

    def pod_of(self, rank: int) -> int:
        return rank // self.per_pod

    def local_rank(self, rank: int) -> int:
        return rank % self.per_pod

    def ranks_of(self, ordinal: int) -> range:
        return range(ordinal * self.per_pod, (ordinal + 1) * self.per_pod)

    def same_position(self, ordinal: int, rank: int) -> int:
        """The rank in pod ``ordinal`` at the same local position as ``rank``."""
        return ordinal * self.per_pod + self.local_rank(rank)
