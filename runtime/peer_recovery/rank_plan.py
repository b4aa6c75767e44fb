"""This rank's part in a restore: its :class:`Role` and the :class:`RankPlan` behind it.

Pure and torch-free. The round's agreement (:mod:`peer_recovery.peer_restore`) produces a
``RankPlan`` per rank; :class:`peer_recovery.recovery.PeerRecovery` carries it out. Kept
apart from both so that neither has to import the other to speak of it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["RankPlan", "Role"]


class Role(str, enum.Enum):
    """What one rank does in a restore."""

    LOCAL = "local"  # load this rank's own snapshot
    RECEIVE = "receive"  # receive the state from a peer holding the same shard
    SEND = "send"  # load the own snapshot, then stream it to peers


@dataclass(frozen=True)
class RankPlan:
    """This rank's part in a restore, as the agreement step decided it.

    ``step`` is the agreed resume step; ``receive_from`` the global rank streaming to this
    rank (role RECEIVE), its primary source; ``also_from`` other holders of the same
    snapshot that serve part of it at once (slot replication stripes over all of them; the
    in-place transport uses ``receive_from`` only); ``send_to`` the ranks this rank streams
    its stored ``step`` to after loading it (role SEND). Neither set: role LOCAL.
    ``lineage``: the agreed snapshots' lineage (``peer_recovery.snapshots.identity``); None
    accepts any.
    """

    step: int
    receive_from: int | None = None
    send_to: tuple[int, ...] = ()
    lineage: str | None = None
    also_from: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.receive_from is not None and self.send_to:
            raise ValueError("a rank that receives its state cannot also send it")
        if self.also_from and self.receive_from is None:
            raise ValueError("extra sources (also_from) need a primary one (receive_from)")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"a source is named twice: {list(self.sources)}")

    @property
    def sources(self) -> tuple[int, ...]:
        """Every rank this one receives from, the primary first; empty unless RECEIVE."""
        return () if self.receive_from is None else (self.receive_from, *self.also_from)

    @property
    def role(self) -> Role:
        if self.receive_from is not None:
            return Role.RECEIVE
        return Role.SEND if self.send_to else Role.LOCAL
