"""``restore()`` with slot replication (what a round's transport offers): the replaced rank
copies its holder's slot, loads it after the vote like a local slot, and ends holding a
snapshot; a holder offering another step is refused before any byte moves and nothing
changes anywhere. Real ranks over gloo; each rank's store is its own directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests._multiproc import run_ranks
from tests.snapshots.test_failed_restore_multiproc import _now, _objects, _recovery, _train_step

pytestmark = pytest.mark.multiproc


class _Streams:
    """The part of a round's transport that ``restore()`` uses for slot replication."""

    def __init__(self) -> None:
        import torch.distributed as dist

        from peer_recovery.peer_slots import SlotStreams

        def fail(error: BaseException) -> None:
            raise AssertionError(f"transfer failed: {error}")

        self.slot_streams = SlotStreams(dist.group.WORLD, [0, 1, 2], fail)


def _replaced_rank_1(rank: int, world: int, root: str, plan_step: int) -> dict[str, Any]:
    from peer_recovery.rank_plan import RankPlan
    from tests.snapshots._worker import same

    objects, position = _objects(0)
    recovery = _recovery(rank, world, root, objects, position, 30)
    for step in (1, 2):
        _train_step(objects, position)
        recovery.snapshot(step)
    trained = _now(objects, position)
    if rank == 1:  # its pod was replaced: no snapshot survived
        shutil.rmtree(f"{root}/pod-1")
    live, private = _objects(10 + rank)  # restarted: fresh objects with other values
    restorer = _recovery(rank, world, root, live, private, 30)
    plans = {
        0: RankPlan(2, send_to=(1,)),
        1: RankPlan(plan_step, receive_from=0),
        2: RankPlan(2),
    }
    before = _now(live, private)
    transport = _Streams() if rank < 2 else None
    result = restorer.restore(plan=plans[rank], transport=transport)
    after = _now(live, private)
    del trained["private"], after["private"]
    restorer.wait()  # the store's preallocation, completed in the background
    return {
        "capacity": [restorer.store.capacity(slot) for slot in (0, 1)],
        "phases": list(restorer.stats.restore_phases),
        "result": None if result is None else (result.role.value, result.step, result.source),
        "as_trained": same(trained, after),
        "unchanged": same(before, _now(live, private)),
        "held": [m.step for m in restorer.store.scan()[0]],
        "why": restorer.last_failure,
    }


def test_the_replaced_rank_restores_from_its_holders_slot_and_holds_it(tmp_path: Path) -> None:
    holder, receiver, local = run_ranks(_replaced_rank_1, 3, str(tmp_path), 2, timeout=300)
    assert holder["result"] == ("send", 2, "local slot 1")
    assert receiver["result"] == ("receive", 2, "rank 0")
    assert local["result"][:2] == ("local", 2)
    for outcome in (holder, receiver, local):
        assert outcome["as_trained"] == []  # model, optimizer and scheduler as trained
    assert receiver["held"] == [2]  # redundancy is back: the receiver holds the snapshot
    # It allocated only the slot it received into on the critical path; the other one
    # afterwards, so its next snapshot does not wait for it.
    assert receiver["capacity"][0] > 0 and receiver["capacity"] == holder["capacity"]
    assert receiver["phases"][-4:] == ["transfer and check", "vote", "load", "quarantine"]


def test_a_holder_offering_another_step_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    outcomes = run_ranks(_replaced_rank_1, 3, str(tmp_path), 1, timeout=300)
    for rank, outcome in enumerate(outcomes):
        assert outcome["result"] is None, f"rank {rank}"
        assert outcome["unchanged"] == [], f"rank {rank}: changed at {outcome['unchanged']}"
    assert "offers step 2, not 1" in outcomes[1]["why"]
    assert outcomes[1]["held"] == []  # nothing was committed
