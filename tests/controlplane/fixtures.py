"""pytest fixtures for the test control plane: ``control_plane`` (one per session) and
``namespace`` (a fresh namespace per test); ``real_controller_plane`` (one per session: the
real training-operator, kube-scheduler and the test kubelet) and ``real_namespace`` (a fresh
namespace on it). tests/conftest.py re-exports them.

Invariants: when the binaries are missing, tests that use the control plane are skipped with a
reason naming `make tools`, except under ``PEER_RECOVERY_REQUIRE_CLUSTER=1`` (set by
`make test`), where they fail; when such a test fails, the components' logs are copied to
``.artifacts/control-plane/<test>/`` and their tails attached to the report; at the end of the
session every component is stopped.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.controlplane._support import REPO_ROOT, MissingBinariesError, find_bin_dir, poll
from testbed.controlplane.cluster import ControlPlane

__all__ = [
    "control_plane",
    "control_plane_options",
    "namespace",
    "real_controller_plane",
    "real_namespace",
    "require_bin_dir",
]

REQUIRE_ENV = "PEER_RECOVERY_REQUIRE_CLUSTER"
ARTIFACTS_ENV = "PEER_RECOVERY_ARTIFACTS"  # overrides .artifacts/ (the repository's)


class _KeepLogsOnFailure:
    """A pytest plugin, registered while a control plane runs: on a failed test that used it,
    keep a copy of the component logs and attach their tails to the report."""

    def __init__(self, plane: ControlPlane, fixture: str) -> None:
        self.plane = plane
        self.fixture = fixture

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        if report.failed and self.fixture in getattr(item, "fixturenames", ()):
            root = Path(os.environ.get(ARTIFACTS_ENV, REPO_ROOT / ".artifacts"))
            dest = root / "control-plane" / re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)[-120:]
            shutil.copytree(self.plane.log_dir, dest, dirs_exist_ok=True)
            pods = self.plane.work_dir / "kubelet" / "pods"  # the test kubelet's pod logs
            for log in pods.glob("*/*.log") if pods.is_dir() else ():
                target = dest / "pods" / log.parent.name
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(log, target / log.name)
            tails = "\n".join(
                f"--- {name}:\n{component.log_tail(15)}"
                for name, component in self.plane.components().items()
            )
            report.sections.append(("control plane logs", f"full logs copied to {dest}\n{tails}"))
        return report


def require_bin_dir() -> Path:
    """The binaries' directory; when they are missing, skip the calling test, or fail it under
    PEER_RECOVERY_REQUIRE_CLUSTER=1. For tests that start their own ControlPlane."""
    try:
        return find_bin_dir()
    except MissingBinariesError as error:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{error} ({REQUIRE_ENV}=1, so this is an error, not a skip)")
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def control_plane_options() -> dict[str, Any]:
    """Keyword arguments for ControlPlane; override this fixture to change nodes or zones."""
    return {"nodes": 4, "zones": 2}


@pytest.fixture(scope="session")
def control_plane(
    request: pytest.FixtureRequest, control_plane_options: dict[str, Any]
) -> Iterator[ControlPlane]:
    """A running control plane shared by the session (see testbed/controlplane/cluster.py)."""
    yield from _running(request, "control_plane", **control_plane_options)


@pytest.fixture(scope="session")
def real_controller_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """A control plane with the real training-operator, kube-scheduler and the test kubelet
    on 4 local nodes in 2 zones, shared by the session."""
    yield from _running(request, "real_controller_plane", nodes=4, zones=2, real_controller=True)


def _running(
    request: pytest.FixtureRequest, fixture: str, **options: Any
) -> Iterator[ControlPlane]:
    plane = ControlPlane(bin_dir=require_bin_dir(), **options)
    plane.start()
    plugin = _KeepLogsOnFailure(plane, fixture)
    request.config.pluginmanager.register(plugin, f"peer-recovery-{fixture}-logs")
    try:
        yield plane
    finally:
        request.config.pluginmanager.unregister(plugin)
        plane.stop()


def wait_default_service_account(client: Any, namespace: str, *, timeout: float) -> None:
    """Wait until the controller manager has created ``namespace``'s default ServiceAccount
    (which the ServiceAccount admission plugin requires before any pod is admitted)."""
    import kubernetes.client
    from kubernetes.client.exceptions import ApiException

    core = kubernetes.client.CoreV1Api(client)

    def default_account() -> bool:
        try:
            return core.read_namespaced_service_account("default", namespace) is not None
        except ApiException as error:
            if error.status == 404:
                return False
            raise

    poll(f"ServiceAccount {namespace}/default", default_account, timeout=timeout)


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount present), deleted after the test."""
    yield from _fresh_namespace(control_plane, request)


@pytest.fixture
def real_namespace(
    real_controller_plane: ControlPlane, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh namespace on ``real_controller_plane``, deleted after the test."""
    yield from _fresh_namespace(real_controller_plane, request)


def _fresh_namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    import kubernetes.client
    from kubernetes.client.exceptions import ApiException

    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{stem or 't'}-{uuid.uuid4().hex[:6]}"
    with control_plane.api_client() as client:
        core = kubernetes.client.CoreV1Api(client)
        core.create_namespace(
            {"metadata": {"name": name, "labels": {"peer-recovery/test": "true"}}}
        )

        wait_default_service_account(client, name, timeout=30)
    try:
        yield name
    finally:
        with control_plane.api_client() as client:
            try:
                kubernetes.client.CoreV1Api(client).delete_namespace(name)
            except ApiException as error:
                if error.status != 404:
                    raise
