"""Properties of the planner over generated jobs (hypothesis)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from peer_recovery.contract.planning import PodRecord, assign_sources

NODES = st.sampled_from([None, "n1", "n2", "n3"])
ZONES = st.sampled_from([None, "z1", "z2"])


@st.composite
def jobs(draw: st.DrawFn) -> tuple[list[PodRecord], list[int], int | None, list[int]]:
    size = draw(st.integers(min_value=1, max_value=12))
    ordinals = draw(st.lists(st.integers(0, size + 2), min_size=1, max_size=size, unique=True))
    pods = [
        PodRecord(ordinal, ready=True, node=draw(NODES), zone=draw(ZONES))
        if draw(st.integers(0, 2))  # two in three pods healthy, so sources often compete
        else PodRecord(
            ordinal,
            ready=draw(st.booleans()),
            terminating=draw(st.booleans()),
            rejoining=draw(st.booleans()),
            node=draw(NODES),
            node_ready=draw(st.booleans()),
            node_schedulable=draw(st.booleans()),
            zone=draw(ZONES),
        )
        for ordinal in ordinals
    ]
    # Targets: mostly known pods, sometimes one without a record (not scheduled yet).
    targets = draw(st.lists(st.integers(0, size + 2), max_size=size, unique=True))
    k = draw(st.one_of(st.none(), st.integers(1, 4)))
    busy = draw(st.lists(st.sampled_from(ordinals), max_size=4))
    return pods, targets, k, busy


def _eligible(pod: PodRecord, target: int, targets: set[int], k: int) -> bool:
    """An oracle written from the rules, independent of the planner's code."""
    return (
        pod.ordinal % k == target % k
        and pod.ordinal not in targets
        and pod.ready
        and not (pod.terminating or pod.rejoining)
        and pod.node_ready
        and pod.node_schedulable
    )


@settings(max_examples=300)
@given(jobs())
def test_a_plan_only_names_healthy_pods_of_the_same_shard_position(job: tuple) -> None:
    pods, targets, k, busy = job
    by_ordinal = {p.ordinal: p for p in pods}
    kk = k or 1
    plan = assign_sources(targets, pods, pods_per_replica=k, busy_sources=busy)
    assert [a.target for a in plan] == sorted(targets)
    for assignment in plan:
        assert assignment.reason
        if assignment.source is None:
            # None only when no pod qualifies.
            assert not any(_eligible(p, assignment.target, set(targets), kk) for p in pods)
            continue
        source = by_ordinal[assignment.source]
        assert assignment.source != assignment.target
        assert assignment.source not in targets
        assert source.ready and not source.terminating and not source.rejoining
        assert source.node_ready and source.node_schedulable
        assert assignment.source % kk == assignment.target % kk


@settings(max_examples=200)
@given(jobs(), st.randoms(use_true_random=False))
def test_a_plan_does_not_depend_on_input_order(job: tuple, random: object) -> None:
    pods, targets, k, busy = job
    expected = assign_sources(targets, pods, pods_per_replica=k, busy_sources=busy)
    for _ in range(3):
        shuffled = [list(pods), list(targets), list(busy)]
        for part in shuffled:
            random.shuffle(part)  # type: ignore[attr-defined]
        again = assign_sources(
            shuffled[1], shuffled[0], pods_per_replica=k, busy_sources=shuffled[2]
        )
        assert again == expected


@settings(max_examples=300)
@given(jobs())
def test_no_source_serves_more_targets_than_necessary(job: tuple) -> None:
    """A source takes one more target only while every other qualifying source is at least
    as loaded: its final load minus one never exceeds another qualifying source's final load
    (in-flight recoveries included)."""
    pods, targets, k, busy = job
    kk = k or 1
    plan = assign_sources(targets, pods, pods_per_replica=k, busy_sources=busy)
    load = Counter(busy) + Counter(a.source for a in plan if a.source is not None)
    for assignment in plan:
        if assignment.source is None:
            continue
        for other in pods:
            if _eligible(other, assignment.target, set(targets), kk):
                assert load[assignment.source] - 1 <= load[other.ordinal], (assignment, other)


@settings(max_examples=200)
@given(jobs())
def test_targets_spread_over_distinct_sources_when_enough_qualify(job: tuple) -> None:
    pods, targets, k, _ = job
    kk = k or 1
    plan = assign_sources(targets, pods, pods_per_replica=k)
    by_position: dict[int, list[int]] = {}
    for assignment in plan:
        if assignment.source is not None:
            by_position.setdefault(assignment.target % kk, []).append(assignment.source)
    for position, chosen in by_position.items():
        qualifying = {p.ordinal for p in pods if _eligible(p, position, set(targets), kk)}
        wanted = len(chosen)
        assert len(set(chosen)) == min(wanted, len(qualifying)), (position, chosen, qualifying)
