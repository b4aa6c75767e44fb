"""The test control plane: real etcd, kube-apiserver, kube-controller-manager and KWOK on
loopback, or kube-scheduler, the Kubeflow training-operator and a test kubelet instead of
KWOK, built by `make tools` (see docs/control-plane.md).

``ControlPlane`` runs one; ``tests.controlplane.fixtures`` (pytest's view) offers it to pytest as the
``control_plane``/``namespace`` and ``real_controller_plane``/``real_namespace`` fixtures;
``testbed.controlplane.pytorchjob`` creates hand-made PyTorchJobs and pods where no controller
runs, ``testbed.controlplane.trainingjob`` real ones for the training-operator;
``python -m testbed.controlplane`` runs one in the foreground for people (`make cluster`).
"""

from testbed.controlplane._support import MissingBinariesError, find_bin_dir
from testbed.controlplane.cluster import ControlPlane, KubectlError

__all__ = ["ControlPlane", "KubectlError", "MissingBinariesError", "find_bin_dir"]
