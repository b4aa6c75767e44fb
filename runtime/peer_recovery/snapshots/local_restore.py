"""Restoring this rank's own snapshot: which slots qualify, the agreed step, the private part.

Helpers of ``PeerRecovery.restore`` for the roles that load their own slot (LOCAL, SEND).

Invariants:
- ``usable_snapshots`` never deletes a snapshot: one whose shard key does not match the
  live state is quarantined (moved aside whole, logged with why, never scanned, published
  or loaded again); a slot older than the durable checkpoint is skipped but kept (a later
  restore with an older checkpoint may use it).
- ``agree_on_step`` runs the same collectives on every rank whatever failed locally (at most
  two rounds: there are two slots), so a corrupt or missing slot is never a hang.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch.distributed as dist

from peer_recovery.shard_key import ShardKey
from peer_recovery.snapshots.live import LiveState, flat_digest
from peer_recovery.snapshots.manifest import Manifest
from peer_recovery.snapshots.store import SnapshotStore
from peer_recovery.snapshots.tree import Flat
from peer_recovery.vote import all_agree, newest_common_step

__all__ = ["agree_on_step", "load_private", "usable_snapshots"]

log = logging.getLogger("peer_recovery.recovery")


def usable_snapshots(
    store: SnapshotStore,
    rank: int,
    live: tuple[Flat, ShardKey],
    checkpoint_step: int | None,
) -> tuple[list[tuple[Manifest, Flat]], list[str]]:
    """This rank's snapshots that may be restored, each with the live state to load into.

    ``live`` is the live state (optimizer state created) and its key; the key leaves out
    lazily created optimizer state, so a snapshot taken before the first step, or one in
    which some parameter never had state, matches it too. Also returns why others were
    passed over.
    """
    manifests, problems = store.scan()
    reasons = list(problems)
    usable: list[tuple[Manifest, Flat]] = []
    for manifest in manifests:
        if manifest.shard_key == live[1]:
            target = live[0]
        else:
            why = live[1].mismatch(manifest.shard_key)
            reason = f"slot {manifest.slot} (step {manifest.step}) is another shard: {why}"
            store.quarantine_slot(manifest.slot, manifest.step, reason)
            reasons.append(f"{reason} (quarantined)")
            continue
        if checkpoint_step is not None and manifest.step < checkpoint_step:
            reasons.append(
                f"slot {manifest.slot} holds step {manifest.step}, older than the "
                f"checkpoint's step {checkpoint_step}"
            )
            continue
        usable.append((manifest, target))
    for reason in reasons:
        log.warning("peer-recovery: rank %d: %s", rank, reason)
    if not usable and not reasons:
        reasons.append(f"no snapshot in {store.directory}")
    return usable, reasons


def agree_on_step(
    pg: dist.ProcessGroup | None,
    store: SnapshotStore,
    rank: int,
    manifests: Sequence[Manifest],
    reasons: Sequence[str],
) -> tuple[int | None, str | None]:
    """The newest step all ranks hold whose bytes pass their checksum on every rank.

    A slot failing its checksum is skipped and the ranks agree again (at most twice:
    there are two slots), so all ranks always take part in the same collectives. Returns
    the step, or ``None`` and why (``reasons`` from the scan first).
    """
    excluded: set[int] = set()
    problems = list(reasons)
    for _ in range(2):
        step = newest_common_step(pg, [m.step for m in manifests if m.step not in excluded])
        if step is None:
            break
        manifest = next((m for m in manifests if m.step == step), None)
        try:
            problem = None if manifest is None else store.verify(manifest)
        except OSError as error:
            problem = f"slot {manifest.slot if manifest else '?'} unreadable: {error}"
        if problem is not None:
            excluded.add(step)
            problems.append(problem)
            log.warning("peer-recovery: rank %d: %s; skipping it", rank, problem)
        if all_agree(pg, problem is None):
            return step, None
    mine = sorted((m.step for m in manifests if m.step not in excluded), reverse=True)
    problems.append(f"no step held intact by every rank (this rank holds {mine})")
    return None, "; ".join(problems)


def load_private(private: LiveState, store: SnapshotStore, manifest: Manifest, rank: int) -> bool:
    """Rank-private state: loaded when stored and still of the same shape, else skipped."""
    if not private.objects:
        return False
    if manifest.private is None:
        log.info("peer-recovery: rank %d: no rank-private state stored; re-derive it", rank)
        return False
    live = private.flat()
    if flat_digest(live) != manifest.private.digest():
        log.warning(
            "peer-recovery: rank %d: stored rank-private state has another shape; skipped", rank
        )
        return False
    private.load(live, manifest.private, store.tensors(manifest, manifest.private))
    return True
