"""The planner's rules, one at a time (docs/design.md, "The flow", step 3)."""

from __future__ import annotations

import pytest

from peer_recovery.contract.planning import (
    Assignment,
    Locality,
    PodRecord,
    assign_sources,
    shard_position,
)


def ready(
    ordinal: int, node: str | None = None, zone: str | None = None, **flags: bool
) -> PodRecord:
    return PodRecord(ordinal, ready=flags.pop("ready", True), node=node, zone=zone, **flags)


def target(ordinal: int, node: str | None = None, zone: str | None = None) -> PodRecord:
    return PodRecord(ordinal, ready=False, rejoining=True, node=node, zone=zone)


def sources(plan: tuple[Assignment, ...]) -> dict[int, int | None]:
    return {a.target: a.source for a in plan}


def test_shard_position_is_ordinal_modulo_pods_per_replica() -> None:
    assert [shard_position(o, 3) for o in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert {shard_position(o, None) for o in range(5)} == {0}


def test_only_pods_with_the_same_shards_qualify() -> None:
    pods = [ready(0), ready(1), ready(2), target(3), ready(4), ready(5)]
    # k = 2: ordinal 3 holds position 1, like 1 and 5, never 0, 2 or 4.
    (plan,) = assign_sources([3], pods, pods_per_replica=2)
    assert plan.source == 1
    assert "shard position 1 of 2" in plan.reason
    # k = 3: position 0, like 0 only.
    assert sources(assign_sources([3], pods, pods_per_replica=3)) == {3: 0}


def test_every_pod_qualifies_when_each_holds_a_full_replica() -> None:
    pods = [target(0), ready(1, node="n"), ready(2)]
    (plan,) = assign_sources([0], pods)
    assert plan.source == 1 and "full replica" in plan.reason


def test_never_the_target_even_if_it_looks_healthy() -> None:
    (plan,) = assign_sources([1], [ready(1)])
    assert plan.source is None
    assert "no other pod holds a full replica" in plan.reason


def test_never_another_target_of_the_same_plan() -> None:
    pods = [ready(0), ready(1)]  # a caller that forgot to mark its targets rejoining
    plan = assign_sources([0, 1], pods)
    assert sources(plan) == {0: None, 1: None}
    assert "ordinal 1 is itself being recovered" in plan[0].reason


@pytest.mark.parametrize(
    ("unhealthy", "why"),
    [
        (ready(1, terminating=True), "is terminating"),
        (ready(1, rejoining=True), "is rejoining"),
        (ready(1, ready=False), "is not Ready"),
        (ready(1, node="n1", node_ready=False), "is on node n1, which is not Ready"),
        (ready(1, node="n1", node_schedulable=False), "is on node n1, which is cordoned"),
    ],
)
def test_unhealthy_pods_never_serve_and_the_reason_says_why(unhealthy: PodRecord, why: str) -> None:
    (alone,) = assign_sources([0], [target(0), unhealthy])
    assert alone.source is None
    assert f"ordinal 1 {why}" in alone.reason
    (with_healthy,) = assign_sources([0], [target(0), unhealthy, ready(2)])
    assert with_healthy.source == 2


def test_no_source_reason_covers_every_peer() -> None:
    pods = [
        target(1),
        PodRecord(3, ready=False, name="job-worker-3"),
        ready(5, terminating=True),
        ready(0),
    ]
    (plan,) = assign_sources([1], pods, pods_per_replica=2)
    assert plan.source is None and plan.locality is None
    assert plan.reason == (
        "no source for ordinal 1: ordinal 3 (job-worker-3) is not Ready; ordinal 5 is terminating"
    )


def test_prefers_same_node_then_same_zone_then_lowest_ordinal() -> None:
    t = target(0, node="n1", zone="z1")
    far, zone, node = ready(1, "n9", "z9"), ready(2, "n2", "z1"), ready(3, "n1", "z1")
    assert assign_sources([0], [t, far, zone, node])[0].source == 3
    assert assign_sources([0], [t, far, zone, node])[0].locality is Locality.SAME_NODE
    assert assign_sources([0], [t, far, zone])[0].source == 2
    assert assign_sources([0], [t, far, zone])[0].locality is Locality.SAME_ZONE
    assert assign_sources([0], [t, ready(4, "n8", "z8"), far])[0].source == 1
    assert "on the same node n1" in assign_sources([0], [t, node])[0].reason
    assert "in the same zone z1" in assign_sources([0], [t, zone])[0].reason


def test_unknown_node_or_zone_is_never_the_same() -> None:
    t = target(0)  # not scheduled yet: no node, no zone
    (plan,) = assign_sources([0], [t, ready(2), ready(1)])
    assert plan.source == 1 and plan.locality is Locality.REMOTE
    (missing,) = assign_sources([0], [ready(1, "n1", "z1")])  # target has no record at all
    assert missing.source == 1 and missing.locality is Locality.REMOTE


def test_simultaneous_targets_spread_over_sources_before_locality() -> None:
    pods = [target(0, "n1"), target(1, "n1"), ready(2, "n1"), ready(3, "n2")]
    plan = assign_sources([0, 1], pods)
    assert sorted(a.source for a in plan) == [2, 3]
    # The same-node source goes to the lower ordinal; the other target gets the free one.
    assert sources(plan) == {0: 2, 1: 3}
    assert "already serving" not in plan[1].reason


def test_sources_are_reused_only_when_all_are_busy() -> None:
    pods = [ready(0), ready(1), target(2), target(3), target(4)]
    plan = assign_sources([2, 3, 4], pods)
    assert sorted(a.source for a in plan) == [0, 0, 1]
    assert "already serving 1 other recovery" in plan[2].reason


def test_in_flight_recoveries_count_as_load() -> None:
    pods = [ready(0, "n1"), ready(1, "n2"), target(2, "n1")]
    assert sources(assign_sources([2], pods)) == {2: 0}
    assert sources(assign_sources([2], pods, busy_sources=[0])) == {2: 1}
    assert sources(assign_sources([2], pods, busy_sources=[0, 1, 1])) == {2: 0}


def test_targets_with_a_local_source_are_planned_first() -> None:
    """Target 0 has no local option; target 1 has one (pod 2 on its node). Planning 0 first by
    ordinal would take pod 2 from 1 and leave 1 with a remote source."""
    pods = [target(0, "x"), target(1, "a"), ready(2, "a"), ready(3, "b")]
    plan = assign_sources([0, 1], pods)
    assert sources(plan) == {0: 3, 1: 2}
    assert [a.target for a in plan] == [0, 1]  # output still sorted by target


def test_runtime_records_from_snapshot_manifests_plan_the_same_way() -> None:
    """In-band, a record is an agent: ready means 'valid snapshot at the agreed step'."""
    agents = [
        PodRecord(0, ready=True, node="host-a"),
        PodRecord(1, ready=False, node="host-b"),  # snapshot older than the agreed step
        PodRecord(2, ready=False, rejoining=True, node="host-c"),
        PodRecord(3, ready=True, node="host-c"),
    ]
    assert sources(assign_sources([1, 2], agents, pods_per_replica=2)) == {1: 3, 2: 0}


def test_no_targets_no_plan() -> None:
    assert assign_sources([], [ready(0)]) == ()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": [-1]}, r"target ordinal must be an int >= 0, got -1"),
        ({"targets": [True]}, r"target ordinal must be an int >= 0, got True"),
        ({"targets": [1, 1]}, r"listed more than once: \[1\]"),
        ({"pods": [ready(0), ready(0)]}, "two pods claim ordinal 0"),
        ({"pods": [ready(-3)]}, "pod ordinal must be an int >= 0, got -3"),
        ({"pods": [{"ordinal": 0}]}, "pods must be PodRecord"),
        ({"pods_per_replica": 0}, "pods_per_replica must be at least 1"),
        ({"pods_per_replica": "2"}, "pods_per_replica must be an int"),
        ({"busy_sources": ["a"]}, "busy source ordinal must be an int"),
    ],
)
def test_malformed_input_is_reported(kwargs: dict, message: str) -> None:
    arguments: dict = {"targets": [1], "pods": [ready(0)], **kwargs}
    targets, pods = arguments.pop("targets"), arguments.pop("pods")
    with pytest.raises(ValueError, match=message):
        assign_sources(targets, pods, **arguments)


def test_inputs_may_be_any_iterable() -> None:
    plan = assign_sources(
        iter([2]), (p for p in [ready(0), ready(1), target(2)]), busy_sources=iter([0])
    )
    assert sources(plan) == {2: 1}
