"""The phase table of a ``PeerRecovery``: who may move it to which phase, and the checks.

Pure, torch-free and kubernetes-free; both the operator and the runtime validate every
status write with :func:`check_transition` (the one writer of such moves is
:mod:`peer_recovery.contract.moves`).

Invariants of the phase table (:data:`TRANSITIONS`):

- A PeerRecovery only moves forward: Pending -> Planned -> Streaming -> Succeeded | Failed |
  FellBack, with shortcuts to Failed / FellBack. Terminal phases never move.
- An object whose ``status.phase`` is not written yet is Pending (a status subresource
  ignores ``status`` on create, so the creator writes it with a second call).
- A re-plan is a *new object*: the old attempt is closed (moved to Failed, with the reason in
  ``status.message``) and the planner creates ``attempt + 1``, whose deterministic name
  differs because the attempt is part of it. Nothing ever moves back to Pending or Planned,
  so a runtime that is streaming can never have its plan changed under it.
- Every status write carries ``status.observedAttempt == spec.attempt``.

Concurrency is the callers' job, and it is required: every status write is a PATCH or PUT
that carries the ``metadata.resourceVersion`` the writer read (a precondition), and the
writer validates its move against the phase of *that* version with
:func:`check_transition`. On a 409 Conflict the writer re-reads, re-validates and either
retries or stops (a terminal phase means the other side finished first). That is how an
operator re-plan and a runtime report never silently overwrite each other.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from peer_recovery.contract.names import Actor, Phase, PlannedBy, parse_enum

__all__ = [
    "REPLAN_FROM",
    "TRANSITIONS",
    "Decision",
    "Owner",
    "Transition",
    "TransitionError",
    "check_replan",
    "check_transition",
    "parse_phase",
    "phase_of",
    "require_transition",
]


class Owner(str, enum.Enum):
    """Who owns a move in :data:`TRANSITIONS`.

    ``PLANNER`` is whichever side ``spec.plannedBy`` names: the operator for its own plans,
    the runtime for the plans it made in-band because no operator plan arrived.
    """

    OPERATOR = "operator"
    RUNTIME = "runtime"
    PLANNER = "planner"

    def admits(self, actor: Actor, planned_by: PlannedBy) -> bool:
        if self is Owner.PLANNER:
            return actor.value == planned_by.value
        return actor.value == self.value


# --- The phase transition table -------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    """One allowed move: from ``current`` to ``proposed``, made only by one of ``owners``."""

    current: Phase
    proposed: Phase
    owners: frozenset[Owner]
    meaning: str


def _move(current: Phase, proposed: Phase, owners: set[Owner], meaning: str) -> Transition:
    return Transition(current, proposed, frozenset(owners), meaning)


_P, _O = Phase, Owner

#: Every allowed phase move, keyed by (current, proposed). Anything not here is refused.
#: A move to the same phase is a status update that keeps the phase (progress, messages).
TRANSITIONS: Final[Mapping[tuple[Phase, Phase], Transition]] = MappingProxyType(
    {
        (t.current, t.proposed): t
        for t in (
            _move(_P.PENDING, _P.PENDING, {_O.PLANNER}, "the planner updates its message"),
            _move(_P.PENDING, _P.PLANNED, {_O.PLANNER}, "the planner chose a source"),
            _move(
                _P.PENDING,
                _P.FELL_BACK,
                {_O.PLANNER, _O.RUNTIME},
                "no source qualifies, or the job resumed from its checkpoint",
            ),
            _move(_P.PENDING, _P.FAILED, {_O.OPERATOR}, "the deadline passed before planning"),
            _move(_P.PLANNED, _P.STREAMING, {_O.RUNTIME}, "the transfer (or local load) began"),
            _move(
                _P.PLANNED,
                _P.FELL_BACK,
                {_O.PLANNER, _O.RUNTIME},
                "the source was lost with no other, or the job resumed from its checkpoint",
            ),
            _move(
                _P.PLANNED,
                _P.FAILED,
                {_O.OPERATOR, _O.RUNTIME},
                "the deadline passed or the plan was superseded (operator); "
                "the runtime refused the plan in-band (runtime)",
            ),
            _move(_P.STREAMING, _P.STREAMING, {_O.RUNTIME}, "the runtime reports progress"),
            _move(_P.STREAMING, _P.SUCCEEDED, {_O.RUNTIME}, "every rank voted success"),
            _move(
                _P.STREAMING,
                _P.FAILED,
                {_O.RUNTIME, _O.OPERATOR},
                "the transfer failed (runtime) or its deadline passed with no report (operator)",
            ),
            _move(
                _P.STREAMING,
                _P.FELL_BACK,
                {_O.RUNTIME},
                "some rank could not resume from peers; the job loads its checkpoint",
            ),
        )
    }
)

#: Phases after which the planner may create the next attempt (a new object, attempt + 1).
#: Only Failed: Succeeded needs nothing more, and FellBack means the job already resumed
#: from its checkpoint.
REPLAN_FROM: Final = frozenset({Phase.FAILED})


class TransitionError(ValueError):
    """A refused phase move; the message says why and what is allowed instead."""


@dataclass(frozen=True)
class Decision:
    """The answer of a pure check: whether it is allowed, and why, in words for a human."""

    allowed: bool
    reason: str


def parse_phase(value: Phase | str | None) -> Phase:
    """``status.phase`` as a :class:`Phase`; absent or empty means Pending (status not yet
    written). Raises ``ValueError`` naming the value and the known phases otherwise."""
    if value is None or value == "":
        return Phase.PENDING
    return parse_enum(Phase, value, "status.phase")


def phase_of(body: Mapping[str, Any]) -> Phase:
    """The phase of a PeerRecovery body (a dict as the API server returns it)."""
    status = body.get("status") or {}
    if not isinstance(status, Mapping):
        raise ValueError(f"status of a PeerRecovery must be an object, got {status!r}")
    return parse_phase(status.get("phase"))


def check_transition(
    current: Phase | str | None,
    proposed: Phase | str,
    actor: Actor | str,
    *,
    planned_by: PlannedBy | str,
) -> Decision:
    """May ``actor`` move a recovery planned by ``planned_by`` from ``current`` to ``proposed``?

    Pure. Unknown phase, actor or planner names raise ``ValueError``; a well-formed but
    refused move returns ``Decision(False, reason)``.
    """
    now = parse_phase(current)
    to = parse_enum(Phase, proposed, "proposed phase")
    who = parse_enum(Actor, actor, "actor")
    planner = parse_enum(PlannedBy, planned_by, "spec.plannedBy")
    if now.terminal:
        return Decision(
            False,
            f"{now.value} is terminal: a finished PeerRecovery never changes phase"
            + (" (re-plan as a new object with attempt + 1)" if now in REPLAN_FROM else ""),
        )
    rule = TRANSITIONS.get((now, to))
    if rule is None:
        allowed = ", ".join(p.value for (c, p) in TRANSITIONS if c is now)
        return Decision(
            False,
            f"{now.value} -> {to.value} is not a PeerRecovery move (from {now.value}: {allowed})",
        )
    if not any(owner.admits(who, planner) for owner in rule.owners):
        owners = " or ".join(sorted(_owner_words(o, planner) for o in rule.owners))
        return Decision(
            False,
            f"{now.value} -> {to.value} belongs to {owners}, not the {who.value}",
        )
    return Decision(True, f"the {who.value} moves {now.value} -> {to.value}: {rule.meaning}")


def require_transition(
    current: Phase | str | None,
    proposed: Phase | str,
    actor: Actor | str,
    *,
    planned_by: PlannedBy | str,
) -> Transition:
    """Like :func:`check_transition`, but returns the rule or raises :class:`TransitionError`."""
    decision = check_transition(current, proposed, actor, planned_by=planned_by)
    if not decision.allowed:
        raise TransitionError(decision.reason)
    return TRANSITIONS[(parse_phase(current), parse_enum(Phase, proposed, "proposed phase"))]


def check_replan(current: Phase | str | None) -> Decision:
    """May the planner create the next attempt of a recovery whose latest attempt is here?

    A live attempt must first be closed (Planned/Streaming -> Failed by the operator, with the
    reason), so two attempts never run at once.
    """
    now = parse_phase(current)
    if now in REPLAN_FROM:
        return Decision(True, f"attempt ended {now.value}: the next attempt is a new object")
    if now.terminal:
        return Decision(False, f"attempt ended {now.value}: nothing left to re-plan")
    return Decision(
        False, f"attempt is still {now.value}: move it to Failed before planning the next"
    )


def _owner_words(owner: Owner, planned_by: PlannedBy) -> str:
    if owner is Owner.PLANNER:
        return f"the planner (spec.plannedBy={planned_by.value})"
    return f"the {owner.value}"
