"""Parts of the control plane's contract that need no cluster: missing binaries skip under a
plain pytest run and fail under `make test`; pods follow the training-operator's conventions;
kubeconfigs are self-contained."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testbed.controlplane._support import REPO_ROOT, MissingBinariesError, find_bin_dir
from testbed.controlplane.pytorchjob import _pod_manifest, _recreatable, _replicas, pod_name

_USES_FIXTURE = """
import pytest

@pytest.mark.cluster
def test_needs_cluster(control_plane):
    pass
"""


def _run_pytest(tmp_path: Path, require: bool) -> subprocess.CompletedProcess[str]:
    test_file = tmp_path / "test_uses_cluster.py"
    test_file.write_text(_USES_FIXTURE)
    env = {**os.environ, "PEER_RECOVERY_BIN_DIR": str(tmp_path / "no-bin")}
    env.pop("PEER_RECOVERY_REQUIRE_CLUSTER", None)
    if require:
        env["PEER_RECOVERY_REQUIRE_CLUSTER"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.controlplane.fixtures", "-rs", "-q",
         "-p", "no:cacheprovider", "-o", "addopts=", str(test_file)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_missing_binaries_name_make_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEER_RECOVERY_BIN_DIR", str(tmp_path))
    with pytest.raises(MissingBinariesError, match=r"make tools") as caught:
        find_bin_dir()
    assert "kube-apiserver" in str(caught.value)


def test_missing_binaries_skip_a_plain_run(tmp_path: Path) -> None:
    result = _run_pytest(tmp_path, require=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "make tools" in result.stdout


def test_missing_binaries_fail_under_make_test(tmp_path: Path) -> None:
    result = _run_pytest(tmp_path, require=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout
    assert "make tools" in result.stdout


def _job(workers: int, master: bool = True) -> dict:
    specs = {}
    template = {"spec": {"containers": [{"name": "pytorch", "image": "img"}]}}
    if master:
        specs["Master"] = {"replicas": 1, "template": template}
    if workers:
        specs["Worker"] = {"replicas": workers, "template": template}
    return {
        "metadata": {"name": "job", "namespace": "ns", "uid": "u-1"},
        "spec": {"pytorchReplicaSpecs": specs},
    }


def test_pods_are_named_ranked_and_owned_like_the_training_operator() -> None:
    job = _job(workers=2)
    replicas = _replicas(job)
    assert replicas == [("Master", 0), ("Worker", 0), ("Worker", 1)]
    pods = [_pod_manifest(job, t, i, rank, 3, "n0") for rank, (t, i) in enumerate(replicas)]
    assert [p["metadata"]["name"] for p in pods] == ["job-master-0", "job-worker-0", "job-worker-1"]
    for rank, pod in enumerate(pods):
        env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
        assert env["RANK"] == env["PET_NODE_RANK"] == str(rank)
        assert env["MASTER_ADDR"] == "job-master-0"
        labels = pod["metadata"]["labels"]
        assert labels["training.kubeflow.org/replica-type"] in ("master", "worker")
        assert labels["training.kubeflow.org/job-name"] == "job"
        (owner,) = pod["metadata"]["ownerReferences"]
        assert owner["uid"] == "u-1" and owner["controller"] is True
        assert pod["spec"]["nodeName"] == "n0"
    assert "training.kubeflow.org/job-role" in pods[0]["metadata"]["labels"]
    assert "training.kubeflow.org/job-role" not in pods[1]["metadata"]["labels"]
    assert pod_name("job", "Worker", 3) == "job-worker-3"


def test_a_masterless_job_uses_worker_zero_as_rendezvous() -> None:
    job = _job(workers=2, master=False)
    pod = _pod_manifest(job, "Worker", 1, 1, 2, "n0")
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == "job-worker-0"


def test_recreated_pod_drops_server_set_fields_and_injected_token_volume() -> None:
    pod = {
        "metadata": {"name": "p", "uid": "old", "resourceVersion": "7", "labels": {"a": "b"}},
        "spec": {
            "priority": 0,
            "volumes": [{"name": "kube-api-access-x1"}, {"name": "data"}],
            "containers": [
                {"name": "c", "volumeMounts": [{"name": "kube-api-access-x1"}, {"name": "data"}]}
            ],
        },
        "status": {"phase": "Running"},
    }
    new = _recreatable(pod)
    assert new["metadata"] == {"name": "p", "labels": {"a": "b"}}
    assert new["spec"]["volumes"] == [{"name": "data"}]
    assert new["spec"]["containers"][0]["volumeMounts"] == [{"name": "data"}]
    assert "status" not in new and "priority" not in new["spec"]
    assert pod["metadata"]["uid"] == "old"  # the input is not modified


def test_kubeconfig_embeds_credentials(tmp_path: Path) -> None:
    from testbed.controlplane._support import write_kubeconfig

    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"CA")
    path = write_kubeconfig(
        tmp_path / "k", server="https://127.0.0.1:1", ca_cert=ca, user="u", token="tok"
    )
    config = yaml.safe_load(path.read_text())
    assert config["users"][0]["user"] == {"token": "tok"}
    assert config["clusters"][0]["cluster"]["certificate-authority-data"] == "Q0E="
    with pytest.raises(ValueError, match="client certificate or a token"):
        write_kubeconfig(tmp_path / "k2", server="s", ca_cert=ca, user="u")


_FAILS_ON_CLUSTER = """
import pytest

@pytest.mark.cluster
def test_fails(control_plane):
    control_plane.kubectl("get", "nodes")
    assert False, "deliberate"
"""


@pytest.mark.cluster
def test_a_failing_cluster_test_keeps_the_component_logs(tmp_path: Path) -> None:
    from tests.controlplane.fixtures import require_bin_dir

    require_bin_dir()
    test_file = tmp_path / "test_fails_on_cluster.py"
    test_file.write_text(_FAILS_ON_CLUSTER)
    env = {**os.environ, "PEER_RECOVERY_ARTIFACTS": str(tmp_path / "artifacts")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.controlplane.fixtures", "-q",
         "-p", "no:cacheprovider", "-o", "addopts=", str(test_file)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "control plane logs" in result.stdout
    (kept,) = (tmp_path / "artifacts" / "control-plane").iterdir()
    names = {p.name for p in kept.iterdir()}
    assert {"etcd.log", "kube-apiserver.log", "kube-controller-manager.log", "kwok.log"} <= names
    assert "kube-apiserver" in (kept / "kube-apiserver.log").read_text()
