"""Worker for the plugin tests: records what torchrun gave it, proves the bootstrap store
works with one all_reduce, then waits for the test to say stop (or to be killed)."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    out = Path(sys.argv[1])
    round_no = os.environ["PEER_RECOVERY_ROUND"]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    total = torch.tensor([dist.get_rank()])
    dist.all_reduce(total)
    record = {
        "rank": int(os.environ["RANK"]),
        "group_rank": int(os.environ["GROUP_RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
        "ordinal": int(os.environ["PEER_RECOVERY_ORDINAL"]),
        "round": int(round_no),
        "pid": os.getpid(),
        "all_reduce": int(total.item()),
        "round_prefix": os.environ["PEER_RECOVERY_ROUND_PREFIX"],
    }
    name = out / f"round{round_no}-ordinal{record['ordinal']}.json"
    name.with_suffix(".tmp").write_text(json.dumps(record))
    name.with_suffix(".tmp").rename(name)
    deadline = time.monotonic() + 120
    while not (out / "stop").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
