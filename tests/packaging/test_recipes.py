"""The training-script recipes of docs/user-guide.md are real: extracted from the guide,
compiled, and run under torchrun with the peer-recovery rendezvous backend, with a pod
replaced mid-training (``peer_recovery.demo.local_job``: local agents standing for pods).

A recipe is a ```python block of the guide whose first line is ``# recipe: <file>``.
``tests/packaging/_recipe_runner.py`` runs it unchanged and reports what ``PeerRecovery``
did; the tests check that the replaced pod's rank received its state from a peer holding
the same shard and that replicas end bitwise identical.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "user-guide.md"
_BLOCK = re.compile(r"```python\n# recipe: (\S+)\n(.*?)```", re.DOTALL)


def recipes() -> dict[str, str]:
    return {name: f"# recipe: {name}\n{body}" for name, body in _BLOCK.findall(GUIDE.read_text())}


def test_the_guide_has_both_recipes_and_they_compile() -> None:
    found = recipes()
    assert sorted(found) == ["train_ddp.py", "train_hsdp.py"]
    for name, source in found.items():
        compile(source, name, "exec")
        assert "recovery.restore(" in source and "recovery.snapshot(" in source, name


def _wait_files(paths: list[Path], job: Any, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.exists()]
            raise TimeoutError(f"no {missing} after {timeout:.0f}s\n{job.logs()[-6000:]}")
        time.sleep(0.2)
    return [json.loads(p.read_text()) for p in paths]


def run_with_replacement(
    tmp_path: Path,
    recipe: str,
    args: list[str],
    *,
    nnodes: int,
    pause_at: int,
    replace: int,
    also_wipe: tuple[int, ...] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Run ``recipe`` in ``nnodes`` pods until every rank snapshotted ``pause_at``, replace
    pod ``replace`` (killed, its /dev/shm wiped, started again) after wiping the /dev/shm
    of the pods in ``also_wipe`` (their snapshots lost too), run to the end; return the
    paused states, each rank's last restore, and the final states."""
    from peer_recovery.demo.local_job import LocalJob

    script = tmp_path / recipe
    script.write_text(recipes()[recipe])
    out = tmp_path / "out"
    out.mkdir()
    # This tree's runtime, not whichever one is installed (a shared editable install).
    pythonpath = os.pathsep.join([str(REPO / "runtime"), str(REPO)])
    env = {"PYTHONPATH": pythonpath, "RECIPE_OUT": str(out), "RECIPE_PAUSE_AT": str(pause_at),
           "PEER_RECOVERY_PLAN_TIMEOUT": "1", "PEER_RECOVERY_PLAN_SOURCE": "none"}  # fmt: skip
    command = ["-m", "tests.packaging._recipe_runner", str(script), *args]
    with LocalJob(tmp_path / "job", command, nnodes=nnodes, env=env, run_id="recipe") as job:
        job.start()
        paused = _wait_files([out / f"paused-rank{r}.json" for r in range(nnodes)], job, 300)
        (out / "released").touch()
        for ordinal in also_wipe:
            job.wipe_pod(ordinal)
        job.replace_pod(replace)
        codes = job.wait(timeout=300)
        assert codes == dict.fromkeys(range(nnodes), 0), job.logs()[-6000:]
    restores = [
        json.loads((out / f"restores-rank{r}.jsonl").read_text().splitlines()[-1])
        for r in range(nnodes)
    ]
    final = [json.loads((out / f"final-rank{r}.json").read_text()) for r in range(nnodes)]
    return paused, restores, final


@pytest.mark.multiproc
@pytest.mark.slow
def test_ddp_recipe_replaced_pod_receives_from_its_peer(tmp_path: Path) -> None:
    args = ["--steps=24", "--snapshot-every=4", "--checkpoint-every=8",
            f"--checkpoint-dir={tmp_path / 'checkpoints'}"]  # fmt: skip
    paused, restores, final = run_with_replacement(
        tmp_path, "train_ddp.py", args, nnodes=2, pause_at=12, replace=1
    )
    assert restores[1]["role"] == "receive" and restores[1]["source"] == "rank 0", restores
    assert restores[0]["role"] == "send" and restores[0]["private_restored"] is True, restores
    assert {r["step"] for r in restores} == {12}
    assert paused[0]["hash"] == paused[1]["hash"]  # DDP replicas, before the loss
    assert final[0] == final[1] and final[0]["step"] == 24


@pytest.mark.multiproc
@pytest.mark.slow
def test_ddp_recipe_every_rank_loads_the_checkpoint_when_restore_returns_none(
    tmp_path: Path,
) -> None:
    """Every snapshot is lost (pod 1 replaced, pod 0's /dev/shm wiped): ``restore()`` returns
    None on every rank and the recipe loads checkpoint 8 on every rank. A rank training on
    anything else (its objects as a failed restore left them, its initialisation) would
    leave the two DDP replicas with different states: they end bitwise equal."""
    checkpoints = tmp_path / "checkpoints"
    args = ["--steps=16", "--snapshot-every=4", "--checkpoint-every=8",
            f"--checkpoint-dir={checkpoints}"]  # fmt: skip
    paused, restores, final = run_with_replacement(
        tmp_path, "train_ddp.py", args, nnodes=2, pause_at=12, replace=1, also_wipe=(0,)
    )
    assert paused[0]["hash"] == paused[1]["hash"]  # DDP replicas, before the loss
    assert [r["role"] for r in restores] == [None, None], restores
    assert restores[0]["why"] == restores[1]["why"] and restores[0]["why"], restores
    assert (checkpoints / "latest").read_text() == "16"  # trained on from 8, checkpointed 16
    assert final[0] == final[1] and final[0]["step"] == 16


@pytest.mark.multiproc
@pytest.mark.slow
def test_hsdp_recipe_replaced_pod_receives_its_shard_from_the_other_replica(
    tmp_path: Path,
) -> None:
    args = ["--steps=16", "--snapshot-every=4", "--pods-per-replica=2"]
    paused, restores, final = run_with_replacement(
        tmp_path, "train_hsdp.py", args, nnodes=4, pause_at=8, replace=2
    )
    # Pods 0 and 2 hold shard 0, pods 1 and 3 shard 1 (ordinal modulo pods-per-replica).
    assert restores[2]["role"] == "receive" and restores[2]["source"] == "rank 0", restores
    assert [r["role"] for r in (restores[1], restores[3])] == ["local", "local"], restores
    assert {r["step"] for r in restores} == {8}
    assert paused[0]["hash"] == paused[2]["hash"] != paused[1]["hash"] == paused[3]["hash"]
    assert final[0] == final[2] and final[1] == final[3] and final[0] != final[1]
    assert final[0]["step"] == 16
