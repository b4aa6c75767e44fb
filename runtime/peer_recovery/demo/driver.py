"""The demo driver: a pod replacement on one machine, recovered from a peer.

1. Start 4 torchrun agents (pods 0-3, ``--nproc-per-node=1``, the ``peer-recovery``
   rendezvous backend, gloo), each with its own snapshot directory under ``/dev/shm``.
2. They train a small transformer with AdamW, snapshot every few steps, write a
   checkpoint and a ``torch.save`` file of the state at the pause step, then pause.
3. Replace pod 2: kill its agent and worker, wipe its snapshot directory, start a new
   agent in its place. torchrun restarts the round; the plan file says pod 2 streams
   from pod 1; the other ranks restore their own snapshots.
4. Every rank hashes its model and optimizer state after restoring and at the end; all
   hashes must be equal, and equal to the state the healthy ranks paused with.

The last line printed is ``RESULT peer_seconds=<float> storage_seconds=<float>
bytes=<int> identical=<true|false>``; the exit status is 0 exactly when identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peer_recovery.demo.local_job import LocalJob

__all__ = ["main", "run"]

NNODES = 4
REPLACED = 2
SOURCE = 1


def _say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _wait_for(paths: list[Path], job: LocalJob, timeout: float, what: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        dead = [o for o, pod in job.pods.items() if pod.process and pod.process.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"agents {dead} exited" if dead else f"not done after {timeout:.0f}s"
            raise RuntimeError(f"{what}: {why}; agent logs:\n{job.logs()[-8000:]}")
        time.sleep(0.1)
    return [json.loads(p.read_text()) for p in paths]


def run(workdir: Path, shm_root: Path, *, quick: bool) -> dict[str, Any]:
    out = workdir / "out"
    out.mkdir(parents=True)
    model = ["--width=64", "--layers=1"] if quick else ["--width=256", "--layers=4"]
    steps = ["--pause-at=6", "--steps=8", "--snapshot-every=3", "--checkpoint-at=3"]
    if not quick:
        steps = ["--pause-at=20", "--steps=30", "--snapshot-every=5", "--checkpoint-at=10"]
    plan = workdir / "plan.json"
    script = ["-m", "peer_recovery.demo.train", f"--out={out}", *model, *steps]
    env = {"GLOO_SOCKET_IFNAME": "lo", "PEER_RECOVERY_PLAN_FILE": str(plan)}
    with LocalJob(workdir / "job", script, nnodes=NNODES, run_id="demo", env=env,
                  shm_root=shm_root) as job:  # fmt: skip
        _say(f"starting {NNODES} torchrun agents (pods 0-{NNODES - 1}), rdzv peer-recovery, gloo")
        job.start()
        paused = _wait_for(
            [out / f"paused-rank{r}.json" for r in range(NNODES)], job, 300, "first run"
        )
        _say(
            f"all ranks trained to step {paused[0]['step']} and snapshotted; pod state in /dev/shm"
        )
        plan.write_text(json.dumps({"plans": [{"target": REPLACED, "source": SOURCE}]}))
        (out / "released").touch()
        _say(f"replacing pod {REPLACED}: kill its agent and worker, wipe its /dev/shm, new agent")
        job.replace_pod(REPLACED)
        restored = _wait_for(
            [out / f"restore-round2-rank{r}.json" for r in range(NNODES)], job, 300, "restart"
        )
        _say("torchrun restarted the round; every rank restored; training resumes")
        final = _wait_for([out / f"final-rank{r}.json" for r in range(NNODES)], job, 300, "resume")
        codes = job.wait(120)
    healthy = {p["hash"] for r, p in enumerate(paused) if r != REPLACED}
    identical = (
        all(code == 0 for code in codes.values())
        and len(healthy) == 1
        and {r["hash"] for r in restored} == healthy
        and len({f["hash"] for f in final}) == 1
    )
    target = restored[REPLACED]
    return {
        "restored": restored,
        "peer_seconds": max(r.get("seconds", 0.0) for r in restored),
        "storage_seconds": max(r.get("storage_seconds", 0.0) for r in restored),
        "storage_bytes": restored[0].get("storage_bytes", 0),
        "bytes": int(target.get("bytes", 0)) if target["role"] == "receive" else 0,
        "identical": identical,
        "exit_codes": codes,
        "final_step": final[0]["step"],
    }


def _table(summary: dict[str, Any]) -> str:
    rows = [
        "| rank | pod | restored from | role | step | bytes | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["restored"]:
        rows.append(
            f"| {r['rank']} | {r['rank']} | {r['source']} | {r['role']} | {r['step']} | "
            f"{r.get('bytes', 0)} | {r.get('seconds', 0.0):.3f} |"
        )
    rows.append("")
    rows.append(
        f"peer path: {summary['peer_seconds']:.3f}s (slowest rank, vote included); storage path "
        f"(all ranks torch.load {summary['storage_bytes']} bytes, cold): "
        f"{summary['storage_seconds']:.3f}s"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peer_recovery.demo", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="peer-recovery-demo-"))
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
    shm_root = Path(tempfile.mkdtemp(prefix="peer-recovery-demo-", dir=shm))
    try:
        summary = run(workdir, shm_root, quick=args.quick)
    except Exception as error:
        print(f"demo failed: {error}", file=sys.stderr)
        print("RESULT peer_seconds=0 storage_seconds=0 bytes=0 identical=false")
        return 1
    finally:
        shutil.rmtree(shm_root, ignore_errors=True)
        if args.keep:
            _say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(_table(summary))
    _say(
        f"ranks identical (model + AdamW state, bitwise): {summary['identical']}; "
        f"finished step {summary['final_step']} in {time.monotonic() - started:.1f}s"
    )
    print(
        f"RESULT peer_seconds={summary['peer_seconds']:.4f} "
        f"storage_seconds={summary['storage_seconds']:.4f} bytes={summary['bytes']} "
        f"identical={'true' if summary['identical'] else 'false'}"
    )
    return 0 if summary["identical"] else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
