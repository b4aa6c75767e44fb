"""The CRD on the real test control plane: it applies, it is structural, it rejects what the
contract forbids, it keeps what kopf writes, and ``kubectl explain`` shows its descriptions."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peer_recovery.contract import names
from peer_recovery.contract.bodies import PodRef, build_peer_recovery, build_status
from testbed.controlplane import pytorchjob
from testbed.controlplane._support import poll

pytestmark = pytest.mark.cluster

CRD_PATH = Path(__file__).resolve().parents[2] / "charts/peer-recovery/crds/peerrecoveries.yaml"
CRD_NAME = f"{names.PLURAL}.{names.GROUP}"


@pytest.fixture(scope="module")
def plane(control_plane: Any) -> Any:
    """The control plane with the CRD applied and Established. The CRD is left installed at
    the end (applying it is idempotent, and later tests install the chart over it)."""
    control_plane.kubectl("apply", "-f", str(CRD_PATH))
    control_plane.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    return control_plane


@pytest.fixture
def job(plane: Any, namespace: str) -> Iterator[dict[str, Any]]:
    """A real PyTorchJob (no pods) to own the recoveries, so the GC keeps them."""
    with plane.api_client() as client:
        yield pytorchjob.create_job(client, namespace, "train", workers=2, pods=False)


def _recovery(job: dict[str, Any], *, source: bool = True, **overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "namespace": job["metadata"]["namespace"],
        "job_name": job["metadata"]["name"],
        "job_uid": job["metadata"]["uid"],
        "target": PodRef("train-worker-1", "uid-t", "worker", 1, 2, node="fake-node-0"),
        "source": PodRef("train-worker-0", "uid-s", "worker", 0, 1) if source else None,
        "mode": names.Mode.PEER,
        "reason": names.Reason.POD_REPLACED,
        "attempt": 1,
        "planned_by": names.PlannedBy.OPERATOR,
    }
    arguments.update(overrides)
    return build_peer_recovery(**arguments)


def _create(plane: Any, body: dict[str, Any]) -> str:
    plane.kubectl("create", "-f", "-", input=json.dumps(body))
    return body["metadata"]["name"]


def _patch(
    plane: Any, namespace: str, name: str, patch: dict[str, Any], *, status: bool = False
) -> Any:
    args = [
        "patch",
        names.SHORT_NAME,
        name,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps(patch),
    ]
    if status:
        args.append("--subresource=status")
    return plane.kubectl(*args, check=False)


def _get(plane: Any, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(
        plane.kubectl("get", names.PLURAL, name, "-n", namespace, "-o", "json").stdout
    )


def test_crd_is_established_and_structural(plane: Any) -> None:
    crd = json.loads(plane.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert "NonStructuralSchema" not in conditions
    assert crd["status"]["acceptedNames"]["shortNames"] == [names.SHORT_NAME]


def test_a_built_recovery_is_accepted_and_listed(plane: Any, job: dict[str, Any]) -> None:
    namespace = job["metadata"]["namespace"]
    name = _create(plane, _recovery(job))
    patch = {"status": build_status("Succeeded", attempt=1, step=1200, duration_seconds=4.5)}
    assert _patch(plane, namespace, name, patch, status=True).returncode == 0
    stored = _get(plane, namespace, name)
    assert stored["status"]["phase"] == "Succeeded"
    assert stored["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    header, row = plane.kubectl("get", names.SHORT_NAME, "-n", namespace).stdout.splitlines()
    assert header.split() == [
        "NAME",
        "JOB",
        "TARGET",
        "SOURCE",
        "MODE",
        "PHASE",
        "STEP",
        "DURATION",
        "AGE",
    ]
    assert row.split()[:8] == [
        name,
        "train",
        "train-worker-1",
        "train-worker-0",
        "Peer",
        "Succeeded",
        "1200",
        "4.5",
    ]


def test_an_unknown_phase_is_rejected(plane: Any, job: dict[str, Any]) -> None:
    namespace = job["metadata"]["namespace"]
    name = _create(plane, _recovery(job))
    result = _patch(plane, namespace, name, {"status": {"phase": "Bogus"}}, status=True)
    assert result.returncode != 0
    assert 'Unsupported value: "Bogus"' in result.stderr
    assert _get(plane, namespace, name).get("status", {}).get("phase") is None


@pytest.mark.parametrize(
    ("spec_patch", "message"),
    [
        ({"mode": "Stream"}, 'Unsupported value: "Stream"'),
        ({"reason": "Evicted"}, 'Unsupported value: "Evicted"'),
        ({"plannedBy": "human"}, 'Unsupported value: "human"'),
        ({"attempt": 0}, "should be greater than or equal to 1"),
        ({"mode": "Local"}, "a Local recovery has no source"),
        ({"source": {"pod": "train-worker-1"}}, "a pod cannot be its own source"),
    ],
)
def test_spec_outside_the_contract_is_rejected_on_create(
    plane: Any, job: dict[str, Any], spec_patch: dict[str, Any], message: str
) -> None:
    body = _recovery(job)
    body["spec"].update(spec_patch)
    if "source" in spec_patch:
        body["spec"]["source"] = {**_recovery(job)["spec"]["source"], **spec_patch["source"]}
    result = plane.kubectl("create", "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_plan_cannot_be_rewritten_but_source_can_be_set_once(
    plane: Any, job: dict[str, Any]
) -> None:
    namespace = job["metadata"]["namespace"]
    name = _create(plane, _recovery(job, source=False))
    changed_target = _patch(plane, namespace, name, {"spec": {"target": {"pod": "other"}}})
    assert "spec.target is immutable" in changed_target.stderr
    assert (
        "spec.attempt is immutable"
        in _patch(plane, namespace, name, {"spec": {"attempt": 2}}).stderr
    )
    source = PodRef("train-worker-0", "uid-s", "worker", 0, 1).to_spec()
    assert _patch(plane, namespace, name, {"spec": {"source": source}}).returncode == 0
    other = {**source, "pod": "train-master-0", "ordinal": 0}
    assert (
        "cannot change once set"
        in _patch(plane, namespace, name, {"spec": {"source": other}}).stderr
    )
    assert _get(plane, namespace, name)["spec"]["source"] == source


def test_status_keeps_what_kopf_writes(plane: Any, job: dict[str, Any]) -> None:
    namespace = job["metadata"]["namespace"]
    name = _create(plane, _recovery(job))
    kopf_status = {
        "phase": "Planned",
        "kopf": {
            "progress": {"on_create": {"started": "2024-01-01T00:00:00.000000Z", "retries": 1}}
        },
        "on_create": {"planned": True},  # a handler's return value, stored under its id
    }
    assert _patch(plane, namespace, name, {"status": kopf_status}, status=True).returncode == 0
    assert _get(plane, namespace, name)["status"] == kopf_status


def test_status_writes_with_a_stale_resource_version_conflict(
    plane: Any, job: dict[str, Any]
) -> None:
    """The precondition both sides rely on: a write based on an old read fails with 409."""
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    namespace = job["metadata"]["namespace"]
    name = _create(plane, _recovery(job))
    with plane.api_client() as client:
        custom = CustomObjectsApi(client)
        read = custom.get_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.PLURAL, name
        )
        stale = read["metadata"]["resourceVersion"]
        custom.patch_namespaced_custom_object_status(
            names.GROUP,
            names.VERSION,
            namespace,
            names.PLURAL,
            name,
            {"metadata": {"resourceVersion": stale}, "status": build_status("Planned", attempt=1)},
        )
        with pytest.raises(ApiException) as conflict:
            custom.patch_namespaced_custom_object_status(
                names.GROUP,
                names.VERSION,
                namespace,
                names.PLURAL,
                name,
                {
                    "metadata": {"resourceVersion": stale},
                    "status": build_status("FellBack", attempt=1),
                },
            )
    assert conflict.value.status == 409
    assert _get(plane, namespace, name)["status"]["phase"] == "Planned"


def test_recoveries_go_when_their_job_goes(plane: Any, job: dict[str, Any]) -> None:
    namespace = job["metadata"]["namespace"]
    name = _create(plane, _recovery(job))
    with plane.api_client() as client:
        pytorchjob.delete_job(client, namespace, job["metadata"]["name"])
    poll(
        f"PeerRecovery {name} to be garbage-collected with its job",
        lambda: (
            not plane.kubectl("get", names.PLURAL, "-n", namespace, "-o", "name").stdout.strip()
        ),
        timeout=60,
        interval=0.5,
    )


def test_kubectl_explain_prints_descriptions(plane: Any) -> None:
    def explained() -> str | None:
        result = plane.kubectl("explain", "peerrecovery.spec.target", check=False)
        return result.stdout if result.returncode == 0 else None

    # The OpenAPI document is published shortly after the CRD is Established.
    raw = poll("kubectl explain peerrecovery.spec.target", explained, timeout=60, interval=0.5)
    text = " ".join(raw.split())  # kubectl wraps long descriptions
    assert "The rejoining pod that receives the state" in text
    for field in ("pod", "podUID", "replicaType", "replicaIndex", "ordinal", "node"):
        assert re.search(rf"\b{field} <(string|integer)>", text), field
    assert "UID of this incarnation of the pod" in text
    phase = " ".join(plane.kubectl("explain", "peerrecovery.status.phase").stdout.split())
    assert "Terminal phases never change" in phase


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        ("Succeeded", "Planned", "a finished PeerRecovery never changes phase"),
        ("FellBack", "Failed", "a finished PeerRecovery never changes phase"),
        ("Streaming", "Planned", "status.phase only moves forward"),
        ("Planned", "Pending", "status.phase only moves forward"),
    ],
)
def test_the_api_server_refuses_a_phase_moved_backward_or_out_of_a_finished_one(
    plane: Any, job: dict[str, Any], before: str, after: str, message: str
) -> None:
    """A writer that skips the contract's checks is refused by the API server too."""
    namespace = job["metadata"]["namespace"]
    name = _create(plane, _recovery(job))
    assert (
        _patch(plane, namespace, name, {"status": {"phase": before}}, status=True).returncode == 0
    )
    result = _patch(plane, namespace, name, {"status": {"phase": after}}, status=True)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert _get(plane, namespace, name)["status"]["phase"] == before


def test_the_api_server_accepts_forward_moves_and_writes_that_keep_the_phase(
    plane: Any, job: dict[str, Any]
) -> None:
    namespace = job["metadata"]["namespace"]
    name = _create(plane, _recovery(job))
    for phase in ("Pending", "Planned", "Streaming", "Streaming", "Succeeded"):
        result = _patch(plane, namespace, name, {"status": {"phase": phase}}, status=True)
        assert result.returncode == 0, result.stderr
    kept = _patch(plane, namespace, name, {"status": {"message": "done"}}, status=True)
    assert kept.returncode == 0, kept.stderr
