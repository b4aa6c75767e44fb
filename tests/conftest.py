"""Fixtures shared by every test directory."""

# The test control plane (testbed/controlplane/, fixtures in tests/controlplane/): `control_plane`
# (session) and `namespace`;
# then our CRD on it (`crd`) and an admin API client (`client`).
from tests.cluster_fixtures import client, crd  # noqa: F401
from tests.controlplane.fixtures import (  # noqa: F401
    control_plane,
    control_plane_options,
    namespace,
    real_controller_plane,
    real_namespace,
)
