"""The end-to-end harness: a PyTorchJob on the test control plane whose pods are local
torchrun agents.

``ClusterJob`` creates an annotated PyTorchJob (pods bound to KWOK's fake nodes), then runs
each pod as a ``peer_recovery.demo.local_job.LocalJob`` agent with the env a pod of that
job gets (``POD_NAME``/``POD_UID``/``POD_NAMESPACE``/``NODE_NAME`` from the Pod object,
``RANK``/``PET_NODE_RANK`` = its ordinal) and a kubeconfig for the runtime's ServiceAccount,
bound to the chart's runtime Role rendered with the real ``helm template``. The training
script is the demo's (``peer_recovery.demo.train``): a small transformer with AdamW that
snapshots, pauses until released, and writes hashes of its state.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from peer_recovery.contract import names
from peer_recovery.demo.local_job import LocalJob
from testbed.controlplane import pytorchjob as pj
from testbed.operator_process import CHART
from testbed.waiting import wait_for
from tests.controlplane.fixtures import wait_default_service_account

RUNTIME_SA = "trainer"
ENABLED = {names.ANNOTATION_ENABLED: names.ANNOTATION_ENABLED_VALUE}
TRAIN_ARGS = ["--width=64", "--layers=1", "--pause-at=6", "--steps=8"]
TRAIN_ARGS += ["--snapshot-every=3", "--checkpoint-at=3"]


def render_runtime_rbac(helm: Path, release: str, namespace: str) -> str:
    argv = [
        str(helm), "template", release, str(CHART), "--namespace", namespace,
        "--show-only", "templates/runtime-rbac.yaml",
        "--set", f"runtime.serviceAccountName={RUNTIME_SA}",
        "--set", f"runtime.namespaces[0]={namespace}",
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout


def recoveries(client: Any, namespace: str) -> list[dict[str, Any]]:
    from kubernetes.client import CustomObjectsApi

    items = CustomObjectsApi(client).list_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.PLURAL
    )["items"]
    return sorted(items, key=lambda r: r["metadata"]["name"])


def recovery_for(
    client: Any, namespace: str, uid: str, phase: str | None = None
) -> dict[str, Any] | None:
    for rec in recoveries(client, namespace):
        if rec["spec"]["target"]["podUID"] == uid and (
            phase is None or (rec.get("status") or {}).get("phase") == phase
        ):
            return rec
    return None


def job_events(client: Any, namespace: str, job: str) -> list[dict[str, Any]]:
    from kubernetes.client import CoreV1Api

    events = CoreV1Api(client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={job}"
    )
    return [client.sanitize_for_serialization(e) for e in events.items]


class ClusterJob:
    """An annotated PyTorchJob of ``1 + workers`` pods, played by local torchrun agents."""

    def __init__(
        self,
        plane: Any,
        client: Any,
        namespace: str,
        workdir: Path,
        shm_root: Path,
        *,
        name: str = "ddp",
        workers: int = 3,
        env: dict[str, str] | None = None,
    ) -> None:
        self.plane, self.client, self.namespace, self.name = plane, client, namespace, name
        self.out = workdir / "out"
        self.out.mkdir(parents=True)
        pj.create_job(client, namespace, name, workers=workers, annotations=ENABLED)
        self.pods = [
            pj.wait_pod_ready(client, namespace, p["metadata"]["name"])
            for p in pj.job_pods(client, namespace, name)
        ]
        self.pods.sort(key=lambda p: _ordinal(p))
        kubeconfig = plane.service_account_kubeconfig(namespace, RUNTIME_SA)
        self.pod_env: dict[int, dict[str, str]] = {}
        for pod in self.pods:
            self._set_env(pod)
        script = ["-m", "peer_recovery.demo.train", f"--out={self.out}", *TRAIN_ARGS]
        self.job = LocalJob(
            workdir / "job",
            script,
            nnodes=len(self.pods),
            run_id=name,
            env={"KUBECONFIG": str(kubeconfig), **(env or {})},
            pod_env=self.pod_env,
            shm_root=shm_root,
        )

    def _set_env(self, pod: dict[str, Any]) -> None:
        ordinal = _ordinal(pod)
        meta = pod["metadata"]
        self.pod_env[ordinal] = {
            "POD_NAME": meta["name"],
            "POD_UID": meta["uid"],
            "POD_NAMESPACE": meta["namespace"],
            "NODE_NAME": pod["spec"]["nodeName"],
            "RANK": str(ordinal),
            "PET_NODE_RANK": str(ordinal),
        }

    def files(self, pattern: str, count: int, timeout: float) -> list[dict[str, Any]]:
        paths = [self.out / pattern.format(r) for r in range(count)]

        def ready() -> bool:
            dead = [
                o for o, p in self.job.pods.items() if p.process and p.process.poll() is not None
            ]
            if dead:
                raise AssertionError(f"agents {dead} exited early:\n{self.job.logs()[-8000:]}")
            return all(p.exists() for p in paths)

        wait_for(pattern, ready, timeout=timeout, why=lambda: self.job.logs()[-8000:])
        return [json.loads(p.read_text()) for p in paths]

    def train_to_pause(self, timeout: float = 240) -> list[dict[str, Any]]:
        self.job.start()
        return self.files("paused-rank{}.json", len(self.pods), timeout)

    def lose_pod(self, ordinal: int) -> dict[str, Any]:
        """Kill the pod's agent, wipe its snapshots, replace the Pod object (new UID)."""
        (self.out / "released").touch()
        self.job.kill_pod(ordinal)
        self.job.wipe_pod(ordinal)
        name = self.pods[ordinal]["metadata"]["name"]
        new = pj.replace_pod(self.client, self.namespace, name)
        new = pj.wait_pod_ready(self.client, self.namespace, name, uid=new["metadata"]["uid"])
        self.pods[ordinal] = new
        self._set_env(new)
        return new

    def rejoin(self, ordinal: int) -> None:
        self.job.start_pod(ordinal)

    def finish(self, timeout: float = 240) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(the last round's restore reports, the final reports), once every agent exited 0."""
        final = self.files("final-rank{}.json", len(self.pods), timeout)
        return final, self.restores()

    def restores(self) -> list[dict[str, Any]]:
        by_round: dict[int, list[dict[str, Any]]] = {}
        for path in self.out.glob("restore-round*-rank*.json"):
            report = json.loads(path.read_text())
            by_round.setdefault(report["round"], []).append(report)
        return sorted(by_round[max(by_round)], key=lambda r: r["rank"])

    def close(self) -> None:
        self.job.close()


def _ordinal(pod: dict[str, Any]) -> int:
    for container in pod["spec"]["containers"]:
        for env in container.get("env") or ():
            if env["name"] == "PET_NODE_RANK":
                return int(env["value"])
    raise AssertionError(f"pod {pod['metadata']['name']} has no PET_NODE_RANK")


def wait_controllers_settled(client: Any, timeout: float = 180) -> None:
    """After an API server restart, wait until the controller manager works again (its
    ServiceAccount controller fills a new namespace), so later tests find it working."""
    import uuid

    from kubernetes.client import CoreV1Api

    core = CoreV1Api(client)
    name = f"settle-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    try:
        wait_default_service_account(client, name, timeout=timeout)
    finally:
        core.delete_namespace(name)
