"""Striping in the agreement (rule 6): every holder of a receiver's shard at the agreed
(step, lineage), with the same content checksum, serves part of its slot, up to
``MAX_SOURCES``; extras spread over holders and pods (pure; no processes)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from peer_recovery.agreement import MAX_SOURCES, Action, PodReport, agree
from peer_recovery.contract.names import Mode, PlannedBy
from peer_recovery.protocol.records import Holding, PlanEntry, WorkerRecord
from peer_recovery.rank_plan import RankPlan, Role

KEY = "full-replica"


def _holding(rank: int, step: int = 20, key: str = KEY, lineage: str = "L1", checksum: str = "c"):
    return Holding(rank, step, key, 100, "job", lineage, checksum)


def _agree(held: dict[int, tuple[Holding, ...]], n: int, plans=None, keys=None, per_pod: int = 1):
    plans, keys = plans or {}, keys or {}
    pods = [PodReport(o, held.get(o, ()), plans.get(o), f"node-{o}") for o in range(n // per_pod)]
    ranks = [WorkerRecord(r, keys.get(r, KEY)) for r in range(n)]
    return agree(nnodes=n // per_pod, world_size=n, pods=pods, ranks=ranks, job="job")


def test_a_receiver_stripes_over_every_other_holder_with_its_planned_source_first() -> None:
    plan = PlanEntry(2, 3, Mode.PEER, PlannedBy.OPERATOR)
    result = _agree({o: (_holding(o),) for o in (0, 1, 3)}, 4, plans={2: plan})
    role = result.roles[2]
    assert role.action is Action.PEER
    assert role.source == 3 and role.planned_by is PlannedBy.OPERATOR  # the primary, as planned
    assert role.sources == (3, 0, 1) and role.also_from == (0, 1)
    assert {r: result.roles[r].send_to for r in (0, 1, 3)} == {0: (2,), 1: (2,), 3: (2,)}
    assert result.movers == (0, 1, 2, 3)
    assert "3->2 (operator) [also 0 1]" in result.reason


def test_the_sources_of_one_receiver_are_capped() -> None:
    result = _agree({o: (_holding(o),) for o in range(1, 9)}, 9)
    role = result.roles[0]
    assert len(role.sources) == MAX_SOURCES == 4
    assert len(set(role.sources)) == MAX_SOURCES and 0 not in role.sources
    senders = [r for r in range(9) if result.roles[r].send_to]
    assert sorted(senders) == sorted(role.sources)  # holders left out send nothing


def test_many_receivers_spread_their_sources_over_the_holders() -> None:
    # 12 pods, 4 replaced, 8 holders: 4 receivers x 4 sources = 16 = 2 per holder.
    replaced = (1, 4, 7, 10)
    result = _agree({o: (_holding(o),) for o in range(12) if o not in replaced}, 12)
    served = Counter(s for r in replaced for s in result.roles[r].sources)
    assert all(len(result.roles[r].sources) == MAX_SOURCES for r in replaced)
    assert set(served.values()) == {2}, served
    for holder, count in served.items():
        assert len(result.roles[holder].send_to) == count


def test_extras_cover_the_holding_pods_before_a_second_rank_of_one() -> None:
    # 2 ranks per pod: pods 0-2 hold (ranks 0-5), pod 3 (ranks 6, 7) is replaced. Each
    # receiver's 4 sources span all 3 holding pods, and every holder serves someone.
    held = {o: tuple(_holding(r) for r in (2 * o, 2 * o + 1)) for o in (0, 1, 2)}
    result = _agree(held, 8, per_pod=2)
    for receiver in (6, 7):
        role = result.roles[receiver]
        assert len(role.sources) == MAX_SOURCES
        assert {s // 2 for s in role.sources} == {0, 1, 2}, role
    assert all(result.roles[h].send_to for h in range(6))


def test_a_holder_on_another_lineage_is_never_a_source() -> None:
    # Rank 3 holds step 20 of another lineage: at (20, L1) it is a receiver, not a source.
    held = {0: (_holding(0),), 1: (_holding(1),), 3: (_holding(3, lineage="L2"),)}
    result = _agree(held, 4)
    assert (result.step, result.lineage) == (20, "L1")
    for receiver in (2, 3):
        assert result.roles[receiver].action is Action.PEER
        assert set(result.roles[receiver].sources) == {0, 1}
    assert result.roles[0].send_to == result.roles[1].send_to == (2, 3)


def test_a_holder_of_another_shard_key_is_never_a_source() -> None:
    keys = {0: "A", 1: "B", 2: "A", 3: "B", 4: "A", 5: "B"}
    held = {o: (_holding(o, key=keys[o]),) for o in (0, 1, 3, 4)}
    result = _agree(held, 6, keys=keys)
    assert set(result.roles[2].sources) == {0, 4}
    assert set(result.roles[5].sources) == {1, 3}


def test_holders_disagreeing_on_the_checksum_are_not_used_at_that_step() -> None:
    # Step 20: rank 3's copy has another checksum, so no copy of step 20 is used; at step
    # 10 every holder agrees and rank 2 stripes over all of them.
    held = {
        o: (_holding(o, checksum="bad" if o == 3 else "c"), _holding(o, step=10)) for o in (0, 1, 3)
    }
    result = _agree(held, 4)
    assert result.step == 10
    assert sorted(result.roles[2].sources) == [0, 1, 3]


def test_striping_is_deterministic_whatever_the_order_of_the_reports() -> None:
    held = {o: (_holding(o),) for o in range(10) if o not in (2, 5, 6)}
    pods = [PodReport(o, held.get(o, ()), None, f"node-{o}") for o in range(10)]
    ranks = [WorkerRecord(r, KEY) for r in range(10)]
    first = agree(nnodes=10, world_size=10, pods=pods, ranks=ranks, job="job")
    for seed in range(5):
        random.Random(seed).shuffle(pods)
        random.Random(seed + 1).shuffle(ranks)
        again = agree(nnodes=10, world_size=10, pods=pods, ranks=ranks, job="job")
        assert again.roles == first.roles and again.reason == first.reason


def test_a_rank_plan_carries_its_extra_sources_after_the_primary() -> None:
    assert RankPlan(5, receive_from=1).sources == (1,)  # by hand, as before: one source
    striped = RankPlan(5, receive_from=1, also_from=(0, 3))
    assert striped.role is Role.RECEIVE and striped.sources == (1, 0, 3)
    assert RankPlan(5, send_to=(2,)).sources == ()
    with pytest.raises(ValueError, match="need a primary one"):
        RankPlan(5, also_from=(0,))
    with pytest.raises(ValueError, match="a source is named twice"):
        RankPlan(5, receive_from=1, also_from=(0, 1))
