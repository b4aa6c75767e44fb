"""The Kubernetes plan source: this pod's plan from the operator's ``PeerRecovery`` objects.

One reader per pod, in the torchrun agent (the rendezvous plugin calls ``plan_for`` only in
a pod that rejoins without a snapshot). It lists this job's recoveries with the pod's
ServiceAccount and waits, within the plugin's bound, for one that targets this pod's UID
and is ``Planned`` (or already ``Streaming``); the plugin publishes the answer through the
rendezvous store like any plan source. No answer in time (no operator, API server
unreachable or slow, RBAC refusing) means the in-band planner decides; what happened is
kept in a :class:`PlanLedger` so the status reporter can say so in ``status.message``.

:func:`read_plan` is the pure decision over listed bodies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from peer_recovery.contract import names
from peer_recovery.contract.errors import ApiError, Unreachable
from peer_recovery.contract.records import for_target
from peer_recovery.kube.client import RecoveryApi
from peer_recovery.protocol.records import PlanEntry, PodIdentity

__all__ = ["KubePlanSource", "PlanLedger", "PlanReading", "read_plan"]

log = logging.getLogger("peer_recovery.kube.plans")

_POLL_S: Final = 0.25


@dataclass(frozen=True)
class PlanReading:
    """What the listed records say: a plan, or none yet (``final``: stop waiting)."""

    entry: PlanEntry | None
    record: str | None
    final: bool
    note: str


def read_plan(
    bodies: Iterable[Mapping[str, Any]], identity: PodIdentity, ordinal: int
) -> PlanReading:
    """Pure: this pod's plan among ``bodies`` (this job's PeerRecoveries)."""
    mine = for_target(bodies, identity.uid)
    live = [r for r in mine if not r.phase.terminal]
    if live:
        rec = live[0]
        if rec.target_ordinal != ordinal:
            return PlanReading(
                None, None, True,
                f"{rec.name} targets ordinal {rec.target_ordinal}, but this pod is ordinal "
                f"{ordinal}: ignored",
            )  # fmt: skip
        if rec.phase is names.Phase.PENDING:
            return PlanReading(None, None, False, f"{rec.name} is still Pending")
        raw = {
            "target": ordinal,
            "source": rec.source_ordinal,
            "mode": rec.mode.value,
            "plannedBy": rec.planned_by.value,
            "reason": rec.message,
        }
        try:
            entry = PlanEntry.from_json(raw, f"PeerRecovery {rec.name}")
        except ValueError as error:
            return PlanReading(None, rec.name, True, f"unusable plan: {error}")
        return PlanReading(entry, rec.name, True, f"{rec.name} ({rec.phase.value})")
    if mine and mine[0].reason == names.Reason.POD_REPLACED.value:
        # A replaced pod's UID is new: its records are about this incarnation only.
        rec = mine[0]
        return PlanReading(
            None, rec.name, True, f"{rec.name} is {rec.phase.value}: {rec.message or 'no plan'}"
        )
    return PlanReading(None, None, False, "no PeerRecovery targets this pod yet")


class PlanLedger:
    """What the reader saw, per round, for the reporter (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._notes: dict[int, tuple[str | None, str, bool]] = {}

    def record(self, round_no: int, record: str | None, note: str, reachable: bool) -> None:
        with self._lock:
            self._notes[round_no] = (record, note, reachable)

    def get(self, round_no: int) -> tuple[str | None, str, bool] | None:
        """(record used, note, whether the API server answered), or None if never asked."""
        with self._lock:
            return self._notes.get(round_no)


class KubePlanSource:
    """``PlanSource`` over this job's PeerRecoveries (see the module docstring)."""

    def __init__(
        self,
        identity: PodIdentity,
        api_factory: Callable[[], RecoveryApi],
        ledger: PlanLedger | None = None,
    ) -> None:
        self.identity = identity
        self.ledger = ledger or PlanLedger()
        self._factory = api_factory
        self._api: RecoveryApi | None = None

    def client(self) -> RecoveryApi:
        """The API client, made on first use (shared with the reporter)."""
        if self._api is None:
            self._api = self._factory()
        return self._api

    def plan_for(
        self, *, run_id: str, target: int, round_no: int, timeout: float
    ) -> PlanEntry | None:
        deadline = time.monotonic() + timeout
        note, reachable = "not asked", False
        while True:
            remaining = deadline - time.monotonic()
            try:
                bodies = self.client().list_recoveries(
                    self.identity.namespace, self.identity.job, timeout=max(0.5, remaining)
                )
                reachable = True
                reading = read_plan(bodies, self.identity, target)
                note = reading.note
                if reading.final:
                    self.ledger.record(round_no, reading.record, note, True)
                    log.info("peer-recovery: plan from the API server: %s", note)
                    return reading.entry
            except Unreachable as error:
                note = f"the API server was unreachable ({error})"
            except ApiError as error:  # 403, bad config: waiting will not change it
                note = f"the API server refused to list PeerRecoveries ({error})"
                self.ledger.record(round_no, None, note, False)
                log.warning("peer-recovery: %s; planning in-band", note)
                return None
            if time.monotonic() >= deadline:
                break
            time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))
        why = f"no operator plan within {timeout:g}s: {note}"
        self.ledger.record(round_no, None, why, reachable)
        log.warning("peer-recovery: %s; planning in-band", why)
        return None
