"""The in-band agreement: resume step, roles, shard-key checks (pure; no processes)."""

from __future__ import annotations

import random

import pytest

from peer_recovery.agreement import Action, PodReport, agree
from peer_recovery.contract.names import Mode, PlannedBy
from peer_recovery.protocol.records import Holding, PlanEntry, WorkerRecord

KEY = "full-replica"


def _pods(held: dict[int, list[int]], key_of=lambda r: KEY, plans=None) -> list[PodReport]:
    """One rank per pod; ``held[pod]`` lists the steps its snapshot slots hold."""
    plans = plans or {}
    return [
        PodReport(o, tuple(Holding(o, s, key_of(o), 100) for s in steps), plans.get(o), f"node-{o}")
        for o, steps in held.items()
    ]


def _ranks(n: int, key_of=lambda r: KEY, checkpoint_step=None) -> list[WorkerRecord]:
    return [WorkerRecord(r, key_of(r), checkpoint_step) for r in range(n)]


def test_everyone_local_resumes_at_the_newest_step_without_moving_bytes() -> None:
    result = agree(
        nnodes=3, world_size=3, pods=_pods({0: [10, 20], 1: [10, 20], 2: [10, 20]}), ranks=_ranks(3)
    )
    assert result.step == 20
    assert all(role.action is Action.LOCAL and not role.send_to for role in result.roles.values())
    assert result.movers == ()


def test_a_replaced_rank_receives_from_a_holder_planned_in_band() -> None:
    result = agree(
        nnodes=4, world_size=4, pods=_pods({0: [20], 1: [20], 2: [], 3: [20]}), ranks=_ranks(4)
    )
    assert result.step == 20
    target = result.roles[2]
    assert target.action is Action.PEER and target.planned_by is PlannedBy.RUNTIME
    assert target.source in (0, 1, 3)
    assert result.roles[target.source].send_to == (2,)
    # Every other holder stripes too (rule 6); each one's send_to names rank 2.
    assert sorted(target.sources) == [0, 1, 3] and target.sources[0] == target.source
    assert all(result.roles[h].send_to == (2,) for h in (0, 1, 3))
    assert result.movers == (0, 1, 2, 3)


def test_an_operator_plan_is_followed_when_its_source_holds_the_shard() -> None:
    plan = PlanEntry(2, 3, Mode.PEER, PlannedBy.OPERATOR)
    result = agree(
        nnodes=4,
        world_size=4,
        pods=_pods({0: [20], 1: [20], 2: [], 3: [20]}, plans={2: plan}),
        ranks=_ranks(4),
    )
    assert result.roles[2].source == 3 and result.roles[2].planned_by is PlannedBy.OPERATOR


def test_a_planned_source_without_the_shard_is_replaced_in_band() -> None:
    keys = {0: KEY, 1: KEY, 2: KEY, 3: "other-model"}
    plan = PlanEntry(2, 3, Mode.PEER, PlannedBy.OPERATOR)
    result = agree(
        nnodes=4,
        world_size=4,
        pods=_pods({0: [20], 1: [20], 2: [], 3: [20]}, key_of=keys.get, plans={2: plan}),
        ranks=_ranks(4, key_of=lambda r: KEY),
    )
    # Rank 3's snapshot carries another key: it cannot restore it, nor send it.
    assert result.roles[2].source in (0, 1) and result.roles[2].planned_by is PlannedBy.RUNTIME
    assert result.roles[3].action is Action.PEER


def test_two_replaced_ranks_are_served_by_different_sources() -> None:
    result = agree(
        nnodes=4, world_size=4, pods=_pods({0: [20], 1: [], 2: [], 3: [20]}), ranks=_ranks(4)
    )
    assert {result.roles[1].source, result.roles[2].source} == {0, 3}


def test_sharded_replicas_restore_each_shard_from_its_own_replica() -> None:
    shard = lambda r: f"shard-{r % 2}"  # noqa: E731  pods-per-replica 2
    result = agree(
        nnodes=4,
        world_size=4,
        pods=_pods({0: [20], 1: [], 2: [], 3: [20]}, key_of=shard),
        ranks=_ranks(4, key_of=shard),
        pods_per_replica=2,
    )
    assert result.roles[1].source == 3 and result.roles[2].source == 0


