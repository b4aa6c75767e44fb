"""Benchmark: the floor of moving 20,000 small tensors in place through staging buffers.

A receiver's small tensors live in separate allocations, and a gloo message fills one
buffer, so any design that coalesces them (ours does) copies each byte twice more than a
raw send: into a staging buffer on the sender and out of one on the receiver. This measures
what those copies cost on this machine, without any per-tensor work, metadata or
validation, so that ``benchmarks/transport.py``'s in-place ratio can be read against what
is reachable at all. Two processes over gloo on loopback; medians of ``--repeats`` after a
warm-up, run round-robin; each line is the time and its ratio to the ceiling:

- ceiling: one flat-buffer ``pg.send`` into a reused buffer (as in transport.py);
- pipeline: the same bytes as our transport's messages (its plan, its pool of reusable
  buffers, its depth), with no copies;
- + receiver copy / + sender copy / + both copies: each message also copied once, as one
  ``memcpy``, out of (into) its staging buffer to (from) a flat region;
- ours: ``peer_recovery.transport.PGTransport`` in place (metadata, per-tensor scatter).

    python benchmarks/transport_floor.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from transport import TIMEOUT, _zeros_like, run_two_ranks, small_state

METHODS = ("ceiling", "pipeline", "+ receiver copy", "+ sender copy", "+ both copies", "ours")


def _pipeline(pg: Any, rank: int, sizes: list[int], copy: bool, flat: Any) -> None:
    """Send (rank 0) or receive the planned messages through the engine's buffer pool."""
    import torch

    from peer_recovery.transport import engine

    pool = [torch.empty(max(sizes), dtype=torch.uint8) for _ in range(engine._BUFFERS)]
    free, inflight = list(range(len(pool))), deque()
    offset = 0

    def finish() -> None:
        work, slot, start, n = inflight.popleft()
        work.wait()
        if copy and rank == 1:
            flat[start : start + n].copy_(pool[slot][:n])
        free.append(slot)

    for i, n in enumerate(sizes):
        while not free:
            finish()
        slot = free.pop()
        data = pool[slot][:n]
        if rank == 0:
            if copy:
                data.copy_(flat[offset : offset + n])
            work = pg.send([data], 1, 100 + i)
        else:
            work = pg.recv([data], 0, 100 + i)
        inflight.append((work, slot, offset, n))
        offset += n
        while len(inflight) > engine._DEPTH:
            finish()
    while inflight:
        finish()


def _methods(rank: int, pg: Any, state: dict[str, Any]) -> dict[str, Callable[[], None]]:
    import torch

    from peer_recovery.transport import PGTransport
    from peer_recovery.transport.describe import describe_state
    from peer_recovery.transport.pg_transport import _plan

    specs = describe_state(state).specs
    sizes = [m.nbytes for m in _plan(specs, 16 << 20, 32 << 20, 256 << 10)]
    flat = torch.zeros(sum(sizes), dtype=torch.uint8)
    peer = 1 - rank
    ours: Callable[[], None]
    if rank == 0:
        ours = lambda: PGTransport(pg, TIMEOUT, "cpu").send_checkpoint([1], state)  # noqa: E731
    else:
        targets = _zeros_like(state)
        ours = lambda: PGTransport(pg, TIMEOUT, "cpu", lambda: targets).recv_checkpoint(0)  # noqa: E731
    sender_copies, receiver_copies = rank == 0, rank == 1
    return {
        "ceiling": lambda: (pg.send if rank == 0 else pg.recv)([flat], peer, 99).wait(),
        "pipeline": lambda: _pipeline(pg, rank, sizes, False, flat),
        "+ receiver copy": lambda: _pipeline(pg, rank, sizes, receiver_copies, flat),
        "+ sender copy": lambda: _pipeline(pg, rank, sizes, sender_copies, flat),
        "+ both copies": lambda: _pipeline(pg, rank, sizes, True, flat),
        "ours": ours,
    }


def _worker(rank: int, store: str, args: argparse.Namespace, out: Any) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    methods = _methods(rank, dist.group.WORLD, small_state())
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.warmup + args.repeats):
        for name, run in methods.items():
            dist.barrier()
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    out.put((rank, {m: statistics.median(t[args.warmup :]) for m, t in times.items()}))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    results, ok = run_two_ranks(_worker, args, timeout=1800)
    medians = results[1]  # the receiver's clock
    print(
        f"staging floor, 20,000 small tensors in place: 2 processes, gloo on loopback, "
        f"median of {args.repeats} after {args.warmup} warm-up"
    )
    print("| method | ms | / ceiling |\n|---|---|---|")
    for name in METHODS:
        ratio = medians["ceiling"] / medians[name]
        print(f"| {name} | {medians[name] * 1e3:.0f} | {ratio:.2f}x |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
