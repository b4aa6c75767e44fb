"""Writing a PeerRecovery's status as the runtime: validated, preconditioned, idempotent.

Every move is checked against the phase of the version just read
(:func:`peer_recovery.phases.check_transition`, actor ``runtime``, planner from
``spec.plannedBy``) and written with that version's ``resourceVersion``; a 409 re-reads and
re-validates, so an operator re-plan and a runtime report never overwrite each other. A
move to the phase the object already has is skipped, and a refused move (e.g. the object
went terminal meanwhile) ends the sequence with a log line, so applying the same moves
again after a failure is safe. That is what lets :func:`deliver` retry a whole report,
bounded, until an unreachable API server is back.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

from peer_recovery.contract.errors import ApiError, Conflict, Forbidden, Unreachable
from peer_recovery.contract.moves import Move, Outcome, move_phase
from peer_recovery.contract.names import Actor
from peer_recovery.kube.client import RecoveryApi

__all__ = ["apply_moves", "create_or_get", "deliver"]

log = logging.getLogger("peer_recovery.kube.status")

T = TypeVar("T")


def create_or_get(api_: RecoveryApi, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """Create ``body``; when its (deterministic) name exists already, return that object."""
    created = api_.create_recovery(namespace, body)
    if created is not None:
        log.info("peer-recovery: created PeerRecovery %s", body["metadata"]["name"])
        return created
    existing = api_.get_recovery(namespace, body["metadata"]["name"])
    if existing is None:
        raise Conflict(f"PeerRecovery {body['metadata']['name']} exists and vanished")
    return existing


def apply_moves(
    api_: RecoveryApi,
    namespace: str,
    name: str,
    moves: Sequence[Move],
    *,
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> dict[str, Any] | None:
    """Make ``moves`` in order on PeerRecovery ``name``; returns the last version written or
    read, None if the object is gone. Unreachable/ApiError propagate (the caller retries).

    A move the object has made already is skipped (a retry after a lost answer); a refused
    one, or one that kept conflicting, ends the sequence."""
    current: dict[str, Any] | None = None
    for move in moves:
        result = move_phase(api_, namespace, name, move, actor=Actor.RUNTIME, clock=clock)
        current = result.body
        if result.outcome is Outcome.GONE:
            log.warning("peer-recovery: PeerRecovery %s/%s is gone", namespace, name)
            return None
        if result.outcome in (Outcome.REFUSED, Outcome.GAVE_UP):
            return current
    return current


def deliver(
    attempt: Callable[[], T],
    *,
    deadline: float,
    what: str,
    then: str = "gave up at the retry bound (PEER_RECOVERY_STATUS_RETRY_S)",
    level: int = logging.ERROR,
    sleep: Callable[[float], None] = time.sleep,
    uniform: Callable[[], float] = random.random,
) -> T | None:
    """Run ``attempt`` until it succeeds, retrying while the API server is unreachable, with
    backoff, until ``deadline`` (monotonic); a refusal (403) only right after an outage. Logs why it gave up (``then`` says what follows,
    at ``level``); never raises.

    Each wait is drawn between half and all of the current backoff (``uniform`` gives a
    fraction in [0, 1)): after an outage the pods of a job spread their retries instead of
    all hitting the API server in the same instant.
    """
    delay = 0.5
    outage = False
    while True:
        wait = delay * (0.5 + uniform() / 2)
        try:
            return attempt()
        except Forbidden as error:
            if not outage:
                log.error("peer-recovery: could not write %s: %s", what, error)
                return None
            # Just back from an outage, the API server's authorizer may not have loaded RBAC
            # yet: a refusal then is retried like the outage itself.
            if time.monotonic() + wait > deadline:
                log.log(level, "peer-recovery: could not write %s: %s; %s", what, error, then)
                return None
            log.warning("peer-recovery: %s: refused right after an outage (%s); retrying in "
                        "%.1fs", what, error, wait)  # fmt: skip
        except Unreachable as error:
            outage = True
            if time.monotonic() + wait > deadline:
                log.log(level, "peer-recovery: could not write %s, the API server is "
                        "unreachable (%s); %s", what, error, then)  # fmt: skip
                return None
            log.warning("peer-recovery: %s: the API server is unreachable (%s); retrying in "
                        "%.1fs", what, error, wait)  # fmt: skip
        except ApiError as error:
            log.error("peer-recovery: could not write %s: %s", what, error)
            return None
        except Exception as error:  # a bug must not take the agent down
            log.exception("peer-recovery: could not write %s: %s", what, error)
            return None
        sleep(wait)
        delay = min(delay * 2, 5.0)
