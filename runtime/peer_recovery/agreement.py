"""In-band agreement: from what every pod published, the resume step and every rank's role.

Pure, torch-free, no I/O, deterministic: computed from the round's published inputs, the
same inputs always give the same answer. The round's leader computes it once and publishes
it (:mod:`peer_recovery.exchange`).

Inputs: per pod, the snapshots it holds (rank, step, shard key, bytes) and its plan, if one
came; per rank, the shard key of its live (freshly built) state and the step of the last
durable checkpoint the script names (its ``WorkerRecord``); the round's directive from rank
0's agent. Ranks map to pods through :class:`peer_recovery.protocol.layout.Layout`.

Rules:

1. A directive to load the checkpoint (a transfer failed last round) wins: fall back.
2. Only snapshots of this job count (``job``: the holding's job identity must equal it).
   Candidates are snapshot identities, (step, lineage), never older than the newest
   ``checkpoint_step`` any rank names; tried newest step first (lineages in a fixed order),
   so two different states of one step (an abandoned timeline and its replacement) are
   never mixed.
3. At a candidate, a rank restores locally when it holds a snapshot of that step and
   lineage whose shard key equals its live shard key. Otherwise it receives from a
   *holder*: another rank that restores locally a snapshot of that step and lineage with
   exactly its shard key (and then sends its restored state). Keys are compared here,
   before any byte moves; a mismatch is never restored. All holders of one shard key at a
   candidate must publish the same content checksum; if they do not, none of them is used
   for it (no rank of that key is local or a holder there).
4. The candidate is the newest at which every rank is local or has a holder.
5. Sources: the pod's plan when it names a pod whose rank at the same local position is a
   holder (``plannedBy`` as the plan says); otherwise the planner
   (:func:`peer_recovery.contract.planning.assign_sources`) runs in-band on the pods' records
   (``plannedBy: runtime``); a planned source that does not hold the key is replaced by the
   least-loaded holder, lowest rank first. That source is the receiver's *primary* one: the
   one the operator's records and the agent's report name.
6. Striping: every other holder of the receiver's shard key at the candidate (same step
   and lineage, and by rule 3 the same content checksum) may serve part of its slot too,
   up to :data:`MAX_SOURCES` sources in all (the primary included). Extra sources are
   chosen one receiver at a time, lowest rank first, preferring a holder on a pod this
   receiver does not use yet, then the pod serving the fewest receivers so far, then the
   holder serving the fewest, then the lowest rank: when many ranks are replaced, one
   holder is not asked by every receiver. A holder's ``send_to`` names every receiver it
   serves, as primary or extra.
7. No step qualifies: every rank falls back to the checkpoint, with the reason.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from peer_recovery.contract.names import Mode, PlannedBy
from peer_recovery.contract.planning import PodRecord, assign_sources
from peer_recovery.protocol.layout import Layout
from peer_recovery.protocol.records import Holding, PlanEntry, WorkerRecord

__all__ = ["MAX_SOURCES", "Action", "Agreement", "PodReport", "Role", "agree"]

#: The most holders one receiver fetches its slot from at once, its primary source
#: included (rule 6). Each holder serves chunks from the one work queue of
#: ``snapshots.stripes``, so more sources add bandwidth until the receiver's own link is
#: full; four keeps the receiver's threads and connections few while one lost holder still
#: leaves three.
MAX_SOURCES: Final = 4


@dataclass(frozen=True)
class PodReport:
    """What one pod's agent published this round."""

    ordinal: int
    holdings: tuple[Holding, ...] = ()
    plan: PlanEntry | None = None
    host: str | None = None


class Action(str, enum.Enum):
    LOCAL = "local"
    PEER = "peer"


@dataclass(frozen=True)
class Role:
    """What one rank does: restore locally, or receive from ``source`` (its primary source)
    striped with ``also_from`` (the other holders serving part of its slot); then send to
    ``send_to`` (every receiver it serves, as primary or extra source)."""

    rank: int
    action: Action
    source: int | None = None
    send_to: tuple[int, ...] = ()
    planned_by: PlannedBy | None = None
    also_from: tuple[int, ...] = ()

    @property
    def sources(self) -> tuple[int, ...]:
        """Every rank this one receives from, the primary first (empty unless PEER)."""
        return () if self.source is None else (self.source, *self.also_from)


