"""Peer restore end to end: real torchrun agents as pods, real gloo, real /dev/shm files.

Each test runs the demo's training job (``peer_recovery.demo.train``) through
``run_scenario``: train, snapshot, pause; replace pods (kill agent and worker, wipe the
snapshot directory, start a new agent); torchrun restarts the round; every rank restores
and reports a SHA-256 of its model and AdamW state; the job trains on and finishes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from peer_recovery.demo.driver import Outcome, Scenario, run_scenario
from peer_recovery.peer_restore import EXIT_TRANSFER_FAILED

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


@pytest.fixture
def shm_root() -> Iterator[Path]:
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    root = Path(tempfile.mkdtemp(prefix="peer-recovery-test-", dir=base))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _run(tmp_path: Path, shm_root: Path, scenario: Scenario) -> Outcome:
    outcome = run_scenario(tmp_path, shm_root, scenario, say=lambda _: None)
    assert outcome.exit_codes == dict.fromkeys(range(scenario.nnodes), 0), outcome.logs[-6000:]
    return outcome


def _paused_hash(outcome: Outcome, rank: int) -> str:
    return outcome.paused[rank]["hash"]


def _source(report: dict) -> int:
    match = re.fullmatch(r"rank (\d+)", report["source"])
    assert match, report
    return int(match.group(1))


def test_make_demo_in_its_short_mode_reports_identical_state() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "peer_recovery.demo", "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    last = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.fullmatch(
        r"RESULT peer_seconds=[0-9.]+ storage_seconds=[0-9.]+ bytes=[1-9][0-9]* identical=true "
        r"resume_seconds=[0-9.]+ steps_lost=0 storage_steps_lost=3",
        last,
    ), last
    # Where the resume went, phase by phase, from the pod's replacement to the first step.
    assert "| resume (replacement to first step) |" in result.stdout
    # Where each rank's restore went: the receiver's row names its transfer and the vote.
    assert re.search(
        r"\| receive \| [^|]+ \| [0-9]+ \| [0-9.]+ \| [^|]*transfer and check [0-9.]+, vote ",
        result.stdout,
    ), result.stdout[-3000:]
    assert "DCP checkpoint" in result.stdout


def test_a_replaced_rank_restores_from_a_peer_exactly_planned_in_band_after_the_bound(
    tmp_path: Path, shm_root: Path
) -> None:
    # The plan file exists but holds no plan for pod 2: after the bound, in-band planning.
    outcome = _run(tmp_path, shm_root, Scenario(replaced=(2,), plans={}, plan_timeout=1.0))
    reports = outcome.last_restore
    assert [r["role"] for r in reports] == ["local", "local", "receive", "local"] or (
        reports[2]["role"] == "receive" and reports[_source(reports[2])]["role"] == "send"
    )
    assert reports[2]["role"] == "receive" and reports[2]["bytes"] > 0
    assert all(r["step"] == 6 for r in reports)
    healthy = _paused_hash(outcome, 0)
    assert all(r["hash"] == healthy for r in reports)  # bitwise: model and AdamW state
    assert "none within 1s, planned in-band" in outcome.logs
    # Every other holder stripes too: ranks 0, 1 and 3 all serve rank 2's slot.
    assert re.search(r"peer transfers \d->2 \(runtime\) \[also \d \d\]", outcome.logs)
    assert [reports[r]["role"] for r in (0, 1, 3)] == ["send"] * 3
    assert len({f["hash"] for f in outcome.final}) == 1


def test_two_replaced_ranks_are_served_by_different_sources(tmp_path: Path, shm_root: Path) -> None:
    outcome = _run(tmp_path, shm_root, Scenario(replaced=(1, 2), plans=None))
    reports = outcome.last_restore
    assert reports[1]["role"] == reports[2]["role"] == "receive"
    sources = {_source(reports[1]), _source(reports[2])}
    assert sources == {0, 3}
    assert all(r["hash"] == _paused_hash(outcome, 0) for r in reports)


def test_sharded_replicas_restore_each_shard_from_its_own_replica(
    tmp_path: Path, shm_root: Path
) -> None:
    # Pods-per-replica 2: pods 0 and 2 hold shard 0, pods 1 and 3 shard 1 (other shapes).
    outcome = _run(tmp_path, shm_root, Scenario(replaced=(1, 2), plans=None, shards=2))
    reports = outcome.last_restore
    assert _source(reports[1]) == 3 and _source(reports[2]) == 0
    assert _paused_hash(outcome, 0) != _paused_hash(outcome, 3)
    for rank, report in enumerate(reports):
        assert report["hash"] == _paused_hash(outcome, {0: 0, 1: 3, 2: 0, 3: 3}[rank])


def test_a_plan_naming_a_source_of_another_shard_is_refused_before_any_byte_moves(
    tmp_path: Path, shm_root: Path
) -> None:
    # The plan says pod 0 (shard 0) streams to pod 1 (shard 1): the keys differ, so the
    # holder of pod 1's key (pod 3) is used instead, planned in-band.
    outcome = _run(tmp_path, shm_root, Scenario(replaced=(1,), plans={1: 0}, shards=2))
    reports = outcome.last_restore
    assert _source(reports[1]) == 3
    assert reports[1]["hash"] == _paused_hash(outcome, 3)
    assert "peer transfers 3->1 (runtime)" in outcome.logs


def test_every_holder_of_a_shard_lost_means_every_rank_loads_the_checkpoint(
    tmp_path: Path, shm_root: Path
) -> None:
    outcome = _run(tmp_path, shm_root, Scenario(replaced=(1, 3), plans=None, shards=2))
    reports = outcome.last_restore
    assert [r["role"] for r in reports] == ["checkpoint"] * 4
    assert all(r["step"] == 3 for r in reports)
    assert "every holder of that shard is lost" in outcome.logs
    for shard in (0, 1):
        assert len({f["hash"] for f in outcome.final if f["shard"] == shard}) == 1


def test_a_striped_source_killed_mid_stream_costs_a_round_not_the_checkpoint(
    tmp_path: Path, shm_root: Path
) -> None:
    # Rank 2 stripes over ranks 1 (planned), 0 and 3; rank 1 dies at its first request.
    # The receiver completes from the others (no transfer failure, no exit 75), but the
    # dead worker's agent restarts the round; that round agrees again from what is held
    # (rank 1's pod kept its snapshot; the fault fires once per job) and resumes by peers.
    scenario = Scenario(
        replaced=(2,),
        plans={2: 1},
        pod_env={1: {"PEER_RECOVERY_FAULT": "sender-dies-midstream"}},
    )
    outcome = _run(tmp_path, shm_root, scenario)
    assert "fault injection: this sender dies mid-stream" in outcome.logs
    assert f"exiting with {EXIT_TRANSFER_FAILED}" not in outcome.logs
    assert "loading the checkpoint: round" not in outcome.logs
    reports = outcome.last_restore
    assert reports[2]["role"] == "receive" and _source(reports[2]) == 1
    assert all(r["step"] == 6 for r in reports)
    assert all(r["hash"] == _paused_hash(outcome, 0) for r in reports)  # bitwise
    assert len({f["hash"] for f in outcome.final}) == 1


def test_the_only_holder_killed_mid_stream_ends_in_the_checkpoint_for_everyone(
    tmp_path: Path, shm_root: Path
) -> None:
    # Pods-per-replica 2: pod 1 is the only other holder of pod 3's shard.
    scenario = Scenario(
        replaced=(3,),
        plans={3: 1},
        shards=2,
        pod_env={1: {"PEER_RECOVERY_FAULT": "sender-dies-midstream"}},
    )
    outcome = _run(tmp_path, shm_root, scenario)
    assert f"transfer failed, exiting with {EXIT_TRANSFER_FAILED}" in outcome.logs
    # No rank ever reported a successful restore from the failed transfer...
    assert not any(r["role"] in ("receive", "send") for rs in outcome.restores.values() for r in rs)
    # ...and the next round's directive made every rank load the checkpoint.
    last = outcome.last_restore
    assert [r["role"] for r in last] == ["checkpoint"] * 4
    assert "loading the checkpoint: round" in outcome.logs
    for shard in (0, 1):
        assert len({f["hash"] for f in outcome.final if f["shard"] == shard}) == 1
