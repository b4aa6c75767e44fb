"""A two-rank training script for the abandoned-timeline test, run by torchrun agents.

Usage: ``_timeline.py <out dir>``. Each rank holds its own shard (``position``), so no rank
can stand in for the other. What it does depends on the round (``PEER_RECOVERY_ROUND``):

- round 1: snapshot steps 0, 5, 10, 15, 20; rank 1 dies before its step 20 (after rank 0
  committed its 20), so the job must resume at 15 and rank 0's 20 is abandoned;
- round 2: restore (at 15), train again to step 20 on other data, snapshot it; rank 1 dies
  once both committed that new 20;
- round 3: restore and exit.

After each restore it writes ``restore-round<R>-rank<r>.json`` (step, state hash); after
each snapshot ``ref-round<R>-rank<r>-step<S>.json`` (the state's hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from peer_recovery.recovery import PeerRecovery


def state_hash(model: torch.nn.Module, optim: torch.optim.Optimizer) -> str:
    digest = hashlib.sha256()
    for t in (*model.state_dict().values(), *optim.state_dict()["state"].get(0, {}).values()):
        digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write(path: Path, value: dict) -> None:
    path.with_suffix(".tmp").write_text(json.dumps(value))
    path.with_suffix(".tmp").rename(path)


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {path}")
        time.sleep(0.05)


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, round_no = dist.get_rank(), int(os.environ["PEER_RECOVERY_ROUND"])
    torch.manual_seed(rank)
    model = torch.nn.Linear(8, 8)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    recovery = PeerRecovery.from_env(
        {"model": model, "optim": optim}, async_snapshot=False, position={"tp": rank}
    )
    result = recovery.restore()
    start = 0 if result is None else result.step
    write(
        out / f"restore-round{round_no}-rank{rank}.json",
        {"step": None if result is None else result.step, "hash": state_hash(model, optim)},
    )
    if round_no >= 3:
        recovery.close(remove=False)
        return
    if result is None:
        recovery.snapshot(0)
    for step in range(start + 1, 21):
        if step == 20 and round_no == 1 and rank == 1:
            wait_for(out / "ref-round1-rank0-step20.json")
            os._exit(1)  # crashes before committing step 20
        gen = torch.Generator().manual_seed(step * 7919 + round_no * 31 + rank)
        loss = model(torch.randn(4, 8, generator=gen)).square().mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step % 5 == 0:
            recovery.snapshot(step)
            ref = {"hash": state_hash(model, optim)}
            write(out / f"ref-round{round_no}-rank{rank}-step{step}.json", ref)
    if round_no == 2 and rank == 1:
        wait_for(out / "ref-round2-rank0-step20.json")
        os._exit(1)  # crashes again, after both committed the new step 20
    time.sleep(600)  # until torchrun restarts the round


if __name__ == "__main__":
    main()
