"""Snapshot identity across real ranks over gloo: voiding, fallback lineages, other jobs.

Ranks train and snapshot in one set of processes; later sets (restarts) restore. Each
rank's store is its own directory, standing for its pod's ``/dev/shm``. The tests marked
below failed on the code before snapshot identity: a fallback left newer snapshots
loadable, there was no way to void them, and a new job restored the previous job's weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._multiproc import run_ranks

pytestmark = pytest.mark.multiproc
WORLD = 2


def _recovery(rank: int, root: str, objects: dict[str, Any], job: dict[str, str]) -> Any:
    from peer_recovery.recovery import PeerRecovery

    os.environ.update(job)
    return PeerRecovery.from_env(
        objects,
        directory=f"{root}/pod-{rank}",
        rank=rank,
        world_size=WORLD,
        async_snapshot=False,
        vote_timeout_s=30,
    )


def _objects() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    return {"model": model, "optim": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)}


def _train(objects: dict[str, Any], recovery: Any, steps: range, every: int = 5) -> None:
    """The same data on every rank, so replicas stay bitwise equal (as DDP keeps them)."""
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        objects["model"](torch.randn(4, 8, generator=gen)).square().mean().backward()
        objects["optim"].step()
        objects["optim"].zero_grad()
        if step % every == 0:
            recovery.snapshot(step)


def _train_to_20(rank: int, world: int, root: str, job: dict[str, str]) -> None:
    objects = _objects()
    recovery = _recovery(rank, root, objects, job)
    _train(objects, recovery, range(1, 21))
    recovery.close(remove=False)  # a crash: the snapshots stay


def _quarantined(root: str, rank: int) -> list[str]:
    where = Path(root) / f"pod-{rank}" / f"rank-{rank}" / "quarantine"
    return sorted(p.name for p in where.iterdir()) if where.is_dir() else []


def _fall_back_then_train_to_12(rank: int, world: int, root: str) -> dict[str, Any]:
    objects = _objects()
    recovery = _recovery(rank, root, objects, {})
    result = recovery.restore(checkpoint_step=10)
    held = [m.step for m in recovery.manifests()]
    # The script loads its checkpoint of step 10 (here: trains to it again), goes on to 12.
    _train(objects, recovery, range(1, 11), every=1000)
    _train(objects, recovery, range(11, 13), every=12)
    recovery.close(remove=False)
    return {
        "restored": result is not None,
        "held": held,
        "lineage": getattr(recovery, "lineage", None),  # (none before snapshot identity)
        "quarantined": _quarantined(root, rank),
    }


def _restore(rank: int, world: int, root: str, job: dict[str, str]) -> dict[str, Any]:
    objects = _objects()
    recovery = _recovery(rank, root, objects, job)
    result = recovery.restore(checkpoint_step=10 if not job else None)
    return {
        "step": None if result is None else result.step,
        "why": recovery.last_failure,
        "quarantined": _quarantined(root, rank),
    }


def test_a_fallback_voids_newer_snapshots_on_every_rank_and_starts_one_new_lineage(
    tmp_path: Path,
) -> None:
    # Failed before the fix: rank 0 still held 15 and 20 after every rank loaded checkpoint
    # 10, and a later crash could resume at the abandoned 20.
    root = str(tmp_path)
    run_ranks(_train_to_20, WORLD, root, {}, timeout=600)
    shutil.rmtree(tmp_path / "pod-1")  # this pod was replaced: no peer path, so fall back
    after = run_ranks(_fall_back_then_train_to_12, WORLD, root, timeout=600)
    assert [a["restored"] for a in after] == [False, False]
    assert after[0]["held"] == []  # 15 and 20 are void on rank 0
    assert {"step-15-slot-0.manifest", "step-20-slot-1.manifest"} <= set(after[0]["quarantined"])
    assert after[0]["lineage"] == after[1]["lineage"]  # one new timeline for the whole job
    restored = run_ranks(_restore, WORLD, root, {}, timeout=600)
    assert [r["step"] for r in restored] == [12, 12], restored


def _roll_back_to_10(rank: int, world: int, root: str) -> list[int]:
    objects = _objects()
    recovery = _recovery(rank, root, objects, {})
    _train(objects, recovery, range(1, 21))
    # A loss spike: the script reloads its checkpoint of step 10 and voids what is newer.
    voided = recovery.invalidate(after_step=10)
    fresh = _objects()
    for name, obj in objects.items():
        obj.load_state_dict(fresh[name].state_dict())
    _train(objects, recovery, range(1, 13), every=12)
    recovery.close(remove=False)
    return voided


def test_invalidate_voids_newer_snapshots_so_a_crash_resumes_the_new_timeline(
    tmp_path: Path,
) -> None:
    # Failed before the fix: there was no way to void snapshots (no invalidate()).
    root = str(tmp_path)
    voided = run_ranks(_roll_back_to_10, WORLD, root, timeout=600)
    assert voided == [[20, 15], [20, 15]]
    restored = run_ranks(_restore, WORLD, root, {}, timeout=600)
    assert [r["step"] for r in restored] == [12, 12], restored


@pytest.mark.parametrize(
    "new_job",
    [
        {"TORCHELASTIC_RUN_ID": "job-b"},
        {"TORCHELASTIC_RUN_ID": "job-a", "PEER_RECOVERY_JOB_UID": "uid-2"},
    ],
    ids=["another-run-id", "same-run-id-another-job-uid"],
)
def test_a_new_job_of_the_same_architecture_never_restores_the_previous_jobs_weights(
    tmp_path: Path, new_job: dict[str, str]
) -> None:
    # Failed before the fix: the new job restored step 20 of the previous one.
    root = str(tmp_path)
    old_job = {"TORCHELASTIC_RUN_ID": "job-a", "PEER_RECOVERY_JOB_UID": "uid-1"}
    run_ranks(_train_to_20, WORLD, root, old_job, timeout=600)
    restored = run_ranks(_restore, WORLD, root, new_job, timeout=600)
    for r in restored:
        assert r["step"] is None, restored
        assert "belongs to another job" in r["why"]
        assert "step-20-slot-1.manifest" in r["quarantined"]
