"""The agreement on snapshot identity: job, lineage and content checksum (pure).

Each test provokes one way a recovered job could mix states and failed on the code before
snapshot identity existed (holdings then carried a step and a shard key only).
"""

from __future__ import annotations

from peer_recovery.agreement import Action, PodReport, agree
from peer_recovery.protocol.records import Holding, WorkerRecord

JOB = "run=train;uid=1111"
OLD = "lineage-old"
NEW = "lineage-new"


def _holding(
    rank: int, step: int, key: str, lineage: str, checksum: str, job: str = JOB
) -> Holding:
    return Holding(rank, step, key, 100, job=job, lineage=lineage, checksum=checksum)


def _ranks(keys: list[str]) -> list[WorkerRecord]:
    return [WorkerRecord(r, key, None) for r, key in enumerate(keys)]


def test_two_states_of_one_step_on_different_lineages_are_never_mixed() -> None:
    # Sharded (no rank holds another's shard). Rank 0 holds the abandoned step 20 and the
    # new one; rank 1 only the new one: both must resume the new one, with its lineage.
    pods = [
        PodReport(0, (_holding(0, 20, "k0", OLD, "a"), _holding(0, 20, "k0", NEW, "b"))),
        PodReport(1, (_holding(1, 20, "k1", NEW, "c"), _holding(1, 15, "k1", OLD, "d"))),
    ]
    result = agree(nnodes=2, world_size=2, pods=pods, ranks=_ranks(["k0", "k1"]), job=JOB)
    assert (result.step, result.lineage) == (20, NEW)
    assert all(role.action is Action.LOCAL for role in result.roles.values())


def test_an_abandoned_step_held_by_one_rank_does_not_pair_with_another_ranks_new_one() -> None:
    pods = [
        PodReport(0, (_holding(0, 20, "k0", OLD, "a"), _holding(0, 15, "k0", OLD, "e"))),
        PodReport(1, (_holding(1, 20, "k1", NEW, "c"), _holding(1, 15, "k1", OLD, "d"))),
    ]
    result = agree(nnodes=2, world_size=2, pods=pods, ranks=_ranks(["k0", "k1"]), job=JOB)
    assert (result.step, result.lineage) == (15, OLD)


def test_snapshots_of_another_job_are_never_used() -> None:
    # Same architecture (same shard key), newer step, but another job (same run id, new UID).
    other = "run=train;uid=2222"
    pods = [
        PodReport(o, (_holding(o, 50, "k", OLD, "x", job=other), _holding(o, 5, "k", NEW, "y")))
        for o in range(2)
    ]
    result = agree(nnodes=2, world_size=2, pods=pods, ranks=_ranks(["k", "k"]), job=JOB)
    assert (result.step, result.lineage) == (5, NEW)
    only_foreign = [PodReport(o, (_holding(o, 50, "k", OLD, "x", job=other),)) for o in range(2)]
    result = agree(nnodes=2, world_size=2, pods=only_foreign, ranks=_ranks(["k", "k"]), job=JOB)
    assert result.step is None and "other jobs ignored" in result.reason


def test_holders_of_one_shard_that_disagree_on_the_checksum_are_not_used() -> None:
    # Ranks 0 and 1 hold the same shard at step 20 with different bytes; rank 2 was replaced
    # and would receive from one of them. Neither is used: the job resumes at 15, where the
    # holders agree, and rank 2 receives that.
    pods = [
        PodReport(0, (_holding(0, 20, "k", NEW, "aaaa"), _holding(0, 15, "k", NEW, "same"))),
        PodReport(1, (_holding(1, 20, "k", NEW, "bbbb"), _holding(1, 15, "k", NEW, "same"))),
        PodReport(2, ()),
    ]
    result = agree(nnodes=3, world_size=3, pods=pods, ranks=_ranks(["k"] * 3), job=JOB)
    assert result.step == 15
    assert result.roles[2].action is Action.PEER and result.roles[2].source in (0, 1)
    disputed_only = [
        PodReport(0, (_holding(0, 20, "k", NEW, "aaaa"),)),
        PodReport(1, (_holding(1, 20, "k", NEW, "bbbb"),)),
        PodReport(2, ()),
    ]
    result = agree(nnodes=3, world_size=3, pods=disputed_only, ranks=_ranks(["k"] * 3), job=JOB)
    assert result.step is None and "disagree on its checksum" in result.reason


def test_holdings_carry_their_identity_through_the_store_codec() -> None:
    holding = _holding(3, 20, "k", NEW, "b2:00ff")
    assert Holding.from_json(holding.to_json()) == holding
    legacy = {"rank": 3, "step": 20, "shard_key": "k", "nbytes": 1}
    assert Holding.from_json(legacy).job == ""  # never equal to a real job identity
