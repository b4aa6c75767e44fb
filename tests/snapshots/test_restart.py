"""Snapshot, kill the worker process for real, restore in a new process: exact or refused.

Every test runs real worker processes (``_worker.py``): one trains and snapshots into a
store directory and is killed with a real signal; a fresh process builds new objects (from
another seed), restores, and compares with the reference state bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).with_name("_worker.py")
pytestmark = pytest.mark.multiproc


class Worker:
    def __init__(self, mode: str, store: Path, work: Path, **opts: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(store), str(work), json.dumps(opts)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_for(self, marker: Path, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited {self.proc.returncode}: {self.proc.stderr.read()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"worker never wrote {marker.name}")
            time.sleep(0.05)

    def kill(self, sig: int) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == -sig

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    store, work = tmp_path / "shm", tmp_path / "work"
    work.mkdir()
    yield store, work


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


def restore(store: Path, work: Path, **opts: Any) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(WORKER), "restore", str(store), str(work), json.dumps(opts)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["log"] = done.stderr
    return report


def train_and_kill(workers: list[Worker], store: Path, work: Path, sig: int, **opts: Any) -> None:
    worker = Worker("train", store, work, **opts)
    workers.append(worker)
    worker.wait_for(work / f"done-{opts.get('steps', 4)}")
    worker.kill(sig)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("async_snapshot", [True, False], ids=["async", "sync"])
def test_killed_worker_is_restored_exactly(
    dirs: tuple[Path, Path], workers: list[Worker], sig: int, async_snapshot: bool
) -> None:
    store, work = dirs
    train_and_kill(workers, store, work, sig, steps=4, **{"async": async_snapshot})
    report = restore(store, work)
    assert report["result"] == {"step": 4, "role": "local", "bytes": report["result"]["bytes"]}
    assert report["result"]["bytes"] > 0
    assert report["differs"] == [], report["log"]  # model, AdamW state, scheduler, private
    assert report["private_restored"] is True


def test_killed_mid_snapshot_leaves_previous_slot_restorable(
    dirs: tuple[Path, Path], workers: list[Worker]
) -> None:
    store, work = dirs
    worker = Worker("hang-mid-snapshot", store, work, steps=4)
    workers.append(worker)
    worker.wait_for(work / "copying")  # step 4's snapshot is half-copied over step 2's slot
    worker.kill(signal.SIGKILL)
    assert not (work / "done-4").exists()
    report = restore(store, work)
    assert report["result"]["step"] == 3
    assert report["differs"] == []


def test_corrupted_slot_is_detected_and_skipped(
    dirs: tuple[Path, Path], workers: list[Worker]
) -> None:
    store, work = dirs
    train_and_kill(workers, store, work, signal.SIGKILL, steps=4)
    newest = json.loads((store / "rank-0" / "slot-1.json").read_bytes())["body"]
    assert newest["step"] == 4
    data = store / "rank-0" / "slot-1.data"
    with open(data, "r+b") as handle:  # flip one bit in the middle of the first tensor
        handle.seek(100)
        byte = handle.read(1)[0]
        handle.seek(100)
        handle.write(bytes([byte ^ 0x01]))
    report = restore(store, work)
    assert report["result"]["step"] == 3, report["log"]
    assert report["differs"] == []
    assert "failed its checksum" in report["log"]


def test_shard_key_mismatch_is_refused_and_quarantined(
    dirs: tuple[Path, Path], workers: list[Worker]
) -> None:
    store, work = dirs
    train_and_kill(workers, store, work, signal.SIGKILL, steps=2, width=32)
    report = restore(store, work, width=48)  # another model: names equal, shapes differ
    assert report["result"] is None
    assert "another shard" in report["log"] and "state digest" in report["log"]
    assert report["optimizer_state"] == 0  # the never-stepped optimizer was left untouched
    assert not [f for f in report["files"] if f.endswith(".json")]  # no longer snapshots
    assert "quarantine" in report["files"]  # moved aside, not deleted


def test_snapshot_older_than_checkpoint_is_never_used(
    dirs: tuple[Path, Path], workers: list[Worker]
) -> None:
    store, work = dirs
    train_and_kill(workers, store, work, signal.SIGKILL, steps=3)
    assert restore(store, work, checkpoint_step=3)["result"]["step"] == 3  # as new: usable
    report = restore(store, work, checkpoint_step=4)
    assert report["result"] is None
    assert "older than the checkpoint's step 4" in report["log"]


def test_manifest_damaged_on_disk_is_skipped(
    dirs: tuple[Path, Path], workers: list[Worker]
) -> None:
    store, work = dirs
    train_and_kill(workers, store, work, signal.SIGKILL, steps=4)
    manifest = store / "rank-0" / "slot-1.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"step":4', b'"step":9'))
    report = restore(store, work)
    assert report["result"]["step"] == 3
    assert "its own checksum does not match" in report["log"]


def test_clean_exit_removes_the_files(tmp_path: Path) -> None:
    code = (
        "import torch, sys\n"
        "from peer_recovery.recovery import PeerRecovery\n"
        "m = torch.nn.Linear(4, 4)\n"
        "with PeerRecovery({'model': m}, directory=sys.argv[1]) as r:\n"
        "    r.snapshot(1)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "shm")], check=True, timeout=60)
    assert not (tmp_path / "shm" / "rank-0").exists()
    assert os.listdir(tmp_path / "shm") == []
