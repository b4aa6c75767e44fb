"""Restoring this rank's own snapshot: which slots qualify, the agreed step, the private part.

Helpers of ``PeerRecovery.restore`` for the roles that load their own slot (LOCAL, SEND).

Invariants:
- ``usable_snapshots`` never deletes a snapshot: one of another job, or whose shard key does
  not match the live state, is quarantined (moved aside whole, logged with why, never
  scanned, published or loaded again); a slot older than the durable checkpoint is skipped
  but kept (a later restore with an older checkpoint may use it).
- ``agree_on_step`` agrees on a snapshot *identity*, (step, lineage), not on a step alone:
  two different states of one step (an abandoned timeline and its replacement) are never
  taken for each other. It also hands every rank rank 0's random id for this restore, from
  which a fallback's new lineage is derived (``identity.fallback``).
- ``agree_on_step`` runs the same collectives on every rank whatever failed locally (at most
  two rounds: there are two slots), so a corrupt or missing slot is never a hang.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from peer_recovery.shard_key import ShardKey
from peer_recovery.snapshots.live import LiveState, flat_digest
from peer_recovery.snapshots.manifest import Manifest
from peer_recovery.snapshots.store import SnapshotStore
from peer_recovery.snapshots.tree import Flat
from peer_recovery.vote import all_agree

__all__ = ["LocalAgreement", "agree_on_step", "load_private", "usable_snapshots"]

log = logging.getLogger("peer_recovery.recovery")

_NONCE_BYTES = 16
_LINEAGE_BYTES = 16
_MAX_OFFERS = 4  # two slots; room to spare
_OFFER = struct.Struct(f"<q{_LINEAGE_BYTES}s")


def usable_snapshots(
    store: SnapshotStore,
    rank: int,
    live: tuple[Flat, ShardKey],
    checkpoint_step: int | None,
    job: str | None = None,
) -> tuple[list[tuple[Manifest, Flat]], list[str]]:
    """This rank's snapshots that may be restored, each with the live state to load into.

    ``live`` is the live state (optimizer state created) and its key; the key leaves out
    lazily created optimizer state, so a snapshot taken before the first step, or one in
    which some parameter never had state, matches it too. ``job``: this job's identity
    (``identity.job_identity``); a snapshot of another job is quarantined. Also returns why
    others were passed over.
    """
    manifests, problems = store.scan()
    reasons = list(problems)
    usable: list[tuple[Manifest, Flat]] = []
    for manifest in manifests:
        if job is not None and manifest.job != job:
            reason = (
                f"slot {manifest.slot} (step {manifest.step}) belongs to another job "
                f"({manifest.job!r}, this job is {job!r})"
            )
            store.quarantine_slot(manifest.slot, manifest.step, reason)
            reasons.append(f"{reason} (quarantined)")
            continue
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


@dataclass(frozen=True)
class LocalAgreement:
    """The local restore's agreement: the manifest to load (None: fall back, ``reason``
    says why) and rank 0's random id for this restore (the same on every rank that
    exchanged offers)."""

    manifest: Manifest | None
    nonce: str
    reason: str | None


def _lineage_id(lineage: str) -> bytes:
    return hashlib.blake2b(lineage.encode(), digest_size=_LINEAGE_BYTES).digest()


def _exchange(
    pg: dist.ProcessGroup | None, offers: Sequence[Manifest], nonce: bytes
) -> tuple[tuple[int, bytes] | None, bytes]:
    """The newest (step, lineage id) every rank offers, and rank 0's nonce."""
    mine = {(m.step, _lineage_id(m.lineage)) for m in offers}
    world = 1 if pg is None else dist.get_world_size(pg)
    if world == 1:
        return max(mine, default=None), nonce
    raw = bytearray(_NONCE_BYTES + _MAX_OFFERS * _OFFER.size)
    raw[:_NONCE_BYTES] = nonce
    chosen = sorted(mine, reverse=True)[:_MAX_OFFERS]
    for i in range(_MAX_OFFERS):
        step, lineage = chosen[i] if i < len(chosen) else (-1, bytes(_LINEAGE_BYTES))
        _OFFER.pack_into(raw, _NONCE_BYTES + i * _OFFER.size, step, lineage)
    tensor = torch.frombuffer(raw, dtype=torch.uint8).clone()
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor, group=pg)
    common: set[tuple[int, bytes]] | None = None
    for row in gathered:
        data = row.numpy().tobytes()
        offered = {
            _OFFER.unpack_from(data, _NONCE_BYTES + i * _OFFER.size) for i in range(_MAX_OFFERS)
        }
        offered = {o for o in offered if o[0] >= 0}
        common = offered if common is None else common & offered
    first = gathered[0].numpy().tobytes()[:_NONCE_BYTES]
    return max(common or (), default=None), first


def agree_on_step(
    pg: dist.ProcessGroup | None,
    store: SnapshotStore,
    rank: int,
    manifests: Sequence[Manifest],
    reasons: Sequence[str],
) -> LocalAgreement:
    """The newest snapshot identity (step, lineage) every rank holds, intact on every rank.

    A slot failing its checksum is skipped and the ranks agree again (at most twice:
    there are two slots), so all ranks always take part in the same collectives. Returns
    the manifest to load, or ``None`` and why (``reasons`` from the scan first).
    """
    excluded: set[tuple[int, str]] = set()
    problems = list(reasons)
    nonce = secrets.token_bytes(_NONCE_BYTES)
    for _ in range(2):
        offers = [m for m in manifests if (m.step, m.lineage) not in excluded]
        agreed, nonce = _exchange(pg, offers, nonce)
        if agreed is None:
            break
        manifest = next((m for m in offers if (m.step, _lineage_id(m.lineage)) == agreed), None)
        try:
            problem = None if manifest is None else store.verify(manifest)
        except OSError as error:
            problem = f"slot {manifest.slot if manifest else '?'} unreadable: {error}"
        if problem is not None and manifest is not None:
            excluded.add((manifest.step, manifest.lineage))
            problems.append(problem)
            log.warning("peer-recovery: rank %d: %s; skipping it", rank, problem)
        if all_agree(pg, problem is None):
            return LocalAgreement(manifest, nonce.hex(), None)
    mine = sorted((m.step for m in manifests if (m.step, m.lineage) not in excluded), reverse=True)
    problems.append(
        f"no snapshot (step and lineage) held intact by every rank (this rank holds {mine})"
    )
    return LocalAgreement(None, nonce.hex(), "; ".join(problems))


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
