"""What the plugin and the workers publish to each other through the rendezvous store.

Layout (on the c10d rendezvous store, which outlives workers and rounds)::

    peer-recovery/<run_id>/rounds                 counter; rank 0 bumps it once per round
    peer-recovery/<run_id>/load-checkpoint        set by a worker whose transfer failed
    peer-recovery/<run_id>/round/<n>/agent/<o>    pod o: host, its snapshot manifests
    peer-recovery/<run_id>/round/<n>/plan/<o>     pod o: its plan, or null
    peer-recovery/<run_id>/round/<n>/directive    rank 0 agent: load the checkpoint or not
    peer-recovery/<run_id>/round/<n>/worker/<r>   rank r: shard key of its live state, ...
    peer-recovery/<run_id>/round/<n>/pg/...       the recovery process group's bootstrap
    peer-recovery/<run_id>/round/<n>/vote/...     the all-or-nothing vote

Every round has a fresh prefix, so nothing from an earlier round can be mistaken for this
round's. Values are JSON (never pickle), size-capped, decoded into plain dicts and checked
by their consumers. Every wait is bounded.

The agent tells its workers where to look through environment variables (workers inherit
the agent's environment when torchrun starts them): ``ENV_STORE``, ``ENV_ROUND_PREFIX``,
``ENV_ROUND``, ``ENV_NNODES``, ``ENV_ORDINAL``.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, Final

__all__ = [
    "ENV_NNODES",
    "ENV_ORDINAL",
    "ENV_ROUND",
    "ENV_ROUND_PREFIX",
    "ENV_STORE",
    "MAX_VALUE_BYTES",
    "ExchangeError",
    "agent_key",
    "decode",
    "encode",
    "load_checkpoint_key",
    "read_all",
    "round_prefix",
    "rounds_key",
    "worker_key",
]

ENV_STORE: Final = "PEER_RECOVERY_STORE"
ENV_ROUND_PREFIX: Final = "PEER_RECOVERY_ROUND_PREFIX"
ENV_ROUND: Final = "PEER_RECOVERY_ROUND"
ENV_NNODES: Final = "PEER_RECOVERY_NNODES"
ENV_ORDINAL: Final = "PEER_RECOVERY_POD_ORDINAL"

#: Largest JSON value accepted from the store (manifests of one pod fit easily).
MAX_VALUE_BYTES: Final = 4 * 1024 * 1024


class ExchangeError(RuntimeError):
    """A value in the rendezvous store was missing in time, oversized or malformed."""


def _job(run_id: str) -> str:
    return f"peer-recovery/{run_id}/"


def rounds_key(run_id: str) -> str:
    return _job(run_id) + "rounds"


def load_checkpoint_key(run_id: str) -> str:
    return _job(run_id) + "load-checkpoint"


def round_prefix(run_id: str, round_no: int) -> str:
    return f"{_job(run_id)}round/{round_no}/"


def agent_key(prefix: str, ordinal: int) -> str:
    return f"{prefix}agent/{ordinal}"


def worker_key(prefix: str, rank: int) -> str:
    return f"{prefix}worker/{rank}"


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


def read_all(store: Any, keys: list[str], timeout: float, what: str) -> list[dict[str, Any]]:
    """Wait (at most ``timeout`` seconds) for every key, then decode them all."""
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except Exception as exc:  # c10d raises DistStoreError/RuntimeError on timeout
        missing = [k for k in keys if not store.check([k])]
        raise ExchangeError(
            f"{what}: {len(missing)} of {len(keys)} entries missing after {timeout:.0f}s "
            f"(first: {missing[:3]}): {exc}"
        ) from None
    return [decode(v, f"{what} {k}") for k, v in zip(keys, store.multi_get(keys), strict=True)]
