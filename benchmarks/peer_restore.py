"""Benchmark: a replaced rank restoring from a peer, three ways, against the floor.

Two processes over gloo on loopback: rank 0 holds a committed snapshot slot (in a
memory-backed directory) and live objects; rank 1 is the replaced rank, with live objects of
the same shapes and other values. Workloads: ``small`` (20,000 tensors of 1-64 KiB, about
640 MB), ``model`` (a GPT-2-small-shaped model with AdamW state, about 1.5 GB) and
``large`` (four 256 MiB tensors). For each, timed from a shared barrier until both ranks are
done (the slower one counts), medians of ``--repeats``, run round-robin:

- floor: the holder sends its slot's data as one flat message into a pre-touched buffer on
  the receiver, which then restores from it like a healthy rank (grouped copies into the
  live tensors); the holder restores itself after sending;
- previous: ``PGTransport`` in place (``send_checkpoint`` of the slot's views,
  ``recv_checkpoint`` into the live tensors, then ``load_state_dict``), the receive path
  before slot replication (without its backup copy of the receiver's objects, so this
  anchor is if anything fast); the holder restores itself after sending;
- new: slot replication (``peer_recovery.snapshots.replica``): the holder serves its slot
  from a thread while it restores itself; the receiver fetches the slot into its own store,
  checking every chunk's CRC-32 (and its live state against the layout while the bytes
  land), restores from it like a healthy rank, then commits it in the background (as
  ``restore()`` does once the job voted to resume).

Every holder restore verifies its slot's checksums first (as a planned holder does). The
receiver's slot files are preallocated before the barrier (start-up work, like the floor's
pre-touched buffer). Sizes: ``PEER_RESTORE_SCALE`` (default 1) scales the bytes of every
workload for quick runs; ``PEER_RESTORE_WORKLOADS`` picks workloads (comma-separated).
The last line is
``RATIOS small_vs_previous=<new/previous> model_vs_previous=<new/previous>
receiver_vs_floor=<worst new/floor over the workloads, receiver side>``.

    python benchmarks/peer_restore.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from transport import TIMEOUT, run_two_ranks

METHODS = ("floor", "previous", "new")
WORKLOADS = ("small", "model", "large")


class _Tensors:
    """A plain dict of tensors as a ``Stateful``."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, Any]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if value is not self.tensors[name]:
                self.tensors[name].copy_(value)


