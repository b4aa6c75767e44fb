"""Benchmark: the round's exchange and agreement at 1,024 ranks against one real TCPStore.

One process hosts the rendezvous TCPStore (as the job's rendezvous Service would) and
publishes what 128 pods' agents publish before their workers start (8 ranks a pod, every
pod holding its ranks' snapshots but one, replaced, that holds none). ``--procs`` processes
then play the 1,024 ranks as threads, each rank with its own store connection, and run a
round through :class:`peer_recovery.peer_restore.RoundSession` from a shared start (a key
every rank waits for) until it holds its plan. Two exchanges, in the same run, alternated:

- ``leader`` (today's): every rank publishes its record; rank 0 reads every record in one
  batched wait and ``multi_get``, agrees, publishes the agreement; the others read it
  (:mod:`peer_recovery.exchange`);
- ``previous``: every rank reads every agent, plan and worker record (batched as well) and
  computes the agreement itself, as the exchange did before.

A round's time is its slowest rank's: from the shared start until that rank holds its plan.
All ranks share this machine's cores, so that is an upper bound on what one rank of a real
job (its own CPU) waits. Medians of ``--repeats``; the last line is
``RESULT ranks=<n> round_seconds_per_rank=<f> previous_seconds_per_rank=<f>``.

    python benchmarks/round_scale.py [--ranks 1024] [--per-pod 8] [--procs 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from peer_recovery import exchange
from peer_recovery.agreement import Agreement
from peer_recovery.peer_restore import RoundContext, RoundSession
from peer_recovery.protocol import keys
from peer_recovery.protocol.codec import publish
from peer_recovery.protocol.records import (
    AgentRecord,
    Directive,
    Holding,
    PlanRecord,
    WorkerRecord,
)

RUN_ID = "bench"
STEP = 100
# A shard key as snapshots record it: world size, position, a digest of names and shapes.
SHARD_KEY = json.dumps(
    {"digest": "9f" * 32, "position": {"pipeline": 0, "tensor": 0}, "world_size": 1024},
    sort_keys=True,
    separators=(",", ":"),
)
MODES = ("leader", "previous")


class PreviousSession(RoundSession):
    """The exchange before the leader: every rank reads every record and agrees itself."""

    def _agree(
        self, live_shard_key: str, checkpoint_step: int | None, timeout: float, job: str | None
    ) -> Agreement:
        ctx = self.ctx
        publish(self.store, keys.worker_key(ctx.prefix, self.rank),
                WorkerRecord(self.rank, live_shard_key, checkpoint_step))  # fmt: skip
        inputs = exchange.read_inputs(self.store, ctx.prefix, ctx.nnodes, self.world_size, timeout)
        return inputs.agree(ctx.nnodes, self.world_size, job)


def _publish_agents(store: Any, prefix: str, nnodes: int, per_pod: int, replaced: int) -> None:
    publish(store, keys.directive_key(prefix), Directive(None, None))
    for o in range(nnodes):
        ranks = range(o * per_pod, (o + 1) * per_pod)
        held = () if o == replaced else tuple(Holding(r, STEP, SHARD_KEY, 1 << 30) for r in ranks)
        publish(store, keys.agent_key(prefix, o), AgentRecord(o, f"node-{o}", 1000 + o, held))
        publish(store, keys.plan_key(prefix, o), PlanRecord(None))


def _one_rank(
    store: Any, r: int, mode: str, round_no: int, world: int, per_pod: int, out: dict
) -> None:
    """One rank's round: wait for the shared start, then agree; its seconds into ``out``."""
    prefix = keys.round_prefix(RUN_ID, round_no)
    ctx = RoundContext("127.0.0.1", store.port, prefix, round_no, world // per_pod, RUN_ID,
                       r // per_pod, r % per_pod, per_pod)  # fmt: skip
    kind = RoundSession if mode == "leader" else PreviousSession
    session = kind(ctx, store, r, world, env={})
    store.add(prefix + "ready", 1)
    store.wait([prefix + "go"])
    started = float(store.get(prefix + "go"))
    cpu_started = time.thread_time()
    arrived = time.time()  # when this rank joined the exchange (its thread got to run)
    plan = session.agree(SHARD_KEY, STEP // 2, timeout=300)
    finished = time.time()
    out[r] = (finished - started, time.thread_time() - cpu_started, arrived, finished)
    if plan is None:
        raise RuntimeError(f"rank {r}: no agreement: {session.agreement}")


def _ranks_process(
    port: int, ranks: list[int], world: int, per_pod: int, rounds: list[tuple[int, str]]
) -> None:
    """Play ``ranks`` as threads, each with its own store connection, through ``rounds``."""
    from torch.distributed import TCPStore

    # Connected in parallel: now and then one connect stalls for seconds on this machine.
    with ThreadPoolExecutor(len(ranks)) as pool:
        connected = pool.map(lambda _: TCPStore("127.0.0.1", port, is_master=False), ranks)
        stores = dict(zip(ranks, connected, strict=True))
    for round_no, mode in rounds:
        out: dict[int, tuple[float, float, float, float]] = {}
        threads = [
            threading.Thread(
                target=_one_rank, args=(stores[r], r, mode, round_no, world, per_pod, out)
            )
            for r in ranks
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len(out) != len(ranks):
            raise RuntimeError(f"round {round_no}: {len(ranks) - len(out)} ranks failed")
        prefix = keys.round_prefix(RUN_ID, round_no)
        stores[ranks[0]].set(f"{prefix}done/{ranks[0]}", json.dumps(list(out.values())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=1024)
    parser.add_argument("--per-pod", type=int, default=8)
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.ranks % args.per_pod or args.ranks < 2 * args.per_pod:
        parser.error("--ranks must be a multiple of --per-pod, at least two pods")
    # One warning per connection otherwise (the client's reverse lookup of 127.0.0.1).
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from torch.distributed import TCPStore

    world, per_pod = args.ranks, args.per_pod
    nnodes = world // per_pod
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    rounds = [[str(i), MODES[i % 2]] for i in range(2 * args.repeats)]
    for round_no, _ in rounds:
        _publish_agents(
            store, keys.round_prefix(RUN_ID, int(round_no)), nnodes, per_pod, nnodes // 2
        )
    chunks = [list(range(world))[p :: args.procs] for p in range(args.procs)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_ranks_process, args=(store.port, c, world, per_pod, rounds))
             for c in chunks]  # fmt: skip
    for p in procs:
        p.start()
    print(f"{world} ranks ({nnodes} pods x {per_pod}) as threads of {args.procs} processes, "
          f"one TCPStore; {args.repeats} rounds of each exchange, alternated", flush=True)  # fmt: skip
    results: dict[str, list[float]] = {m: [] for m in MODES}
    after_last: dict[str, list[float]] = {m: [] for m in MODES}
    cpus: dict[str, list[float]] = {m: [] for m in MODES}
    for round_no, mode in rounds:
        prefix = keys.round_prefix(RUN_ID, round_no)
        while store.add(prefix + "ready", 0) < world:  # every rank waits for the start key
            time.sleep(0.05)
        time.sleep(0.2)
        store.set(prefix + "go", repr(time.time()))
        done = [f"{prefix}done/{c[0]}" for c in chunks]
        store.wait(done)
        seconds, cpu, arrivals, ends = [], [], [], []
        for raw in store.multi_get(done):
            for wall, used, arrived, finished in json.loads(raw):
                seconds.append(wall)
                cpu.append(used)
                arrivals.append(arrived)
                ends.append(finished)
        results[mode].append(max(seconds))
        after_last[mode].append(max(ends) - max(arrivals))
        cpus[mode].append(statistics.median(cpu))
        print(f"  round {round_no} {mode:8s}: slowest rank {max(seconds):7.3f}s, median rank "
              f"{statistics.median(seconds):7.3f}s, last arrival {max(arrivals) - min(arrivals):6.3f}s "
              f"after the first, then {after_last[mode][-1]:6.3f}s to the last plan, "
              f"median rank CPU {statistics.median(cpu):.4f}s", flush=True)  # fmt: skip
    for p in procs:
        p.join(60)
    leader = statistics.median(results["leader"])
    previous = statistics.median(results["previous"])
    print(f"leader exchange:   {leader:.3f}s per round (slowest rank), median rank CPU "
          f"{statistics.median(cpus['leader']):.4f}s")  # fmt: skip
    print(f"previous exchange: {previous:.3f}s per round (slowest rank), median rank CPU "
          f"{statistics.median(cpus['previous']):.4f}s")  # fmt: skip
    print(f"ratio leader/previous: {leader / previous:.3f}")
    print(f"from the last rank's arrival to the last plan (the exchange itself, without the "
          f"simulated ranks' start-up skew): leader "
          f"{statistics.median(after_last['leader']):.3f}s, previous "
          f"{statistics.median(after_last['previous']):.3f}s")  # fmt: skip
    print(f"RESULT ranks={world} round_seconds_per_rank={leader:.4f} "
          f"previous_seconds_per_rank={previous:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
