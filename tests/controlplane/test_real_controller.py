"""The real Kubeflow training-operator on the test control plane, with kube-scheduler and the
test kubelet: PyTorchJobs applied with kubectl get their pods, Services and env from the
controller, and the controller reacts to the real exits of the pods' processes."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from testbed.controlplane import trainingjob as tj
from testbed.controlplane._proc import group_alive
from testbed.controlplane.cluster import ControlPlane
from testbed.controlplane.kubelet import LOCAL_NODE_LABEL
from tests.controlplane.fixtures import require_bin_dir, wait_default_service_account

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

# Writes its env to /dev/shm/env.json (the pod's memory emptyDir), then waits to be killed.
DUMP_ENV_AND_WAIT = [
    sys.executable,
    "-c",
    "import json, os, sys, time\n"
    "json.dump(dict(os.environ), open(sys.argv[1], 'w'))\n"
    "time.sleep(3600)\n",
    "/dev/shm/env.json",
]

# Exits 3 the first time it runs in a pod (a marker in the pod's emptyDir), 0 after that.
FAIL_ONCE_PER_POD = [
    sys.executable,
    "-c",
    "import os, sys\n"
    "marker = sys.argv[1]\n"
    "if not os.path.exists(marker):\n"
    "    open(marker, 'w').close()\n"
    "    sys.exit(3)\n",
    "/dev/shm/failed-once",
]


def _listening_tcp(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket process ``pid`` holds open: its socket
    inodes from /proc/<pid>/fd matched against /proc/<pid>/net/tcp and tcp6."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):  # closed since listed
            target = os.readlink(fd_dir / fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            # The kernel prints each 32-bit word in host (little-endian) order.
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(packed)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            found.append((str(addr), int(hex_port, 16)))
    return found


def _env(pod: dict[str, Any]) -> dict[str, str]:
    container = pod["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _pods(plane: ControlPlane, namespace: str, job: str) -> dict[str, dict[str, Any]]:
    with plane.api_client() as client:
        return tj.job_pods(client, namespace, job)


def _running(plane: ControlPlane, namespace: str, job: str, count: int) -> Any:
    pods = _pods(plane, namespace, job)
    running = {n: p for n, p in pods.items() if p["status"].get("phase") == "Running"}
    return running if len(running) == count else None


def test_pytorchjob_gets_pods_services_and_env_from_the_controller(
    real_controller_plane: ControlPlane, real_namespace: str
) -> None:
    plane, ns = real_controller_plane, real_namespace
    manifest = tj.pytorchjob("envjob", command=DUMP_ENV_AND_WAIT, workers=2)
    port = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
        "ports"
    ][0]["containerPort"]
    assert "created" in tj.apply(plane, ns, manifest)

    pods = tj.wait_for(
        "3 Running pods",
        lambda: _running(plane, ns, "envjob", 3),
        timeout=120,
        why=lambda: json.dumps({n: p["status"] for n, p in _pods(plane, ns, "envjob").items()}),
    )
    assert set(pods) == {"envjob-master-0", "envjob-worker-0", "envjob-worker-1"}
    for name, pod in pods.items():
        # Scheduled by kube-scheduler onto the test kubelet's nodes, owned by the job.
        assert pod["spec"]["nodeName"] in plane.nodes
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "PyTorchJob"
        assert pod["spec"]["restartPolicy"] == "OnFailure"
        env = _env(pod)
        rank = 0 if "master" in name else int(name.rsplit("-", 1)[1]) + 1
        assert env["MASTER_ADDR"] == "envjob-master-0"
        assert env["MASTER_PORT"] == str(port)
        assert env["PET_MASTER_ADDR"] == "envjob-master-0"
        assert env["WORLD_SIZE"] == "3"
        assert env["RANK"] == str(rank)
        assert env["PET_NODE_RANK"] == str(rank)
        assert env["PET_NNODES"] == "3"
        assert env["PYTHONUNBUFFERED"] == "1"
    # Workers wait for the master's name to resolve in an init container; the master does not.
    assert "initContainers" not in pods["envjob-master-0"]["spec"]
    assert [c["name"] for c in pods["envjob-worker-0"]["spec"]["initContainers"]] == [
        "init-pytorch"
    ]

    services = json.loads(plane.kubectl("get", "services", "-n", ns, "-o", "json").stdout)
    by_name = {s["metadata"]["name"]: s for s in services["items"]}
    assert set(by_name) == set(pods)
    for service in by_name.values():
        assert service["spec"]["clusterIP"] == "None"  # headless, one per pod

    # What the process saw: the downward API resolved, /dev/shm the pod's own directory,
    # the master's Service name pointing at loopback.
    for name, pod in pods.items():
        path = tj.pod_volume_dir(plane, pod) / "env.json"
        seen = json.loads(
            tj.wait_for(f"{path}", lambda p=path: p.exists() and p.read_text(), timeout=60)
        )
        assert seen["POD_NAME"] == name
        assert seen["POD_UID"] == pod["metadata"]["uid"]
        assert seen["POD_NAMESPACE"] == ns
        assert seen["NODE_NAME"] == pod["spec"]["nodeName"]
        assert seen["MASTER_ADDR"] == "127.0.0.1"
        assert seen["RANK"] == _env(pod)["RANK"]
        assert Path(seen["KUBECONFIG"]).is_file()

    job = tj.wait_for(
        "the job Running with 2 active workers",
        lambda: (
            (j := tj.read_job(plane, ns, "envjob"))
            and tj.condition(j, "Running")
            and j["status"].get("replicaStatuses", {}).get("Worker", {}).get("active") == 2
            and j
        ),
        timeout=60,
        why=lambda: json.dumps(tj.read_job(plane, ns, "envjob").get("status")),
    )
    assert job["status"]["replicaStatuses"]["Master"]["active"] == 1


def test_local_nodes_are_ready_and_labelled(real_controller_plane: ControlPlane) -> None:
    nodes = json.loads(real_controller_plane.kubectl("get", "nodes", "-o", "json").stdout)
    by_name = {n["metadata"]["name"]: n for n in nodes["items"]}
    assert set(by_name) == set(real_controller_plane.nodes)
    for name, node in by_name.items():
        assert node["metadata"]["labels"][LOCAL_NODE_LABEL] == "local"
        assert (
            node["metadata"]["labels"]["topology.kubernetes.io/zone"]
            == (real_controller_plane.zones[name])
        )
        assert any(
            c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"]
        )


def test_onfailure_restarts_the_container_in_place_and_the_job_succeeds(
    real_controller_plane: ControlPlane, real_namespace: str
) -> None:
    plane, ns = real_controller_plane, real_namespace
    tj.apply(plane, ns, tj.pytorchjob("crash", command=FAIL_ONCE_PER_POD, workers=1))
    job = tj.wait_for(
        "the job to succeed",
        lambda: (j := tj.read_job(plane, ns, "crash")) and tj.condition(j, "Succeeded") and j,
        timeout=120,
        why=lambda: json.dumps(tj.read_job(plane, ns, "crash").get("status")),
    )
    assert not tj.condition(job, "Failed")
    # The job succeeds with its master; the worker may still be finishing its second run.
    pods = tj.wait_for(
        "both pods to succeed",
        lambda: (
            (p := _pods(plane, ns, "crash"))
            and all(x["status"].get("phase") == "Succeeded" for x in p.values())
            and p
        ),
        timeout=60,
    )
    assert set(pods) == {"crash-master-0", "crash-worker-0"}
    for pod in pods.values():
        status = pod["status"]["containerStatuses"][0]
        assert status["restartCount"] == 1
        assert status["lastState"]["terminated"]["exitCode"] == 3
        assert status["state"]["terminated"]["exitCode"] == 0
        assert pod["status"]["phase"] == "Succeeded"


def test_exitcode_policy_recreates_a_pod_after_a_retryable_exit(
    real_controller_plane: ControlPlane, real_namespace: str, tmp_path: Path
) -> None:
    """Under ExitCode the pod's own policy is Never; exit 143 (SIGTERM) is retryable, so the
    controller deletes the failed pod and creates a new one, which succeeds."""
    plane, ns = real_controller_plane, real_namespace
    marker = tmp_path / "worker-failed"
    command = [
        sys.executable,
        "-c",
        "import os, sys, time\n"
        "marker, done = sys.argv[1], sys.argv[2]\n"
        "if os.environ['POD_NAME'].endswith('master-0'):\n"
        "    while not os.path.exists(done): time.sleep(0.1)\n"  # the master outlives the worker
        "    sys.exit(0)\n"
        "if not os.path.exists(marker):\n"
        "    open(marker, 'w').close()\n"
        "    sys.exit(143)\n"
        "open(done, 'w').close()\n",
        str(marker),
        str(tmp_path / "worker-done"),
    ]
    tj.apply(plane, ns, tj.pytorchjob("exitcode", command=command, restart_policy="ExitCode"))
    first = tj.wait_for(
        "the first worker pod",
        lambda: _pods(plane, ns, "exitcode").get("exitcode-worker-0"),
        timeout=60,
    )
    assert first["spec"]["restartPolicy"] == "Never"
    tj.wait_for(
        "the job to succeed",
        lambda: tj.condition(tj.read_job(plane, ns, "exitcode"), "Succeeded"),
        timeout=120,
        why=lambda: json.dumps(tj.read_job(plane, ns, "exitcode").get("status")),
    )
    worker = _pods(plane, ns, "exitcode")["exitcode-worker-0"]
    assert worker["metadata"]["uid"] != first["metadata"]["uid"]
    assert worker["status"]["containerStatuses"][0]["restartCount"] == 0
    assert marker.exists()


def test_exitcode_policy_fails_the_job_on_a_permanent_exit(
    real_controller_plane: ControlPlane, real_namespace: str
) -> None:
    plane, ns = real_controller_plane, real_namespace
    command = [sys.executable, "-c", "import sys; sys.exit(1)"]
    tj.apply(
        plane, ns, tj.pytorchjob("permanent", command=command, workers=0, restart_policy="ExitCode")
    )
    tj.wait_for(
        "the job to fail",
        lambda: tj.condition(tj.read_job(plane, ns, "permanent"), "Failed"),
        timeout=120,
        why=lambda: json.dumps(tj.read_job(plane, ns, "permanent").get("status")),
    )
    pod = _pods(plane, ns, "permanent")["permanent-master-0"]
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 1


def test_a_worker_only_job_gets_no_master_env(
    real_controller_plane: ControlPlane, real_namespace: str
) -> None:
    plane, ns = real_controller_plane, real_namespace
    tj.apply(plane, ns, tj.pytorchjob("workers", command=DUMP_ENV_AND_WAIT, masters=0, workers=2))
    pods = tj.wait_for("2 Running pods", lambda: _running(plane, ns, "workers", 2), timeout=120)
    assert set(pods) == {"workers-worker-0", "workers-worker-1"}
    for pod in pods.values():
        env = _env(pod)
        assert env["PET_NNODES"] == "2"
        for absent in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "PET_NODE_RANK"):
            assert absent not in env
        assert "initContainers" not in pod["spec"]


def test_suspend_deletes_the_pods_and_resume_recreates_them(
    real_controller_plane: ControlPlane, real_namespace: str
) -> None:
    plane, ns = real_controller_plane, real_namespace
    tj.apply(plane, ns, tj.pytorchjob("pausable", command=DUMP_ENV_AND_WAIT))
    before = tj.wait_for("2 Running pods", lambda: _running(plane, ns, "pausable", 2), timeout=120)
    patch = '{"spec": {"runPolicy": {"suspend": true}}}'
    plane.kubectl("patch", "pytorchjob", "pausable", "-n", ns, "--type=merge", "-p", patch)
    tj.wait_for(
        "the pods to be gone",
        lambda: not _pods(plane, ns, "pausable"),
        timeout=120,
        why=lambda: list(_pods(plane, ns, "pausable")),
    )
    assert tj.condition(tj.read_job(plane, ns, "pausable"), "Suspended")
    for pod in before.values():  # the kubelet stopped each pod's process before removing it
        pid = int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("local://"))
        assert not group_alive(pid)
    patch = '{"spec": {"runPolicy": {"suspend": false}}}'
    plane.kubectl("patch", "pytorchjob", "pausable", "-n", ns, "--type=merge", "-p", patch)
    after = tj.wait_for("2 Running pods", lambda: _running(plane, ns, "pausable", 2), timeout=120)
    assert set(after) == set(before)
    assert {p["metadata"]["uid"] for p in after.values()}.isdisjoint(
        p["metadata"]["uid"] for p in before.values()
    )


def test_stop_leaves_no_component_or_pod_process_alive() -> None:
    plane = ControlPlane(nodes=1, zones=1, bin_dir=require_bin_dir(), real_controller=True)
    pod_pid = None
    try:
        plane.start()
        pids = plane.pids()
        assert set(pids) == {
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "training-operator",
            "kubelet",
        }
        # Metrics, health probes and webhook server, each on loopback only (the upstream
        # binary's webhook server binds every interface).
        listening = _listening_tcp(pids["training-operator"])
        assert len(listening) == 3, listening
        assert all(addr == "127.0.0.1" for addr, _ in listening), listening
        with plane.api_client() as client:
            wait_default_service_account(client, "default", timeout=60)
        tj.apply(plane, "default", tj.pytorchjob("left", command=DUMP_ENV_AND_WAIT, workers=0))
        pod = tj.wait_for(
            "a Running pod", lambda: _running(plane, "default", "left", 1), timeout=120
        )
        status = pod["left-master-0"]["status"]["containerStatuses"][0]
        pod_pid = int(status["containerID"].removeprefix("local://"))
        assert group_alive(pod_pid)
    finally:
        plane.stop()
    for name, pid in pids.items():
        assert not group_alive(pid), name
    assert pod_pid is not None and not group_alive(pod_pid)
    assert not plane.work_dir.exists()
