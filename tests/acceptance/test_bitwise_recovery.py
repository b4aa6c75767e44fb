"""The acceptance test: a job that loses pods and recovers ends bitwise where it would have.

A deterministic CPU job (``peer_recovery.demo.train``: a small transformer, AdamW, gloo,
data a function of (step, rank), a snapshot every 2 steps, a checkpoint at step 4) runs
in 4 torchrun agents with the ``peer-recovery`` rendezvous backend
(``peer_recovery.demo.local_job.LocalJob``: one agent per "pod", each with its own
snapshot directory). Every run trains to step 8; each scenario pauses every rank at a kill
point, loses pods (agent and worker SIGKILLed), and lets torchrun restart the round. The
final model and optimizer state of every rank must equal, bitwise, that of the same job run
without a failure.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from peer_recovery.demo.local_job import LocalJob

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

NNODES = 4
STEPS = 8
# Width 256: the state crosses the wire in several messages, so a sender can die mid-stream.
TRAIN = ["--width=256", "--layers=1", f"--steps={STEPS}", "--snapshot-every=2",
         "--checkpoint-at=4"]  # fmt: skip
TIMEOUT_S = 600.0
# Generous liveness bounds: on a loaded machine an agent may miss a 1 s heartbeat.
RDZV_CONF = {"keep_alive_interval": "5", "keep_alive_max_attempt": "24", "join_timeout": "600"}


@dataclass(frozen=True)
class Loss:
    """Pods lost at once while every rank waits at step ``at``."""

    at: int
    pods: Sequence[int] = (2,)
    wipe: bool = True  # the pod is replaced (empty /dev/shm), not restarted in place
    plans: Mapping[int, int] | None = None  # a plan file: {target pod: source pod}
    pod_env: Mapping[int, Mapping[str, str]] = field(default_factory=dict)


@dataclass
class Run:
    final: list[dict[str, Any]]
    restores: list[dict[str, Any]]  # each rank's report of its last restore
    logs: str


@pytest.fixture(scope="module")
def shm_root() -> Iterator[Path]:
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    root = Path(tempfile.mkdtemp(prefix="peer-recovery-acceptance-", dir=base))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _wait(paths: list[Path], job: LocalJob, what: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + TIMEOUT_S
    while not all(p.exists() for p in paths):
        dead = [o for o, pod in job.pods.items() if pod.process and pod.process.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"agents {dead} exited" if dead else f"not done after {TIMEOUT_S:.0f}s"
            raise AssertionError(f"{what}: {why}\n{job.logs()[-8000:]}")
        time.sleep(0.2)
    return [json.loads(p.read_text()) for p in paths]


def run_job(workdir: Path, shm: Path, loss: Loss | None) -> Run:
    """The job, with ``loss`` (or none: then it never pauses); its final states."""
    out = workdir / "out"
    out.mkdir(parents=True)
    plan = workdir / "plan.json"
    env = {"PEER_RECOVERY_PLAN_TIMEOUT": "1"}
    if loss is not None and loss.plans is not None:
        env["PEER_RECOVERY_PLAN_FILE"] = str(plan)
    pause = STEPS if loss is None else loss.at  # at STEPS the loop ends before pausing
    script = ["-m", "peer_recovery.demo.train", f"--out={out}", f"--pause-at={pause}", *TRAIN]
    pod_env = {} if loss is None else loss.pod_env
    shm.mkdir(parents=True)
    with LocalJob(workdir / "job", script, nnodes=NNODES, run_id="acceptance", env=env,
                  pod_env=pod_env, shm_root=shm, rdzv_conf=RDZV_CONF) as job:  # fmt: skip
        job.start()
        if loss is not None:
            _wait([out / f"paused-rank{r}.json" for r in range(NNODES)], job, "the pause")
            if loss.plans is not None:
                entries = [{"target": t, "source": s} for t, s in loss.plans.items()]
                plan.write_text(json.dumps({"plans": entries}))
            (out / "released").touch()
            for pod in loss.pods:
                job.kill_pod(pod)
                if loss.wipe:
                    job.wipe_pod(pod)
            for pod in loss.pods:
                job.start_pod(pod)
        final = _wait([out / f"final-rank{r}.json" for r in range(NNODES)], job, "the end")
        codes = job.wait(120)
        logs = job.logs()
    assert codes == dict.fromkeys(range(NNODES), 0), logs[-6000:]
    restores = []
    for rank in range(NNODES):
        reports = [json.loads(p.read_text()) for p in out.glob(f"restore-round*-rank{rank}.json")]
        restores.append(max(reports, key=lambda r: r["round"]))
    return Run(final, restores, logs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, shm_root: Path) -> Run:
    """The same job without a failure."""
    return run_job(tmp_path_factory.mktemp("reference"), shm_root / "reference", None)


def _assert_bitwise_equal(run: Run, reference: Run) -> None:
    assert [f["step"] for f in run.final] == [STEPS] * NNODES
    assert [f["hash"] for f in run.final] == [f["hash"] for f in reference.final], run.restores


def _recover(tmp_path: Path, shm_root: Path, loss: Loss) -> Run:
    return run_job(tmp_path, shm_root / tmp_path.name, loss)


@pytest.mark.parametrize(
    ("at", "resumed"),
    [(1, None), (4, 4), (5, 4), (7, 6)],
    ids=["before-any-snapshot", "at-a-snapshot", "after-a-snapshot", "late"],
)
def test_a_pod_lost_at_any_point_recovers_to_the_bitwise_same_end(
    tmp_path: Path, shm_root: Path, reference: Run, at: int, resumed: int | None
) -> None:
    run = _recover(tmp_path, shm_root, Loss(at=at))
    if resumed is None:  # nothing to resume from: every rank starts afresh
        assert [r["role"] for r in run.restores] == ["fresh"] * NNODES
    else:
        assert run.restores[2]["role"] == "receive", run.restores
        assert {r["step"] for r in run.restores} == {resumed}
    _assert_bitwise_equal(run, reference)


def test_two_pods_lost_at_once_recover_to_the_bitwise_same_end(
    tmp_path: Path, shm_root: Path, reference: Run
) -> None:
    run = _recover(tmp_path, shm_root, Loss(at=5, pods=(1, 2)))
    assert [r["role"] for r in run.restores].count("receive") == 2, run.restores
    _assert_bitwise_equal(run, reference)


def test_a_restarted_pod_that_kept_its_snapshot_restores_it_locally(
    tmp_path: Path, shm_root: Path, reference: Run
) -> None:
    run = _recover(tmp_path, shm_root, Loss(at=7, wipe=False))
    assert [r["role"] for r in run.restores] == ["local"] * NNODES, run.restores
    _assert_bitwise_equal(run, reference)


def test_a_striped_source_killed_mid_stream_ends_bitwise_the_same_through_peers(
    tmp_path: Path, shm_root: Path, reference: Run
) -> None:
    # Pod 2 stripes over pods 1 (planned), 0 and 3; pod 1's worker dies mid-stream (once).
    # The receiver completes from the others; the restarted round resumes by peers.
    fault = {1: {"PEER_RECOVERY_FAULT": "sender-dies-midstream"}}
    run = _recover(tmp_path, shm_root, Loss(at=7, plans={2: 1}, pod_env=fault))
    assert "fault injection: this sender dies mid-stream" in run.logs
    assert "transfer failed, exiting with" not in run.logs
    assert run.restores[2]["role"] == "receive", run.restores
    assert {r["step"] for r in run.restores} == {6}
    _assert_bitwise_equal(run, reference)
