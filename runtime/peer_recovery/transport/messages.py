"""The data messages of a transfer, laid out: pure, deterministic, no I/O.

Sender and receiver compute the same plan from the same tensor sizes and the three sizes the
sender announces in the metadata, so no per-message framing travels on the wire:

- a payload of at most ``small`` bytes is copied into a *bucket* at the next offset that is
  a multiple of its ``align`` (its dtype's item size), so that every payload in a bucket
  can be viewed as its own dtype and a run of same-dtype payloads is dense (packed,
  unpacked or received-as-views with one batched operation); a bucket is sent when the
  next small payload would not fit in ``bucket`` bytes, and at the end;
- a larger payload is sent straight from (and received straight into) its own memory, in
  *chunks* of at most ``chunk`` bytes, so that progress is reported and integrity checks of
  one chunk overlap with the transfer of the next;
- empty payloads send nothing.

Invariant: every byte of every payload appears in exactly one message, in payload order
within each payload; in a bucket, payload ``i`` starts at a multiple of ``aligns[i]`` and
the gaps before such starts (padding, fewer than ``aligns[i]`` bytes each) carry nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Bucket", "Chunk", "Message", "Run", "bucket_runs", "plan_messages"]


@dataclass(frozen=True)
class Bucket:
    """Several small payloads packed into one buffer of ``nbytes``."""

    nbytes: int
    entries: tuple[tuple[int, int, int], ...]  # (payload index, offset, nbytes)

    @property
    def payload_bytes(self) -> int:
        """Bytes of payload, without alignment padding."""
        return sum(n for _, _, n in self.entries)


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


class Run(NamedTuple):
    """Consecutive payloads of one bucket with the same ``key`` (dtype), packed densely."""

    start: int  # byte offsets in the bucket
    end: int
    key: object
    indices: list[int]


def bucket_runs(bucket: Bucket, keys: Sequence[object]) -> list[Run]:
    """Split a bucket into runs of same-key payloads (``keys[i]`` is payload i's dtype).

    Payloads of one dtype have sizes that are multiples of its item size, so after the
    first one (aligned) the rest of a run follows without padding: ``[start, end)`` is
    exactly the run's payloads, back to back.
    """
    runs: list[Run] = []
    start = end = -1
    key: object = None
    indices: list[int] = []
    for index, offset, size in bucket.entries:
        k = keys[index]
        if offset != end or k != key:
            if indices:
                runs.append(Run(start, end, key, indices))
            start, key, indices = offset, k, []
        indices.append(index)
        end = offset + size
    if indices:
        runs.append(Run(start, end, key, indices))
    return runs


def plan_messages(
    sizes: Sequence[int],
    *,
    bucket: int,
    chunk: int,
    small: int,
    aligns: Sequence[int] | None = None,
) -> list[Message]:
    """Split payloads of ``sizes`` bytes into buckets and chunks (see the module docstring).

    ``aligns`` (one per payload, powers of two up to 16; all 1 when omitted) is where a
    payload may start in a bucket.
    """
    if bucket <= 0 or chunk <= 0 or small > bucket:
        raise ValueError(f"bad plan sizes: bucket={bucket} chunk={chunk} small={small}")
    if aligns is not None and len(aligns) != len(sizes):
        raise ValueError(f"{len(aligns)} alignments for {len(sizes)} payloads")
    messages: list[Message] = []
    entries: list[tuple[int, int, int]] = []
    used = 0
    for index, size in enumerate(sizes):
        if size == 0:
            continue
        if size <= small:
            align = aligns[index] if aligns is not None else 1
            offset = -(-used // align) * align
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
