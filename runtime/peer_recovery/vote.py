"""The ballots of the all-or-nothing commit, and the small agreement on which step to restore.

After every rank has prepared its part (checked its own slot, or received from a peer), each
casts a :class:`Ballot`: whether it succeeded, the step it restored and, when it failed, why.
:func:`decide` is the pure verdict: success only if every rank succeeded at one and the same
step, with a reason naming each failed rank. The ballots travel, and the verdict is written
once for the whole job, in :mod:`peer_recovery.decision`.

``newest_common_step`` is the local-restore agreement: each rank offers the steps of its
usable snapshots and all restore the newest step every rank offers. Under the torchrun
plugin the round's agreement (``peer_recovery.agreement``) decides the step instead, since
peers may supply missing shards there. ``new_vote_group`` forms the gloo group these
collectives use, inside the failure handling.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "Ballot",
    "VoteOutcome",
    "all_agree",
    "decide",
    "new_vote_group",
    "newest_common_step",
]

log = logging.getLogger("peer_recovery.vote")

_BALLOT_BYTES = 512
_HEADER = struct.Struct("<Bq H")  # ok, step (-1 for none), reason length
_MAX_REASON = _BALLOT_BYTES - _HEADER.size
_MAX_OFFERS = 8


@dataclass(frozen=True)
class Ballot:
    ok: bool
    step: int | None
    reason: str = ""

    def encode(self) -> torch.Tensor:
        reason = self.reason.encode("utf-8", "replace")[:_MAX_REASON]
        raw = _HEADER.pack(int(self.ok), -1 if self.step is None else self.step, len(reason))
        buffer = bytearray(_BALLOT_BYTES)
        buffer[: len(raw) + len(reason)] = raw + reason
        return torch.frombuffer(buffer, dtype=torch.uint8).clone()

    @classmethod
    def decode(cls, tensor: torch.Tensor) -> Ballot:
        raw = bytes(tensor.numpy().tobytes())
        ok, step, length = _HEADER.unpack_from(raw)
        length = min(length, _MAX_REASON)
        reason = raw[_HEADER.size : _HEADER.size + length].decode("utf-8", "replace")
        return cls(bool(ok), None if step < 0 else step, reason)


@dataclass(frozen=True)
class VoteOutcome:
    ok: bool
    step: int | None
    failed: dict[int, str]  # rank -> reason
    reason: str


def decide(ballots: Sequence[Ballot]) -> VoteOutcome:
    """Pure: success only if every rank succeeded, at one and the same step."""
    failed = {rank: b.reason or "failed" for rank, b in enumerate(ballots) if not b.ok}
    if failed:
        detail = "; ".join(f"rank {rank}: {why}" for rank, why in sorted(failed.items()))
        return VoteOutcome(
            False, None, failed, f"{len(failed)} of {len(ballots)} ranks failed: {detail}"
        )
    steps = {b.step for b in ballots}
    if len(steps) != 1:
        by_step = {step: [r for r, b in enumerate(ballots) if b.step == step] for step in steps}
        return VoteOutcome(False, None, {}, f"ranks restored different steps: {by_step}")
    step = steps.pop()
    return VoteOutcome(True, step, {}, f"all {len(ballots)} ranks restored step {step}")


def new_vote_group(
    world_size: int, timeout_s: float
) -> tuple[dist.ProcessGroup | None, str | None]:
    """A gloo group of all ranks for the vote, or ``None`` and why.

    Creating it is itself a collective: a rank that never gets there (it failed before
    ``restore()``) makes it fail on the others after ``timeout_s``. That must end in a
    failed restore, never an exception, so the error is returned as the reason. Without
    ``torch.distributed`` initialised there is nothing to wait for: that is a usage error.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"world size {world_size} needs torch.distributed initialised (or pg=) to vote"
        )
    try:
        return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)), None
    except Exception as error:  # gloo: RuntimeError on a timeout or a lost peer
        why = f"{type(error).__name__}: {error}".splitlines()[0]
        log.warning("peer-recovery: no vote group: %s", why)
        return None, f"could not form the vote group (a rank is missing or too slow): {why}"


def _world(pg: dist.ProcessGroup | None) -> int:
    return 1 if pg is None else dist.get_world_size(pg)


def newest_common_step(pg: dist.ProcessGroup | None, offers: Sequence[int]) -> int | None:
    """The newest step every rank offers, or ``None``; every rank gets the same answer."""
    if _world(pg) == 1:
        return max(offers, default=None)
    padded = sorted(set(offers), reverse=True)[:_MAX_OFFERS]
    mine = torch.full((_MAX_OFFERS,), -1, dtype=torch.int64)
    mine[: len(padded)] = torch.tensor(padded, dtype=torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(_world(pg))]
    dist.all_gather(gathered, mine, group=pg)
    common: set[int] | None = None
    for row in gathered:
        steps = {int(s) for s in row.tolist() if s >= 0}
        common = steps if common is None else common & steps
    return max(common or (), default=None)


def all_agree(pg: dist.ProcessGroup | None, ok: bool) -> bool:
    """True on every rank exactly when ``ok`` is true on every rank."""
    if _world(pg) == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=pg)
    return bool(flag.item())
