"""The contract shared by the operator and the runtime.

Names of the ``PeerRecovery`` custom resource, the annotation and label keys both sides
read, the enumerations (phases, modes, reasons) that appear in its fields, the phase
transition table that says who may move a recovery to which phase, and the helpers that
build a ``PeerRecovery`` body with its deterministic name. Everything here is pure and
torch-free and kubernetes-free, so the operator, the runtime and torchrun's plugin loading
can import it cheaply. These names are a fixed contract (see DESIGN.md): tests and users
depend on them, so change them only with a new API version.

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

__all__ = [
    "ANNOTATION_ENABLED",
    "ANNOTATION_ENABLED_VALUE",
    "ANNOTATION_PODS_PER_REPLICA",
    "API_VERSION",
    "GROUP",
    "KIND",
    "LABEL_JOB_NAME",
    "LABEL_JOB_ROLE",
    "LABEL_OPERATOR_NAME",
    "LABEL_RECOVERY_JOB",
    "LABEL_RECOVERY_TARGET_UID",
    "LABEL_REPLICA_INDEX",
    "LABEL_REPLICA_TYPE",
    "MAX_ATTEMPT",
    "PLURAL",
    "PYTORCHJOB_GROUP",
    "PYTORCHJOB_KIND",
    "PYTORCHJOB_PLURAL",
    "PYTORCHJOB_VERSION",
    "REPLAN_FROM",
    "SHORT_NAME",
    "SINGULAR",
    "TRANSITIONS",
    "VERSION",
    "Actor",
    "Decision",
    "Mode",
    "Owner",
    "Phase",
    "PlannedBy",
    "Reason",
    "Transition",
    "TransitionError",
    "check_replan",
    "check_transition",
    "parse_enum",
    "parse_phase",
    "phase_of",
    "require_transition",
]

# --- The PeerRecovery custom resource ------------------------------------------------------

GROUP: Final = "peerrecovery.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "PeerRecovery"
PLURAL: Final = "peerrecoveries"
SINGULAR: Final = "peerrecovery"
SHORT_NAME: Final = "precov"

# --- The Kubeflow PyTorchJob it serves ------------------------------------------------------

PYTORCHJOB_GROUP: Final = "kubeflow.org"
PYTORCHJOB_VERSION: Final = "v1"
PYTORCHJOB_KIND: Final = "PyTorchJob"
PYTORCHJOB_PLURAL: Final = "pytorchjobs"

# --- Annotations on the PyTorchJob ----------------------------------------------------------

#: Opt-in switch. Only jobs whose annotation has exactly ANNOTATION_ENABLED_VALUE are watched.
ANNOTATION_ENABLED: Final = "peer-recovery"
ANNOTATION_ENABLED_VALUE: Final = "enabled"
#: How many consecutive pods make up one full replica of the state (default: every pod does).
ANNOTATION_PODS_PER_REPLICA: Final = "peerrecovery.io/pods-per-replica"

# --- Labels the training-operator puts on every pod of a job --------------------------------

LABEL_JOB_NAME: Final = "training.kubeflow.org/job-name"
LABEL_REPLICA_TYPE: Final = "training.kubeflow.org/replica-type"
LABEL_REPLICA_INDEX: Final = "training.kubeflow.org/replica-index"
LABEL_OPERATOR_NAME: Final = "training.kubeflow.org/operator-name"
LABEL_JOB_ROLE: Final = "training.kubeflow.org/job-role"

# --- Labels peer-recovery puts on every PeerRecovery ----------------------------------------

#: The PyTorchJob the recovery belongs to, so "this job's recoveries" is a label selector.
LABEL_RECOVERY_JOB: Final = "peerrecovery.io/job-name"
#: The target pod's UID, so "is this replacement already being recovered" is a selector too.
LABEL_RECOVERY_TARGET_UID: Final = "peerrecovery.io/target-uid"


class Phase(str, enum.Enum):
    """``status.phase`` of a PeerRecovery: Pending -> Planned -> Streaming -> a terminal one."""

    PENDING = "Pending"
    PLANNED = "Planned"
    STREAMING = "Streaming"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    FELL_BACK = "FellBack"

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED, Phase.FELL_BACK)


class Mode(str, enum.Enum):
    """``spec.mode``: stream from a peer, or load the pod's own surviving snapshot."""

    PEER = "Peer"
    LOCAL = "Local"


class Reason(str, enum.Enum):
    """``spec.reason``: what the operator saw happen to the target pod."""

    POD_REPLACED = "PodReplaced"
    CONTAINER_RESTARTED = "ContainerRestarted"


class PlannedBy(str, enum.Enum):
    """``spec.plannedBy``: who chose the source."""

    OPERATOR = "operator"
    RUNTIME = "runtime"


class Actor(str, enum.Enum):
    """Who proposes a phase move: the operator or the in-pod runtime."""

    OPERATOR = "operator"
    RUNTIME = "runtime"


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

#: The largest ``spec.attempt`` (the CRD's int32 bound).
MAX_ATTEMPT: Final = 2**31 - 1


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


def parse_enum(kind: type[enum.Enum], value: object, what: str) -> Any:
    """``value`` as a member of the contract enum ``kind``; the error names ``what`` was
    wrong and the values allowed."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        known = ", ".join(repr(m.value) for m in kind)
        raise ValueError(f"unknown {what} {value!r}; expected one of {known}") from None
