"""PeerRecovery bodies: the deterministic name, the ownerReference, and field validation."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peer_recovery.contract import bodies, names
from peer_recovery.contract.bodies import PodRef, build_peer_recovery, build_status, recovery_name

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

TARGET = PodRef("train-worker-1", "uid-target", "worker", 1, 2, node="node-a")
SOURCE = PodRef("train-worker-3", "uid-source", "worker", 3, 4, node="node-b")


def _body(**overrides: object) -> dict:
    arguments: dict = {
        "namespace": "team",
        "job_name": "train",
        "job_uid": "uid-job",
        "target": TARGET,
        "mode": names.Mode.PEER,
        "reason": names.Reason.POD_REPLACED,
        "attempt": 1,
        "planned_by": names.PlannedBy.OPERATOR,
        "source": SOURCE,
    }
    arguments.update(overrides)
    return build_peer_recovery(**arguments)


def test_name_is_readable_stable_and_distinct_per_incarnation_and_attempt() -> None:
    name = recovery_name("train", "train-worker-1", "uid-1", 1)
    assert name.startswith("train-worker-1-a1-")
    assert name == recovery_name("train", "train-worker-1", "uid-1", 1)
    others = {
        recovery_name("train", "train-worker-1", "uid-2", 1),  # replaced again: new UID
        recovery_name("train", "train-worker-1", "uid-1", 2),  # re-plan
        recovery_name("other", "train-worker-1", "uid-1", 1),  # another job
        recovery_name("train", "train-worker-2", "uid-1", 1),
    }
    assert name not in others and len(others) == 4


@given(
    job=st.text(min_size=1, max_size=80),
    pod=st.text(min_size=1, max_size=300),
    uid=st.text(min_size=1, max_size=60),
    attempt=st.integers(min_value=1, max_value=bodies.MAX_ATTEMPT),
)
def test_name_is_always_a_dns_1123_label(job: str, pod: str, uid: str, attempt: int) -> None:
    name = recovery_name(job, pod, uid, attempt)
    assert len(name) <= 63
    assert DNS_1123_LABEL.match(name), name
    assert name == recovery_name(job, pod, uid, attempt)


def test_long_or_odd_pod_names_are_cut_and_cleaned() -> None:
    long_name = recovery_name("j", "A" * 200 + "-worker-7", "u", 3)
    assert len(long_name) == 63 and long_name.startswith("aaaa")
    assert recovery_name("j", "Pod_With.Dots", "u", 1).startswith("pod-with-dots-a1-")
    assert recovery_name("j", "___", "u", 1).startswith("precov-a1-")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", "p", "u", 1), "job name"),
        (("j", "", "u", 1), "target pod"),
        (("j", "p", None, 1), "target UID"),
        (("j", "p", "u", 0), "attempt"),
        (("j", "p", "u", True), "attempt"),
        (("j", "p", "u", 2**31), "attempt"),
    ],
)
def test_name_inputs_are_checked(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        recovery_name(*args)


def test_body_has_contract_fields_and_owner() -> None:
    body = _body()
    assert body["apiVersion"] == "peerrecovery.io/v1alpha1" and body["kind"] == "PeerRecovery"
    meta = body["metadata"]
    assert meta["name"] == recovery_name("train", "train-worker-1", "uid-target", 1)
    assert meta["namespace"] == "team"
    assert meta["labels"] == {
        names.LABEL_RECOVERY_JOB: "train",
        names.LABEL_RECOVERY_TARGET_UID: "uid-target",
    }
    (owner,) = meta["ownerReferences"]
    assert owner == {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "name": "train",
        "uid": "uid-job",
        "controller": False,
        "blockOwnerDeletion": False,
    }
    assert body["spec"] == {
        "jobName": "train",
        "target": {
            "pod": "train-worker-1",
            "podUID": "uid-target",
            "replicaType": "worker",
            "replicaIndex": 1,
            "ordinal": 2,
            "node": "node-a",
        },
        "source": {
            "pod": "train-worker-3",
            "podUID": "uid-source",
            "replicaType": "worker",
            "replicaIndex": 3,
            "ordinal": 4,
            "node": "node-b",
        },
        "mode": "Peer",
        "reason": "PodReplaced",
        "attempt": 1,
        "plannedBy": "operator",
    }
    assert "status" not in body  # the status subresource ignores it on create


def test_local_and_pending_bodies_have_no_source() -> None:
    local = _body(mode="Local", reason="ContainerRestarted", source=None)
    assert "source" not in local["spec"] and local["spec"]["mode"] == "Local"
    pending = _body(source=None, planned_by="runtime")
    assert "source" not in pending["spec"] and pending["spec"]["plannedBy"] == "runtime"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "Local"}, "Local recovery .* has no source"),
        ({"source": TARGET}, "own source"),
        ({"mode": "Stream"}, "unknown spec.mode 'Stream'"),
        ({"reason": "Evicted"}, "unknown spec.reason 'Evicted'"),
        ({"planned_by": "human"}, "unknown spec.plannedBy 'human'"),
        ({"attempt": 0}, "attempt"),
        ({"namespace": ""}, "namespace"),
        ({"job_uid": ""}, "job UID"),
        ({"job_name": "x" * 64}, "not a valid label value"),
        ({"job_name": "bad name"}, "not a valid label value"),
    ],
)
def test_body_inputs_are_checked(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _body(**overrides)


def test_pod_ref_round_trips_and_names_bad_fields() -> None:
    assert PodRef.from_spec(TARGET.to_spec()) == TARGET
    without_node = PodRef("p", "u", "master", 0, 0)
    assert "node" not in without_node.to_spec()
    assert PodRef.from_spec(without_node.to_spec(), "spec.source") == without_node
    with pytest.raises(ValueError, match=r"spec.source lacks podUID, ordinal"):
        PodRef.from_spec({"pod": "p", "replicaType": "worker", "replicaIndex": 0}, "spec.source")
    with pytest.raises(ValueError, match=r"spec.target: ordinal of pod 'p' must be an int >= 0"):
        PodRef.from_spec({**without_node.to_spec(), "ordinal": -1})
    with pytest.raises(ValueError, match="must be an object"):
        PodRef.from_spec(["p"])  # type: ignore[arg-type]


def test_status_uses_contract_keys_and_omits_unset_fields() -> None:
    assert build_status("Planned", attempt=2, message="ordinal 4 streams") == {
        "phase": "Planned",
        "observedAttempt": 2,
        "message": "ordinal 4 streams",
    }
    assert build_status(
        names.Phase.SUCCEEDED, attempt=1, step=1200, bytes_moved=10, duration_seconds=3
    ) == {
        "phase": "Succeeded",
        "observedAttempt": 1,
        "step": 1200,
        "bytes": 10,
        "durationSeconds": 3.0,
    }
    for bad, message in (
        ({"step": -1}, "status.step"),
        ({"bytes_moved": 1.5}, "status.bytes"),
        ({"duration_seconds": float("nan")}, "durationSeconds"),
    ):
        with pytest.raises(ValueError, match=message):
            build_status("Streaming", attempt=1, **bad)
    with pytest.raises(ValueError, match=r"unknown status\.phase 'Done'"):
        build_status("Done", attempt=1)
