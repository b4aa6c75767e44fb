"""Which holder sends which chunk of a slot: a work queue that re-plans a lost holder's part.

Pure (no I/O, no torch); the caller (``snapshots.replica``) serialises calls with its own
lock. Invariants:
- The slot is cut at the manifest's chunk boundaries, so every range a holder sends is
  checked against one of the manifest's checksums when it lands.
- A chunk is outstanding at one source at a time and lands exactly once; a chunk that was
  outstanding at a source that is lost (died, timed out, or sent bytes failing their
  checksum) goes back to the front of the queue, for the sources still alive.
- The transfer fails only when chunks remain and no source is left.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Range", "StripePlan"]


@dataclass(frozen=True)
class Range:
    """Chunk ``index`` of the slot: bytes ``[offset, offset + length)``."""

    index: int
    offset: int
    length: int


class StripePlan:
    """The chunks still to fetch, who holds which, and which sources are gone."""

    def __init__(self, data_bytes: int, chunk_bytes: int, sources: Sequence[int]) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        if not sources:
            raise ValueError("a transfer needs at least one source")
        self.ranges = [
            Range(i, at, min(chunk_bytes, data_bytes - at))
            for i, at in enumerate(range(0, data_bytes, chunk_bytes))
        ]
        self._pending: deque[int] = deque(r.index for r in self.ranges)
        self._outstanding: dict[int, list[int]] = {s: [] for s in sources}
        self._landed: set[int] = set()
        self.lost: dict[int, str] = {}  # source -> why it was dropped
        self.sent_by: dict[int, int] = dict.fromkeys(sources, 0)  # source -> bytes landed

    @property
    def alive(self) -> list[int]:
        return list(self._outstanding)

    @property
    def finished(self) -> bool:
        return len(self._landed) == len(self.ranges)

    @property
    def failed(self) -> bool:
        """Chunks remain and nobody is left to send them."""
        return not self.finished and not self._outstanding

    def next_for(self, source: int) -> Range | None:
        """The next chunk for ``source`` to send, or None (nothing queued, or it is lost)."""
        if source not in self._outstanding or not self._pending:
            return None
        index = self._pending.popleft()
        self._outstanding[source].append(index)
        return self.ranges[index]

    def outstanding(self, source: int) -> int:
        return len(self._outstanding.get(source, ()))

    def landed(self, source: int, index: int) -> None:
        """Chunk ``index`` from ``source`` arrived and passed its checksum."""
        if source not in self._outstanding or index not in self._outstanding[source]:
            raise ValueError(f"chunk {index} was not outstanding at source {source}")
        self._outstanding[source].remove(index)
        self._landed.add(index)
        self.sent_by[source] += self.ranges[index].length

    def lose(self, source: int, why: str) -> list[int]:
        """Drop ``source``; its outstanding chunks go back to the queue first. Returns them."""
        if source not in self._outstanding:
            return []
        back = self._outstanding.pop(source)
        self._pending.extendleft(reversed(back))
        self.lost[source] = why
        return back

    def describe(self) -> str:
        """Where the transfer stands, for errors and logs."""
        lost = "; ".join(f"source {s}: {why}" for s, why in sorted(self.lost.items()))
        return (
            f"{len(self._landed)} of {len(self.ranges)} chunks landed, "
            f"{len(self._outstanding)} source(s) left" + (f"; lost {lost}" if lost else "")
        )
