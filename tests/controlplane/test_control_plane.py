"""The test control plane does what tests rely on: fake nodes are Ready, RBAC is enforced,
the garbage collector follows PyTorchJob owner references, pods on fake nodes run and can be
replaced, the API server restarts in place, and teardown leaves no process behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import kubernetes.client
import pytest
from kubernetes.client.exceptions import ApiException

from testbed.controlplane import ControlPlane
from testbed.controlplane._proc import group_alive
from testbed.controlplane._support import REPO_ROOT, poll
from testbed.controlplane.pytorchjob import (
    GROUP,
    KIND,
    VERSION,
    create_job,
    delete_job,
    job_pods,
    replace_pod,
    wait_pod_ready,
)
from tests.controlplane.fixtures import require_bin_dir

pytestmark = pytest.mark.cluster


def test_kubectl_shows_fake_nodes_ready_with_topology_labels(control_plane: ControlPlane) -> None:
    nodes = json.loads(control_plane.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    assert sorted(by_name) == sorted(control_plane.nodes)
    for name, node in by_name.items():
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert [c["status"] for c in ready] == ["True"], name
        labels = node["metadata"]["labels"]
        assert labels["kubernetes.io/hostname"] == name
        assert labels["topology.kubernetes.io/zone"] == control_plane.zones[name]
    assert len(set(control_plane.zones.values())) == 2
    table = control_plane.kubectl("get", "nodes", "--no-headers").stdout
    assert all(line.split()[1] == "Ready" for line in table.splitlines()), table


def test_rbac_denies_a_service_account_until_a_role_is_bound(
    control_plane: ControlPlane, namespace: str
) -> None:
    kubeconfig = control_plane.service_account_kubeconfig(namespace, "reader")
    denied = control_plane.kubectl(
        "get", "pods", "-n", namespace, kubeconfig=kubeconfig, check=False
    )
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()
    assert f"system:serviceaccount:{namespace}:reader" in denied.stderr

    control_plane.kubectl(
        "create", "role", "pod-reader", "-n", namespace, "--verb=get,list", "--resource=pods"
    )
    control_plane.kubectl(
        "create",
        "rolebinding",
        "reader-reads-pods",
        "-n",
        namespace,
        "--role=pod-reader",
        f"--serviceaccount={namespace}:reader",
    )
    poll(
        "the RoleBinding to take effect",
        lambda: (
            control_plane.kubectl(
                "get", "pods", "-n", namespace, kubeconfig=kubeconfig, check=False
            ).returncode
            == 0
        ),
        timeout=30,
    )
    # Still least privilege: the binding grants pods in this namespace only.
    other = control_plane.kubectl(
        "get", "configmaps", "-n", namespace, kubeconfig=kubeconfig, check=False
    )
    assert other.returncode != 0 and "forbidden" in other.stderr.lower()


def test_garbage_collector_deletes_a_configmap_owned_by_a_deleted_pytorchjob(
    control_plane: ControlPlane, namespace: str
) -> None:
    with control_plane.api_client() as client:
        job = create_job(client, namespace, "gc-job", workers=1, pods=False)
        core = kubernetes.client.CoreV1Api(client)
        owner = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": "gc-job",
            "uid": job["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        core.create_namespaced_config_map(
            namespace, {"metadata": {"name": "owned", "ownerReferences": [owner]}}
        )
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "bystander"}})
        delete_job(client, namespace, "gc-job")

        def owned_gone() -> bool:
            try:
                core.read_namespaced_config_map("owned", namespace)
            except ApiException as error:
                if error.status == 404:
                    return True
                raise
            return False

        poll("the garbage collector to delete the owned ConfigMap", owned_gone, timeout=60)
        assert core.read_namespaced_config_map("bystander", namespace).metadata.name == "bystander"


def test_pods_on_fake_nodes_run_and_replace_keeps_name_with_new_uid(
    control_plane: ControlPlane, namespace: str
) -> None:
    with control_plane.api_client() as client:
        create_job(client, namespace, "train", workers=2, node_names=control_plane.nodes[:2])
        pods = job_pods(client, namespace, "train")
        assert [p["metadata"]["name"] for p in pods] == [
            "train-master-0",
            "train-worker-0",
            "train-worker-1",
        ]
        for pod in pods:
            ready = wait_pod_ready(client, namespace, pod["metadata"]["name"])
            assert ready["status"]["podIP"]
            assert ready["spec"]["nodeName"] in control_plane.nodes[:2]
        worker = next(p for p in pods if p["metadata"]["name"] == "train-worker-1")
        env = {e["name"]: e["value"] for e in worker["spec"]["containers"][0]["env"]}
        assert (env["RANK"], env["PET_NODE_RANK"], env["WORLD_SIZE"]) == ("2", "2", "3")
        owner = worker["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("PyTorchJob", "train", True)

        new = replace_pod(client, namespace, "train-worker-1")
        assert new["metadata"]["name"] == "train-worker-1"
        assert new["metadata"]["uid"] != worker["metadata"]["uid"]
        assert new["metadata"]["labels"] == worker["metadata"]["labels"]
        running = wait_pod_ready(client, namespace, "train-worker-1", uid=new["metadata"]["uid"])
        assert running["spec"]["nodeName"] == worker["spec"]["nodeName"]


def test_apiserver_restarts_on_the_same_port_with_the_same_data(
    control_plane: ControlPlane, namespace: str
) -> None:
    control_plane.kubectl("create", "configmap", "survivor", "-n", namespace)
    control_plane.stop_apiserver()
    try:
        down = control_plane.kubectl("get", "ns", namespace, check=False, timeout=30)
        assert down.returncode != 0
    finally:
        control_plane.start_apiserver()
    control_plane.kubectl("get", "configmap", "survivor", "-n", namespace)
    # The controllers reconnect: a new pod on a fake node still becomes Ready.
    with control_plane.api_client() as client:
        create_job(client, namespace, "after-restart", workers=0)
        wait_pod_ready(client, namespace, "after-restart-master-0")


def test_stop_leaves_no_process_alive() -> None:
    plane = ControlPlane(nodes=1, zones=1, bin_dir=require_bin_dir())
    try:
        plane.start()
        pids = plane.pids()
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kwok"}
        assert all(group_alive(pid) for pid in pids.values())
    finally:
        plane.stop()
    for name, pid in pids.items():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not group_alive(pid), name
    assert not plane.work_dir.exists()
    port = int(plane.server.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def _pins() -> dict[str, str]:
    lines = (REPO_ROOT / "tools" / "versions.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_binaries_report_the_pinned_versions(control_plane: ControlPlane) -> None:
    pins = _pins()
    versions = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert versions["clientVersion"]["gitVersion"] == pins["K8S_VERSION"]
    assert versions["serverVersion"]["gitVersion"] == pins["K8S_VERSION"]
    helm = subprocess.run(
        [str(control_plane.bin_dir / "helm"), "version", "--short"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert helm.stdout.startswith(pins["HELM_VERSION"])


def test_helm_installs_a_chart_and_sees_the_cluster_version(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\n"
        "data:\n  kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}\n"
    )
    subprocess.run(
        [str(control_plane.bin_dir / "helm"), "install", "probe", str(chart), "-n", namespace,
         f"--kubeconfig={control_plane.kubeconfig}", "--wait", "--timeout=60s"],
        capture_output=True, text=True, timeout=120, check=True,
        env={**os.environ, "HELM_CACHE_HOME": str(tmp_path / "cache"),
             "HELM_CONFIG_HOME": str(tmp_path / "config"), "HELM_DATA_HOME": str(tmp_path / "data")},
    )  # fmt: skip
    data = json.loads(
        control_plane.kubectl("get", "configmap", "probe", "-n", namespace, "-o", "json").stdout
    )["data"]
    assert data["kubeVersion"] == _pins()["K8S_VERSION"]
