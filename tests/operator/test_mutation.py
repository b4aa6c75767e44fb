"""The webhook's pure mutation: what a pod of an opted-in job gets, and what is left alone."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest

from peer_recovery.contract import names
from peer_recovery.kube.identity import IDENTITY_ENV
from peer_recovery.rendezvous.identity import ENV_REPLICA_INDEX
from peer_recovery.rendezvous.round import ENV_PODS_PER_REPLICA
from peer_recovery.snapshots.identity import ENV_JOB_UID
from peer_recovery_operator import mutation
from peer_recovery_operator.mutation import MutationSettings, mutate_pod, shm_size

GI = 1024**3
SETTINGS = MutationSettings(service_account="peer-recovery-runtime", version="7")
ON = {names.ANNOTATION_ENABLED: names.ANNOTATION_ENABLED_VALUE}


def job(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "ddp", "namespace": "team-a", "uid": "job-uid-1",
                         "annotations": annotations}}  # fmt: skip


def pod(**container: Any) -> dict[str, Any]:
    base = {"name": "pytorch", "image": "trainer"}
    return {
        "metadata": {"name": "ddp-worker-0", "labels": {names.LABEL_JOB_NAME: "ddp"}},
        "spec": {"containers": [{**base, **container}]},
    }


def applied(body: dict[str, Any], job_body: dict[str, Any]) -> dict[str, Any]:
    result = mutate_pod(body, job_body, SETTINGS)
    return jsonpatch.apply_patch(copy.deepcopy(body), result.patch)


def env_of(body: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item for item in body["spec"]["containers"][0].get("env") or ()}


def test_env_names_are_the_ones_the_runtime_reads() -> None:
    for name, path in IDENTITY_ENV.items():
        assert mutation.DOWNWARD_ENV[name] == path
    assert ENV_REPLICA_INDEX in mutation.DOWNWARD_ENV
    assert mutation.ENV_PODS_PER_REPLICA == ENV_PODS_PER_REPLICA


def test_a_bare_pod_of_an_opted_in_job_comes_out_complete() -> None:
    annotations = {**ON, names.ANNOTATION_PODS_PER_REPLICA: "2"}
    out = applied(pod(resources={"limits": {"memory": "16Gi"}}), job(annotations))
    env = env_of(out)
    for name, path in mutation.DOWNWARD_ENV.items():
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == path
    assert env[ENV_PODS_PER_REPLICA]["value"] == "2"
    assert env[ENV_JOB_UID]["value"] == "job-uid-1"  # the snapshots' job identity
    spec = out["spec"]
    assert spec["volumes"] == [
        {"name": "peer-recovery-shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}
    ]
    assert spec["containers"][0]["volumeMounts"] == [
        {"name": "peer-recovery-shm", "mountPath": "/dev/shm"}
    ]
    assert spec["serviceAccountName"] == "peer-recovery-runtime"
    assert out["metadata"]["annotations"] == {names.ANNOTATION_MUTATED: "7"}


def test_the_prefixed_opt_in_mutates_too() -> None:
    out = applied(pod(), job({names.ANNOTATION_ENABLED_PREFIXED: "true"}))
    assert "POD_UID" in env_of(out)


@pytest.mark.parametrize("annotations", [None, {}, {names.ANNOTATION_ENABLED: "true"}])
def test_a_job_not_opted_in_is_untouched(annotations: dict[str, str] | None) -> None:
    result = mutate_pod(pod(), job(annotations), SETTINGS)
    assert result.patch == []
    assert bool(result.warnings) == bool(annotations)  # a malformed opt-in is reported


def test_what_the_user_set_is_kept() -> None:
    user_env = [
        {"name": "POD_NAME", "value": "mine"},
        {"name": "OTHER", "value": "x"},
    ]
    body = pod(
        env=user_env,
        volumeMounts=[
            {"name": "my-shm", "mountPath": "/dev/shm/"},
            {"name": "data", "mountPath": "/data"},
        ],
        resources={"limits": {"memory": "4Gi"}},
    )
    body["metadata"]["annotations"] = {"team": "a"}
    body["spec"]["volumes"] = [
        {"name": "my-shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        {"name": "data", "emptyDir": {}},
    ]
    body["spec"]["serviceAccountName"] = "ddp-trainer"
    out = applied(body, job(ON))
    env = env_of(out)
    assert env["POD_NAME"] == {"name": "POD_NAME", "value": "mine"}
    assert env["OTHER"]["value"] == "x"
    assert "POD_UID" in env and "NODE_NAME" in env
    assert out["spec"]["volumes"] == body["spec"]["volumes"]
    assert (
        out["spec"]["containers"][0]["volumeMounts"]
        == body["spec"]["containers"][0]["volumeMounts"]
    )
    assert out["spec"]["serviceAccountName"] == "ddp-trainer"
    assert out["metadata"]["annotations"] == {"team": "a", names.ANNOTATION_MUTATED: "7"}


def test_the_default_account_is_replaced_and_its_alias_kept_in_step() -> None:
    body = pod()
    body["spec"].update(serviceAccountName="default", serviceAccount="default")
    out = applied(body, job(ON))
    assert out["spec"]["serviceAccountName"] == "peer-recovery-runtime"
    assert out["spec"]["serviceAccount"] == "peer-recovery-runtime"
    no_account = mutate_pod(pod(), job(ON), MutationSettings(service_account=""))
    assert not any(op["path"] == "/spec/serviceAccountName" for op in no_account.patch)


def test_the_training_container_is_the_pytorch_one() -> None:
    body = pod()
    body["spec"]["containers"].insert(0, {"name": "sidecar", "image": "s"})
    out = applied(body, job(ON))
    assert "env" not in out["spec"]["containers"][0]
    assert "POD_UID" in {e["name"] for e in out["spec"]["containers"][1]["env"]}


def test_a_taken_volume_name_gets_another() -> None:
    body = pod()
    body["spec"]["volumes"] = [{"name": "peer-recovery-shm", "emptyDir": {}}]
    out = applied(body, job(ON))
    assert out["spec"]["volumes"][1]["name"] == "peer-recovery-shm-2"
    assert out["spec"]["containers"][0]["volumeMounts"][0]["name"] == "peer-recovery-shm-2"


def test_shm_size_rule() -> None:
    snap = {mutation.ANNOTATION_SNAPSHOT_SIZE: "3Gi"}
    assert shm_size({mutation.ANNOTATION_SHM_SIZE: "5Gi", **snap}, 16 * GI).size == 5 * GI
    assert shm_size(snap, 16 * GI).size == 6 * GI
    assert shm_size({}, 16 * GI).size == 8 * GI
    unknown = shm_size({}, None)
    assert unknown.size is None and "no memory limit" in unknown.warnings[0]
    assert shm_size(snap, 16 * GI).warnings == ()


def test_warns_when_the_memory_limit_cannot_hold_two_snapshots() -> None:
    result = mutate_pod(
        pod(resources={"limits": {"memory": "4Gi"}}),
        job({**ON, mutation.ANNOTATION_SNAPSHOT_SIZE: "3Gi"}),
        SETTINGS,
    )
    assert any("memory limit 4Gi cannot hold two snapshots of 3Gi" in w for w in result.warnings)
    assert result.patch  # warned, never refused


def test_warns_about_a_small_explicit_size_and_a_bad_annotation() -> None:
    small = shm_size(
        {mutation.ANNOTATION_SHM_SIZE: "1Gi", mutation.ANNOTATION_SNAPSHOT_SIZE: "1Gi"}, None
    )
    assert small.size == GI
    assert any("cannot hold two snapshots" in w for w in small.warnings)
    bad = shm_size({mutation.ANNOTATION_SNAPSHOT_SIZE: "lots"}, 2 * GI)
    assert bad.size == GI
    assert any("'lots' is not a quantity" in w for w in bad.warnings)


def test_warns_about_a_users_small_or_disk_shm() -> None:
    body = pod(volumeMounts=[{"name": "my-shm", "mountPath": "/dev/shm"}])
    body["spec"]["volumes"] = [
        {"name": "my-shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}
    ]
    small = mutate_pod(body, job({**ON, mutation.ANNOTATION_SNAPSHOT_SIZE: "1Gi"}), SETTINGS)
    assert any("cannot hold two snapshots" in w for w in small.warnings)
    body["spec"]["volumes"] = [{"name": "my-shm", "emptyDir": {}}]
    disk = mutate_pod(body, job(ON), SETTINGS)
    assert any("not a memory emptyDir" in w for w in disk.warnings)


@pytest.mark.parametrize(
    ("annotations", "limit"),
    [
        ({}, 16 * GI),
        ({}, None),
        ({mutation.ANNOTATION_SNAPSHOT_SIZE: "3Gi"}, 16 * GI),
        ({mutation.ANNOTATION_SHM_SIZE: "5Gi", mutation.ANNOTATION_SNAPSHOT_SIZE: "3Gi"}, None),
        ({mutation.ANNOTATION_SNAPSHOT_SIZE: "lots"}, 2 * GI),
    ],
)
def test_doctor_applies_the_same_size_rule(annotations: dict[str, str], limit: int | None) -> None:
    from peer_recovery.doctor import webhook_shm_bytes

    assert webhook_shm_bytes(annotations, limit) == shm_size(annotations, limit).size


def test_warns_when_the_pod_mounts_no_token() -> None:
    body = pod()
    body["spec"]["automountServiceAccountToken"] = False
    result = mutate_pod(body, job(ON), SETTINGS)
    assert any("automountServiceAccountToken: false" in w for w in result.warnings)
    assert not any(
        "automountServiceAccountToken" in w for w in mutate_pod(pod(), job(ON), SETTINGS).warnings
    )
