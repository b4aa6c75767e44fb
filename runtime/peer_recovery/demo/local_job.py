"""A torchrun job of several "pods" on one machine, for the demo and the tests.

Each pod is one ``torchrun`` agent (``--rdzv-backend=peer-recovery``) with its own
snapshot directory standing for the pod's ``/dev/shm``, its ordinal in the env (as the
training-operator would give it) and its own log file. The rendezvous store is hosted by
this process, as a Kubernetes job would host it on a Service that outlives any one pod, so
that replacing any pod leaves the rendezvous intact. Everything listens on 127.0.0.1.

``kill_pod`` SIGKILLs an agent and its workers (they run in their own sessions);
``replace_pod`` starts a new agent in its place. ``close`` kills whatever is left, so a
failing caller never leaves processes behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LocalJob", "Pod", "descendants"]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class Pod:
    ordinal: int
    shm: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    generation: int = 0


@dataclass
class LocalJob:
    """``nnodes`` torchrun agents running ``script`` with the peer-recovery plugin."""

    workdir: Path
    script: Sequence[str]
    nnodes: int = 4
    nproc_per_node: int = 1
    run_id: str = "demo"
    max_restarts: int = 3
    env: Mapping[str, str] = field(default_factory=dict)
    rdzv_conf: Mapping[str, str] = field(default_factory=dict)
    #: Extra environment per pod ordinal (e.g. a fault injected into one pod).
    pod_env: Mapping[int, Mapping[str, str]] = field(default_factory=dict)
    #: Where the pods' snapshot directories go (default: under ``workdir``).
    shm_root: Path | None = None
    pods: dict[int, Pod] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from torch.distributed import TCPStore

        self.workdir.mkdir(parents=True, exist_ok=True)
        self._store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.port = self._store.port
        for o in range(self.nnodes):
            shm = (self.shm_root or self.workdir) / f"pod-{o}" / "shm"
            shm.mkdir(parents=True, exist_ok=True)
            (self.workdir / f"pod-{o}").mkdir(exist_ok=True)
            self.pods[o] = Pod(o, shm, self.workdir / f"pod-{o}" / "agent.log")

    @property
    def store(self) -> Any:
        """The rendezvous store this process hosts (a client may read the round's keys)."""
        return self._store

    def command(self) -> list[str]:
        conf = {
            "is_host": "0",
            "join_timeout": "120",
            "last_call_timeout": "1",
            "keep_alive_interval": "1",
            "keep_alive_max_attempt": "3",
            "read_timeout": "60",
            **self.rdzv_conf,
        }
        return [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={self.nnodes}", f"--nproc-per-node={self.nproc_per_node}",
            "--rdzv-backend=peer-recovery", f"--rdzv-endpoint=127.0.0.1:{self.port}",
            f"--rdzv-id={self.run_id}", "--rdzv-conf=" + ",".join(f"{k}={v}" for k, v in conf.items()),
            f"--max-restarts={self.max_restarts}", "--monitor-interval=0.2",
            "--local-addr=127.0.0.1", *self.script,
        ]  # fmt: skip

    def start_pod(self, ordinal: int) -> Pod:
        pod = self.pods[ordinal]
        env = {
            **os.environ,
            "PEER_RECOVERY_ORDINAL": str(ordinal),
            "PEER_RECOVERY_SNAPSHOT_DIR": str(pod.shm),
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "LOGLEVEL": os.environ.get("LOGLEVEL", "INFO"),
            **self.env,
            **self.pod_env.get(ordinal, {}),
        }
        pod.generation += 1
        with pod.log.open("ab") as log:
            log.write(f"=== pod {ordinal} generation {pod.generation} ===\n".encode())
            log.flush()
            pod.process = subprocess.Popen(
                self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.workdir,
            )  # fmt: skip
        return pod

    def start(self, order: Sequence[int] | None = None, stagger: float = 0.0) -> None:
        """Start every pod, in ``order`` (c10d would rank them by pid, i.e. this order)."""
        for o in order if order is not None else range(self.nnodes):
            self.start_pod(o)
            if stagger:
                time.sleep(stagger)

    def kill_pod(self, ordinal: int) -> None:
        """SIGKILL the pod's agent and all its workers, as a node loss would."""
        process = self.pods[ordinal].process
        if process is None:
            return
        for pid in [process.pid, *descendants(process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)

    def wipe_pod(self, ordinal: int) -> None:
        """A new pod starts with an empty ``/dev/shm``."""
        shm = self.pods[ordinal].shm
        shutil.rmtree(shm, ignore_errors=True)
        shm.mkdir(parents=True)

    def replace_pod(self, ordinal: int) -> Pod:
        self.kill_pod(ordinal)
        self.wipe_pod(ordinal)
        return self.start_pod(ordinal)

    def wait(self, timeout: float) -> dict[int, int]:
        """Exit codes of every agent; raises TimeoutError (after ``close``) past ``timeout``."""
        deadline = time.monotonic() + timeout
        codes: dict[int, int] = {}
        for o, pod in self.pods.items():
            assert pod.process is not None
            try:
                codes[o] = pod.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.close()
                raise TimeoutError(f"pod {o}'s agent still running after {timeout:.0f}s") from None
        return codes

    def logs(self) -> str:
        return "\n".join(
            p.log.read_text(errors="replace") for p in self.pods.values() if p.log.exists()
        )

    def close(self) -> None:
        for o in self.pods:
            self.kill_pod(o)

    def __enter__(self) -> LocalJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
