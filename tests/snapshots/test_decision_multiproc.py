"""One decision for the whole job: every rank acts alike, whoever is late or slow.

Real ranks over gloo, one process each; each rank's store is its own directory, standing
for its pod's ``/dev/shm``. A rank is made late or a transfer slow by wrapping a method of
the real objects in the rank's own process (a slow slot check, a slow sender), and the job
store is made unreachable by killing the process that serves it, as losing torchrun's agent
does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests._multiproc import run_ranks
from tests.snapshots.test_failed_restore_multiproc import (
    _AdoptMetadata,
    _now,
    _objects,
    _recovery,
    _train_step,
)

pytestmark = pytest.mark.multiproc

VOTE_S = 3.0  # the vote phase; the budget around it is 3.5 times as long (10.5 s)
BUDGET_S = VOTE_S * 3.5


def _snapshots(rank: int, world: int, root: str) -> None:
    objects, position = _objects(0)
    recovery = _recovery(rank, world, root, objects, position, VOTE_S)
    for step in (1, 2):
        _train_step(objects, position)
        recovery.snapshot(step)


def _outcome(restorer: Any, result: Any, before: Any, live: Any, private: Any) -> dict[str, Any]:
    from tests.snapshots._worker import same

    return {
        "result": None if result is None else result.step,
        "differs": same(before, _now(live, private)),
        "why": restorer.last_failure,
    }


def _rank_1_arrives_after_the_deadline(rank: int, world: int, root: str) -> dict[str, Any]:
    from peer_recovery.rank_plan import RankPlan

    _snapshots(rank, world, root)
    live, private = _objects(10 + rank)  # restarted: fresh objects with other values
    restorer = _recovery(rank, world, root, live, private, VOTE_S)
    if rank == 1:  # checking its slot takes longer than the whole restore budget
        check = restorer._prepare_local

        def slow_check(*args: Any, **kwargs: Any) -> Any:
            time.sleep(BUDGET_S + 5)
            return check(*args, **kwargs)

        restorer._prepare_local = slow_check
    before = _now(live, private)
    result = restorer.restore(plan=RankPlan(2))
    return _outcome(restorer, result, before, live, private)


def test_a_rank_arriving_after_the_deadline_makes_every_rank_fall_back(tmp_path: Path) -> None:
    """Rank 1 writes its ballot after every other rank's deadline passed: it finds "fall
    back" written and falls back with them, naming itself as the rank that did not report.
    (Before the one decision each rank acted on its own all_gather's timeout; in this run
    all fell back too, by a gloo timeout, since the late rank's gather found nothing sent.)"""
    outcomes = run_ranks(_rank_1_arrives_after_the_deadline, 3, str(tmp_path), timeout=300)
    assert [o["result"] for o in outcomes] == [None, None, None], outcomes
    for rank, outcome in enumerate(outcomes):
        assert outcome["differs"] == [], f"rank {rank}: objects changed at {outcome['differs']}"
        assert "ranks [1] did not report" in outcome["why"], outcome["why"]


def _slow_sender(rank: int, world: int, root: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from peer_recovery.rank_plan import RankPlan
    from peer_recovery.transport import PGTransport

    _snapshots(rank, world, root)
    live, private = _objects(10 + rank)
    restorer = _recovery(rank, world, root, live, private, VOTE_S)
    plans = {0: RankPlan(2, send_to=(1,)), 1: RankPlan(2, receive_from=0), 2: RankPlan(2)}
    transport = None
    if rank < 2:
        inner = PGTransport(dist.group.WORLD, 60, torch.device("cpu"), state_dict=restorer.template)
        transport = _AdoptMetadata(inner, restorer.template)
    if rank == 0:  # the transfer takes longer than the vote phase, within the transfer phase
        send = transport.send_checkpoint

        def slow_send(*args: Any, **kwargs: Any) -> None:
            time.sleep(VOTE_S + 2)
            send(*args, **kwargs)

        transport.send_checkpoint = slow_send
    before = _now(live, private)
    result = restorer.restore(plan=plans[rank], transport=transport)
    return _outcome(restorer, result, before, live, private)


def test_a_transfer_longer_than_the_vote_phase_still_resumes(tmp_path: Path) -> None:
    """Before the one budget, rank 2 (nothing to receive) started the vote clock at once and
    gave up after the vote timeout while rank 1 was still receiving: the job fell back."""
    outcomes = run_ranks(_slow_sender, 3, str(tmp_path), timeout=300)
    assert [o["result"] for o in outcomes] == [2, 2, 2], outcomes


def _serve_store() -> tuple[subprocess.Popen[str], int]:
    """A TCPStore in a process of its own, as torchrun's agent serves the job's store."""
    code = (
        "import sys, time\n"
        "from torch.distributed import TCPStore\n"
        "s = TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n"
        "print(s.port, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def _store_lost_before_the_decision(
    rank: int, world: int, root: str, port: int, server_pid: int
) -> dict[str, Any]:
    from datetime import timedelta

    import torch.distributed as dist

    from peer_recovery.rank_plan import RankPlan

    dist.destroy_process_group()  # the job's store is the one the other process serves
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=20))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    group = dist.new_group(backend="gloo")  # the ranks still reach each other without it
    _snapshots(rank, world, root)
    live, private = _objects(10 + rank)
    restorer = _recovery(rank, world, root, live, private, VOTE_S)
    restorer._pg = group
    dist.barrier(group=group)
    if rank == 0:
        os.kill(server_pid, signal.SIGKILL)
    dist.barrier(group=group)
    try:
        result = restorer.restore(plan=RankPlan(2))
    except Exception as error:
        return {"raised": type(error).__name__, "message": str(error)}
    return {"raised": None, "result": None if result is None else result.step}


def test_a_rank_that_cannot_learn_the_decision_does_not_train(tmp_path: Path) -> None:
    """Before the one decision, the ranks voted over their own gloo group and resumed with
    the job's store gone; now no rank can learn the decision, so each raises
    ``DecisionUnknown`` (uncaught, the process exits non-zero) instead of training."""
    server, port = _serve_store()
    try:
        outcomes = run_ranks(
            _store_lost_before_the_decision, 2, str(tmp_path), port, server.pid, timeout=300
        )
    finally:
        server.kill()
        server.wait()
    for rank, outcome in enumerate(outcomes):
        assert outcome["raised"] == "DecisionUnknown", (rank, outcome)
        assert "could not learn the job's restore decision" in outcome["message"]
