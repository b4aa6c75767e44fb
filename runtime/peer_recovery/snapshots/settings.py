"""Configuration names of the snapshot runtime, and the one rule for resolving them.

Every setting is resolved as **argument, then environment variable, then default**: an
explicit argument to ``PeerRecovery`` / ``PeerRecovery.from_env`` wins, an environment
variable (set on the pod, e.g. by the Helm chart or the PyTorchJob spec) comes next, and
the default below applies otherwise. This is the only place that rule is implemented.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = [
    "DEFAULT_ROOT",
    "ENV_ASYNC",
    "ENV_DIR",
    "ENV_VOTE_TIMEOUT",
    "resolve",
]

T = TypeVar("T")

#: Directory under which each pod keeps its snapshots (a memory-backed emptyDir in a pod).
ENV_DIR = "PEER_RECOVERY_SNAPSHOT_DIR"
DEFAULT_ROOT = "/dev/shm/peer-recovery"
#: "1"/"true" to copy on the training thread and finish the snapshot in the background.
ENV_ASYNC = "PEER_RECOVERY_SNAPSHOT_ASYNC"
#: Seconds the agreement and the vote may wait for the slowest rank.
ENV_VOTE_TIMEOUT = "PEER_RECOVERY_VOTE_TIMEOUT_S"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}, got {raw!r}")


def resolve(
    argument: T | None,
    env_name: str,
    default: T,
    parse: Callable[[str], T],
    environ: Mapping[str, str] | None = None,
) -> T:
    """Argument if given, else the parsed environment variable if set, else ``default``."""
    if argument is not None:
        return argument
    raw = (os.environ if environ is None else environ).get(env_name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError as error:
        raise ValueError(f"environment variable {env_name}={raw!r} is invalid: {error}") from None
