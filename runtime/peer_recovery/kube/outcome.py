"""What workers tell their agent about this round's restore, through the rendezvous store.

The status reporter runs in the agent (it outlives workers), but only workers know what the
round's agreement decided and whether the restore and its vote succeeded. Each worker
publishes two small JSON records under the round's prefix::

    <prefix>outcome/<pod ordinal>/<local rank>/agreed   the agreement, as this rank sees it
    <prefix>outcome/<pod ordinal>/<local rank>/result   restored or not, step, bytes, seconds

Torch-free and kubernetes-free (workers import it from ``peer_recovery.peer_restore``).
Publishing never raises: reporting must not break a recovery. Reading decodes with
:func:`peer_recovery.rendezvous.exchange.decode` (JSON, size-capped, never pickle) and
validates every field; every wait is bounded and can be cut short by a stop event.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from peer_recovery.rendezvous import exchange

__all__ = [
    "RankAgreed",
    "RankResult",
    "agreed_key",
    "publish_agreed",
    "publish_result",
    "result_key",
    "wait_records",
]

log = logging.getLogger("peer_recovery.kube.outcome")

_POLL_S: Final = 0.2


def agreed_key(prefix: str, ordinal: int, local_rank: int) -> str:
    return f"{prefix}outcome/{ordinal}/{local_rank}/agreed"


def result_key(prefix: str, ordinal: int, local_rank: int) -> str:
    return f"{prefix}outcome/{ordinal}/{local_rank}/result"


@dataclass(frozen=True)
class RankAgreed:
    """One rank's view of the round's agreement (every rank computed the same one)."""

    rank: int
    local_world_size: int
    ok: bool
    step: int | None
    #: "local" or "peer"; None when the round falls back to the checkpoint.
    action: str | None
    source_ordinal: int | None
    planned_by: str | None
    reason: str

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> RankAgreed:
        try:
            return cls(
                rank=_int(raw["rank"]),
                local_world_size=max(1, _int(raw["local_world_size"])),
                ok=bool(raw["ok"]),
                step=_opt_int(raw.get("step")),
                action=_opt_choice(raw.get("action"), ("local", "peer")),
                source_ordinal=_opt_int(raw.get("source_ordinal")),
                planned_by=_opt_choice(raw.get("planned_by"), ("operator", "runtime")),
                reason=str(raw.get("reason") or "")[:2048],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise exchange.ExchangeError(f"{where}: malformed record: {error}") from None


@dataclass(frozen=True)
class RankResult:
    """Whether one rank's restore (and the all-or-nothing vote) succeeded."""

    rank: int
    restored: bool
    step: int | None
    bytes: int
    seconds: float

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> RankResult:
        try:
            seconds = float(raw.get("seconds") or 0.0)
            if not seconds >= 0:
                raise ValueError(f"seconds={seconds!r}")
            return cls(
                rank=_int(raw["rank"]),
                restored=bool(raw["restored"]),
                step=_opt_int(raw.get("step")),
                bytes=_int(raw.get("bytes") or 0),
                seconds=seconds,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise exchange.ExchangeError(f"{where}: malformed record: {error}") from None


# --- the worker's side ----------------------------------------------------------------------


def _where_am_i(env: Mapping[str, str]) -> tuple[int, int, int]:
    """(pod ordinal, local rank, local world size) of this worker, from torchrun's env."""
    return (
        int(env[exchange.ENV_ORDINAL]),
        int(env.get("LOCAL_RANK", "0")),
        int(env.get("LOCAL_WORLD_SIZE", "1")),
    )


def publish_agreed(
    store: Any,
    prefix: str,
    rank: int,
    agreement: Any,
    *,
    per_pod: int,
    reason: str = "",
    env: Mapping[str, str] | None = None,
) -> None:
    """Publish this rank's view of ``agreement`` (an ``agreement.Agreement``, or None when
    none was reached: then ``reason`` says why). Never raises."""
    try:
        ordinal, local_rank, local_world = _where_am_i(os.environ if env is None else env)
        record: dict[str, Any] = {
            "rank": rank,
            "local_world_size": local_world,
            "ok": bool(agreement is not None and agreement.ok),
            "step": None if agreement is None else agreement.step,
            "reason": reason or ("" if agreement is None else agreement.reason),
        }
        role = None if agreement is None else agreement.roles.get(rank)
        if role is not None:
            record["action"] = role.action.value
            if role.source is not None:
                record["source_ordinal"] = role.source // max(1, per_pod)
            if role.planned_by is not None:
                record["planned_by"] = role.planned_by.value
        store.set(agreed_key(prefix, ordinal, local_rank), exchange.encode(record))
    except Exception as error:  # reporting must never break a recovery
        log.warning("peer-recovery: could not publish the agreement for the agent: %s", error)


def publish_result(
    store: Any, prefix: str, rank: int, result: Any, *, env: Mapping[str, str] | None = None
) -> None:
    """Publish whether this rank restored (``result`` is a ``RestoreResult`` or None)."""
    try:
        ordinal, local_rank, _ = _where_am_i(os.environ if env is None else env)
        record = {
            "rank": rank,
            "restored": result is not None,
            "step": None if result is None else result.step,
            "bytes": 0 if result is None else int(result.bytes),
            "seconds": 0.0 if result is None else float(result.seconds),
        }
        store.set(result_key(prefix, ordinal, local_rank), exchange.encode(record))
    except Exception as error:
        log.warning("peer-recovery: could not publish the restore result for the agent: %s", error)


# --- the agent's side -----------------------------------------------------------------------


def wait_records(
    store: Any, keys: list[str], *, timeout: float, stop: threading.Event | None = None
) -> list[dict[str, Any]] | None:
    """Every key's decoded value, or None when ``timeout`` passed or ``stop`` was set first.

    Polls with ``check`` (not a blocking ``wait``) so that a stop is noticed promptly.
    """
    deadline = time.monotonic() + timeout
    while True:
        if store.check(keys):
            return [exchange.decode(v, k) for k, v in zip(keys, store.multi_get(keys), strict=True)]
        if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            return None
        if stop is not None:
            stop.wait(_POLL_S)
        else:
            time.sleep(_POLL_S)


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected an int >= 0, got {value!r}")
    return value


def _opt_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _opt_choice(value: Any, allowed: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if value not in allowed:
        raise ValueError(f"expected one of {allowed}, got {value!r}")
    return str(value)
