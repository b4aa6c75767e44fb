"""``restore()`` returning ``None`` leaves every registered object bitwise as it was, on every
rank, and says why; a rank that never joins makes the others return ``None``, not raise.

Real ranks over gloo; each rank's store is its own directory, standing for its pod's
``/dev/shm``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._multiproc import run_ranks

pytestmark = pytest.mark.multiproc


class Position:
    """Rank-private state: a data-loader position and the torch RNG."""

    def __init__(self) -> None:
        self.batches = 0

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = state["batches"]
        torch.set_rng_state(state["rng"])


def _objects(seed: int) -> tuple[dict[str, Any], Position]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 / (1 + s))
    return {"model": model, "optim": optim, "sched": sched}, Position()


def _train_step(objects: dict[str, Any], position: Position) -> None:
    objects["model"](torch.randn(4, 8)).square().mean().backward()
    objects["optim"].step()
    objects["optim"].zero_grad(set_to_none=True)
    objects["sched"].step()
    position.batches += 1


def _now(objects: dict[str, Any], position: Position) -> dict[str, Any]:
    state = {name: obj.state_dict() for name, obj in objects.items()}
    return copy.deepcopy({**state, "private": position.state_dict()})


def _recovery(rank: int, world: int, root: str, objects: Any, position: Any, timeout: float) -> Any:
    from peer_recovery.recovery import PeerRecovery

    return PeerRecovery(
        objects,
        private={"position": position},
        directory=f"{root}/pod-{rank}",
        rank=rank,
        world_size=world,
        async_snapshot=False,
        vote_timeout_s=timeout,
    )


def _damage_newest(store: Any) -> None:
    """Flip one byte of the newest snapshot's data: its checksum fails."""
    manifest = store.scan()[0][0]
    with open(store.data_path(manifest.slot), "r+b") as handle:
        handle.seek(3)
        byte = handle.read(1)
        handle.seek(3)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _one_damaged_rank(rank: int, world: int, root: str) -> list[dict[str, Any]]:
    from peer_recovery.rank_plan import RankPlan
    from tests.snapshots._worker import same

    objects, position = _objects(0)
    recovery = _recovery(rank, world, root, objects, position, 30)
    for step in (1, 2):
        _train_step(objects, position)
        recovery.snapshot(step)
    if rank == 1:
        _damage_newest(recovery.store)
    _train_step(objects, position)  # step 3, not snapshotted: now differs from step 2
    seen = []
    # A rank in mid-run (stepped optimizer) and a restarted one (fresh objects, other values).
    for live, private in ((objects, position), _objects(10 + rank)):
        restorer = _recovery(rank, world, root, live, private, 30)
        before = _now(live, private)
        result = restorer.restore(plan=RankPlan(2))
        seen.append(
            {
                "result": None if result is None else result.step,
                "differs": same(before, _now(live, private)),
                "why": getattr(restorer, "last_failure", "no last_failure attribute"),
            }
        )
    return seen


def test_none_leaves_every_object_bitwise_as_it_was_on_every_rank(tmp_path: Path) -> None:
    outcomes = run_ranks(_one_damaged_rank, 3, str(tmp_path), timeout=300)
    for rank, (first, second) in enumerate(outcomes):
        for case in (first, second):
            assert case["result"] is None, f"rank {rank}"
            assert case["differs"] == [], f"rank {rank}: objects changed at {case['differs']}"
        assert "rank 1:" in first["why"] and "failed its checksum" in first["why"]
        # The first fallback voided every snapshot (no checkpoint_step) on every rank.
        assert "this rank holds []" in second["why"]


def _rank_1_never_joins(rank: int, world: int, root: str) -> dict[str, Any] | str:
    from tests.snapshots._worker import same

    objects, position = _objects(0)
    recovery = _recovery(rank, world, root, objects, position, 3)
    _train_step(objects, position)
    recovery.snapshot(1)
    if rank == 1:
        return "bailed out before restore()"  # e.g. its script raised first
    before = _now(objects, position)
    try:
        result = recovery.restore()
    except Exception as error:
        return f"restore() raised {type(error).__name__}: {error}"
    return {
        "result": result,
        "differs": same(before, _now(objects, position)),
        "why": getattr(recovery, "last_failure", "no last_failure attribute"),
    }


def test_a_rank_that_never_joins_makes_the_others_return_none(tmp_path: Path) -> None:
    outcome = run_ranks(_rank_1_never_joins, 2, str(tmp_path), timeout=300)[0]
    assert isinstance(outcome, dict), outcome
    assert outcome["result"] is None and outcome["differs"] == []
    assert "vote group" in outcome["why"]


class _AdoptMetadata:
    """The transport does not carry a module state dict's ``_metadata``; as the plugin's
    transport does (``peer_restore``), the receiver gives it its own."""

    def __init__(self, inner: Any, template: Any) -> None:
        self.inner, self.template = inner, template

    def send_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self.inner.send_checkpoint(*args, **kwargs)

    def recv_checkpoint(self, src: int, *, step: int | None = None) -> Any:
        received = self.inner.recv_checkpoint(src, step=step)
        for name, live in self.template().items():
            if hasattr(live, "_metadata"):
                received[name]._metadata = live._metadata
        return received


def _receiver_and_damaged_local(rank: int, world: int, root: str) -> dict[str, Any]:
    import torch.distributed as dist

    from peer_recovery.rank_plan import RankPlan
    from peer_recovery.transport import PGTransport
    from tests.snapshots._worker import same

    objects, position = _objects(0)
    recovery = _recovery(rank, world, root, objects, position, 30)
    for step in (1, 2):
        _train_step(objects, position)
        recovery.snapshot(step)
    if rank == 2:
        _damage_newest(recovery.store)
    live, private = _objects(10 + rank)  # restarted: fresh objects with other values
    restorer = _recovery(rank, world, root, live, private, 30)
    plans = {0: RankPlan(2, send_to=(1,)), 1: RankPlan(2, receive_from=0), 2: RankPlan(2)}
    transport = None
    if rank < 2:  # rank 1 receives in place, into its live objects
        cpu = torch.device("cpu")
        inner = PGTransport(dist.group.WORLD, 30, cpu, state_dict=restorer.template)
        transport = _AdoptMetadata(inner, restorer.template)
    before = _now(live, private)
    result = restorer.restore(plan=plans[rank], transport=transport)
    return {
        "result": None if result is None else result.step,
        "differs": same(before, _now(live, private)),
        "why": getattr(restorer, "last_failure", "no last_failure attribute"),
    }


def test_a_receiver_is_put_back_when_the_vote_fails(tmp_path: Path) -> None:
    outcomes = run_ranks(_receiver_and_damaged_local, 3, str(tmp_path), timeout=300)
    for rank, outcome in enumerate(outcomes):
        assert outcome["result"] is None, f"rank {rank}"
        assert outcome["differs"] == [], f"rank {rank}: objects changed at {outcome['differs']}"
        assert "rank 2:" in outcome["why"] and "failed its checksum" in outcome["why"]
        assert "1 of 3 ranks failed" in outcome["why"]  # rank 1 did receive, then was put back
