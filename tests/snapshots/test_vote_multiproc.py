"""The all-or-nothing commit across four real ranks over gloo.

Ranks train and snapshot in one set of processes; a second set (a restart) restores. Each
rank's store is its own directory, standing for its pod's ``/dev/shm``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._multiproc import run_ranks

pytestmark = pytest.mark.multiproc
WORLD = 4


def _objects(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {"model": model, "optim": optim}


def _recovery(rank: int, world: int, root: str, objects: dict[str, Any]) -> Any:
    from peer_recovery.recovery import PeerRecovery

    return PeerRecovery(
        objects,
        directory=f"{root}/pod-{rank}",
        rank=rank,
        world_size=world,
        async_snapshot=False,
        vote_timeout_s=30,
    )


def _train(rank: int, world: int, root: str, steps: int) -> list[float]:
    objects = _objects(0)
    recovery = _recovery(rank, world, root, objects)
    for step in range(1, steps + 1):
        objects["model"](torch.randn(8, 16)).square().mean().backward()
        objects["optim"].step()
        objects["optim"].zero_grad()
        recovery.snapshot(step)
    return [float(p.sum()) for p in objects["model"].parameters()]


def _restore(rank: int, world: int, root: str) -> dict[str, Any] | None:
    objects = _objects(1)
    result = _recovery(rank, world, root, objects).restore()
    if result is None:
        return None
    return {
        "step": result.step,
        "sums": [float(p.sum()) for p in objects["model"].parameters()],
        "momentum": len(objects["optim"].state),
    }


def test_all_four_ranks_restore_the_same_step(tmp_path: Path) -> None:
    trained = run_ranks(_train, WORLD, str(tmp_path), 3, timeout=120)
    restored = run_ranks(_restore, WORLD, str(tmp_path), timeout=120)
    for rank in range(WORLD):
        assert restored[rank] is not None
        assert restored[rank]["step"] == 3
        assert restored[rank]["sums"] == trained[rank]
        assert restored[rank]["momentum"] == 4  # SGD momentum buffers, one per parameter


def test_ranks_agree_on_the_newest_step_all_hold(tmp_path: Path) -> None:
    run_ranks(_train, WORLD, str(tmp_path), 3, timeout=120)
    # Rank 1 died while committing step 3: only its step-2 slot is a snapshot.
    newest = [
        p
        for p in (tmp_path / "pod-1" / "rank-1").glob("slot-*.json")
        if b'"step":3' in p.read_bytes()
    ]
    assert len(newest) == 1
    newest[0].unlink()
    restored = run_ranks(_restore, WORLD, str(tmp_path), timeout=120)
    assert [r["step"] for r in restored] == [2] * WORLD


def _restore_reason(rank: int, world: int, root: str) -> str:
    import logging

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("peer_recovery").addHandler(Keep())
    logging.getLogger("peer_recovery").setLevel(logging.INFO)
    assert _restore(rank, world, root) is None
    return next(m for m in records if "falls back" in m)


def test_one_wiped_store_makes_all_four_return_none_and_say_why(tmp_path: Path) -> None:
    run_ranks(_train, WORLD, str(tmp_path), 2, timeout=120)
    shutil.rmtree(tmp_path / "pod-2")  # this pod was replaced: its memory is gone
    # _restore_reason asserts that restore() returned None on its rank.
    reasons = run_ranks(_restore_reason, WORLD, str(tmp_path), timeout=120)
    assert len(set(reasons)) == 1  # every rank logs the same verdict
    assert "rank 2: no snapshot in" in reasons[0]
    assert "ranks failed" in reasons[0]
