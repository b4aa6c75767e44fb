"""Parsing of numeric settings that arrive as strings (env vars, torchrun's --rdzv-conf).

Torch-free and kubernetes-free: the rendezvous plugin and the cluster agent both use it.
Errors name the setting and the bad value.
"""

from __future__ import annotations


def nonnegative_seconds(raw: str | float | None, what: str, default: float) -> float:
    """``raw`` as seconds (``default`` when unset or empty); a clear error otherwise."""
    try:
        value = default if raw is None or raw == "" else float(raw)
    except ValueError:
        raise ValueError(f"peer-recovery: {what}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"peer-recovery: {what}={value} must not be negative")
    return value
