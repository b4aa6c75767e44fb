"""The real operator (a subprocess, kopf, its own RBAC from the chart) on the real control plane.

Every test renders the chart's RBAC for its namespace with ``helm template``, runs the
operator as that ServiceAccount, and drives it the way the training-operator would: jobs,
pods bound to KWOK's fake nodes, pods replaced under the same name with a new UID.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peer_recovery.contract import names
from testbed.controlplane import pytorchjob as pj
from testbed.operator_process import (
    OperatorProcess,
    operator_under_rbac,
    recoveries,
    wait_for,
)

pytestmark = pytest.mark.cluster

ENABLED = {names.ANNOTATION_ENABLED: names.ANNOTATION_ENABLED_VALUE}
SHM = {
    "containers": [
        {
            "name": "pytorch",
            "image": pj.DEFAULT_IMAGE,
            "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
        }
    ],
    "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
}


@pytest.fixture
def custom(client: Any) -> Any:
    from kubernetes.client import CustomObjectsApi

    return CustomObjectsApi(client)


@pytest.fixture
def operator(
    control_plane: Any, namespace: str, crd: None, tmp_path: Path
) -> Iterator[OperatorProcess]:
    with operator_under_rbac(control_plane, namespace, tmp_path / "operator.log") as proc:
        yield proc


def ready_job(client: Any, namespace: str, name: str, **kw: Any) -> list[dict[str, Any]]:
    pj.create_job(client, namespace, name, **kw)
    pods = pj.job_pods(client, namespace, name)
    return [pj.wait_pod_ready(client, namespace, p["metadata"]["name"]) for p in pods]


def replace(client: Any, namespace: str, pod: str) -> dict[str, Any]:
    new = pj.replace_pod(client, namespace, pod)
    return pj.wait_pod_ready(client, namespace, pod, uid=new["metadata"]["uid"])


def wait_recovery(
    custom: Any, namespace: str, *, uid: str, phase: str = "Planned", attempt: int = 1
) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for rec in recoveries(custom, namespace):
            spec, status = rec["spec"], rec.get("status") or {}
            if (
                spec["target"]["podUID"] == uid
                and spec["attempt"] == attempt
                and status.get("phase") == phase
            ):
                return rec
        return None

    return wait_for(
        f"a {phase} PeerRecovery (attempt {attempt}) for pod UID {uid}", found, timeout=30
    )


def pod_marks(client: Any, namespace: str) -> dict[str, tuple[Any, Any]]:
    return {
        p["metadata"]["uid"]: (p["metadata"].get("annotations"), p["metadata"].get("finalizers"))
        for p in pj.job_pods(client, namespace, "a") + pj.job_pods(client, namespace, "b")
    }


def test_replaced_pod_of_annotated_job_yields_exactly_one_recovery_and_pods_stay_untouched(
    control_plane: Any, namespace: str, operator: OperatorProcess, client: Any, custom: Any
) -> None:
    ready_job(client, namespace, "a", workers=3, annotations=ENABLED)
    ready_job(client, namespace, "b", workers=3)  # not opted in
    before = pod_marks(client, namespace)
    new_a = replace(client, namespace, "a-worker-0")
    replace(client, namespace, "b-worker-0")
    rec = wait_recovery(custom, namespace, uid=new_a["metadata"]["uid"])
    time.sleep(2)  # give a duplicate, or one for job b, the chance to appear
    assert [r["metadata"]["name"] for r in recoveries(custom, namespace)] == [
        rec["metadata"]["name"]
    ]
    spec = rec["spec"]
    assert (spec["jobName"], spec["target"]["pod"], spec["target"]["ordinal"]) == (
        "a",
        "a-worker-0",
        1,
    )
    assert spec["source"]["pod"] in {"a-master-0", "a-worker-1", "a-worker-2"}
    assert (spec["mode"], spec["reason"], spec["plannedBy"]) == ("Peer", "PodReplaced", "operator")
    assert rec["metadata"]["ownerReferences"][0]["name"] == "a"
    # pods are only observed: no annotation, no finalizer written by the operator
    after = pod_marks(client, namespace)
    survivors = {uid: marks for uid, marks in after.items() if uid in before}
    assert survivors == {uid: before[uid] for uid in survivors} and len(survivors) == 6
    assert all(f is None and not (a or {}) for a, f in after.values())
    # an Event on the job, and kubectl's columns
    events = control_plane.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=a", "-o", "name"
    ).stdout
    assert events.strip()
    table = control_plane.kubectl("get", "peerrecoveries", "-n", namespace).stdout.splitlines()
    assert table[0].split() == [
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
    metrics = operator.metrics_text()
    assert "peer_recovery_recoveries{" in metrics
    # The process froze what its imports built out of the collector's full passes.
    frozen = [line for line in metrics.splitlines() if line.startswith("peer_recovery_gc_frozen")]
    assert len(frozen) == 1 and float(frozen[0].split()[-1]) > 10_000, frozen


def test_container_restart_yields_container_restarted_in_local_mode(
    namespace: str, operator: OperatorProcess, client: Any, custom: Any
) -> None:
    from kubernetes.client import CoreV1Api

    pods = ready_job(client, namespace, "a", workers=2, annotations=ENABLED, pod_spec_overrides=SHM)
    target = next(p for p in pods if p["metadata"]["name"] == "a-worker-1")
    statuses = target["status"]["containerStatuses"]
    statuses[0]["restartCount"] = 1
    CoreV1Api(client).patch_namespaced_pod_status(
        "a-worker-1", namespace, {"status": {"containerStatuses": statuses}}
    )
    rec = wait_recovery(custom, namespace, uid=target["metadata"]["uid"])
    assert (rec["spec"]["reason"], rec["spec"]["mode"]) == ("ContainerRestarted", "Local")
    assert "source" not in rec["spec"]


def test_operator_restart_neither_duplicates_nor_misses_a_replacement(
    namespace: str, operator: OperatorProcess, client: Any, custom: Any
) -> None:
    ready_job(client, namespace, "a", workers=3, annotations=ENABLED)
    first = replace(client, namespace, "a-worker-0")
    wait_recovery(custom, namespace, uid=first["metadata"]["uid"])
    operator.stop()
    time.sleep(4)  # past the catch-up grace (3 s) after the job's original pods
    missed = replace(client, namespace, "a-worker-1")
    operator.start()
    wait_recovery(custom, namespace, uid=missed["metadata"]["uid"])
    time.sleep(2)
    targets = sorted(r["spec"]["target"]["podUID"] for r in recoveries(custom, namespace))
    assert targets == sorted([first["metadata"]["uid"], missed["metadata"]["uid"]])


def test_deleting_the_source_replans_and_deleting_the_job_removes_recoveries(
    namespace: str, operator: OperatorProcess, client: Any, custom: Any
) -> None:
    from kubernetes.client import CoreV1Api

    ready_job(client, namespace, "a", workers=3, annotations=ENABLED)
    new = replace(client, namespace, "a-worker-0")
    uid = new["metadata"]["uid"]
    first = wait_recovery(custom, namespace, uid=uid)
    CoreV1Api(client).delete_namespaced_pod(first["spec"]["source"]["pod"], namespace)
    second = wait_recovery(custom, namespace, uid=uid, attempt=2)
    assert second["spec"]["source"]["pod"] != first["spec"]["source"]["pod"]
    old = wait_recovery(custom, namespace, uid=uid, phase="Failed")
    assert "re-planning" in old["status"]["message"]
    pj.delete_job(client, namespace, "a")
    wait_for(
        "the job's PeerRecoveries to be garbage-collected",
        lambda: not recoveries(custom, namespace),
        timeout=60,
    )


def test_malformed_input_leaves_the_operator_healthy(
    control_plane: Any, namespace: str, operator: OperatorProcess, client: Any, custom: Any
) -> None:
    from kubernetes.client import CoreV1Api

    ready_job(client, namespace, "bad", workers=1, annotations={names.ANNOTATION_ENABLED: "true"})
    ready_job(
        client,
        namespace,
        "odd",
        workers=2,
        annotations={**ENABLED, names.ANNOTATION_PODS_PER_REPLICA: "x"},
    )
    made_by = {names.LABEL_OPERATOR_NAME: "pytorchjob-controller"}  # what the selector watches
    stray = {"metadata": {"name": "stray", "labels": {**made_by, names.LABEL_JOB_NAME: "odd"}},
             "spec": {"nodeName": control_plane.nodes[0], "containers": [{"name": "c", "image": "x"}]}}  # fmt: skip
    CoreV1Api(client).create_namespaced_pod(namespace, stray)
    CoreV1Api(client).create_namespaced_pod(
        namespace,
        {"metadata": {"name": "ghost-worker-0", "labels": {**made_by, names.LABEL_JOB_NAME: "ghost", names.LABEL_REPLICA_TYPE: "worker", names.LABEL_REPLICA_INDEX: "0"}},
         "spec": {"nodeName": control_plane.nodes[0], "containers": [{"name": "c", "image": "x"}]}},
    )  # fmt: skip

    def warned() -> bool:
        out = control_plane.kubectl(
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            "reason=PeerRecoveryBadInput",
            "-o",
            "jsonpath={.items[*].message}",
        ).stdout
        return "peer-recovery='true'" in out and "pods-per-replica" in out

    wait_for("warning Events naming the malformed annotations", warned)
    ready_job(client, namespace, "a", workers=2, annotations=ENABLED)
    new = replace(client, namespace, "a-worker-0")
    wait_recovery(custom, namespace, uid=new["metadata"]["uid"])
    assert operator.healthy()
    log = operator.log()
    assert "stray: label training.kubeflow.org/replica-type is missing" in log
    assert "Traceback" not in log


def test_operator_account_has_no_rights_beyond_its_role(
    control_plane: Any, namespace: str, operator: OperatorProcess
) -> None:
    def can(*args: str, ns: str = namespace) -> str:
        result = control_plane.kubectl(
            "auth", "can-i", *args, "-n", ns, kubeconfig=operator.kubeconfig, check=False
        )
        return result.stdout.strip()

    assert can("watch", "pods") == "yes"
    assert can("patch", "peerrecoveries", "--subresource=status") == "yes"
    assert can("patch", "peerrecoveries") == "no"  # only the status subresource
    for verb_resource in (
        ("get", "secrets"),
        ("patch", "pods"),
        ("update", "pods"),
        ("patch", "pytorchjobs.kubeflow.org"),
        ("delete", "pods"),
    ):
        assert can(*verb_resource) == "no", verb_resource
    assert can("list", "pods", ns="default") == "no"


def finish(custom: Any, namespace: str, name: str) -> None:
    """Play the runtime: move a Planned recovery to Streaming, then Succeeded."""
    for phase in ("Streaming", "Succeeded"):
        custom.patch_namespaced_custom_object_status(
            names.GROUP, names.VERSION, namespace, names.PLURAL, name,
            {"status": {"phase": phase, "observedAttempt": 1}},
        )  # fmt: skip


def test_finished_records_past_the_retention_policy_are_deleted(
    control_plane: Any, namespace: str, crd: None, client: Any, custom: Any, tmp_path: Path
) -> None:
    """Under the chart's RBAC, the operator keeps only the newest finished record of a pod
    slot. The slot's second record comes from a container restart, not a second replacement
    under the same name: KWOK deletes by name, and a delete it queued for the replaced pod
    can land on its replacement."""
    from kubernetes.client import CoreV1Api

    ready_job(client, namespace, "a", workers=2, annotations=ENABLED)
    log = tmp_path / "operator.log"
    with operator_under_rbac(control_plane, namespace, log, "--keep-finished", "1"):
        first = replace(client, namespace, "a-worker-0")
        uid = first["metadata"]["uid"]
        older = wait_recovery(custom, namespace, uid=uid)["metadata"]["name"]
        finish(custom, namespace, older)
        statuses = first["status"]["containerStatuses"]
        statuses[0]["restartCount"] = 1
        CoreV1Api(client).patch_namespaced_pod_status(
            "a-worker-0", namespace, {"status": {"containerStatuses": statuses}}
        )
        # the incarnation's next attempt number (docs/operator.md, Detection)
        newer = wait_recovery(custom, namespace, uid=uid, attempt=2)["metadata"]["name"]
        assert older in [r["metadata"]["name"] for r in recoveries(custom, namespace)]
        finish(custom, namespace, newer)
        wait_for(
            "the older finished record to be deleted",
            lambda: [r["metadata"]["name"] for r in recoveries(custom, namespace)] == [newer],
            timeout=60,
        )
