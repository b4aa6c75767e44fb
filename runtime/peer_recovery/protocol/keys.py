"""Every key of the round's store protocol, and the env vars that point workers at them.

Layout (on the c10d rendezvous store, which outlives workers and rounds)::

    peer-recovery/<run_id>/rounds                   counter; rank 0's agent bumps it per round
    peer-recovery/<run_id>/load-checkpoint          set by a worker whose transfer failed
    peer-recovery/<run_id>/fault-fired              counter: injected faults (drills, tests)
    peer-recovery/<run_id>/round/<n>/agent/<o>      pod o: host, its snapshot holdings
    peer-recovery/<run_id>/round/<n>/plan/<o>       pod o: its plan, or null
    peer-recovery/<run_id>/round/<n>/pod/<o>        pod o: its identity (in a cluster)
    peer-recovery/<run_id>/round/<n>/directive      rank 0's agent: load the checkpoint or not
    peer-recovery/<run_id>/round/<n>/worker/<r>     rank r: shard key of its live state, ...
    peer-recovery/<run_id>/round/<n>/agreement      rank 0 (the leader): the round's agreement
    peer-recovery/<run_id>/round/<n>/outcome/<o>/<l>/agreed   local rank l of pod o: agreement
    peer-recovery/<run_id>/round/<n>/outcome/<o>/<l>/result   ... and its restore's result
    peer-recovery/<run_id>/round/<n>/pg/...         the recovery process group's bootstrap

On c10d's own per-round store, before the ranks are pinned::

    peer-recovery/ordinal/<c10d rank>               an agent's claim of its pod ordinal
    peer-recovery/round-number                      rank 0's round number, for the others

Every round has a fresh prefix, so nothing from an earlier round can be mistaken for this
round's. The agent tells its workers where to look through environment variables (workers
inherit the agent's environment when torchrun starts them).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ENV_NNODES",
    "ENV_ORDINAL",
    "ENV_ROUND",
    "ENV_ROUND_PREFIX",
    "ENV_STORE",
    "ROUND_NUMBER_KEY",
    "agent_key",
    "agreed_key",
    "agreement_key",
    "directive_key",
    "fault_key",
    "identity_key",
    "load_checkpoint_key",
    "ordinal_claim_key",
    "pg_prefix",
    "plan_key",
    "result_key",
    "round_prefix",
    "rounds_key",
    "worker_key",
]

ENV_STORE: Final = "PEER_RECOVERY_STORE"
ENV_ROUND_PREFIX: Final = "PEER_RECOVERY_ROUND_PREFIX"
ENV_ROUND: Final = "PEER_RECOVERY_ROUND"
ENV_NNODES: Final = "PEER_RECOVERY_NNODES"
ENV_ORDINAL: Final = "PEER_RECOVERY_POD_ORDINAL"

ROUND_NUMBER_KEY: Final = "peer-recovery/round-number"


def _job(run_id: str) -> str:
    return f"peer-recovery/{run_id}/"


def rounds_key(run_id: str) -> str:
    return _job(run_id) + "rounds"


def load_checkpoint_key(run_id: str) -> str:
    return _job(run_id) + "load-checkpoint"


def fault_key(run_id: str) -> str:
    return _job(run_id) + "fault-fired"


def round_prefix(run_id: str, round_no: int) -> str:
    return f"{_job(run_id)}round/{round_no}/"


def agent_key(prefix: str, ordinal: int) -> str:
    return f"{prefix}agent/{ordinal}"


def plan_key(prefix: str, ordinal: int) -> str:
    return f"{prefix}plan/{ordinal}"


def identity_key(prefix: str, ordinal: int) -> str:
    return f"{prefix}pod/{ordinal}"


def directive_key(prefix: str) -> str:
    return f"{prefix}directive"


def worker_key(prefix: str, rank: int) -> str:
    return f"{prefix}worker/{rank}"


def agreement_key(prefix: str) -> str:
    return f"{prefix}agreement"


def agreed_key(prefix: str, ordinal: int, local_rank: int) -> str:
    return f"{prefix}outcome/{ordinal}/{local_rank}/agreed"


def result_key(prefix: str, ordinal: int, local_rank: int) -> str:
    return f"{prefix}outcome/{ordinal}/{local_rank}/result"


def pg_prefix(prefix: str) -> str:
    """Where the recovery process group of the round bootstraps."""
    return f"{prefix}pg/"


def ordinal_claim_key(c10d_rank: int) -> str:
    return f"peer-recovery/ordinal/{c10d_rank}"
