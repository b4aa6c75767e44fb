"""The contract shared by the operator and the runtime.

Names of the ``PeerRecovery`` custom resource, the annotation and label keys both sides
read, and the enumerations (phases, modes, reasons) that appear in its fields. Everything
here is torch-free and kubernetes-free, so the operator, the runtime and torchrun's plugin
loading can import it cheaply. These names are a fixed contract (see DESIGN.md): tests and
users depend on them, so change them only with a new API version.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "ANNOTATION_ENABLED",
    "ANNOTATION_ENABLED_VALUE",
    "ANNOTATION_PODS_PER_REPLICA",
    "API_VERSION",
    "GROUP",
    "KIND",
    "LABEL_JOB_NAME",
    "LABEL_JOB_ROLE",
    "LABEL_OPERATOR_NAME",
    "LABEL_REPLICA_INDEX",
    "LABEL_REPLICA_TYPE",
    "PLURAL",
    "PYTORCHJOB_GROUP",
    "PYTORCHJOB_KIND",
    "PYTORCHJOB_PLURAL",
    "PYTORCHJOB_VERSION",
    "SHORT_NAME",
    "SINGULAR",
    "VERSION",
    "Mode",
    "Phase",
    "PlannedBy",
    "Reason",
]

# --- The PeerRecovery custom resource ------------------------------------------------------

GROUP: Final = "peerrecovery.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "PeerRecovery"
PLURAL: Final = "peerrecoveries"
SINGULAR: Final = "peerrecovery"
SHORT_NAME: Final = "precov"

# --- The Kubeflow PyTorchJob it serves ------------------------------------------------------

PYTORCHJOB_GROUP: Final = "kubeflow.org"
PYTORCHJOB_VERSION: Final = "v1"
PYTORCHJOB_KIND: Final = "PyTorchJob"
PYTORCHJOB_PLURAL: Final = "pytorchjobs"

# --- Annotations on the PyTorchJob ----------------------------------------------------------

#: Opt-in switch. Only jobs whose annotation has exactly ANNOTATION_ENABLED_VALUE are watched.
ANNOTATION_ENABLED: Final = "peer-recovery"
ANNOTATION_ENABLED_VALUE: Final = "enabled"
#: How many consecutive pods make up one full replica of the state (default: every pod does).
ANNOTATION_PODS_PER_REPLICA: Final = "peerrecovery.io/pods-per-replica"

# --- Labels the training-operator puts on every pod of a job --------------------------------

LABEL_JOB_NAME: Final = "training.kubeflow.org/job-name"
LABEL_REPLICA_TYPE: Final = "training.kubeflow.org/replica-type"
LABEL_REPLICA_INDEX: Final = "training.kubeflow.org/replica-index"
LABEL_OPERATOR_NAME: Final = "training.kubeflow.org/operator-name"
LABEL_JOB_ROLE: Final = "training.kubeflow.org/job-role"


class Phase(str, enum.Enum):
    """``status.phase`` of a PeerRecovery: Pending -> Planned -> Streaming -> a terminal one."""

    PENDING = "Pending"
    PLANNED = "Planned"
    STREAMING = "Streaming"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    FELL_BACK = "FellBack"

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED, Phase.FELL_BACK)


class Mode(str, enum.Enum):
    """``spec.mode``: stream from a peer, or load the pod's own surviving snapshot."""

    PEER = "Peer"
    LOCAL = "Local"


class Reason(str, enum.Enum):
    """``spec.reason``: what the operator saw happen to the target pod."""

    POD_REPLACED = "PodReplaced"
    CONTAINER_RESTARTED = "ContainerRestarted"


class PlannedBy(str, enum.Enum):
    """``spec.plannedBy``: who chose the source."""

    OPERATOR = "operator"
    RUNTIME = "runtime"
