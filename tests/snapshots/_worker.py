"""A training worker for the snapshot tests, run as a real process and killed by the test.

Usage: ``python _worker.py <mode> <store dir> <work dir> [options as JSON]``

- ``train``: train a small model with AdamW and a scheduler, snapshotting every step; after
  each committed snapshot write ``ref-<step>.pt`` (the exact state, for comparison) and
  ``done-<step>``; then wait to be killed.
- ``hang-mid-snapshot``: like train, but the snapshot of the last step stops halfway
  through copying its tensors (``copying`` marker) and waits to be killed there.
- ``restore``: build fresh objects, ``restore(checkpoint_step)``, compare with the
  references bitwise and print one JSON line with the outcome.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from peer_recovery.recovery import PeerRecovery
from peer_recovery.snapshots import store as store_module


class TinyLM(torch.nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, width)
        self.norm = torch.nn.LayerNorm(width)
        self.ff = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, 50, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.ff(self.norm(self.embed(tokens)))))


class Position:
    """Rank-private state: a data-loader position and the torch RNG."""

    def __init__(self) -> None:
        self.batches = 0

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = state["batches"]
        torch.set_rng_state(state["rng"])


def build(seed: int, width: int) -> tuple[TinyLM, Any, Any, Position]:
    torch.manual_seed(seed)
    model = TinyLM(width)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 / (1 + s))
    return model, optim, sched, Position()


def state_of(model: Any, optim: Any, sched: Any, pos: Position) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "sched": sched.state_dict(),
        "private": pos.state_dict(),
    }


def train_step(model: Any, optim: Any, sched: Any, pos: Position) -> None:
    tokens = torch.randint(0, 50, (4, 8))
    loss = model(tokens).logsumexp(-1).mean()
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    sched.step()
    pos.batches += 1


def same(a: Any, b: Any, path: str = "") -> list[str]:
    """Bitwise comparison of two states; returns the paths that differ."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [path]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [path]
        return (
            []
            if torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
            else [path]
        )
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys"]
        return [d for k in a for d in same(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return [path]
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in same(x, y, f"{path}/{i}")
        ]
    return [] if (a == b and type(a) is type(b)) else [path]


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    mode, store_dir, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    width = opts.get("width", 32)
    steps = opts.get("steps", 4)
    if mode in ("train", "hang-mid-snapshot"):
        model, optim, sched, pos = build(0, width)
        recovery = PeerRecovery(
            {"model": model, "optim": optim, "sched": sched},
            private={"position": pos},
            directory=store_dir,
            async_snapshot=opts.get("async", True),
        )
        for step in range(1, steps + 1):
            train_step(model, optim, sched, pos)
            if mode == "hang-mid-snapshot" and step == steps:
                _hang_halfway(work)
            recovery.snapshot(step)
            recovery.wait()
            torch.save(state_of(model, optim, sched, pos), work / f"ref-{step}.pt")
            (work / f"done-{step}").touch()
        while True:
            time.sleep(1)
    if mode == "restore":
        model, optim, sched, pos = build(1, width)  # different seed: equality cannot be luck
        recovery = PeerRecovery(
            {"model": model, "optim": optim, "sched": sched},
            private={"position": pos},
            directory=store_dir,
        )
        result = recovery.restore(checkpoint_step=opts.get("checkpoint_step"))
        report: dict[str, Any] = {"result": None, "optimizer_state": len(optim.state)}
        if result is not None:
            ref = torch.load(work / f"ref-{result.step}.pt", weights_only=True)
            report["result"] = {
                "step": result.step,
                "role": result.role.value,
                "bytes": result.bytes,
            }
            report["private_restored"] = result.private_restored
            report["differs"] = same(ref, state_of(model, optim, sched, pos))
        report["files"] = (
            sorted(p.name for p in Path(store_dir, "rank-0").glob("*"))
            if Path(store_dir, "rank-0").exists()
            else []
        )
        print(json.dumps(report))
        return
    raise SystemExit(f"unknown mode {mode!r}")


def _hang_halfway(work: Path) -> None:
    """Make the next snapshot stop after copying half its tensors, to be killed there."""
    original = store_module._copy_into
    copied = [0]

    def copy_then_hang(buf: torch.Tensor, entry: Any, tensor: torch.Tensor) -> None:
        original(buf, entry, tensor)
        copied[0] += 1
        if copied[0] == 6:
            (work / "copying").touch()
            while True:
                time.sleep(1)

    store_module._copy_into = copy_then_hang


if __name__ == "__main__":
    main()
