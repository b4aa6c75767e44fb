"""``restore()`` striped over several holders (what a round's agreement gives a receiver
when several ranks hold its shard): 4 real ranks over gloo, rank 2's snapshots wiped, ranks
0, 1 and 3 hold step 2. Each rank's store is its own directory; chunks are made small so
the slot is many chunks and every holder gets some.

- All holders alive: the receiver takes chunks from more than one holder and ends bitwise
  equal to the trained state, holding the snapshot.
- A holder dies mid-stream: the receiver completes the slot from the other holders (its
  transfer does not fail, so it never ends the process), but the dead rank never votes, so
  the job's decision falls back at the deadline and every surviving rank returns ``None``
  with its objects untouched. In a torchrun job the dead worker's agent restarts the round
  first, and the next round's agreement plans again from what is held (see
  ``tests/peer_restore/test_peer_restore.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests._multiproc import run_ranks
from tests.snapshots.test_failed_restore_multiproc import _now, _objects, _recovery, _train_step

pytestmark = pytest.mark.multiproc

RECEIVER = 2
HOLDERS = (0, 1, 3)


class _Transport:
    """The part of a round's transport that ``restore()`` uses for slot replication, with a
    record of what the receiver's transfer did."""

    def __init__(self, dies: bool) -> None:
        import torch.distributed as dist

        from peer_recovery.peer_restore import _DiesMidStream
        from peer_recovery.peer_slots import SlotStreams

        def fail(error: BaseException) -> None:
            raise AssertionError(f"transfer failed: {error}")

        wire = _DiesMidStream(dist.group.WORLD, lambda: True) if dies else dist.group.WORLD
        self.got: Any = None
        streams = SlotStreams(wire, [0, 1, 2, 3], fail)
        receive = streams.receive

        def spy(*args: Any, **kwargs: Any) -> Any:
            self.got = receive(*args, **kwargs)
            return self.got

        streams.receive = spy  # type: ignore[method-assign]
        self.slot_streams = streams


def _striped(rank: int, world: int, root: str, dies: int | None, vote_s: float) -> dict[str, Any]:
    from peer_recovery.rank_plan import RankPlan
    from peer_recovery.snapshots import store as store_mod
    from tests.snapshots._worker import same

    store_mod.CHUNK_BYTES = 64  # a few KiB of state: dozens of chunks
    objects, position = _objects(0)
    recovery = _recovery(rank, world, root, objects, position, vote_s)
    for step in (1, 2):
        _train_step(objects, position)
        recovery.snapshot(step)
    trained = _now(objects, position)
    if rank == RECEIVER:  # its pod was replaced: no snapshot survived
        shutil.rmtree(f"{root}/pod-{rank}")
    live, private = _objects(10 + rank)  # restarted: fresh objects with other values
    restorer = _recovery(rank, world, root, live, private, vote_s)
    plan = (
        RankPlan(2, receive_from=1, also_from=(0, 3))
        if rank == RECEIVER
        else RankPlan(2, send_to=(RECEIVER,))
    )
    before = _now(live, private)
    transport = _Transport(dies=rank == dies)
    result = restorer.restore(plan=plan, transport=transport)
    after = _now(live, private)
    del trained["private"], after["private"]
    restorer.wait()
    got = transport.got
    return {
        "result": None if result is None else (result.role.value, result.step, result.source),
        "bytes_by_source": None if result is None else dict(result.bytes_by_source),
        "received": None if got is None else dict(got.bytes_by_source),
        "lost": None if got is None else dict(got.lost),
        "data_bytes": None if got is None else got.manifest.data_bytes,
        "as_trained": same(trained, after),
        "unchanged": same(before, _now(live, private)),
        "held": [m.step for m in restorer.store.scan()[0]],
        "why": restorer.last_failure,
    }


def test_the_receiver_takes_chunks_from_several_holders_and_ends_bitwise_equal(
    tmp_path: Path,
) -> None:
    outcomes = run_ranks(_striped, 4, str(tmp_path), None, 30.0, timeout=300)
    receiver = outcomes[RECEIVER]
    assert receiver["result"] == ("receive", 2, "rank 1")  # named by its planned source
    by_source = receiver["bytes_by_source"]
    assert set(by_source) <= set(HOLDERS) and len(by_source) > 1, by_source
    assert sum(by_source.values()) == receiver["data_bytes"]
    assert receiver["lost"] == {}
    for rank, outcome in enumerate(outcomes):
        assert outcome["as_trained"] == [], f"rank {rank}: {outcome['as_trained']}"
    assert [outcomes[h]["result"][0] for h in HOLDERS] == ["send"] * 3
    assert receiver["held"] == [2]  # redundancy is back


def test_a_holder_dying_mid_stream_leaves_the_slot_to_the_others_but_the_vote_falls_back(
    tmp_path: Path,
) -> None:
    # Rank 1, the receiver's planned source, SIGKILLs itself at the receiver's first
    # request. A short budget: the survivors wait for its ballot until the deadline.
    outcomes = run_ranks(_striped, 4, str(tmp_path), 1, 4.0, timeout=300, may_die=[1])
    assert outcomes[1] is None  # it died
    receiver = outcomes[RECEIVER]
    # The transfer completed from the holders still alive, without rank 1's bytes...
    assert receiver["received"] is not None and 1 not in receiver["received"]
    assert sum(receiver["received"].values()) == receiver["data_bytes"]
    # ...but rank 1 never voted: every survivor falls back, its objects as they were, and
    # the receiver's uncommitted copy is not a snapshot.
    for rank in (0, 2, 3):
        outcome = outcomes[rank]
        assert outcome["result"] is None, f"rank {rank}"
        assert outcome["unchanged"] == [], f"rank {rank}: {outcome['unchanged']}"
        assert "[1]" in outcome["why"], outcome["why"]
    assert receiver["held"] == []
