"""Planning of the data messages of a transfer: pure, deterministic, no I/O.

Sender and receiver compute the same plan from the same tensor sizes and the three sizes the
sender announces in the metadata, so no per-message framing travels on the wire:

- a payload of at most ``small`` bytes is copied into a *bucket*, packed densely (no
  padding, so packing and unpacking are single batched byte copies); a bucket is sent when
  the next small payload would not fit in ``bucket`` bytes, and at the end;
- a larger payload is sent straight from (and received straight into) its own memory, in
  *chunks* of at most ``chunk`` bytes, so that progress is reported and integrity checks of
  one chunk overlap with the transfer of the next;
- empty payloads send nothing.

Invariant: every byte of every payload appears in exactly one message, in payload order
within each payload.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Bucket", "Chunk", "Message", "plan_messages"]


@dataclass(frozen=True)
class Bucket:
    """Several small payloads packed into one buffer of ``nbytes``."""

    nbytes: int
    entries: tuple[tuple[int, int, int], ...]  # (payload index, offset, nbytes)

    @property
    def payload_bytes(self) -> int:
        return self.nbytes


@dataclass(frozen=True)
class Chunk:
    """Bytes ``[start, end)`` of one large payload."""

    index: int
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def payload_bytes(self) -> int:
        return self.end - self.start


Message = Bucket | Chunk


def plan_messages(sizes: Sequence[int], *, bucket: int, chunk: int, small: int) -> list[Message]:
    """Split payloads of ``sizes`` bytes into buckets and chunks (see the module docstring)."""
    if bucket <= 0 or chunk <= 0 or small > bucket:
        raise ValueError(f"bad plan sizes: bucket={bucket} chunk={chunk} small={small}")
    messages: list[Message] = []
    entries: list[tuple[int, int, int]] = []
    used = 0
    for index, size in enumerate(sizes):
        if size == 0:
            continue
        if size <= small:
            offset = used
            if entries and offset + size > bucket:
                messages.append(Bucket(used, tuple(entries)))
                entries, offset = [], 0
            entries.append((index, offset, size))
            used = offset + size
            continue
        for start in range(0, size, chunk):
            messages.append(Chunk(index, start, min(start + chunk, size)))
    if entries:
        messages.append(Bucket(used, tuple(entries)))
    return messages
