"""Fixtures for tests that run our objects on the test control plane."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PEER_RECOVERY_CRD = (
    Path(__file__).resolve().parents[1] / "charts/peer-recovery/crds/peerrecoveries.yaml"
)


@pytest.fixture(scope="module")
def crd(control_plane: Any) -> None:
    """The chart's PeerRecovery CRD, applied to the control plane and Established."""
    control_plane.kubectl("apply", "-f", str(PEER_RECOVERY_CRD))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "crd/peerrecoveries.peerrecovery.io", "--timeout=60s"
    )


@pytest.fixture
def client(control_plane: Any) -> Iterator[Any]:
    """An admin API client for the control plane, closed after the test."""
    with control_plane.api_client() as api_client:
        yield api_client
