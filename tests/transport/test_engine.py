"""The engine's bound on messages in flight, against a recording process group.

A real gloo group cannot show how many operations are outstanding at once, so a fake one
records it: messages straight from tensor memory may run deep, messages that hold a
temporary contiguous copy may not (that is what keeps the sender's extra memory bounded).
"""

from __future__ import annotations

from datetime import timedelta

import torch

from peer_recovery.transport import engine
from peer_recovery.transport.engine import Wire, send_messages
from peer_recovery.transport.messages import plan_messages
from peer_recovery.transport.metadata import TensorSpec


class _Work:
    def __init__(self, group: _RecordingGroup) -> None:
        self._group = group

    def wait(self, timeout: timedelta) -> bool:
        self._group.outstanding -= 1
        return True


class _RecordingGroup:
    def __init__(self) -> None:
        self.outstanding = self.peak = self.sends = 0

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> _Work:
        self.outstanding += 1
        self.sends += 1
        self.peak = max(self.peak, self.outstanding)
        return _Work(self)


def _peak_in_flight(payloads: list[torch.Tensor]) -> tuple[int, int]:
    specs = [TensorSpec(p.dtype, tuple(p.shape), p.nbytes) for p in payloads]
    plan = plan_messages([s.nbytes for s in specs], bucket=1024, chunk=1 << 20, small=512)
    group = _RecordingGroup()
    wire = Wire(group, torch.device("cpu"), timedelta(seconds=5), False)  # type: ignore[arg-type]
    send_messages(wire, [1], payloads, specs, plan, str)
    assert group.outstanding == 0 and group.sends == len(plan) == len(payloads)
    return group.peak, len(plan)


def test_messages_straight_from_tensor_memory_run_deep() -> None:
    peak, messages = _peak_in_flight([torch.zeros(64, 64) for _ in range(80)])
    assert messages == 80
    assert peak == engine._DIRECT_DEPTH + 1  # posted before the oldest is waited for


def test_messages_holding_a_contiguous_copy_stay_shallow() -> None:
    peak, messages = _peak_in_flight([torch.zeros(64, 64).t() for _ in range(80)])
    assert messages == 80
    assert peak == engine._DEPTH + 1
