"""A rank restored from its own snapshot continues the same random streams and the same
sample order, bitwise: ``RNGState`` and ``DataPosition`` registered as rank-private state of
a real ``PeerRecovery`` on a real store."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from peer_recovery.rank_state import DataPosition, RNGState
from peer_recovery.recovery import PeerRecovery


def _recovery(root: Path, private: dict[str, Any]) -> PeerRecovery:
    model = torch.nn.Linear(4, 4)
    return PeerRecovery({"model": model}, private, directory=root, async_snapshot=False)


def _draws() -> list[Any]:
    """A little of every stream: Python, NumPy, torch CPU (and Gaussian caches in flight)."""
    return [
        [random.random() for _ in range(5)],
        random.gauss(0, 1),
        numpy.random.rand(5).tolist(),
        numpy.random.standard_normal(),
        torch.randn(5).tolist(),
        torch.randint(0, 1 << 30, (3,)).tolist(),
    ]


def test_a_restored_rank_continues_the_same_random_streams(tmp_path: Path) -> None:
    random.seed(1)
    numpy.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached Gaussian in Python's and NumPy's generators
    numpy.random.standard_normal()
    recovery = _recovery(tmp_path, {"rng": RNGState()})
    recovery.snapshot(1)
    expected = _draws()  # what the rank would have drawn had it not failed

    random.seed(99)  # the restarted process starts from other streams
    numpy.random.seed(99)
    torch.manual_seed(99)
    restored = _recovery(tmp_path, {"rng": RNGState()})
    result = restored.restore()
    assert result is not None and result.step == 1 and result.private_restored
    assert _draws() == expected


def _loader(epoch: int) -> DataLoader[Any]:
    data = TensorDataset(torch.arange(40).float().unsqueeze(1))
    sampler = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=7)
    sampler.set_epoch(epoch)
    return DataLoader(data, batch_size=3, sampler=sampler)


def _ids(batches: Any) -> list[list[float]]:
    return [batch[0].flatten().tolist() for batch in batches]


def test_a_restored_rank_continues_the_same_sample_order(tmp_path: Path) -> None:
    position = DataPosition()
    recovery = _recovery(tmp_path, {"data": position})
    seen = []
    for batch in position.iterate(_loader(position.epoch)):
        seen.append(batch[0].flatten().tolist())
        if position.batch == 4:
            recovery.snapshot(4)  # inside the loop, after the 4th batch was trained on
            break
    rest = _ids(_loader(0))[4:]  # the batches a rank that never failed goes on with
    position.next_epoch()
    assert position.state_dict() == {"epoch": 1, "batch": 0}

    resumed = DataPosition()
    result = _recovery(tmp_path, {"data": resumed}).restore()
    assert result is not None and result.private_restored
    assert resumed.state_dict() == {"epoch": 0, "batch": 4}
    assert _ids(resumed.iterate(_loader(resumed.epoch))) == rest
    assert resumed.batch == len(_ids(_loader(0)))
    resumed.next_epoch()
    assert _ids(resumed.iterate(_loader(resumed.epoch))) == _ids(_loader(1))  # a new epoch


def test_a_position_past_the_loader_or_malformed_is_refused() -> None:
    position = DataPosition()
    position.load_state_dict({"epoch": 0, "batch": 50})
    with pytest.raises(RuntimeError, match="epoch 0 ended while skipping to batch 50"):
        list(position.iterate(_loader(0)))
    with pytest.raises(ValueError, match="epoch and batch >= 0"):
        position.load_state_dict({"epoch": -1, "batch": 0})
