"""The demo driver: a pod replacement on one machine, recovered from a peer.

1. Start 4 torchrun agents (pods 0-3, ``--nproc-per-node=1``, the ``peer-recovery``
   rendezvous backend, gloo), each with its own snapshot directory under ``/dev/shm``.
2. They train a small transformer with AdamW (about 126 MB of state per rank), snapshot
   every few steps, write a checkpoint with ``torch.distributed.checkpoint``, then pause,
   two steps after their last snapshot, as if a pod were lost then.
3. Replace pod 2: kill its agent and worker, wipe its snapshot directory, start a new
   agent in its place. torchrun restarts the round; the plan file says pod 2 streams
   from pod 1; the other ranks restore their own snapshots.
4. Every rank hashes its model and optimizer state after restoring and at the end; all
   hashes must be equal, and equal to the state the healthy ranks paused with.

The last line printed is ``RESULT peer_seconds=<float> storage_seconds=<float>
bytes=<int> identical=<true|false> resume_seconds=<float> steps_lost=<int>
storage_steps_lost=<int>``: ``peer_seconds`` is the slowest rank's whole restore (agreement
through vote); ``storage_seconds`` every rank loading the job's DCP checkpoint at once from
a cold page cache; ``resume_seconds`` the time from the pod's replacement to the first
training step after it (its phases are printed as a table, :mod:`.timeline`); the steps
lost are what each path re-trains (since the last snapshot, since the last checkpoint).
The exit status is 0 exactly when identical.
:func:`run_scenario` is the same machinery with the knobs the tests turn (which pods are
replaced, plans, sharded replicas, faults).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peer_recovery.demo.local_job import LocalJob
from peer_recovery.demo.timeline import Watcher, phases, table

__all__ = ["Outcome", "Scenario", "main", "run_scenario"]


def _say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class Scenario:
    """One job, one pause, some pods replaced at once, then run to the end."""

    nnodes: int = 4
    replaced: Sequence[int] = (2,)
    #: Plans the plan file gives, as ``{target: source}``; None: no plan file at all.
    plans: Mapping[int, int] | None = None
    #: Seconds a rejoining pod waits for its plan before the in-band planner decides.
    plan_timeout: float = 10.0
    shards: int = 1
    quick: bool = True
    env: Mapping[str, str] = field(default_factory=dict)
    pod_env: Mapping[int, Mapping[str, str]] = field(default_factory=dict)
    train_args: Sequence[str] = ()
    timeout: float = 300.0


@dataclass
class Outcome:
    paused: list[dict[str, Any]]
    restores: dict[int, list[dict[str, Any]]]  # round -> one report per rank
    final: list[dict[str, Any]]
    exit_codes: dict[int, int]
    logs: str
    #: The first replaced pod's resume, timed from its replacement.
    watcher: Watcher | None = None

    @property
    def last_restore(self) -> list[dict[str, Any]]:
        return self.restores[max(self.restores)]


def _wait_for(
    paths: list[Path], job: LocalJob, timeout: float, what: str, say=None
) -> list[dict[str, Any]]:
    started = time.monotonic()
    next_note = started + 10
    while not all(p.exists() for p in paths):
        dead = [o for o, pod in job.pods.items() if pod.process and pod.process.poll() is not None]
        now = time.monotonic()
        if dead or now > started + timeout:
            why = f"agents {dead} exited" if dead else f"not done after {timeout:.0f}s"
            raise RuntimeError(f"{what}: {why}; agent logs:\n{job.logs()[-8000:]}")
        if say is not None and now >= next_note:
            done = sum(p.exists() for p in paths)
            say(f"  {what}: {done} of {len(paths)} ranks there after {now - started:.0f}s")
            next_note = now + 10
        time.sleep(0.1)
    return [json.loads(p.read_text()) for p in paths]


def run_scenario(workdir: Path, shm_root: Path, scenario: Scenario, *, say=_say) -> Outcome:
    out = workdir / "out"
    out.mkdir(parents=True)
    n = scenario.nnodes
    if scenario.quick:
        args = ["--width=64", "--layers=1", "--pause-at=6", "--steps=8"]
        args += ["--snapshot-every=3", "--checkpoint-at=3"]
    else:
        # ~126 MB of model and AdamW state per rank; the pod is lost 2 steps after a snapshot.
        args = ["--width=512", "--layers=2", "--vocab=4096", "--pause-at=12", "--steps=14"]
        args += ["--snapshot-every=5", "--checkpoint-at=5"]
    args += [f"--shards={scenario.shards}", *scenario.train_args]
    plan = workdir / "plan.json"
    env = {**scenario.env, "PEER_RECOVERY_PLAN_TIMEOUT": str(scenario.plan_timeout)}
    if scenario.shards > 1:
        env["PEER_RECOVERY_PODS_PER_REPLICA"] = str(scenario.shards)
    if scenario.plans is not None:
        env["PEER_RECOVERY_PLAN_FILE"] = str(plan)
    script = ["-m", "peer_recovery.demo.train", f"--out={out}", *args]
    job = LocalJob(workdir / "job", script, nnodes=n, run_id="demo", env=env,
                   pod_env=scenario.pod_env, shm_root=shm_root)  # fmt: skip
    with job:
        say(f"starting {n} torchrun agents (pods 0-{n - 1}), rdzv peer-recovery, gloo")
        job.start()
        paused = _wait_for(
            [out / f"paused-rank{r}.json" for r in range(n)],
            job,
            scenario.timeout,
            "training to the pause",
            say,
        )
        say(f"all ranks trained to step {paused[0]['step']} and snapshotted into /dev/shm")
        if scenario.plans is not None:
            entries = [{"target": t, "source": s} for t, s in scenario.plans.items()]
            plan.write_text(json.dumps({"plans": entries}))
        (out / "released").touch()
        pods = ", ".join(map(str, scenario.replaced))
        say(f"replacing pod(s) {pods}: kill agent and worker, wipe /dev/shm, start a new agent")
        for o in scenario.replaced:
            job.kill_pod(o)
            job.wipe_pod(o)
        first = scenario.replaced[0]
        watcher = Watcher(job.store, "demo", job.pods[first].log)
        for o in scenario.replaced:
            job.start_pod(o)
        final = _wait_for(
            [out / f"final-rank{r}.json" for r in range(n)],
            job,
            scenario.timeout,
            "restart, restore and train on",
            say,
        )
        watcher.stop()
        codes = job.wait(120)
        logs = job.logs()
    restores: dict[int, list[dict[str, Any]]] = {}
    for path in sorted(out.glob("restore-round*-rank*.json")):
        report = json.loads(path.read_text())
        restores.setdefault(report["round"], []).append(report)
    for reports in restores.values():
        reports.sort(key=lambda r: r["rank"])
    return Outcome(paused, restores, final, codes, logs, watcher)


def summarize(outcome: Outcome, replaced: Sequence[int]) -> dict[str, Any]:
    """The demo's verdict: every rank equal, bitwise, to what the healthy ranks paused with."""
    restored = outcome.last_restore
    # The healthy ranks' state at their last snapshot: what every rank resumes from.
    healthy = {
        p.get("snapshot_hash") or p["hash"]
        for r, p in enumerate(outcome.paused)
        if r not in replaced
    }
    identical = (
        all(code == 0 for code in outcome.exit_codes.values())
        and len(healthy) == 1
        and len(restored) == len(outcome.paused)
        and {r["hash"] for r in restored} == healthy
        and len({f["hash"] for f in outcome.final}) == 1
    )
    received = [r for r in restored if r["role"] == "receive"]
    paused_step = outcome.paused[0]["step"]
    checkpoint_step = restored[0].get("checkpoint_step")
    rows = phases(outcome.watcher, restored) if outcome.watcher is not None else []
    return {
        "restored": restored,
        "phases": rows,
        "resume_seconds": sum(seconds for _, seconds in rows),
        "steps_lost": paused_step - restored[0]["step"],
        "storage_steps_lost": paused_step - (checkpoint_step or 0),
        "peer_seconds": max(r.get("total_seconds", 0.0) for r in restored),
        "storage_seconds": max(r.get("storage_seconds", 0.0) for r in restored),
        "storage_bytes": restored[0].get("storage_bytes", 0),
        "bytes": sum(int(r.get("bytes", 0)) for r in received),
        "identical": identical,
        "final_step": outcome.final[0]["step"],
    }


