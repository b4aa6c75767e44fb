"""The lifecycle sweep's decisions, made off the event loop on what the loop gathered.

Pure: :func:`decide` takes a :class:`SweepInput` (frozen records the engine copied out of
its state on the loop, by index look-ups only) and returns :class:`SweepDecisions`; the
engine runs it on a worker thread and applies the result on the loop. Nothing here reads
the state, so the state needs no lock: it stays the loop's alone.

1. For each record the lifecycle may act on, with the pods now in its target's slot and
   carrying its source's name and the attempts of its episode: the lifecycle's verdict
   (:func:`peer_recovery_operator.lifecycle.decide`); KEEP verdicts are dropped.
2. For each pod slot due for the retention rule, with all its records: the finished
   records to delete (:func:`peer_recovery_operator.retention.expired`), and when the
   slot is due again: at once while deletions are pending, else when its oldest finished
   record reaches the time to live, else never.

A decision may be stale when it is applied (the watch moved on meanwhile). That is safe:
every move it leads to is the contract's checked move with ``decided_on`` set, and every
delete carries the resourceVersion read, so a stale decision writes nothing.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from peer_recovery.contract.records import RecoveryRecord
from peer_recovery_operator import lifecycle
from peer_recovery_operator.config import OperatorConfig
from peer_recovery_operator.retention import Expired, expired
from peer_recovery_operator.state import Slot
from peer_recovery_operator.views import PodView

__all__ = ["Candidate", "SweepDecisions", "SweepInput", "decide"]


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """One record the lifecycle may act on, and what its verdict depends on."""

    record: RecoveryRecord
    slot_pod: PodView | None
    source_pod: PodView | None
    episode: tuple[RecoveryRecord, ...]


@dataclasses.dataclass(frozen=True)
class SweepInput:
    now: datetime
    config: OperatorConfig
    candidates: tuple[Candidate, ...]
    #: The pod slots due for the retention rule, each with every record it holds.
    slots: tuple[tuple[Slot, tuple[RecoveryRecord, ...]], ...]


@dataclasses.dataclass(frozen=True)
class SweepDecisions:
    #: Records to act on, with the verdict (never KEEP).
    verdicts: tuple[tuple[RecoveryRecord, lifecycle.Verdict], ...]
    #: Finished records to delete, by slot.
    expired: tuple[tuple[Slot, tuple[Expired, ...]], ...]
    #: When each looked-at slot is due again (absent: only when its records change).
    due: tuple[tuple[Slot, datetime], ...]


def decide(sweep: SweepInput) -> SweepDecisions:
    """The sweep's decisions (see the module docstring)."""
    config = sweep.config
    verdicts = []
    for candidate in sweep.candidates:
        rec = candidate.record
        verdict = lifecycle.decide(
            rec,
            now=sweep.now,
            slot_pod=candidate.slot_pod,
            source_pod=candidate.source_pod,
            attempts_in_episode=len(candidate.episode),
            newer_attempt_exists=any(r.attempt > rec.attempt for r in candidate.episode),
            config=config,
        )
        if verdict.action is not lifecycle.Action.KEEP:
            verdicts.append((rec, verdict))
    found_by_slot = []
    due = []
    ttl = timedelta(seconds=config.finished_ttl)
    for slot, records in sweep.slots:
        found = expired(records, now=sweep.now, keep=config.keep_finished, ttl=config.finished_ttl)
        finished = [r.phase_since for r in records if r.phase.terminal]
        if found:
            found_by_slot.append((slot, tuple(found)))
            due.append((slot, sweep.now))  # look again until the deletions land
        elif finished:
            due.append((slot, min(finished) + ttl))
    return SweepDecisions(tuple(verdicts), tuple(found_by_slot), tuple(due))
