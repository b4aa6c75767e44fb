"""The checked phase move of a ``PeerRecovery``, written once for both sides.

:func:`move_phase` reads the object, validates the move against the phase of *that* version
(:func:`peer_recovery.contract.phases.check_transition`, as the given actor, the planner
taken from ``spec.plannedBy``), and writes the status with that version's
``resourceVersion`` as a precondition; a :class:`~peer_recovery.contract.errors.Conflict`
re-reads and re-validates, a bounded number of times. :func:`status_for` builds the status
of a move: the contract's fields plus one condition per phase (the latest), so the status
and conditions look the same whoever wrote them.

The API is reached through :class:`StatusApi`, which both sides' client modules satisfy;
nothing here imports a Kubernetes client. Errors other than Conflict propagate: the caller
owns the retry policy for an unreachable API server.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Final, Protocol

from peer_recovery.contract.bodies import build_status
from peer_recovery.contract.errors import Conflict
from peer_recovery.contract.names import Actor, ConditionReason, Phase
from peer_recovery.contract.phases import check_transition, phase_of

__all__ = ["Move", "MoveResult", "Outcome", "StatusApi", "move_phase", "status_for"]

log = logging.getLogger("peer_recovery.contract.moves")

#: Longest ``status.message`` and condition message written (the CRD caps them too).
MESSAGE_MAX: Final = 1024
_CONFLICT_RETRIES: Final = 5


class StatusApi(Protocol):
    """The two calls a phase move needs."""

    def get_recovery(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def patch_recovery_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str
    ) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Move:
    """One status write: the phase, the condition reason, the message, the figures."""

    phase: Phase
    reason: ConditionReason
    message: str
    step: int | None = None
    bytes: int | None = None
    duration_seconds: float | None = None


class Outcome(str, enum.Enum):
    WRITTEN = "written"
    #: The object is in the move's phase already (a retry after a lost answer).
    ALREADY = "already"
    #: The phase table refuses the move from the phase just read (the other side moved).
    REFUSED = "refused"
    GONE = "gone"
    #: Conflicts every time, up to the bound.
    GAVE_UP = "gave-up"
    #: The object is no longer in the phase the move was decided on: decide again.
    STALE = "stale"


@dataclasses.dataclass(frozen=True)
class MoveResult:
    outcome: Outcome
    #: The version written, or the last one read (None when gone).
    body: dict[str, Any] | None
    why: str = ""


def status_for(current: Mapping[str, Any], move: Move, now: datetime) -> dict[str, Any]:
    """The status to merge-patch onto ``current`` for ``move``: the contract's fields and
    the conditions, one per phase type (the latest replaces an earlier one), each with the
    ``metadata.generation`` of the object it was decided on."""
    attempt = int((current.get("spec") or {}).get("attempt", 1))
    message = move.message[:MESSAGE_MAX]
    status = build_status(
        move.phase,
        attempt=attempt,
        message=message,
        step=move.step,
        bytes_moved=move.bytes,
        duration_seconds=move.duration_seconds,
    )
    conditions = [
        c
        for c in (current.get("status") or {}).get("conditions") or ()
        if c.get("type") != move.phase.value
    ]
    condition: dict[str, Any] = {
        "type": move.phase.value,
        "status": "True",
        "reason": ConditionReason(move.reason).value,
        "message": message,
        "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    generation = (current.get("metadata") or {}).get("generation")
    if isinstance(generation, int) and not isinstance(generation, bool) and generation >= 0:
        condition["observedGeneration"] = generation
    conditions.append(condition)
    status["conditions"] = conditions
    return status


def move_phase(
    api: StatusApi,
    namespace: str,
    name: str,
    move: Move,
    *,
    actor: Actor,
    clock: Callable[[], datetime],
    retries: int = _CONFLICT_RETRIES,
    decided_on: Phase | None = None,
) -> MoveResult:
    """Make ``move`` on PeerRecovery ``name`` if the phase table allows it from the version
    just read (see the module docstring).

    ``decided_on`` is the phase the caller saw when it decided on the move (a cached view):
    when the object just read is in another phase, nothing is written (``STALE``), because
    the decision may not hold any more (a deadline measured in Planned says nothing about an
    attempt that is Streaming now)."""
    current: dict[str, Any] | None = None
    for _ in range(retries):
        current = api.get_recovery(namespace, name)
        if current is None:
            return MoveResult(Outcome.GONE, None, f"PeerRecovery {namespace}/{name} is gone")
        phase = phase_of(current)
        if phase is move.phase:
            return MoveResult(Outcome.ALREADY, current, f"already {phase.value}")
        if decided_on is not None and phase is not decided_on:
            why = f"decided on {decided_on.value}, but it is {phase.value} now"
            log.info("peer-recovery: not moving %s/%s: %s", namespace, name, why)
            return MoveResult(Outcome.STALE, current, why)
        planned_by = (current.get("spec") or {}).get("plannedBy", "operator")
        decision = check_transition(phase, move.phase, actor, planned_by=planned_by)
        if not decision.allowed:
            log.info("peer-recovery: not moving %s/%s: %s", namespace, name, decision.reason)
            return MoveResult(Outcome.REFUSED, current, decision.reason)
        status = status_for(current, move, clock())
        try:
            written = api.patch_recovery_status(
                namespace, name, status, current["metadata"]["resourceVersion"]
            )
        except Conflict:
            continue  # changed under us: re-read and re-validate
        log.info("peer-recovery: %s/%s -> %s: %s", namespace, name, move.phase.value, move.message)
        return MoveResult(Outcome.WRITTEN, written)
    log.warning("peer-recovery: gave up moving %s/%s after %d conflicts", namespace, name, retries)
    return MoveResult(Outcome.GAVE_UP, current, f"{retries} conflicts in a row")
