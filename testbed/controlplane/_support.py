"""Small pieces the control plane is assembled from: where the binaries are, free loopback
ports, kubeconfig files, and polling with a deadline.

Invariants: nothing here starts a process; every wait has a deadline and its error says what
was awaited and what was last seen.
"""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml

__all__ = [
    "BINARIES",
    "REPO_ROOT",
    "MissingBinariesError",
    "find_bin_dir",
    "free_ports",
    "poll",
    "write_kubeconfig",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
    "training-operator",
)

T = TypeVar("T")


class MissingBinariesError(RuntimeError):
    """The control plane's binaries are not built; `make tools` builds them."""


def find_bin_dir() -> Path:
    """The directory holding the control plane's binaries (``PEER_RECOVERY_BIN_DIR`` or
    ``.tools/bin``); raises MissingBinariesError naming the missing ones and `make tools`."""
    bin_dir = Path(os.environ.get("PEER_RECOVERY_BIN_DIR", REPO_ROOT / ".tools" / "bin"))
    missing = [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if missing:
        raise MissingBinariesError(
            f"control plane binaries missing from {bin_dir}: {', '.join(missing)}; "
            "run `make tools` to build them"
        )
    return bin_dir


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held together while chosen, so distinct)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def poll(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.05,
    alive: Callable[[], str | None] | None = None,
) -> T:
    """Call ``probe`` until it returns something other than None or False, and return that.

    ``alive`` is checked each round and returns an error text when waiting is pointless (a
    component exited). Raises TimeoutError naming ``what`` and the probe's last exception.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = probe()
            if result is not None and result is not False:
                return result
        except Exception as error:  # the probe's failure is the thing being waited out
            last_error = error
        if alive is not None:
            problem = alive()
            if problem:
                raise RuntimeError(f"gave up waiting for {what}: {problem}")
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca_cert: Path,
    user: str,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> Path:
    """Write a self-contained kubeconfig (certificates embedded) for one user and return it."""
    credentials: dict[str, str] = {}
    if client_cert is not None and client_key is not None:
        credentials["client-certificate-data"] = _b64(client_cert)
        credentials["client-key-data"] = _b64(client_key)
    if token is not None:
        credentials["token"] = token
    if not credentials:
        raise ValueError(f"kubeconfig for {user!r} needs a client certificate or a token")
    context: dict[str, str] = {"cluster": "peer-recovery-test", "user": user}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "peer-recovery-test",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_cert)},
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": context}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