@dataclass(frozen=True)
class Agreement:
    """The round's decision. ``step`` is None when every rank must load the checkpoint;
    ``lineage`` is the resumed snapshots' lineage."""

    step: int | None
    roles: Mapping[int, Role] = field(default_factory=dict)
    reason: str = ""
    lineage: str | None = None

    @property
    def ok(self) -> bool:
        return self.step is not None

    @property
    def movers(self) -> tuple[int, ...]:
        """Ranks that send or receive (the members of the recovery process group)."""
        return tuple(
            sorted(
                r for r, role in self.roles.items() if role.action is Action.PEER or role.send_to
            )
        )


def _fallback(reason: str) -> Agreement:
    return Agreement(step=None, roles={}, reason=reason)


def agree(
    *,
    nnodes: int,
    world_size: int,
    pods: Sequence[PodReport],
    ranks: Sequence[WorkerRecord],
    load_checkpoint: str | None = None,
    pods_per_replica: int | None = None,
    job: str | None = None,
) -> Agreement:
    """Decide the round (module docstring, rules 1-7). Raises ValueError on malformed input.

    ``job``: this job's identity; None accepts every holding (for callers that check it
    themselves)."""
    if nnodes < 1 or world_size < nnodes or world_size % nnodes:
        raise ValueError(f"world size {world_size} is not a multiple of {nnodes} nodes")
    layout = Layout(nnodes, world_size)
    if load_checkpoint:
        return _fallback(f"loading the checkpoint: {load_checkpoint}")
    live = {r.rank: r for r in ranks}
    if sorted(live) != list(range(world_size)):
        missing = sorted(set(range(world_size)) - set(live))
        raise ValueError(f"no report from ranks {missing}")
    by_pod = {p.ordinal: p for p in pods}
    if sorted(by_pod) != list(range(nnodes)):
        missing = sorted(set(range(nnodes)) - set(by_pod))
        raise ValueError(f"no report from pods {missing}")
    floors = [r.checkpoint_step for r in ranks if r.checkpoint_step is not None]
    floor = max(floors) if floors else None
    # A pod's snapshots count only for its own ranks (pinned: see Layout).
    holdings = [h for p in pods for h in p.holdings if layout.pod_of(h.rank) == p.ordinal]
    foreign = [h for h in holdings if job is not None and h.job != job]
    holdings = [h for h in holdings if h not in foreign]
    candidates = sorted(
        {(h.step, h.lineage) for h in holdings if floor is None or h.step >= floor},
        key=lambda c: (-c[0], c[1]),
    )
    if not candidates:
        newer = f" at or after checkpoint step {floor}" if floor is not None else ""
        other = f" ({len(foreign)} snapshot(s) of other jobs ignored)" if foreign else ""
        return _fallback(f"no pod holds a snapshot{newer}{other}; every rank loads the checkpoint")
    first_failure = ""
    for step, lineage in candidates:
        holders, disputed = _holders(h for h in holdings if (h.step, h.lineage) == (step, lineage))
        local = {r for r in live if r in holders.get(live[r].shard_key, ())}
        orphans = [
            r for r in sorted(live) if r not in local and not _peers(r, live, holders, local)
        ]
        if orphans:
            reason = _orphan_reason(step, orphans, live, holders, floor)
            if disputed:
                reason += f" (holders of shard key(s) {disputed[:3]} disagree on its checksum)"
            first_failure = first_failure or reason
            continue
        agreement = _assign(step, live, local, holders, by_pod, layout, pods_per_replica)
        return dataclasses.replace(agreement, lineage=lineage)
    return _fallback(f"{first_failure}; every rank loads the checkpoint")


def _holders(holdings: Iterable[Holding]) -> tuple[dict[str, list[int]], list[str]]:
    """Ranks holding each shard key at one candidate; keys whose holders publish different
    checksums are left out (second value): no copy of a disputed shard is used."""
    by_key: dict[str, list[Holding]] = {}
    for h in holdings:
        by_key.setdefault(h.shard_key, []).append(h)
    holders, disputed = {}, []
    for key, found in by_key.items():
        if len({h.checksum for h in found}) > 1:
            disputed.append(key)
        else:
            holders[key] = [h.rank for h in found]
    return holders, sorted(disputed)


def _peers(
    rank: int, live: Mapping[int, WorkerRecord], holders: Mapping[str, list[int]], local: set[int]
) -> list[int]:
    """Ranks that can send ``rank`` its state: they hold its key and restore it locally."""
    return sorted(h for h in holders.get(live[rank].shard_key, ()) if h != rank and h in local)


def _orphan_reason(
    step: int,
    orphans: list[int],
    live: Mapping[int, WorkerRecord],
    holders: Mapping[str, list[int]],
    floor: int | None,
) -> str:
    rank = orphans[0]
    others = sorted({k for k in holders if k != live[rank].shard_key})
    mismatch = f" (snapshots of step {step} carry other shard keys: {others[:3]})" if others else ""
    floor_text = f" (not older than checkpoint step {floor})" if floor is not None else ""
    return (
        f"no snapshot of step {step}{floor_text} holds shard key {live[rank].shard_key!r} of "
        f"rank(s) {orphans}: every holder of that shard is lost{mismatch}"
    )


