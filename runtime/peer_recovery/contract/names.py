"""Names and enumerations of the contract the operator and the runtime share.

The ``PeerRecovery`` custom resource's group, version, kind and plural; the PyTorchJob it
serves; the annotation and label keys both sides read; the enumerations that appear in its
fields (phases, modes, reasons, who planned) and in its conditions. Pure, torch-free and
kubernetes-free. These names are a fixed contract (``docs/design.md``, "The contract"):
tests, manifests and users depend on them, so change them only with a new API version.
"""

from __future__ import annotations

import enum
from typing import Any, Final

__all__ = [
    "ANNOTATION_ENABLED",
    "ANNOTATION_ENABLED_PREFIXED",
    "ANNOTATION_ENABLED_PREFIXED_VALUE",
    "ANNOTATION_ENABLED_VALUE",
    "ANNOTATION_MUTATED",
    "ANNOTATION_PODS_PER_REPLICA",
    "ANNOTATION_RESTART_COUNT",
    "ANNOTATION_SHM_SIZE",
    "ANNOTATION_SNAPSHOT_SIZE",
    "API_VERSION",
    "CATEGORY",
    "ENV_JOB_UID",
    "GROUP",
    "KIND",
    "LABEL_JOB_NAME",
    "LABEL_JOB_ROLE",
    "LABEL_OPERATOR_NAME",
    "LABEL_RECOVERY_JOB",
    "LABEL_RECOVERY_TARGET_UID",
    "LABEL_REPLICA_INDEX",
    "LABEL_REPLICA_TYPE",
    "PLURAL",
    "PYTORCHJOB_API_VERSION",
    "PYTORCHJOB_GROUP",
    "PYTORCHJOB_KIND",
    "PYTORCHJOB_PLURAL",
    "PYTORCHJOB_VERSION",
    "PYTORCH_CONTAINER",
    "SHORT_NAME",
    "SINGULAR",
    "VERSION",
    "Actor",
    "ConditionReason",
    "Mode",
    "Phase",
    "PlannedBy",
    "Reason",
    "is_operator_reason",
    "parse_enum",
]

# --- The PeerRecovery custom resource ------------------------------------------------------

GROUP: Final = "peerrecovery.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "PeerRecovery"
PLURAL: Final = "peerrecoveries"
SINGULAR: Final = "peerrecovery"
SHORT_NAME: Final = "precov"
#: The CRD's category: ``kubectl get peer-recovery`` (deliberately not ``all``).
CATEGORY: Final = "peer-recovery"

# --- The Kubeflow PyTorchJob it serves ------------------------------------------------------

PYTORCHJOB_GROUP: Final = "kubeflow.org"
PYTORCHJOB_VERSION: Final = "v1"
PYTORCHJOB_KIND: Final = "PyTorchJob"
PYTORCHJOB_PLURAL: Final = "pytorchjobs"
PYTORCHJOB_API_VERSION: Final = f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}"

# --- Annotations on the PyTorchJob ----------------------------------------------------------

#: Opt-in switch. Only jobs whose annotation has exactly ANNOTATION_ENABLED_VALUE are watched.
ANNOTATION_ENABLED: Final = "peer-recovery"
ANNOTATION_ENABLED_VALUE: Final = "enabled"
#: The same switch under the project's prefix, for clusters whose policies require prefixed
#: keys: ``peerrecovery.io/enabled: "true"``. Either key opts the job in.
ANNOTATION_ENABLED_PREFIXED: Final = "peerrecovery.io/enabled"
ANNOTATION_ENABLED_PREFIXED_VALUE: Final = "true"
#: How many consecutive pods make up one full replica of the state (default: every pod does).
ANNOTATION_PODS_PER_REPLICA: Final = "peerrecovery.io/pods-per-replica"
#: The size of one snapshot of one pod's state (a quantity, e.g. "6Gi"): the webhook sizes
#: /dev/shm for two of them (docs/webhook.md).
ANNOTATION_SNAPSHOT_SIZE: Final = "peerrecovery.io/snapshot-size"
#: The /dev/shm sizeLimit the webhook sets (a quantity), overriding its rule.
ANNOTATION_SHM_SIZE: Final = "peerrecovery.io/shm-size"

# --- Annotations on a PeerRecovery ----------------------------------------------------------

