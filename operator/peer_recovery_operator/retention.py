"""Which finished PeerRecoveries the operator deletes: the retention rule (pure).

Finished records are history: they answer "what happened to this pod", and nothing acts on
them. Kept forever, they grow without bound (every container restart of every pod adds one).
:func:`expired` takes the records, the clock and the policy, and returns those to delete,
with a reason each. Rules, per pod slot (namespace, job, replica type, replica index):

1. Only finished records (Succeeded, Failed, FellBack) are ever deleted.
2. An attempt closed for re-planning whose successor is not recorded yet is kept: it is
   how the next sweep knows to finish the re-plan.
3. The newest ``keep`` finished records of the slot are kept, unless rule 4 applies.
4. A record finished longer ago than ``ttl`` seconds is deleted, however recent in its slot.

Newest means the latest ``phase_since`` (when its phase was written), then the highest
attempt. The garbage collector still deletes every record with its PyTorchJob.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime

from peer_recovery.contract.names import ConditionReason, Phase
from peer_recovery.contract.records import RecoveryRecord

__all__ = ["Expired", "expired"]


@dataclasses.dataclass(frozen=True, slots=True)
class Expired:
    record: RecoveryRecord
    why: str


def expired(
    records: Iterable[RecoveryRecord], *, now: datetime, keep: int, ttl: float
) -> list[Expired]:
    """The finished records to delete under the policy (see the module docstring)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")
    if ttl <= 0:
        raise ValueError(f"ttl must be > 0, got {ttl!r}")
    by_slot: dict[tuple[str, str, str, int], list[RecoveryRecord]] = {}
    attempts: dict[tuple[str, str, str, int, str], int] = {}
    for record in records:
        by_slot.setdefault(record.slot, []).append(record)
        episode = record.episode
        attempts[episode] = max(attempts.get(episode, 0), record.attempt)
    found: list[Expired] = []
    for slot_records in by_slot.values():
        finished = [
            r
            for r in slot_records
            if r.phase.terminal and not _awaits_replan(r, attempts[r.episode])
        ]
        finished.sort(key=lambda r: (r.phase_since, r.attempt), reverse=True)
        for rank, record in enumerate(finished):
            age = (now - record.phase_since).total_seconds()
            if age > ttl:
                found.append(Expired(record, f"finished {age:.0f}s ago (retention {ttl:g}s)"))
            elif rank >= keep:
                found.append(
                    Expired(record, f"{rank} newer finished records of its pod (keeping {keep})")
                )
    return found


def _awaits_replan(record: RecoveryRecord, newest_attempt: int) -> bool:
    return (
        record.phase is Phase.FAILED
        and record.status_reason == ConditionReason.REPLANNING
        and record.attempt >= newest_attempt
    )
