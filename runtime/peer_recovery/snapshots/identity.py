"""What identifies a snapshot beyond its step: the job that took it and its lineage.

Pure and torch-free (the torchrun agent publishes identities from manifests).

- **Job**: the rendezvous run id (``TORCHELASTIC_RUN_ID``, torchrun's ``--rdzv-id``) and,
  when the pod knows it, the PyTorchJob's UID (``PEER_RECOVERY_JOB_UID``). A snapshot of
  another job is never loaded, even when its shapes match: a new job of the same
  architecture would otherwise resume the previous job's weights.
- **Lineage**: the timeline the state belongs to. It changes whenever a restore resumes:
  resuming at step ``S`` of lineage ``L`` continues on ``resumed(L, S)``, and a restore that
  falls back to the checkpoint (or starts fresh) continues on a lineage drawn for that
  restore (``fallback``). Every rank computes the same lineage from what all ranks agreed
  on, so snapshots of one timeline match across ranks and two different states at one step
  (an abandoned timeline and its replacement) never do.
- A rank keeps only what is on the timeline it resumed (``on_timeline``); the rest is
  quarantined (``peer_recovery.snapshots.store.SnapshotStore.quarantine_slot``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from peer_recovery.contract import names

__all__ = [
    "ENV_JOB_UID",
    "ENV_RUN_ID",
    "fallback",
    "invalidated",
    "job_identity",
    "on_timeline",
    "resumed",
    "root",
]

ENV_RUN_ID = "TORCHELASTIC_RUN_ID"
#: The PyTorchJob's UID, when the pod is told it (the operator's webhook sets it); optional.
ENV_JOB_UID = names.ENV_JOB_UID
_NO_RUN_ID = "none"


def _digest(*parts: str) -> str:
    """A short, stable id of ``parts`` (16 bytes of BLAKE2b, hex)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        raw = part.encode()
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def job_identity(env: Mapping[str, str]) -> str:
    """``run=<rendezvous run id>`` and ``;uid=<PyTorchJob UID>`` when the pod knows it."""
    run_id = env.get(ENV_RUN_ID) or _NO_RUN_ID
    uid = env.get(ENV_JOB_UID)
    return f"run={run_id}" + (f";uid={uid}" if uid else "")


def root(job: str) -> str:
    """The lineage of snapshots taken before any restore (a script that never restores)."""
    return _digest("root", job)


def resumed(lineage: str, step: int) -> str:
    """The lineage that continues from step ``step`` of ``lineage`` after a restore."""
    return _digest("resumed", lineage, str(step))


def fallback(job: str, nonce: str, checkpoint_step: int | None) -> str:
    """The lineage after a restore that loaded the checkpoint (or started fresh).

    ``nonce`` must be the same on every rank and new for every such restore (rank 0's
    random id, or the round's store prefix under the plugin): two fallbacks to the same
    checkpoint start two different timelines.
    """
    return _digest(
        "fallback", job, nonce, "none" if checkpoint_step is None else str(checkpoint_step)
    )


def on_timeline(lineage: str, step: int, *, resumed_lineage: str, resumed_step: int) -> bool:
    """Is a snapshot ``(lineage, step)`` part of the timeline resumed at ``resumed_step`` of
    ``resumed_lineage``? Only that lineage's steps up to the resumed one are: newer ones of
    it belong to the abandoned continuation, other lineages to other timelines."""
    return lineage == resumed_lineage and step <= resumed_step


def invalidated(lineage: str, after_step: int) -> str:
    """The lineage after a script voided everything newer than ``after_step`` and went back
    (``PeerRecovery.invalidate``): every rank on ``lineage`` gets the same new one."""
    return _digest("invalidated", lineage, str(after_step))