def _assign(
    step: int,
    live: Mapping[int, WorkerRecord],
    local: set[int],
    holders: Mapping[str, list[int]],
    by_pod: Mapping[int, PodReport],
    layout: Layout,
    pods_per_replica: int | None,
) -> Agreement:
    receivers = sorted(set(live) - local)
    sources: dict[int, int] = {}
    planned_by: dict[int, PlannedBy] = {}
    load: Counter[int] = Counter()

    def holds(candidate: int, rank: int) -> bool:
        return candidate in _peers(rank, live, holders, local)

    # Rule 5, first: plans that came from the plan source.
    unplanned: list[int] = []
    for rank in receivers:
        plan = by_pod[layout.pod_of(rank)].plan
        if plan is not None and plan.mode is Mode.PEER and plan.source is not None:
            candidate = layout.same_position(plan.source, rank)
            if holds(candidate, rank):
                sources[rank], planned_by[rank] = candidate, plan.planned_by
                load[candidate] += 1
                continue
        unplanned.append(rank)
    # Then the planner, in-band, on pod records derived from this step's holdings.
    if unplanned:
        targets = sorted({layout.pod_of(r) for r in unplanned})
        records = [
            PodRecord(
                ordinal=o,
                ready=all(r in local for r in layout.ranks_of(o)),
                rejoining=o in targets,
                node=by_pod[o].host,
                name=f"pod {o}",
            )
            for o in sorted(by_pod)
        ]
        busy = [layout.pod_of(s) for s in sources.values()]
        try:
            chosen = {
                a.target: a.source
                for a in assign_sources(
                    targets, records, pods_per_replica=pods_per_replica, busy_sources=busy
                )
            }
        except ValueError:
            chosen = {}
        for rank in unplanned:
            pod_source = chosen.get(layout.pod_of(rank))
            candidate = None if pod_source is None else layout.same_position(pod_source, rank)
            if candidate is None or not holds(candidate, rank):
                candidate = min(_peers(rank, live, holders, local), key=lambda h: (load[h], h))
            sources[rank], planned_by[rank] = candidate, PlannedBy.RUNTIME
            load[candidate] += 1
    extras = _stripe(sources, {r: _peers(r, live, holders, local) for r in receivers}, layout)
    send_to: dict[int, list[int]] = {}
    for rank, source in sources.items():
        for sender in (source, *extras[rank]):
            send_to.setdefault(sender, []).append(rank)
    roles = {
        r: Role(
            rank=r,
            action=Action.LOCAL if r in local else Action.PEER,
            source=sources.get(r),
            send_to=tuple(sorted(send_to.get(r, ()))),
            planned_by=planned_by.get(r),
            also_from=extras.get(r, ()),
        )
        for r in sorted(live)
    }
    moves = ", ".join(
        f"{s}->{r} ({planned_by[r].value})"
        + (f" [also {' '.join(map(str, extras[r]))}]" if extras[r] else "")
        for r, s in sorted(sources.items())
    )
    reason = f"resume at step {step}: {len(local)} rank(s) restore locally" + (
        f"; peer transfers {moves}" if moves else ""
    )
    return Agreement(step=step, roles=roles, reason=reason)


def _stripe(
    primary: Mapping[int, int], peers: Mapping[int, list[int]], layout: Layout
) -> dict[int, tuple[int, ...]]:
    """Rule 6: each receiver's extra sources, chosen among its other holders (``peers``),
    receivers in rank order; the load counts every receiver a holder (and its pod) serves,
    primaries included."""
    load: Counter[int] = Counter(primary.values())
    pod_load: Counter[int] = Counter(layout.pod_of(s) for s in primary.values())
    chosen: dict[int, tuple[int, ...]] = {}
    for rank in sorted(primary):
        picked: list[int] = []
        used = {layout.pod_of(primary[rank])}
        others = [h for h in peers[rank] if h != primary[rank]]
        while others and len(picked) < MAX_SOURCES - 1:
            best = min(
                others,
                key=lambda h: (layout.pod_of(h) in used, pod_load[layout.pod_of(h)], load[h], h),
            )
            others.remove(best)
            picked.append(best)
            used.add(layout.pod_of(best))
            load[best] += 1
            pod_load[layout.pod_of(best)] += 1
        chosen[rank] = tuple(sorted(picked))
    return chosen
