"""``peer_recovery.contract.names`` spells the contract of docs/design.md exactly; users and
manifests depend on these strings."""

from __future__ import annotations

from peer_recovery.contract import names


def test_custom_resource_names() -> None:
    assert names.GROUP == "peerrecovery.io"
    assert names.VERSION == "v1alpha1"
    assert names.API_VERSION == "peerrecovery.io/v1alpha1"
    assert names.KIND == "PeerRecovery"
    assert names.PLURAL == "peerrecoveries"
    assert names.SHORT_NAME == "precov"


def test_pytorchjob_names() -> None:
    assert (names.PYTORCHJOB_GROUP, names.PYTORCHJOB_VERSION) == ("kubeflow.org", "v1")
    assert names.PYTORCHJOB_PLURAL == "pytorchjobs"


def test_annotation_and_label_keys() -> None:
    assert (names.ANNOTATION_ENABLED, names.ANNOTATION_ENABLED_VALUE) == (
        "peer-recovery",
        "enabled",
    )
    assert names.ANNOTATION_PODS_PER_REPLICA == "peerrecovery.io/pods-per-replica"
    prefix = "training.kubeflow.org/"
    assert prefix + "job-name" == names.LABEL_JOB_NAME
    assert prefix + "replica-type" == names.LABEL_REPLICA_TYPE
    assert prefix + "replica-index" == names.LABEL_REPLICA_INDEX
    assert prefix + "operator-name" == names.LABEL_OPERATOR_NAME
    assert prefix + "job-role" == names.LABEL_JOB_ROLE


def test_enumerations() -> None:
    assert [p.value for p in names.Phase] == [
        "Pending",
        "Planned",
        "Streaming",
        "Succeeded",
        "Failed",
        "FellBack",
    ]
    assert {p for p in names.Phase if p.terminal} == {
        names.Phase.SUCCEEDED,
        names.Phase.FAILED,
        names.Phase.FELL_BACK,
    }
    assert [m.value for m in names.Mode] == ["Peer", "Local"]
    assert [r.value for r in names.Reason] == ["PodReplaced", "ContainerRestarted"]
    assert [b.value for b in names.PlannedBy] == ["operator", "runtime"]
