"""``peer_recovery.api`` spells the contract of DESIGN.md exactly; users and manifests
depend on these strings."""

from __future__ import annotations

from peer_recovery import api


def test_custom_resource_names() -> None:
    assert api.GROUP == "peerrecovery.io"
    assert api.VERSION == "v1alpha1"
    assert api.API_VERSION == "peerrecovery.io/v1alpha1"
    assert api.KIND == "PeerRecovery"
    assert api.PLURAL == "peerrecoveries"
    assert api.SHORT_NAME == "precov"


def test_pytorchjob_names() -> None:
    assert (api.PYTORCHJOB_GROUP, api.PYTORCHJOB_VERSION) == ("kubeflow.org", "v1")
    assert api.PYTORCHJOB_PLURAL == "pytorchjobs"


def test_annotation_and_label_keys() -> None:
    assert (api.ANNOTATION_ENABLED, api.ANNOTATION_ENABLED_VALUE) == ("peer-recovery", "enabled")
    assert api.ANNOTATION_PODS_PER_REPLICA == "peerrecovery.io/pods-per-replica"
    prefix = "training.kubeflow.org/"
    assert prefix + "job-name" == api.LABEL_JOB_NAME
    assert prefix + "replica-type" == api.LABEL_REPLICA_TYPE
    assert prefix + "replica-index" == api.LABEL_REPLICA_INDEX
    assert prefix + "operator-name" == api.LABEL_OPERATOR_NAME
    assert prefix + "job-role" == api.LABEL_JOB_ROLE


def test_enumerations() -> None:
    assert [p.value for p in api.Phase] == [
        "Pending",
        "Planned",
        "Streaming",
        "Succeeded",
        "Failed",
        "FellBack",
    ]
    assert {p for p in api.Phase if p.terminal} == {
        api.Phase.SUCCEEDED,
        api.Phase.FAILED,
        api.Phase.FELL_BACK,
    }
    assert [m.value for m in api.Mode] == ["Peer", "Local"]
    assert [r.value for r in api.Reason] == ["PodReplaced", "ContainerRestarted"]
    assert [b.value for b in api.PlannedBy] == ["operator", "runtime"]
