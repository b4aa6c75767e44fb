"""Parsing of numeric settings that arrive as strings (env vars, torchrun's --rdzv-conf).

Torch-free and kubernetes-free: the rendezvous plugin and the cluster agent both use it.
Errors name the setting and the bad value.
"""

from __future__ import annotations

from collections.abc import Mapping


def nonnegative_seconds(raw: str | float | None, what: str, default: float) -> float:
    """``raw`` as seconds (``default`` when unset or empty); a clear error otherwise."""
    try:
        value = default if raw is None or raw == "" else float(raw)
    except ValueError:
        raise ValueError(f"peer-recovery: {what}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"peer-recovery: {what}={value} must not be negative")
    return value


#: The job's ``peerrecovery.io/pods-per-replica``, which the operator's webhook passes to
#: every pod of an opted-in job (the rendezvous plugin and the training script read it).
ENV_PODS_PER_REPLICA = "PEER_RECOVERY_PODS_PER_REPLICA"


def pods_per_replica(env: Mapping[str, str], default: int = 1) -> int:
    """``$PEER_RECOVERY_PODS_PER_REPLICA`` as an int >= 1 (``default`` when unset); a clear
    error naming the variable otherwise."""
    raw = (env.get(ENV_PODS_PER_REPLICA) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"peer-recovery: {ENV_PODS_PER_REPLICA}={raw!r} is not an integer"
        ) from None
    if value < 1:
        raise ValueError(f"peer-recovery: {ENV_PODS_PER_REPLICA}={value} must be at least 1")
    return value
