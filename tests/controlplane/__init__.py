"""The test control plane: real etcd, kube-apiserver, kube-controller-manager and KWOK on
loopback, built by `make tools` (see docs/control-plane.md).

``ControlPlane`` runs one; ``tests.controlplane.fixtures`` offers it to pytest as the
``control_plane`` and ``namespace`` fixtures; ``tests.controlplane.pytorchjob`` creates
PyTorchJobs and pods as the training-operator does; ``python -m tests.controlplane`` runs one
in the foreground for people (`make cluster`).
"""

from tests.controlplane._support import MissingBinariesError, find_bin_dir
from tests.controlplane.cluster import ControlPlane, KubectlError

__all__ = ["ControlPlane", "KubectlError", "MissingBinariesError", "find_bin_dir"]
