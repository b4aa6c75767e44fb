"""Abandoned timelines under real torchrun agents with the plugin: never two histories.

Two sharded ranks (neither can stand in for the other). Rank 0 commits step 20, rank 1
crashes before it does; the job resumes at 15. Both train to a new step 20 and snapshot
it; rank 1 crashes again. Without snapshot identity rank 0 held two step-20 snapshots and
loaded the abandoned one while rank 1 loaded the new one: the vote passed and training went
on with two histories (this test failed so before lineages existed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from peer_recovery.demo.local_job import LocalJob

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("_timeline.py")


def _read(path: Path, job: LocalJob, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} never came; logs:\n{job.logs()[-8000:]}")
        time.sleep(0.1)
    return json.loads(path.read_text())


def test_a_resume_abandons_the_newer_snapshots_of_the_old_timeline_on_every_rank(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with LocalJob(tmp_path / "job", [str(SCRIPT), str(out)], nnodes=2, run_id="timeline") as job:
        job.start()
        codes = job.wait(360)
        logs = job.logs()
    assert codes == {0: 0, 1: 0}, logs[-8000:]
    second = [_read(out / f"restore-round2-rank{r}.json", job) for r in (0, 1)]
    assert [r["step"] for r in second] == [15, 15], logs[-8000:]
    third = [_read(out / f"restore-round3-rank{r}.json", job) for r in (0, 1)]
    assert [r["step"] for r in third] == [20, 20]
    for rank in (0, 1):
        new = _read(out / f"ref-round2-rank{rank}-step20.json", job)["hash"]
        assert third[rank]["hash"] == new, f"rank {rank} resumed another history than the job"
    abandoned = _read(out / "ref-round1-rank0-step20.json", job)["hash"]
    assert third[0]["hash"] != abandoned
    assert "not on the timeline resumed at step 15" in logs
