"""Encoding of the protocol's values, and the bounded waits that read them.

Values are JSON objects, size-capped both ways (:data:`MAX_VALUE_BYTES`), decoded into plain
dicts that the record parsers in ``records`` check field by field; never pickle. Every wait
is bounded; :func:`wait_records` can also be cut short by a stop event.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import Any, Final, Protocol

__all__ = [
    "MAX_VALUE_BYTES",
    "ExchangeError",
    "Record",
    "decode",
    "encode",
    "publish",
    "read_all",
    "wait_records",
]

#: Largest JSON value accepted from the store (manifests of one pod fit easily).
MAX_VALUE_BYTES: Final = 4 * 1024 * 1024
_POLL_S: Final = 0.2


class ExchangeError(RuntimeError):
    """A value in the rendezvous store was missing in time, oversized or malformed."""


class Record(Protocol):
    def to_json(self) -> dict[str, Any]: ...


def encode(value: dict[str, Any]) -> bytes:
    data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    if len(data) > MAX_VALUE_BYTES:
        raise ExchangeError(f"value of {len(data)} bytes exceeds the {MAX_VALUE_BYTES} cap")
    return data


def decode(data: bytes, what: str) -> dict[str, Any]:
    """Decode one published value; ``what`` names it in errors."""
    if len(data) > MAX_VALUE_BYTES:
        raise ExchangeError(f"{what}: {len(data)} bytes exceeds the {MAX_VALUE_BYTES} cap")
    try:
        value = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExchangeError(f"{what}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ExchangeError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def publish(store: Any, key: str, record: Record) -> None:
    """Set ``key`` to ``record``'s JSON."""
    store.set(key, encode(record.to_json()))


def read_all(store: Any, keys: list[str], timeout: float, what: str) -> list[dict[str, Any]]:
    """Wait (at most ``timeout`` seconds) for every key, then decode them all (one batch)."""
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except Exception as exc:  # c10d raises DistStoreError/RuntimeError on timeout
        missing = [k for k in keys if not store.check([k])]
        raise ExchangeError(
            f"{what}: {len(missing)} of {len(keys)} entries missing after {timeout:.0f}s "
            f"(first: {missing[:3]}): {exc}"
        ) from None
    return [decode(v, f"{what} {k}") for k, v in zip(keys, store.multi_get(keys), strict=True)]


def wait_records(
    store: Any, keys: list[str], *, timeout: float, stop: threading.Event | None = None
) -> list[dict[str, Any]] | None:
    """Every key's decoded value, or None when ``timeout`` passed or ``stop`` was set first.

    Polls with ``check`` (not a blocking ``wait``) so that a stop is noticed promptly.
    """
    deadline = time.monotonic() + timeout
    while True:
        if store.check(keys):
            return [decode(v, k) for k, v in zip(keys, store.multi_get(keys), strict=True)]
        if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            return None
        if stop is not None:
            stop.wait(_POLL_S)
        else:
            time.sleep(_POLL_S)
