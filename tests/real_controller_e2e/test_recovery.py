"""End to end through the real Kubeflow training-operator: a PyTorchJob of torchrun agents
(the peer-recovery rendezvous backend, the demo's training script) run by the test kubelet;
a worker pod is deleted as a node loss would, the controller recreates it, the kube-scheduler
places it, the operator plans, the new pod's runtime restores from a peer, and the
PeerRecovery ends Succeeded; the job then completes.

Real parts: the control plane, the training-operator (its CRD, webhook and ClusterRole), the
scheduler, our operator as a subprocess under the chart's RBAC, the chart's runtime Role, and
torchrun with gloo in every pod. Played: the kubelet (testbed/controlplane/kubelet.py says what
it does not imitate).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peer_recovery.contract import names
from peer_recovery.demo.local_job import descendants
from testbed.controlplane import trainingjob as tj
from testbed.controlplane._support import free_ports
from testbed.controlplane.cluster import ControlPlane
from testbed.operator_process import operator_under_rbac
from tests.cluster_e2e.support import RUNTIME_SA, recovery_for, render_runtime_rbac
from tests.cluster_fixtures import PEER_RECOVERY_CRD

pytestmark = [pytest.mark.cluster, pytest.mark.multiproc, pytest.mark.slow]

JOB = "ddp"
PODS = 3  # master-0 (ordinal 0), worker-0 (1), worker-1 (2)
REPLACED = "ddp-worker-1"
TRAIN_ARGS = ["--width=64", "--layers=1", "--pause-at=6", "--steps=8"]
TRAIN_ARGS += ["--snapshot-every=3", "--checkpoint-at=3"]


@pytest.fixture
def recovery_setup(
    real_controller_plane: ControlPlane, real_namespace: str, tmp_path: Path
) -> Iterator[Any]:
    """Our CRD, the runtime's RBAC and ServiceAccount, and our operator watching the
    namespace."""
    plane, ns = real_controller_plane, real_namespace
    plane.kubectl("apply", "-f", str(PEER_RECOVERY_CRD))
    plane.kubectl(
        "wait", "--for=condition=Established", "crd/peerrecoveries.peerrecovery.io", "--timeout=60s"
    )
    plane.kubectl("apply", "-f", "-", input=render_runtime_rbac(plane.bin_dir / "helm", "pr", ns))
    plane.kubectl("create", "serviceaccount", RUNTIME_SA, "-n", ns)
    deadlines = ("--plan-deadline", "900", "--stream-deadline", "900")
    with operator_under_rbac(plane, ns, tmp_path / "operator.log", *deadlines) as proc:
        yield proc


def torchrun_job(
    out: Path, *, master: bool = True, restart_policy: str = "OnFailure"
) -> dict[str, Any]:
    """The DDP example's shape (manifests/examples/ddp-pytorchjob.yaml) for this machine: the
    first pod's agent (the master's, or worker-0's in a job without a Master) hosts the
    rendezvous store on a free port; the others reach it through that pod's Service name."""
    (rdzv_port,) = free_ports(1)
    host = f"{JOB}-master-0" if master else f"{JOB}-worker-0"

    def command(is_host: str) -> list[str]:
        conf = f"is_host={is_host},join_timeout=120,last_call_timeout=1,read_timeout=60"
        return [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={PODS}", "--nproc-per-node=1",
            "--rdzv-backend=peer-recovery", f"--rdzv-endpoint={host}:{rdzv_port}",
            f"--rdzv-id={JOB}", f"--rdzv-conf={conf}", "--max-restarts=3",
            "--monitor-interval=0.2", "--local-addr=127.0.0.1",
            "-m", "peer_recovery.demo.train", f"--out={out}", *TRAIN_ARGS,
        ]  # fmt: skip

    env = {
        "PEER_RECOVERY_SNAPSHOT_DIR": "/dev/shm/peer-recovery",
        "PEER_RECOVERY_PLAN_TIMEOUT": "60",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    job = tj.pytorchjob(
        JOB,
        command=command("0"),
        masters=1 if master else 0,
        restart_policy=restart_policy,
        workers=PODS - 1 if master else PODS,
        env=env,
        annotations={names.ANNOTATION_ENABLED: names.ANNOTATION_ENABLED_VALUE},
        service_account=RUNTIME_SA,
    )
    specs = job["spec"]["pytorchReplicaSpecs"]
    if master:
        specs["Master"]["template"]["spec"]["containers"][0]["command"] = command("1")
    else:
        # Workers share one template: the shell picks the host by replica index, and the
        # runtime takes its ordinal from that index (the controller sets no rank env).
        worker = specs["Worker"]["template"]["spec"]["containers"][0]
        index = {"fieldRef": {"fieldPath": f"metadata.labels['{tj.REPLICA_INDEX_LABEL}']"}}
        worker["env"].append({"name": "PEER_RECOVERY_REPLICA_INDEX", "valueFrom": index})
        is_host = '$([ "$PEER_RECOVERY_REPLICA_INDEX" = 0 ] && echo 1 || echo 0)'
        line = " ".join(shlex.quote(a) for a in command("IS_HOST"))
        worker["command"] = [
            "sh",
            "-c",
            "exec " + line.replace("is_host=IS_HOST", f"is_host={is_host}"),
        ]
    return job


def _files(out: Path, pattern: str, plane: ControlPlane, ns: str) -> list[dict[str, Any]]:
    paths = [out / pattern.format(r) for r in range(PODS)]
    tj.wait_for(
        pattern,
        lambda: all(p.exists() for p in paths),
        timeout=300,
        why=lambda: _pod_logs(plane, ns),
    )
    return [json.loads(p.read_text()) for p in paths]


def _pod_logs(plane: ControlPlane, ns: str) -> str:
    logs = []
    for log in sorted((plane.work_dir / "kubelet" / "pods").glob(f"{ns}_*/*.log")):
        logs.append(f"--- {log.parent.name}:\n{log.read_text(errors='replace')[-3000:]}")
    return "\n".join(logs)


def test_deleted_worker_is_recreated_by_the_controller_and_recovers_from_a_peer(
    real_controller_plane: ControlPlane,
    real_namespace: str,
    recovery_setup: Any,
    tmp_path: Path,
) -> None:
    plane, ns = real_controller_plane, real_namespace
    out = tmp_path / "out"
    out.mkdir()
    tj.apply(plane, ns, torchrun_job(out))
    paused = _files(out, "paused-rank{}.json", plane, ns)
    with plane.api_client() as client:
        old = tj.job_pods(client, ns, JOB)[REPLACED]
    (out / "released").touch()
    # A node loss: the pod goes at once, with its memory emptyDir.
    plane.kubectl("delete", "pod", REPLACED, "-n", ns, "--grace-period=1", "--wait=false")

    def recreated() -> dict[str, Any] | None:
        with plane.api_client() as client:
            pod = tj.job_pods(client, ns, JOB).get(REPLACED)
        if pod and pod["metadata"]["uid"] != old["metadata"]["uid"] and pod["spec"].get("nodeName"):
            return pod
        return None

    new = tj.wait_for("the controller to recreate the pod, scheduled", recreated, timeout=120)
    uid = new["metadata"]["uid"]
    final = _files(out, "final-rank{}.json", plane, ns)
    tj.wait_for(
        "the job to succeed",
        lambda: tj.condition(tj.read_job(plane, ns, JOB), "Succeeded"),
        timeout=300,
        why=lambda: _pod_logs(plane, ns),
    )
    with plane.api_client() as client:
        rec = tj.wait_for(
            "a Succeeded PeerRecovery",
            lambda: recovery_for(client, ns, uid, "Succeeded"),
            timeout=120,
            why=lambda: str(recovery_for(client, ns, uid)),
        )
    assert rec["spec"]["plannedBy"] == "operator"
    assert rec["spec"]["target"]["pod"] == REPLACED
    assert rec["status"]["bytes"] > 0
    restored = _last_round(out)
    healthy = {p["hash"] for r, p in enumerate(paused) if r != PODS - 1}
    assert len(healthy) == 1
    source = rec["spec"]["source"]["ordinal"]
    roles = {r["rank"]: r["role"] for r in restored}
    # Every healthy rank holds the replaced rank's (DDP) shard, so every one of them serves
    # part of its slot (striping); the planned source is the one the records name.
    assert roles == {**{r: "send" for r in range(PODS - 1)}, PODS - 1: "receive"}, roles
    assert {r["hash"] for r in restored} == healthy
    assert all(r["step"] == paused[0]["step"] for r in restored)
    assert restored[-1]["source"] == f"rank {source}"
    assert rec["status"]["bytes"] == restored[-1]["bytes"]
    assert new["spec"]["nodeName"] in plane.nodes  # placed by kube-scheduler
    assert len({f["hash"] for f in final}) == 1


def _last_round(out: Path) -> list[dict[str, Any]]:
    by_round: dict[int, list[dict[str, Any]]] = {}
    for path in out.glob("restore-round*-rank*.json"):
        report = json.loads(path.read_text())
        by_round.setdefault(report["round"], []).append(report)
    return sorted(by_round[max(by_round)], key=lambda r: r["rank"])


def _kill_container(pod: dict[str, Any]) -> None:
    """SIGKILL the pod's container: torchrun's agent and every worker it started."""
    pid = int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("local://"))
    for victim in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def test_worker_crash_under_onfailure_restarts_in_place_and_restores_locally(
    real_controller_plane: ControlPlane,
    real_namespace: str,
    recovery_setup: Any,
    tmp_path: Path,
) -> None:
    """The container dies (exit 137) but the pod stays: the test kubelet restarts it in place
    with its memory emptyDir intact, so every rank, the crashed one included, restores from
    its own snapshot, and no peer stream is needed."""
    plane, ns = real_controller_plane, real_namespace
    out = tmp_path / "out"
    out.mkdir()
    tj.apply(plane, ns, torchrun_job(out))
    paused = _files(out, "paused-rank{}.json", plane, ns)
    with plane.api_client() as client:
        before = tj.job_pods(client, ns, JOB)[REPLACED]
    (out / "released").touch()
    _kill_container(before)
    final = _files(out, "final-rank{}.json", plane, ns)
    tj.wait_for(
        "the job to succeed",
        lambda: tj.condition(tj.read_job(plane, ns, JOB), "Succeeded"),
        timeout=300,
        why=lambda: _pod_logs(plane, ns),
    )
    with plane.api_client() as client:
        after = tj.job_pods(client, ns, JOB)[REPLACED]
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    status = after["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 137
    restored = _last_round(out)
    assert [r["role"] for r in restored] == ["local"] * PODS, restored
    assert len({p["hash"] for p in paused}) == 1
    assert {r["hash"] for r in restored} == {paused[0]["hash"]}
    assert len({f["hash"] for f in final}) == 1


def test_replaced_master_takes_the_rendezvous_store_with_it(
    real_controller_plane: ControlPlane,
    real_namespace: str,
    recovery_setup: Any,
    tmp_path: Path,
) -> None:
    """The master's torchrun agent hosts the rendezvous store (``is_host=1``), so it goes with
    the pod. The workers' agents lose their store and exit 1; under OnFailure their
    containers restart in place (snapshots kept) and join the new master's fresh store, whose
    rounds count from 1 again; the new master pod receives its state from a peer."""
    plane, ns = real_controller_plane, real_namespace
    out = tmp_path / "out"
    out.mkdir()
    tj.apply(plane, ns, torchrun_job(out))
    paused = _files(out, "paused-rank{}.json", plane, ns)
    master = f"{JOB}-master-0"
    with plane.api_client() as client:
        before = tj.job_pods(client, ns, JOB)
    (out / "released").touch()
    plane.kubectl("delete", "pod", master, "-n", ns, "--grace-period=1", "--wait=false")
    final = _files(out, "final-rank{}.json", plane, ns)
    tj.wait_for(
        "the job to succeed",
        lambda: tj.condition(tj.read_job(plane, ns, JOB), "Succeeded"),
        timeout=300,
        why=lambda: _pod_logs(plane, ns),
    )
    with plane.api_client() as client:
        after = tj.job_pods(client, ns, JOB)
        uid = after[master]["metadata"]["uid"]
        rec = tj.wait_for(
            "a Succeeded PeerRecovery for the new master",
            lambda: recovery_for(client, ns, uid, "Succeeded"),
            timeout=120,
            why=lambda: str(recovery_for(client, ns, uid)),
        )
    assert uid != before[master]["metadata"]["uid"]
    for name in before:
        if name == master:
            continue
        assert after[name]["metadata"]["uid"] == before[name]["metadata"]["uid"]
        status = after[name]["status"]["containerStatuses"][0]
        assert status["restartCount"] == 1, status
        assert status["lastState"]["terminated"]["exitCode"] == 1
    # A worker's agent notices the lost store either in its monitor loop ("The connection to
    # the C10d store has failed") or while shutting the rendezvous down ("has failed to
    # shutdown the rendezvous"); which one comes first is a race, and both name the error.
    assert "RendezvousConnectionError" in _pod_logs(plane, ns)
    restored = _last_round(out)
    # The new store counted its rounds from 1 again: its round 1 overwrote the first run's.
    assert {r["round"] for r in restored} == {1}
    assert not list(out.glob("restore-round2-*"))
    source = rec["spec"]["source"]["ordinal"]
    assert restored[0]["role"] == "receive" and restored[0]["source"] == f"rank {source}"
    assert {r["role"] for r in restored[1:]} == {"send"}  # every holder stripes
    assert {r["hash"] for r in restored} == {paused[0]["hash"]}
    assert all(r["step"] == paused[0]["step"] for r in restored)
    assert len({f["hash"] for f in final}) == 1


def test_worker_only_job_recovers_a_replaced_worker_by_replica_index(
    real_controller_plane: ControlPlane,
    real_namespace: str,
    recovery_setup: Any,
    tmp_path: Path,
) -> None:
    """No Master: the controller sets no RANK/PET_NODE_RANK/MASTER_*, so the runtime takes
    each pod's ordinal from its replica index (a downward-API env var)."""
    plane, ns = real_controller_plane, real_namespace
    out = tmp_path / "out"
    out.mkdir()
    tj.apply(plane, ns, torchrun_job(out, master=False))
    paused = _files(out, "paused-rank{}.json", plane, ns)
    victim = f"{JOB}-worker-{PODS - 1}"
    with plane.api_client() as client:
        pods = tj.job_pods(client, ns, JOB)
    assert set(pods) == {f"{JOB}-worker-{i}" for i in range(PODS)}
    for pod in pods.values():
        names = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
        assert not names & {"RANK", "PET_NODE_RANK", "MASTER_ADDR"}
    (out / "released").touch()
    plane.kubectl("delete", "pod", victim, "-n", ns, "--grace-period=1", "--wait=false")
    rec, _ = _recreated_and_recovered_from_a_peer(plane, ns, out, pods[victim], paused)
    assert rec["spec"]["target"]["ordinal"] == PODS - 1


def test_suspend_and_resume_replace_every_pod_and_fall_back_to_the_checkpoint(
    real_controller_plane: ControlPlane,
    real_namespace: str,
    recovery_setup: Any,
    tmp_path: Path,
) -> None:
    """Suspending deletes every pod, and their memory with them; on resume every pod is new,
    so no peer holds a snapshot: every rank loads the last checkpoint, behind the step the job
    had reached. The operator recognises the suspension and records no PeerRecovery for the
    recreated pods (tests/real_controller_e2e/test_job_changes.py checks its Events)."""
    plane, ns = real_controller_plane, real_namespace
    out = tmp_path / "out"
    out.mkdir()
    tj.apply(plane, ns, torchrun_job(out))
    paused = _files(out, "paused-rank{}.json", plane, ns)
    before = _pods_of(plane, ns)
    (out / "released").touch()
    patch = '{"spec": {"runPolicy": {"suspend": true}}}'
    plane.kubectl("patch", "pytorchjob", JOB, "-n", ns, "--type=merge", "-p", patch)
    tj.wait_for("the pods to go", lambda: not _pods_of(plane, ns), timeout=120)
    assert tj.condition(tj.read_job(plane, ns, JOB), "Suspended")
    patch = '{"spec": {"runPolicy": {"suspend": false}}}'
    plane.kubectl("patch", "pytorchjob", JOB, "-n", ns, "--type=merge", "-p", patch)
    final = _files(out, "final-rank{}.json", plane, ns)
    after = _pods_of(plane, ns)
    assert set(after) == set(before)
    assert {p["metadata"]["uid"] for p in after.values()}.isdisjoint(
        p["metadata"]["uid"] for p in before.values()
    )
    with plane.api_client() as client:
        for pod in after.values():
            assert recovery_for(client, ns, pod["metadata"]["uid"]) is None, pod["metadata"]
    restored = _last_round(out)
    assert [r["role"] for r in restored] == ["checkpoint"] * PODS, restored
    assert {r["step"] for r in restored} == {3} and paused[0]["step"] == 6  # --checkpoint-at=3
    assert len({r["hash"] for r in restored}) == 1
    assert len({f["hash"] for f in final}) == 1


def test_exitcode_policy_recreates_a_killed_worker_which_recovers_from_a_peer(
    real_controller_plane: ControlPlane,
    real_namespace: str,
    recovery_setup: Any,
    tmp_path: Path,
) -> None:
    """Under ExitCode the pod never restarts in place: the killed container's exit 137 is
    retryable, so the controller deletes the failed pod and creates a new one, which
    recovers from a peer as a replaced pod does."""
    plane, ns = real_controller_plane, real_namespace
    out = tmp_path / "out"
    out.mkdir()
    tj.apply(plane, ns, torchrun_job(out, restart_policy="ExitCode"))
    paused = _files(out, "paused-rank{}.json", plane, ns)
    before = _pods_of(plane, ns)[REPLACED]
    assert before["spec"]["restartPolicy"] == "Never"
    (out / "released").touch()
    _kill_container(before)
    rec, restored = _recreated_and_recovered_from_a_peer(plane, ns, out, before, paused)
    assert restored[-1]["source"] == f"rank {rec['spec']['source']['ordinal']}"


def _recreated_and_recovered_from_a_peer(
    plane: ControlPlane, ns: str, out: Path, before: dict[str, Any], paused: list[Any]
) -> tuple[dict[str, Any], list[Any]]:
    """Wait for the controller to recreate pod ``before`` under a new UID and for its
    PeerRecovery to succeed; check that it received the paused state from a peer and that
    every rank ends with one state. Returns the record and the last round's restores."""
    name = before["metadata"]["name"]

    def recreated() -> dict[str, Any] | None:
        pod = _pods_of(plane, ns).get(name)
        return pod if pod and pod["metadata"]["uid"] != before["metadata"]["uid"] else None

    uid = tj.wait_for("the controller to recreate the pod", recreated, timeout=120)["metadata"][
        "uid"
    ]
    final = _files(out, "final-rank{}.json", plane, ns)
    with plane.api_client() as client:
        rec = tj.wait_for(
            "a Succeeded PeerRecovery",
            lambda: recovery_for(client, ns, uid, "Succeeded"),
            timeout=120,
            why=lambda: str(recovery_for(client, ns, uid)),
        )
    assert rec["spec"]["target"]["pod"] == name
    restored = _last_round(out)
    assert restored[-1]["role"] == "receive"
    assert {r["hash"] for r in restored} == {paused[0]["hash"]}
    assert len({f["hash"] for f in final}) == 1
    return rec, restored


def _pods_of(plane: ControlPlane, ns: str) -> dict[str, dict[str, Any]]:
    with plane.api_client() as client:
        return tj.job_pods(client, ns, JOB)
