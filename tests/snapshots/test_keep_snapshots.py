"""The snapshot layer never destroys a snapshot it cannot use, and never crashes training.

- A parameter that requires grad but never gets one (an idle head) has no optimizer state
  in training; the snapshot must still match the restarted rank's live state and restore
  bitwise.
- A snapshot of another shard is quarantined (moved aside, never scanned, published or
  loaded), not deleted.
- Running out of space (a real small tmpfs) never truncates a committed slot, and a failed
  background commit is logged and counted while training goes on.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from peer_recovery.recovery import PeerRecovery
from peer_recovery.rendezvous.manifests import holdings_in
from peer_recovery.shard_key import ShardKey
from peer_recovery.snapshots import sizing
from peer_recovery.snapshots.store import SnapshotStore
from peer_recovery.snapshots.tree import flatten
from tests.snapshots._worker import same


class IdleHead(torch.nn.Module):
    """``idle`` requires grad but is never used in ``forward``: it never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(6, 3)
        self.idle = torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def _build(seed: int) -> tuple[IdleHead, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = IdleHead()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _train(model: torch.nn.Module, optim: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(4, 6)).square().sum().backward()
        optim.step()
        optim.zero_grad(set_to_none=True)


def _state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": optim.state_dict()}


def test_unused_parameter_does_not_change_the_key_and_restores_bitwise(tmp_path: Path) -> None:
    model, optim = _build(0)
    _train(model, optim, 3)
    assert len(optim.state) == 2  # only the used layer's weight and bias have state
    PeerRecovery({"m": model, "o": optim}, directory=str(tmp_path), async_snapshot=False).snapshot(
        3
    )
    fresh_model, fresh_optim = _build(1)  # a restarted rank: other values, never stepped
    recovery = PeerRecovery({"m": fresh_model, "o": fresh_optim}, directory=str(tmp_path))
    result = recovery.restore()
    assert result is not None and result.step == 3
    assert same(_state(model, optim), _state(fresh_model, fresh_optim)) == []
    assert len(recovery.manifests()) == 1  # the snapshot is still there
    # Training on from both gives the same bits: the idle head still has no state.
    torch.manual_seed(2)
    _train(model, optim, 2)
    torch.manual_seed(2)
    _train(fresh_model, fresh_optim, 2)
    assert same(_state(model, optim), _state(fresh_model, fresh_optim)) == []


def test_snapshot_of_another_shard_is_quarantined_not_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, optim = _build(0)
    _train(model, optim, 2)
    PeerRecovery({"m": model, "o": optim}, directory=str(tmp_path), async_snapshot=False).snapshot(
        2
    )
    rank_dir = tmp_path / "rank-0"
    stored = {p.name: p.read_bytes() for p in rank_dir.glob("slot-0.*")}
    assert set(stored) == {"slot-0.json", "slot-0.data"}

    other = torch.nn.Linear(6, 4)  # another model: its key differs
    with caplog.at_level(logging.WARNING, logger="peer_recovery"):
        assert PeerRecovery({"m": other}, directory=str(tmp_path)).restore() is None
    assert "quarantined" in caplog.text and "another shard" in caplog.text
    quarantined = sorted((rank_dir / "quarantine").iterdir())
    assert [p.suffix for p in quarantined] == [".data", ".manifest"]
    by_suffix = {p.suffix: p.read_bytes() for p in quarantined}
    assert by_suffix[".manifest"] == stored["slot-0.json"]  # kept whole, byte for byte
    assert by_suffix[".data"][: len(stored["slot-0.data"])] == stored["slot-0.data"]
    # Never scanned, published or loaded again.
    assert SnapshotStore(rank_dir, rank=0).scan() == ([], [])
    assert holdings_in(tmp_path) == []
    again, again_optim = _build(1)
    assert PeerRecovery({"m": again, "o": again_optim}, directory=str(tmp_path)).restore() is None


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs standing for a small ``/dev/shm`` (needs mount privileges)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path, leave: int = 0) -> Path:
    """Write a filler file until the filesystem has at most ``leave`` bytes free."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    with open(filler, "wb") as handle:
        try:
            while os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize > leave:
                handle.write(chunk)
                handle.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_enospc_while_growing_a_slot_keeps_its_committed_snapshot(small_tmpfs: Path) -> None:
    """The free space is overstated (injected) so the real fallocate meets the real limit."""

    def roomy(directory: Path, need: int, allocated: int) -> sizing.Sizing:
        return sizing.Sizing(need, allocated, 1 << 40, None, None)

    store = SnapshotStore(small_tmpfs / "rank-0", rank=0, probe=roomy)
    state = flatten({"w": torch.arange(1000, dtype=torch.float32)})
    key = ShardKey(1, (), "0" * 64)
    committed = store.commit(store.write_data(7, key, state, None))
    size_before = store.capacity(committed.slot)
    _fill(small_tmpfs, leave=1 << 20)
    with pytest.raises(sizing.SizingError, match="No space left"):
        store.ensure_capacity(4 << 20)  # the state grew: both slots must grow
    assert store.capacity(committed.slot) == size_before
    manifests, problems = store.scan()
    assert problems == [] and [m.step for m in manifests] == [7]
    assert store.verify(manifests[0]) is None  # the committed snapshot is whole


def test_failed_background_commit_is_counted_and_training_goes_on(
    small_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, optim = _build(0)
    _train(model, optim, 1)
    recovery = PeerRecovery(
        {"m": model, "o": optim}, directory=str(small_tmpfs), async_snapshot=True
    )
    recovery.snapshot(1)
    recovery.wait()
    filler = _fill(small_tmpfs)  # /dev/shm is full: the next manifest cannot be written
    with caplog.at_level(logging.WARNING, logger="peer_recovery"):
        for step in (2, 3):
            _train(model, optim, 1)
            recovery.snapshot(step)  # the previous commit's failure is not raised here
        recovery.wait()
    assert recovery.stats.failed_snapshots == 2
    assert "No space left" in (recovery.stats.last_failure or "")
    assert "snapshot of step 2 failed" in caplog.text
    assert [m.step for m in recovery.manifests()] == [1]  # not a holder of 2 or 3
    assert not list((small_tmpfs / "rank-0").glob("*.tmp"))
    assert recovery.store.verify(recovery.manifests()[0]) is None
    filler.unlink()
    recovery.snapshot(4)
    recovery.wait()
    assert [m.step for m in recovery.manifests()] == [4, 1]
    assert recovery.stats.snapshots == 2
    recovery.close()
