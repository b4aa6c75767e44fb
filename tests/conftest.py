"""Fixtures shared by every test directory."""

# The test control plane (tests/controlplane/): `control_plane` (session) and `namespace`.
from tests.controlplane.fixtures import (  # noqa: F401
    control_plane,
    control_plane_options,
    namespace,
)
