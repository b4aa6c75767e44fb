"""Run a function in N real processes that share a torch.distributed process group.

Reusable by any test that needs real multi-process torch.distributed (transport, snapshot,
peer restore)::

    from tests._multiproc import run_ranks

    def _body(rank: int, world: int, scale: int) -> int:   # module level: it is pickled
        t = torch.tensor([rank * scale])
        dist.all_reduce(t)
        return int(t)

    assert run_ranks(_body, 2, 10) == [10, 10]

Each process is started with the ``spawn`` method, initializes the default process group
(gloo unless told otherwise) through a FileStore in a private temporary directory, so
nothing listens on a port for the rendezvous, and gloo is pinned to the loopback interface.
Results are returned per rank (they must pickle). Any exception, non-zero exit or overrun of
``timeout`` kills every process (SIGKILL) and raises :class:`MultiprocError` carrying each
rank's traceback. Processes stay alive until every rank has reported, so a rank that
finishes first does not tear connections down under a slower peer. Ranks listed in
``may_die`` may exit without reporting (e.g. a test kills one mid-stream); their result is
None.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

__all__ = ["MultiprocError", "run_ranks"]


class MultiprocError(AssertionError):
    """One or more ranks failed, died or overran the timeout."""


def _child(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    store: str,
    backend: str,
    pg_timeout: float,
    results: Any,
    release: Any,
    env: dict[str, str],
    args: tuple[Any, ...],
) -> None:
    os.environ.update(env)
    try:
        import torch.distributed as dist

        dist.init_process_group(
            backend,
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=pg_timeout),
        )
        value = fn(rank, world, *args)
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    results.close()
    results.join_thread()
    release.wait(600)
    os._exit(0)  # skip teardown: a broken process group can hang in its destructor


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    pg_timeout: float = 60.0,
    may_die: Iterable[int] = (),
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return the results."""
    ctx = multiprocessing.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="multiproc-")
    child_env = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(env or {})}
    results = ctx.Queue()
    release = ctx.Event()
    procs = [
        ctx.Process(
            target=_child,
            args=(
                fn,
                r,
                world_size,
                os.path.join(tmp, "store"),
                backend,
                pg_timeout,
                results,
                release,
                child_env,
                args,
            ),
            daemon=True,
        )
        for r in range(world_size)
    ]
    allowed = set(may_die)
    got: dict[int, tuple[bool, Any]] = {}
    clean = False
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(got) < world_size:
            if time.monotonic() > deadline:
                raise MultiprocError(_report(f"timed out after {timeout}s", got, procs))
            try:
                rank, ok, value = results.get(timeout=0.2)
                got[rank] = (ok, value)
                if not ok:  # fail fast: peers of a failed rank may block until their timeout
                    _drained(results, got, rank, wait=2.0)
                    raise MultiprocError(_report(f"rank {rank} failed", got, procs))
                continue
            except queue_mod.Empty:
                pass
            for r, p in enumerate(procs):
                if r not in got and not p.is_alive():
                    if r in allowed:
                        got[r] = (True, None)
                    elif _drained(results, got, r):
                        continue
                    else:
                        raise MultiprocError(_report(f"rank {r} died", got, procs))
        failed = [r for r, (ok, _) in got.items() if not ok]
        if failed:
            raise MultiprocError(_report(f"ranks {failed} failed", got, procs))
        clean = True
        return [got[r][1] for r in range(world_size)]
    finally:
        release.set()
        _reap(procs, grace=5.0 if clean else 0.0)
        results.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _drained(results: Any, got: dict[int, tuple[bool, Any]], rank: int, wait: float = 0.5) -> bool:
    """Read what ranks left in the pipe (an exited rank's result may still be there)."""
    try:
        while True:
            r, ok, value = results.get(timeout=wait)
            got[r] = (ok, value)
    except queue_mod.Empty:
        pass
    return rank in got


def _reap(procs: list[Any], grace: float) -> None:
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)


def _report(what: str, got: dict[int, tuple[bool, Any]], procs: list[Any]) -> str:
    lines = [what]
    for r, p in enumerate(procs):
        ok, value = got.get(r, (None, None))
        state = "ok" if ok else ("failed" if ok is False else f"no report, exit {p.exitcode}")
        lines.append(f"--- rank {r}: {state}")
        if ok is False:
            lines.append(str(value))
    return "\n".join(lines)
