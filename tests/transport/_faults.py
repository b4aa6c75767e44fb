"""Fault injection over a real process group: a wrapper that misbehaves on chosen messages.

Data message i of a transfer travels with tag ``DATA_TAG + 2 i`` (see the engine), so the
wrapper can flip a byte of, delay, or SIGKILL its own process at a chosen message while
every byte still goes through real gloo.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch

from peer_recovery.transport.engine import DATA_TAG


def _message(tag: int) -> int | None:
    if tag >= DATA_TAG and (tag - DATA_TAG) % 2 == 0:
        return (tag - DATA_TAG) // 2
    return None


class FaultyPG:
    """Delegates to ``pg``; at data message ``at`` it flips a byte, sleeps, or dies."""

    def __init__(self, pg: Any, *, at: int, action: str, seconds: float = 0.0) -> None:
        self._pg, self._at, self._action, self._seconds = pg, at, action, seconds

    def _hook(self, tensors: list[torch.Tensor], tag: int) -> list[torch.Tensor]:
        if _message(tag) != self._at:
            return tensors
        if self._action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self._action == "sleep":
            time.sleep(self._seconds)
        if self._action == "flip":
            bad = tensors[0].clone()
            bad[bad.numel() // 2] ^= 0x10
            return [bad]
        return tensors

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> Any:
        return self._pg.send(self._hook(tensors, tag), dst, tag)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> Any:
        return self._pg.recv(self._hook(tensors, tag), src, tag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pg, name)
