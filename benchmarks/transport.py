"""Benchmark: peer_recovery's PGTransport vs PyTorch's PGTransport vs a raw gloo send.

Two processes on loopback over gloo, one run. For each workload and receive mode it measures,
after a warm-up, the median of ``--repeats`` transfers of (run round-robin, so that load
from elsewhere on the machine hits each alike):

- ceiling: one flat-buffer ``pg.send`` of the same number of bytes, into a fresh buffer
  (mode "fresh") or a reused one (mode "in place");
- upstream: ``torch.distributed.checkpoint._pg_transport.PGTransport``;
- ours: ``peer_recovery.transport.PGTransport`` (default settings), and ours with
  ``integrity=True`` to price the checks.

Workloads: large tensors (``--large-mb``, default 1024 MB in 64 MB tensors), 20,000 small
tensors of 1-64 KB, and a GPT-2-small-shaped model (124M parameters) with AdamW state.
Times are taken on the receiver, from a barrier to the last byte in place. Peak RSS is the
growth of each side's resident set over what it held before (kernel peak counter).

    python benchmarks/transport.py [--repeats 5] [--large-mb 1024] [--only small,model]
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

TIMEOUT = timedelta(seconds=300)


def large_state(total_mb: int) -> dict[str, Any]:
    import torch

    n = max(1, total_mb // 64)
    return {f"layer{i}.weight": torch.randn(64 << 18) for i in range(n)}


def small_state(count: int = 20_000) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1 << 10, (64 << 10) + 1, (count,), generator=g).tolist()
    return {f"t{i}": torch.rand(s // 4, generator=g) for i, s in enumerate(sizes)}


def gpt2_state() -> dict[str, Any]:
    """GPT-2 small (124M parameters) with AdamW state, built directly (no training step)."""
    import torch

    d, layers, vocab, ctx = 768, 12, 50257, 1024
    shapes = {"wte.weight": (vocab, d), "wpe.weight": (ctx, d)}
    for i in range(layers):
        p = f"h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.c_attn.weight": (d, 3 * d),
                p + "attn.c_attn.bias": (3 * d,),
                p + "attn.c_proj.weight": (d, d),
                p + "attn.c_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (d, 4 * d),
                p + "mlp.c_fc.bias": (4 * d,),
                p + "mlp.c_proj.weight": (4 * d, d),
                p + "mlp.c_proj.bias": (d,),
            }
        )
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    model = {k: torch.randn(s) for k, s in shapes.items()}
    state = {
        i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(s), "exp_avg_sq": torch.rand(s)}
        for i, s in enumerate(shapes.values())
    }
    group = {"lr": 6e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    group.update({"amsgrad": False, "foreach": None, "maximize": False, "capturable": False})
    group.update({"differentiable": False, "fused": None, "params": list(range(len(shapes)))})
    return {"model": model, "optim": {"state": state, "param_groups": [group]}}


WORKLOADS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "large": lambda a: large_state(a.large_mb),
    "small": lambda a: small_state(),
    "model": lambda a: gpt2_state(),
}


def _tensors(state: Any) -> list[Any]:
    import torch

    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return [state] if isinstance(state, torch.Tensor) else []


def _zeros_like(state: Any) -> Any:
    import torch

    if isinstance(state, dict):
        return {k: _zeros_like(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_zeros_like(v) for v in state]
    if isinstance(state, tuple):
        return tuple(_zeros_like(v) for v in state)
    return torch.zeros_like(state) if isinstance(state, torch.Tensor) else state


class _RssPeak:
    """Peak resident set growth of this process over a block, from the kernel's own counter.

    On entry, freed heap is returned to the kernel (``malloc_trim``) and the peak counter
    (VmHWM) is reset through ``/proc/self/clear_refs``; on exit, ``peak`` is VmHWM minus the
    resident set at entry.
    """

    def __init__(self) -> None:
        self.base = self.peak = 0

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def __enter__(self) -> _RssPeak:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = self._status("VmHWM") - self.base


def _methods(rank: int, pg: Any, work: dict[str, Any], inplace: bool) -> dict[str, Any]:
    """The four ways to move one workload, as zero-argument callables for this side."""
    import torch
    from torch.distributed.checkpoint._pg_transport import PGTransport as Upstream

    from peer_recovery.transport import PGTransport as Ours

    cpu = torch.device("cpu")
    if rank == 0:
        state, flat = work["state"], work["flat"]
        return {
            "ceiling": lambda: pg.send([flat], 1, 99).wait(),
            "upstream": lambda: Upstream(pg, TIMEOUT, cpu).send_checkpoint([1], state),
            "ours": lambda: Ours(pg, TIMEOUT, cpu).send_checkpoint([1], state),
            "ours+crc": lambda: Ours(pg, TIMEOUT, cpu, integrity=True).send_checkpoint([1], state),
        }
    targets, reused, total = work["targets"], work["reused"], work["total"]
    fn = (lambda: targets) if inplace else None

    def ceiling() -> None:
        buf = reused if inplace else torch.empty(total, dtype=torch.uint8)
        pg.recv([buf], 0, 99).wait()

    return {
        "ceiling": ceiling,
        "upstream": lambda: Upstream(pg, TIMEOUT, cpu, fn).recv_checkpoint(0),
        "ours": lambda: Ours(pg, TIMEOUT, cpu, fn).recv_checkpoint(0),
        "ours+crc": lambda: Ours(pg, TIMEOUT, cpu, fn, integrity=True).recv_checkpoint(0),
    }


def _prepare(rank: int, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The sender's state and flat buffer, or the receiver's in-place targets and buffer."""
    import torch

    state = WORKLOADS[name](args)
    total = sum(t.numel() * t.element_size() for t in _tensors(state))
    if rank == 0:
        return {"state": state, "flat": torch.empty(total, dtype=torch.uint8), "total": total}
    targets = _zeros_like(state)  # same shapes as the sender's; values differ
    del state
    return {"targets": targets, "reused": torch.zeros(total, dtype=torch.uint8), "total": total}