def _table(summary: dict[str, Any]) -> str:
    rows = [
        "| rank | restored from | role | step | bytes | seconds | where they went (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["restored"]:
        spent = ", ".join(f"{name} {seconds:.3f}" for name, seconds in r.get("phases", {}).items())
        rows.append(
            f"| {r['rank']} | {r['source']} | {r['role']} | {r['step']} | "
            f"{r.get('bytes', 0)} | {r.get('total_seconds', 0.0):.3f} | {spent} |"
        )
    rows.append("")
    rows.append(
        f"peer path: {summary['peer_seconds']:.3f}s (slowest rank, agreement through vote); "
        f"storage path (all ranks load the DCP checkpoint of {summary['storage_bytes']} bytes at "
        f"once, page cache dropped with posix_fadvise): {summary['storage_seconds']:.3f}s"
    )
    rows.append(
        f"steps re-trained: {summary['steps_lost']} from peers (last snapshot), "
        f"{summary['storage_steps_lost']} from storage (last checkpoint)"
    )
    if summary["phases"]:
        rows += ["", "where the resume goes (slowest rank bounds each phase):"]
        rows.append(table(summary["phases"]))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peer_recovery.demo", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    started = time.monotonic()
    scenario = Scenario(replaced=(2,), plans={2: 1}, quick=args.quick)
    workdir = Path(tempfile.mkdtemp(prefix="peer-recovery-demo-"))
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
    shm_root = Path(tempfile.mkdtemp(prefix="peer-recovery-demo-", dir=shm))
    try:
        outcome = run_scenario(workdir, shm_root, scenario)
        summary = summarize(outcome, scenario.replaced)
    except Exception as error:
        print(f"demo failed: {error}", file=sys.stderr)
        print(
            "RESULT peer_seconds=0 storage_seconds=0 bytes=0 identical=false "
            "resume_seconds=0 steps_lost=0 storage_steps_lost=0"
        )
        return 1
    finally:
        shutil.rmtree(shm_root, ignore_errors=True)
        if args.keep:
            _say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    _say("torchrun restarted the round; pod 2's rank restored from a peer, the others locally")
    print(_table(summary))
    _say(
        f"ranks identical (model + AdamW state, bitwise): {summary['identical']}; "
        f"trained on to step {summary['final_step']}; {time.monotonic() - started:.1f}s in all"
    )
    print(
        f"RESULT peer_seconds={summary['peer_seconds']:.4f} "
        f"storage_seconds={summary['storage_seconds']:.4f} bytes={summary['bytes']} "
        f"identical={'true' if summary['identical'] else 'false'} "
        f"resume_seconds={summary['resume_seconds']:.4f} steps_lost={summary['steps_lost']} "
        f"storage_steps_lost={summary['storage_steps_lost']}"
    )
    return 0 if summary["identical"] else 1