def _objects(name: str, scale: float, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    if name == "small":
        hi = max(8, int((64 << 10) * scale))
        shapes = torch.Generator().manual_seed(0)  # the same shapes on both ranks
        sizes = torch.randint(max(4, hi // 64), hi + 1, (20_000,), generator=shapes).tolist()
        return {
            "tensors": _Tensors(
                {f"t{i}": torch.rand(s // 4, generator=g) for i, s in enumerate(sizes)}
            )
        }
    if name == "large":
        per = max(1 << 20, int((256 << 20) * scale))
        return {
            "tensors": _Tensors({f"layer{i}": torch.rand(per // 4, generator=g) for i in range(4)})
        }
    from snapshot import GPT2Small, one_step

    torch.manual_seed(seed)
    model = GPT2Small(max(1, round(12 * scale)), vocab=max(1024, int(50257 * scale)))
    optim = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
    one_step(model, optim, sched)
    return {"model": model, "optim": optim, "sched": sched}


def _local_restore(
    live: Any, store: Any, manifest: Any, buf: Any = None, verify: bool = False
) -> dict[str, float]:
    """What a healthy rank does with its slot; phase times."""
    phases: dict[str, float] = {}
    started = time.perf_counter()
    if verify:
        assert store.verify(manifest) is None
        phases["verify"] = time.perf_counter() - started
    at = time.perf_counter()
    flat = live.flat()
    checked = live.check(flat, manifest.replicated)
    phases["check"] = time.perf_counter() - at
    at = time.perf_counter()
    live.load_slot(
        flat, manifest.replicated, store.mapped(manifest.slot) if buf is None else buf, checked
    )
    phases["load"] = time.perf_counter() - at
    return phases


def _run(method: str, rank: int, pg: Any, ctx: dict[str, Any]) -> dict[str, float]:
    """One timed restore by ``method`` on this rank; its phase times (``total`` included)."""
    import torch

    from peer_recovery.snapshots import replica
    from peer_recovery.transport import PGTransport

    live, store, manifest = ctx["live"], ctx["store"], ctx["manifest"]
    phases: dict[str, float] = {}
    if "commit" in ctx:  # the previous run's background commit, untimed
        ctx.pop("commit").join()
    pg.barrier().wait()
    started = time.perf_counter()
    if method == "floor":
        if rank == 0:
            data = store.mapped(manifest.slot)[: manifest.data_bytes]
            pg.send([data], 1, 7).wait()
            phases["send"] = time.perf_counter() - started
            phases.update(_local_restore(live, store, manifest, verify=True))
        else:
            pg.recv([ctx["flat_buffer"]], 0, 7).wait()
            phases["recv"] = time.perf_counter() - started
            phases.update(_local_restore(live, store, manifest, buf=ctx["flat_buffer"]))
    elif method == "previous":
        transport = PGTransport(pg, TIMEOUT, torch.device("cpu"), state_dict=ctx["template"])
        if rank == 0:
            transport.send_checkpoint(
                [1], store.read_state_dict(manifest, copy=False), step=manifest.step
            )
            phases["send"] = time.perf_counter() - started
            phases.update(_local_restore(live, store, manifest, verify=True))
        else:
            state = transport.recv_checkpoint(0, step=manifest.step)
            phases["recv"] = time.perf_counter() - started
            at = time.perf_counter()
            for name, obj in live.objects.items():
                obj.load_state_dict(state[name])
            phases["load"] = time.perf_counter() - at
    elif rank == 0:
        sent: dict[str, float] = {}

        def serve() -> None:
            replica.serve_slot(pg, 1, store, manifest)
            sent["serve"] = time.perf_counter() - started

        thread = threading.Thread(target=serve)
        thread.start()
        phases.update(_local_restore(live, store, manifest, verify=True))
        thread.join()
        phases.update(sent)
    else:

        def check(m: Any) -> Any:  # while the bytes are on the wire, as restore() does
            flat = live.flat()
            return flat, live.check(flat, m.replicated)

        # As restore() does: the manifest is installed after the load, in the background.
        got = replica.receive_slot(pg, [0], store, lambda m: None, check, commit=False)
        phases.update(header=got.header_seconds, data=got.data_seconds)
        at = time.perf_counter()
        flat, checked = got.prepared
        live.load_slot(flat, got.manifest.replicated, store.mapped(got.manifest.slot), checked)
        phases["load"] = time.perf_counter() - at
        ctx["commit"] = threading.Thread(target=store.install, args=(got.manifest,))
        ctx["commit"].start()
    phases["total"] = time.perf_counter() - started
    return phases


def _worker(rank: int, store_path: str, args: argparse.Namespace, out: Any) -> None:
    import torch
    import torch.distributed as dist

    from peer_recovery.shard_key import ShardKey
    from peer_recovery.snapshots.live import LiveState, flat_digest
    from peer_recovery.snapshots.manifest import Manifest
    from peer_recovery.snapshots.store import SnapshotStore

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=2, timeout=TIMEOUT
    )
    pg = dist.group.WORLD
    root = tempfile.mkdtemp(prefix=f"bench-peer-restore-{rank}-", dir=args.shm)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    try:
        live = LiveState(_objects(args.workload, args.scale, seed=rank))
        store = SnapshotStore(root, rank=rank)
        flat = live.flat()
        if rank == 0:
            manifest = store.commit(
                store.write_data(3, ShardKey(1, (), flat_digest(flat)), flat, None), threads=4
            )
            header = torch.frombuffer(bytearray(manifest.encode()), dtype=torch.uint8)
            pg.send([torch.tensor([header.numel()])], 1, 1).wait()
            pg.send([header], 1, 2).wait()
        else:
            n = torch.zeros(1, dtype=torch.int64)
            pg.recv([n], 0, 1).wait()
            raw = torch.empty(int(n), dtype=torch.uint8)
            pg.recv([raw], 0, 2).wait()
            manifest = Manifest.decode(raw.numpy().tobytes())
            store.ensure_capacity(manifest.data_bytes)  # both slots, faulted in
        template = {name: obj.state_dict() for name, obj in live.objects.items()}
        ctx = {
            "live": live,
            "store": store,
            "manifest": manifest,
            "template": lambda: template,
            "flat_buffer": torch.ones(manifest.data_bytes, dtype=torch.uint8)
            if rank == 1
            else None,
        }
        del flat
        for rep in range(args.repeats + 1):  # the first round warms up
            for method in METHODS:
                phases = _run(method, rank, pg, ctx)
                if rep:
                    results[method].append(phases)
        if "commit" in ctx:  # the last run's background commit, before the store goes
            ctx.pop("commit").join()
        out.put((rank, {"results": results, "bytes": manifest.data_bytes}))
    except BaseException as error:
        out.put((rank, {"error": f"{type(error).__name__}: {error}"}))
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in rows)


def _workload(name: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    args.workload = name
    results, _ = run_two_ranks(_worker, args, timeout=3600)
    for rank in (0, 1):
        if "error" in results.get(rank, {"error": "no result"}):
            raise SystemExit(f"{name}: rank {rank} failed: {results.get(rank)}")
    nbytes = results[0]["bytes"]
    table: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        holder, receiver = results[0]["results"][method], results[1]["results"][method]
        both = [max(h["total"], r["total"]) for h, r in zip(holder, receiver, strict=True)]
        table[method] = {
            "total": statistics.median(both),
            "receiver": _median(receiver, "total"),
            "holder": _median(holder, "total"),
            "phases_r": {k: _median(receiver, k) for k in receiver[0] if k != "total"},
            "phases_h": {k: _median(holder, k) for k in holder[0] if k != "total"},
        }
    print(f"\n{name}: {nbytes / 1e6:.0f} MB, medians of {args.repeats}")
    print(
        f"  {'method':<9} {'both s':>7} {'recv s':>7} {'hold s':>7} {'GB/s':>6}  phases (receiver | holder)"
    )
    for method, row in table.items():
        fmt = lambda d: " ".join(f"{k}={v:.3f}" for k, v in d.items())  # noqa: E731
        print(
            f"  {method:<9} {row['total']:7.3f} {row['receiver']:7.3f} {row['holder']:7.3f} "
            f"{nbytes / row['total'] / 1e9:6.2f}  {fmt(row['phases_r'])} | {fmt(row['phases_h'])}"
        )
    print(
        f"  new/previous={table['new']['total'] / table['previous']['total']:.2f} "
        f"new/floor={table['new']['total'] / table['floor']['total']:.2f} "
        f"receiver new/floor={table['new']['receiver'] / table['floor']['receiver']:.2f}",
        flush=True,
    )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shm", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args(argv)
    args.scale = float(os.environ.get("PEER_RESTORE_SCALE", "1"))
    names = [
        w for w in os.environ.get("PEER_RESTORE_WORKLOADS", ",".join(WORKLOADS)).split(",") if w
    ]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown or args.repeats < 1 or args.scale <= 0:
        parser.error(f"bad workloads {unknown} / repeats {args.repeats} / scale {args.scale}")
    from peer_recovery.snapshots.checksum import implementation

    print(f"peer restore, two processes over gloo; scale {args.scale}; CRC-32 by {implementation}")
    tables = {name: _workload(name, args) for name in names}

    def ratio(name: str, a: str, b: str, key: str = "total") -> str:
        if name not in tables:
            return "nan"
        return f"{tables[name][a][key] / tables[name][b][key]:.2f}"

    worst = max(
        (t["new"]["receiver"] / t["floor"]["receiver"] for t in tables.values()),
        default=float("nan"),
    )
    print(
        f"RATIOS small_vs_previous={ratio('small', 'new', 'previous')} "
        f"model_vs_previous={ratio('model', 'new', 'previous')} receiver_vs_floor={worst:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