def _worker(rank: int, store: str, args: argparse.Namespace, out: Any) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    pg = dist.group.WORLD
    rows = []
    for name in args.only:
        work = _prepare(rank, name, args)
        for mode in ("fresh", "in place"):
            methods = _methods(rank, pg, work, mode == "in place")
            times: dict[str, list[float]] = {m: [] for m in methods}
            peaks = dict.fromkeys(methods, 0)
            # Round-robin over the methods, so that load from elsewhere on the machine hits
            # every method alike.
            for _ in range(args.warmup + args.repeats):
                for method, run in methods.items():
                    with _RssPeak() as rss:
                        dist.barrier()
                        t0 = time.perf_counter()
                        result = run()
                        times[method].append(time.perf_counter() - t0)
                        del result
                    peaks[method] = max(peaks[method], rss.peak)
            for method in methods:
                median = statistics.median(times[method][args.warmup :])
                rows.append((name, mode, method, work["total"], median, peaks[method]))
            print(f"  rank {rank}: {name}/{mode} done", file=sys.stderr, flush=True)
        del work
    out.put((rank, rows))
    dist.barrier()
    dist.destroy_process_group()


def _table(recv_rows: list[tuple[Any, ...]], send_rows: list[tuple[Any, ...]]) -> str:
    send_rss = {r[:3]: r[5] for r in send_rows}
    by = {r[:3]: r for r in recv_rows}
    lines = [
        "| workload | mode | ceiling GB/s | upstream GB/s | ours GB/s | ours/upstream "
        "| ours/ceiling | integrity cost | peak RSS MB send/recv (ceiling, upstream, ours) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys(r[:2] for r in recv_rows)
    for name, mode in keys:
        c, u, o, oc = (by[(name, mode, m)] for m in ("ceiling", "upstream", "ours", "ours+crc"))
        rate = [r[3] / r[4] / 1e9 for r in (c, u, o, oc)]
        rss = ", ".join(
            f"{send_rss[(name, mode, m)] / 2**20:.0f}/{by[(name, mode, m)][5] / 2**20:.0f}"
            for m in ("ceiling", "upstream", "ours")
        )
        lines.append(
            f"| {name} ({c[3] / 2**20:.0f} MB) | {mode} | {rate[0]:.2f} | {rate[1]:.2f} "
            f"| {rate[2]:.2f} | {rate[2] / rate[1]:.2f}x | {rate[2] / rate[0]:.2f}x "
            f"| {(1 - rate[3] / rate[2]) * 100:+.0f}% | {rss} |"
        )
    return "\n".join(lines)


def run_two_ranks(
    worker: Callable[[int, str, argparse.Namespace, Any], None],
    args: argparse.Namespace,
    timeout: float,
) -> tuple[dict[int, Any], bool]:
    """Run ``worker(rank, store, args, out)`` in two spawned processes sharing a file store;
    each puts ``(rank, result)`` on ``out``. Returns the results by rank and whether both
    processes exited cleanly."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="bench-two-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=worker, args=(r, store, args, out)) for r in range(2)]
        for p in procs:
            p.start()
        try:
            results = dict(out.get(timeout=timeout) for _ in procs)
        finally:
            for p in procs:
                p.join(60)
                if p.is_alive():
                    p.kill()
    return results, all(p.exitcode == 0 for p in procs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--large-mb", type=int, default=1024)
    parser.add_argument("--only", default="large,small,model")
    args = parser.parse_args(argv)
    args.only = [w for w in args.only.split(",") if w]
    unknown = set(args.only) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {sorted(WORKLOADS)}")
    started = time.perf_counter()
    rows, ok = run_two_ranks(_worker, args, timeout=3600)
    print(
        f"transport benchmark: 2 processes, gloo on loopback, median of {args.repeats} after "
        f"{args.warmup} warm-up, {time.perf_counter() - started:.0f} s in all"
    )
    print(_table(rows[1], rows[0]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