#: The target container's restart count a recovery serves, so that repeated container
#: restarts of one pod incarnation get distinct attempts. The runtime's own records carry
#: "0", so an operator that creates the same name a moment later sees "already recorded".
ANNOTATION_RESTART_COUNT: Final = "peerrecovery.io/restart-count"

# --- Annotations on a pod -------------------------------------------------------------------

#: Put on every pod the operator's mutating webhook has completed, with the operator's
#: version; an opted-in job's pod without it came through while the webhook was down.
ANNOTATION_MUTATED: Final = "peerrecovery.io/mutated"

#: The env var that tells a pod its PyTorchJob's UID (set by the webhook): part of every
#: snapshot's job identity, so a new job of the same name never loads an old job's state.
ENV_JOB_UID: Final = "PEER_RECOVERY_JOB_UID"

# --- Labels the training-operator puts on every pod of a job --------------------------------

LABEL_JOB_NAME: Final = "training.kubeflow.org/job-name"
LABEL_REPLICA_TYPE: Final = "training.kubeflow.org/replica-type"
LABEL_REPLICA_INDEX: Final = "training.kubeflow.org/replica-index"
LABEL_OPERATOR_NAME: Final = "training.kubeflow.org/operator-name"
LABEL_JOB_ROLE: Final = "training.kubeflow.org/job-role"
#: The container the training-operator requires in every replica (it validates the name);
#: only its restarts are restarts of the training process (sidecars' are not).
PYTORCH_CONTAINER: Final = "pytorch"

# --- Labels peer-recovery puts on every PeerRecovery ----------------------------------------

#: The PyTorchJob the recovery belongs to, so "this job's recoveries" is a label selector.
LABEL_RECOVERY_JOB: Final = "peerrecovery.io/job-name"
#: The target pod's UID, so "is this replacement already being recovered" is a selector too.
LABEL_RECOVERY_TARGET_UID: Final = "peerrecovery.io/target-uid"


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


class Actor(str, enum.Enum):
    """Who proposes a phase move: the operator or the in-pod runtime."""

    OPERATOR = "operator"
    RUNTIME = "runtime"


class ConditionReason(str, enum.Enum):
    """``reason`` of the condition a writer leaves with each phase it writes.

    The operator's reasons and the runtime's are disjoint, so a reader can tell who wrote a
    phase (:attr:`by_operator`): the operator reports a runtime-written terminal phase as an
    Event, never its own.
    """

    # Written by the operator.
    SOURCE_CHOSEN = "SourceChosen"
    LOCAL_SNAPSHOT = "LocalSnapshot"
    NO_SOURCE = "NoSource"
    REPLANNING = "Replanning"
    SUPERSEDED = "Superseded"
    ATTEMPTS_EXHAUSTED = "AttemptsExhausted"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    # Written by the runtime.
    IN_BAND_PLAN = "InBandPlan"
    TRANSFER_STARTED = "TransferStarted"
    LOCAL_LOAD_STARTED = "LocalLoadStarted"
    RESTORED = "Restored"
    TRANSFER_FAILED = "TransferFailed"
    VOTE_FAILED = "VoteFailed"
    CHECKPOINT_LOADED = "CheckpointLoaded"

    @property
    def by_operator(self) -> bool:
        return self in _OPERATOR_REASONS


_OPERATOR_REASONS: Final = frozenset(
    {
        ConditionReason.SOURCE_CHOSEN,
        ConditionReason.LOCAL_SNAPSHOT,
        ConditionReason.NO_SOURCE,
        ConditionReason.REPLANNING,
        ConditionReason.SUPERSEDED,
        ConditionReason.ATTEMPTS_EXHAUSTED,
        ConditionReason.DEADLINE_EXCEEDED,
    }
)


def parse_enum(kind: type[enum.Enum], value: object, what: str) -> Any:
    """``value`` as a member of the contract enum ``kind``; the error names ``what`` was
    wrong and the values allowed."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        known = ", ".join(repr(m.value) for m in kind)
        raise ValueError(f"unknown {what} {value!r}; expected one of {known}") from None


def is_operator_reason(reason: str) -> bool:
    """Did the operator write the condition with this ``reason``? (False for unknown ones.)"""
    try:
        return ConditionReason(reason).by_operator
    except ValueError:
        return False
