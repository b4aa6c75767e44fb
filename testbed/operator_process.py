"""Running the real operator against the test control plane, under the chart's RBAC.

``render_rbac`` renders the chart's RBAC with the real ``helm template`` for one watched
namespace; ``OperatorProcess`` runs ``python -m peer_recovery_operator`` as a subprocess
with a ServiceAccount kubeconfig (exactly the rights the chart grants), on loopback ports,
and always stops it (terminate, then kill) so no process outlives a test.
``operators_under_rbac`` runs several such replicas electing a leader on the chart's Lease.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from testbed.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "peer-recovery"
CRD = CHART / "crds" / "peerrecoveries.yaml"
RBAC_TEMPLATES = ("templates/operator-rbac.yaml", "templates/operator-serviceaccount.yaml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def render_rbac(helm: Path, release: str, namespace: str, **values: str) -> str:
    argv = [str(helm), "template", release, str(CHART), "--namespace", namespace]
    for template in RBAC_TEMPLATES:
        argv += ["--show-only", template]
    for key, value in values.items():
        argv += ["--set", f"{key}={value}"]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout


class OperatorProcess:
    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path, *extra: str) -> None:
        self.kubeconfig, self.namespace, self.log_path = kubeconfig, namespace, log_path
        self.extra = extra
        self.liveness = free_port()
        self.metrics = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        argv = [
            sys.executable, "-m", "peer_recovery_operator",
            "--namespace", self.namespace,
            "--liveness", f"http://127.0.0.1:{self.liveness}/healthz",
            "--metrics-address", f"127.0.0.1:{self.metrics}",
            "--catch-up-grace", "3", "--sweep-interval", "0.5",
            *self.extra,
        ]  # fmt: skip
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        wait_for("the operator's liveness endpoint", self.healthy, timeout=60)
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"operator exited:\n{self.log()}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.liveness}/healthz", timeout=2
            ) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as r:
            return r.read().decode()

    def kill(self) -> None:
        """SIGKILL, as a crashed node or an OOM kill would: no cleanup, no Lease release."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the process reads nothing (a partition as it sees it) until resumed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def metric(self, name: str) -> float:
        """The value of one unlabelled metric from /metrics (0 when absent)."""
        for line in self.metrics_text().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def operator_under_rbac(
    control_plane: Any,
    namespace: str,
    log_path: Path,
    *extra: str,
    via: Callable[[Path], Path] | None = None,
) -> Iterator[OperatorProcess]:
    """The operator as a subprocess watching ``namespace``, under the chart's RBAC rendered
    for that namespace and bound to its own ServiceAccount; the RBAC is removed after.
    ``via`` rewrites its kubeconfig (e.g. to reach the API server through a proxy)."""
    with _chart_rbac(control_plane, namespace) as (kubeconfig, _release):
        if via is not None:
            kubeconfig = via(kubeconfig)
        proc = OperatorProcess(kubeconfig, namespace, log_path, *extra)
        try:
            yield proc.start()
        finally:
            proc.stop()
            if proc.log_path.exists():
                print(proc.log()[-6000:])


@contextmanager
def operators_under_rbac(
    control_plane: Any, namespace: str, log_dir: Path, replicas: int, *extra: str
) -> Iterator[tuple[list[OperatorProcess], str]]:
    """``replicas`` operators electing a leader on the chart's Lease in ``namespace`` (the
    release's namespace here), as the chart runs them; yields them and the Lease's name.
    Short Lease timings keep the tests quick; every replica is stopped after."""
    with _chart_rbac(control_plane, namespace) as (kubeconfig, release):
        lease = f"{release}-peer-recovery-operator"
        procs = [
            OperatorProcess(
                kubeconfig, namespace, log_dir / f"operator-{i}.log",
                "--lease-namespace", namespace, "--lease-name", lease,
                "--identity", f"replica-{i}", "--lease-duration", "4",
                "--lease-renew-deadline", "3", "--lease-retry-period", "0.5", *extra,
            )
            for i in range(replicas)
        ]  # fmt: skip
        try:
            for proc in procs:
                proc.start()
            yield procs, lease
        finally:
            for proc in procs:
                proc.stop()
            for proc in procs:
                if proc.log_path.exists():
                    print(f"--- {proc.log_path.name}\n{proc.log()[-4000:]}")


@contextmanager
def _chart_rbac(control_plane: Any, namespace: str) -> Iterator[tuple[Path, str]]:
    release = f"pr-{uuid.uuid4().hex[:8]}"
    manifest = render_rbac(
        control_plane.bin_dir / "helm", release, namespace, **{"watchNamespaces[0]": namespace}
    )
    control_plane.kubectl("apply", "-f", "-", input=manifest)
    try:
        yield (
            control_plane.service_account_kubeconfig(namespace, f"{release}-peer-recovery"),
            release,
        )
    finally:
        control_plane.kubectl(
            "delete", "--ignore-not-found", "-f", "-", input=manifest, check=False
        )


def recoveries(core_custom: Any, namespace: str) -> list[dict[str, Any]]:
    from peer_recovery.contract import names

    items = core_custom.list_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.PLURAL
    )
    return sorted(items["items"], key=lambda r: r["metadata"]["name"])