def test_the_step_is_the_newest_at_which_every_shard_has_a_holder() -> None:
    shard = lambda r: f"shard-{r % 2}"  # noqa: E731
    # Shard 1: rank 1 replaced, rank 3 kept only step 10. Shard 0 has steps 10 and 20.
    result = agree(
        nnodes=4,
        world_size=4,
        pods=_pods({0: [10, 20], 1: [], 2: [10, 20], 3: [10]}, key_of=shard),
        ranks=_ranks(4, key_of=shard),
        pods_per_replica=2,
    )
    assert result.step == 10
    assert result.roles[1].source == 3 and result.roles[0].action is Action.LOCAL


def test_never_older_than_the_checkpoint() -> None:
    result = agree(
        nnodes=2, world_size=2, pods=_pods({0: [10], 1: [10]}), ranks=_ranks(2, checkpoint_step=15)
    )
    assert not result.ok and "checkpoint step 15" in result.reason


def test_every_holder_lost_falls_back_for_everyone() -> None:
    shard = lambda r: f"shard-{r % 2}"  # noqa: E731
    result = agree(
        nnodes=4,
        world_size=4,
        pods=_pods({0: [20], 1: [], 2: [20], 3: []}, key_of=shard),
        ranks=_ranks(4, key_of=shard),
        pods_per_replica=2,
    )
    assert not result.ok and result.roles == {}
    assert "every holder of that shard is lost" in result.reason and "[1, 3]" in result.reason


def test_a_shard_key_mismatch_is_never_restored() -> None:
    result = agree(
        nnodes=2,
        world_size=2,
        pods=_pods({0: [20], 1: [20]}, key_of=lambda r: "old-model"),
        ranks=_ranks(2, key_of=lambda r: "new-model"),
    )
    assert not result.ok and "other shard keys" in result.reason


def test_a_failed_transfer_last_round_means_loading_the_checkpoint() -> None:
    result = agree(
        nnodes=2,
        world_size=2,
        pods=_pods({0: [20], 1: [20]}),
        ranks=_ranks(2),
        load_checkpoint="rank 1: transfer from rank 0 failed",
    )
    assert not result.ok and "transfer from rank 0 failed" in result.reason


def test_snapshots_count_only_for_the_pod_that_runs_the_rank() -> None:
    # Pod 1's directory holds a stale snapshot labelled rank 0: rank 1 still has nothing.
    pods = [PodReport(0, (Holding(0, 20, KEY),)), PodReport(1, (Holding(0, 20, KEY),))]
    result = agree(nnodes=2, world_size=2, pods=pods, ranks=_ranks(2))
    assert result.roles[1].action is Action.PEER and result.roles[1].source == 0


def test_several_ranks_per_pod_map_sources_position_by_position() -> None:
    pods = [
        PodReport(0, (Holding(0, 5, "a"), Holding(1, 5, "b"))),
        PodReport(1, ()),
    ]
    ranks = [WorkerRecord(0, "a"), WorkerRecord(1, "b"), WorkerRecord(2, "a"), WorkerRecord(3, "b")]
    result = agree(nnodes=2, world_size=4, pods=pods, ranks=ranks)
    assert result.roles[2].source == 0 and result.roles[3].source == 1
    assert result.roles[0].send_to == (2,) and result.roles[1].send_to == (3,)


def test_the_result_does_not_depend_on_input_order() -> None:
    pods = _pods({0: [10, 20], 1: [], 2: [20], 3: [10], 4: [], 5: [20]})
    ranks = _ranks(6)
    expected = agree(nnodes=6, world_size=6, pods=pods, ranks=ranks)
    for seed in range(5):
        rng = random.Random(seed)
        shuffled_pods, shuffled_ranks = pods[:], ranks[:]
        rng.shuffle(shuffled_pods)
        rng.shuffle(shuffled_ranks)
        assert agree(nnodes=6, world_size=6, pods=shuffled_pods, ranks=shuffled_ranks) == expected


def test_missing_reports_are_refused() -> None:
    with pytest.raises(ValueError, match=r"no report from ranks \[1\]"):
        agree(nnodes=2, world_size=2, pods=_pods({0: [1], 1: [1]}), ranks=_ranks(1))
    with pytest.raises(ValueError, match="not a multiple"):
        agree(nnodes=2, world_size=3, pods=_pods({0: [1], 1: [1]}), ranks=_ranks(3))
