"""The planner: which healthy pod streams its state to which rejoining pod.

Pure, torch-free, no I/O, deterministic. The operator and the runtime's in-band fallback
call the same :func:`assign_sources`, so they can never disagree about who streams to whom.
Its inputs are plain records that assume neither Kubernetes nor torch:

- the operator builds a :class:`PodRecord` per pod from the API (Ready condition,
  ``deletionTimestamp``, its node's Ready condition and ``spec.unschedulable``, the
  ``topology.kubernetes.io/zone`` label) and marks the pods it is recovering ``rejoining``;
- the runtime builds one per agent from the snapshot manifests exchanged in the rendezvous
  store: ``ready`` means "holds a valid snapshot of its shard at the agreed step", ``node``
  is the host, and node health is left at its default (an agent that answered is up).

Rules (``docs/design.md``, "Flow", step 3), in the order they apply:

1. A source holds the same shards as its target: ordinals equal modulo ``pods_per_replica``
   (absent: every pod is a full replica, so any pod qualifies).
2. Never the target, nor any other target of the same plan, nor a pod that is terminating,
   rejoining, not Ready, or on a node that is not Ready or is cordoned.
3. Spread first: among qualifying sources, the one serving the fewest recoveries (those in
   flight, ``busy_sources``, plus those this plan already gave it) wins, so no source serves
   more targets than necessary while another qualifies.
4. Then topology: same node, then same zone, then anywhere. Unknown node or zone never
   counts as "same".
5. Then the lowest ordinal. Targets are planned in order of the best locality open to them
   (then ordinal), so a target with a same-node source is not robbed of it by one that had
   no local option anyway.

The output never depends on the order of the inputs.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Assignment", "Locality", "PodRecord", "assign_sources", "shard_position"]


@dataclass(frozen=True)
class PodRecord:
    """One pod (or, in-band, one agent) of the job, as far as planning cares."""

    ordinal: int
    ready: bool
    terminating: bool = False
    rejoining: bool = False
    node: str | None = None
    node_ready: bool = True
    node_schedulable: bool = True
    zone: str | None = None
    #: For reasons only (a pod name or agent id); never affects the plan.
    name: str = ""


class Locality(int, enum.Enum):
    """How close a source is to its target; lower is better."""

    SAME_NODE = 0
    SAME_ZONE = 1
    REMOTE = 2


@dataclass(frozen=True)
class Assignment:
    """The plan for one target: a source ordinal, or None, and why, in words for a human."""

    target: int
    source: int | None
    reason: str
    locality: Locality | None = None


def shard_position(ordinal: int, pods_per_replica: int | None) -> int:
    """Which part of a replica the pod at ``ordinal`` holds (0 when pods are full replicas)."""
    return ordinal % _replication(pods_per_replica)


def assign_sources(
    targets: Iterable[int],
    pods: Iterable[PodRecord],
    *,
    pods_per_replica: int | None = None,
    busy_sources: Iterable[int] = (),
) -> tuple[Assignment, ...]:
    """One :class:`Assignment` per target, sorted by target ordinal.

    ``pods`` should include every pod known, targets included (their node and zone steer
    locality; a target without a record is planned with unknown locality). ``busy_sources``
    lists the source ordinal of each recovery already in flight, once per recovery, so
    those sources count as loaded. Raises ``ValueError`` for malformed input (negative or
    duplicate ordinals, a bad ``pods_per_replica``).
    """
    k = _replication(pods_per_replica)
    listed = _ordinals(targets, "target")
    wanted = sorted(set(listed))
    if len(wanted) != len(listed):
        twice = sorted(o for o, n in Counter(listed).items() if n > 1)
        raise ValueError(f"target ordinals listed more than once: {twice}")
    records = _index(pods)
    load = Counter(_ordinals(busy_sources, "busy source"))
    wanted_set = set(wanted)

    def best_locality(target: int) -> Locality:
        sources = [p for p in records.values() if _refusal(p, target, wanted_set, k) is None]
        return min((_locality(p, records.get(target)) for p in sources), default=Locality.REMOTE)

    plans: dict[int, Assignment] = {}
    for target in sorted(wanted, key=lambda t: (best_locality(t), t)):
        plans[target] = _plan_one(target, records, wanted_set, k, load)
        chosen = plans[target].source
        if chosen is not None:
            load[chosen] += 1
    return tuple(plans[t] for t in wanted)


def _plan_one(
    target: int,
    records: dict[int, PodRecord],
    targets: set[int],
    k: int,
    load: Counter[int],
) -> Assignment:
    here = records.get(target)
    position = target % k
    peers = sorted(o for o in records if o % k == position and o != target)
    refusals = {o: _refusal(records[o], target, targets, k) for o in peers}
    qualified = [records[o] for o in peers if refusals[o] is None]
    where = _where(target, k)
    if not qualified:
        if not peers:
            return Assignment(
                target, None, f"no source for {_who(target, here)}: no other pod {where}"
            )
        why = "; ".join(f"{_who(o, records[o])} {refusals[o]}" for o in peers)
        return Assignment(target, None, f"no source for {_who(target, here)}: {why}")
    best = min(qualified, key=lambda p: (load[p.ordinal], _locality(p, here), p.ordinal))
    locality = _locality(best, here)
    closeness = {
        Locality.SAME_NODE: f"on the same node {best.node}",
        Locality.SAME_ZONE: f"in the same zone {best.zone}",
        Locality.REMOTE: "in another zone or an unknown place",
    }[locality]
    others = load[best.ordinal]
    busy = f", already serving {others} other recovery(ies)" if others else ""
    return Assignment(
        target,
        best.ordinal,
        f"{_who(best.ordinal, best)} streams to {_who(target, here)}: it {where}, is Ready, "
        f"{closeness}{busy} (chosen from {len(qualified)} qualifying)",
        locality,
    )


def _refusal(pod: PodRecord, target: int, targets: set[int], k: int) -> str | None:
    """Why ``pod`` cannot serve ``target``, or None when it can."""
    if pod.ordinal % k != target % k:
        return "holds other shards"
    if pod.ordinal == target:
        return "is the target"
    if pod.ordinal in targets:
        return "is itself being recovered"
    if pod.terminating:
        return "is terminating"
    if pod.rejoining:
        return "is rejoining"
    if not pod.ready:
        return "is not Ready"
    if not pod.node_ready:
        return f"is on node {pod.node or '?'}, which is not Ready"
    if not pod.node_schedulable:
        return f"is on node {pod.node or '?'}, which is cordoned"
    return None


def _locality(source: PodRecord, target: PodRecord | None) -> Locality:
    if target is None:
        return Locality.REMOTE
    if source.node and source.node == target.node:
        return Locality.SAME_NODE
    if source.zone and source.zone == target.zone:
        return Locality.SAME_ZONE
    return Locality.REMOTE


def _where(target: int, k: int) -> str:
    if k == 1:
        return "holds a full replica"
    return f"holds shard position {target % k} of {k}"


def _who(ordinal: int, pod: PodRecord | None) -> str:
    return (
        f"ordinal {ordinal} ({pod.name})" if pod is not None and pod.name else f"ordinal {ordinal}"
    )


def _replication(pods_per_replica: int | None) -> int:
    if pods_per_replica is None:
        return 1
    if not isinstance(pods_per_replica, int) or isinstance(pods_per_replica, bool):
        raise ValueError(f"pods_per_replica must be an int or None, got {pods_per_replica!r}")
    if pods_per_replica < 1:
        raise ValueError(f"pods_per_replica must be at least 1, got {pods_per_replica}")
    return pods_per_replica


def _ordinals(values: Iterable[int], what: str) -> list[int]:
    checked = []
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{what} ordinal must be an int >= 0, got {value!r}")
        checked.append(value)
    return checked


def _index(pods: Iterable[PodRecord]) -> dict[int, PodRecord]:
    records: dict[int, PodRecord] = {}
    for pod in pods:
        if not isinstance(pod, PodRecord):
            raise ValueError(f"pods must be PodRecord instances, got {pod!r}")
        (ordinal,) = _ordinals([pod.ordinal], "pod")
        if ordinal in records:
            raise ValueError(f"two pods claim ordinal {ordinal}: {records[ordinal]!r} and {pod!r}")
        records[ordinal] = pod
    return records
