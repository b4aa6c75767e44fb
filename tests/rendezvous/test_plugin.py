"""The ``peer-recovery`` rendezvous plugin under real torchrun agents."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer_recovery.demo.local_job import LocalJob

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

WORKER = Path(__file__).with_name("_worker.py")


def _records(out: Path, round_no: int, nnodes: int, timeout: float, job: LocalJob) -> list[dict]:
    deadline = time.monotonic() + timeout
    paths = [out / f"round{round_no}-ordinal{o}.json" for o in range(nnodes)]
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            raise AssertionError(f"round {round_no} incomplete; logs:\n{job.logs()[-6000:]}")
        time.sleep(0.1)
    return [json.loads(p.read_text()) for p in paths]


def test_torchrun_finds_the_plugin_through_its_entry_point() -> None:
    code = (
        "from torch.distributed.elastic.rendezvous.registry import _register_out_of_tree_handlers\n"
        "from torch.distributed.elastic.rendezvous import rendezvous_handler_registry as r\n"
        "_register_out_of_tree_handlers()\n"
        "print(r._registry['peer-recovery'].__module__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "peer_recovery.plugin"


def test_ranks_stay_pinned_when_a_pod_is_replaced_and_agents_rejoin_in_another_order(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with LocalJob(tmp_path / "job", [str(WORKER), str(out)], nnodes=3, run_id="pin") as job:
        # c10d ranks agents by (host, pid): starting them 2, 1, 0 reverses its order.
        job.start(order=[2, 1, 0], stagger=0.3)
        first = _records(out, 1, 3, 120, job)
        # Replace pod 0 (the oldest pid becomes the newest): the order changes again.
        job.replace_pod(0)
        second = _records(out, 2, 3, 120, job)
        (out / "stop").touch()
        codes = job.wait(120)
    assert codes == {0: 0, 1: 0, 2: 0}, job.logs()[-6000:]
    for records in (first, second):
        assert [r["rank"] for r in records] == [0, 1, 2]
        assert [r["group_rank"] for r in records] == [0, 1, 2]
        assert all(r["world_size"] == 3 and r["all_reduce"] == 3 for r in records)
    assert first[0]["pid"] != second[0]["pid"]
    assert first[0]["round_prefix"] != second[0]["round_prefix"]
    logs = job.logs()
    assert "c10d had ranked it 2" in logs  # the stock order really was different


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-restarts=0", "--rdzv-id=x", "--nnodes=2"], "--max-restarts is 0"),
        (["--max-restarts=1", "--nnodes=2"], "--rdzv-id is not set"),
        (["--max-restarts=1", "--rdzv-id=x", "--nnodes=1:2"], "fixed world size"),
    ],
)
def test_torchrun_settings_are_checked_at_start(args: list[str], message: str) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--rdzv-backend=peer-recovery",
        "--rdzv-endpoint=127.0.0.1:1", "--nproc-per-node=1", *args, str(WORKER), "/nonexistent",
    ]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "PEER_RECOVERY_ORDINAL": "0"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "peer-recovery cannot run with these torchrun settings" in result.stderr
    assert message in result.stderr


def test_a_missing_ordinal_is_a_clear_error() -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--rdzv-backend=peer-recovery",
        "--rdzv-endpoint=127.0.0.1:1", "--rdzv-id=x", "--nnodes=2", "--max-restarts=1",
        str(WORKER), "/nonexistent",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"}
    )
    assert result.returncode != 0
    assert "cannot tell this pod's ordinal" in result.stderr


def test_two_agents_claiming_one_ordinal_both_fail_clearly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    job = LocalJob(
        tmp_path / "job",
        [str(WORKER), str(out)],
        nnodes=2,
        run_id="twice",
        pod_env={1: {"PEER_RECOVERY_ORDINAL": "0"}},
    )
    with job:
        job.start()
        codes = job.wait(180)
    assert all(code != 0 for code in codes.values()), codes
    assert job.logs().count("two agents claim one pod ordinal: ordinal 0 claimed by") >= 2
    assert not list(out.glob("round*.json"))  # no worker ever started
