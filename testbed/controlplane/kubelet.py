"""A test kubelet for the control plane's local nodes: it runs each pod bound to one of its
nodes as a local process, so a real controller reacts to real exits.

Run as ``python -m testbed.controlplane.kubelet --kubeconfig K --work-dir D --node N[=ZONE]...``
(ControlPlane starts it). It registers its nodes Ready and then, polling the API server:

- starts a bound pod's first container (``command`` + ``args``, ``$(VAR)`` expanded) as a
  process in its own session, with the pod's ``env`` (literal values, downward API
  ``fieldRef``s, ConfigMap and Secret keys), ``KUBECONFIG`` holding a token for the pod's
  ServiceAccount bound to the pod (in place of the projected token volume), and its output in
  ``<work-dir>/pods/<ns>_<name>_<uid>/<container>.log``;
- gives every ``emptyDir`` volume a directory under the pod's directory and rewrites the
  volume's ``mountPath`` prefix in literal env values and arguments to it (so ``/dev/shm`` becomes a
  per-pod directory that survives container restarts and goes with the pod);
- rewrites, in literal env values and arguments (not in downward API values, so a pod's
  own name, which is also its Service's, stays), host names of the namespace's Services
  (``svc``, ``svc.ns``, ``svc.ns.svc[.cluster.local]``) to 127.0.0.1, where every pod
  listens;
- reports the pod Running and Ready, then its container's exit: under ``Always``, and under
  ``OnFailure`` on a non-zero exit, the container is restarted in place with ``restartCount``
  raised and ``lastState`` set; otherwise the pod ends Succeeded (exit 0) or Failed;
- on a pod's deletion, sends SIGTERM to the container's process group, SIGKILL after the
  pod's grace period, then removes the pod object (grace 0) and its directory.

What it does not imitate: images (the command runs with this machine's Python and files);
init containers (reported as completed without running; the ``init-pytorch`` container the
training-operator adds waits for the master's Service name to resolve, which this kubelet
imitates by holding a pod with ``MASTER_ADDR`` set until that Service exists, and any pod of
a PyTorchJob until the Services named after its job's pods exist, as their names resolve
only then); more than one
container; probes (a started container is Ready); resource limits and cgroups; the restart
back-off's length (0.5 s doubling up to 30 s, not 10 s up to 5 min); distinct pod IPs or
network namespaces (every pod is 127.0.0.1, so pods must not share ports); volumes other
than ``emptyDir``; node heartbeats (nothing here runs the node-lifecycle controller, so the
kubelet itself lifts the ``not-ready`` taint admission puts on a new node). KWOK keeps the nodes it manages; this
kubelet creates and manages only the nodes it is given.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.controlplane._proc import _die_with_parent, group_alive

__all__ = [
    "LOCAL_NODE_LABEL",
    "expand",
    "local_node_manifest",
    "main",
    "rewrite_hosts",
    "rewrite_mount",
]

LOCAL_NODE_LABEL = "peer-recovery.test/kubelet"
POD_IP = "127.0.0.1"
#: The training-operator's label naming a pod's PyTorchJob.
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
_POLL_S = 0.2
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def local_node_manifest(name: str, zone: str) -> dict[str, Any]:
    """A node this kubelet manages (no KWOK annotation, so KWOK leaves it alone)."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/zone": zone,
                LOCAL_NODE_LABEL: "local",
            },
        },
    }


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes, and an
    undefined reference stays as written."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR.sub(one, text)


def rewrite_hosts(text: str, services: list[str], namespace: str) -> str:
    """Replace host names of ``services`` (short or namespace-qualified) in ``text`` by the
    pods' shared address: where the whole value is the name, or the name follows ``=``,
    ``,``, ``@`` or ``//`` and ends the text or comes before ``:``, ``/`` or ``,`` (so a path
    segment that happens to equal a Service name stays as it is)."""
    for service in sorted(services, key=len, reverse=True):
        ns = re.escape(namespace)
        qualified = rf"{re.escape(service)}(?:\.{ns}(?:\.svc(?:\.cluster\.local)?)?)?"
        text = re.sub(rf"(?:^|(?<=[=,@])|(?<=//)){qualified}(?=$|[:/,])", POD_IP, text)
    return text


def rewrite_mount(text: str, mount_path: str, directory: Path) -> str:
    """Replace the path ``mount_path`` (at the start of ``text`` or after ``=`` or ``:``, and
    followed by ``/`` or the end) by ``directory``."""
    pattern = rf"(?<![^=:]){re.escape(mount_path.rstrip('/'))}(?=/|$)"
    return re.sub(pattern, lambda _: str(directory), text)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class _Pod:
    """What this kubelet keeps about one pod it runs."""

    uid: str
    namespace: str
    name: str
    directory: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: str = ""
    terminal: bool = False
    kill_at: float | None = None
    restart_at: float | None = None
    last_state: dict[str, Any] = field(default_factory=dict)


class Kubelet:
    """Polls pods bound to ``nodes`` and runs them; see the module docstring."""

    def __init__(self, kubeconfig: Path, work_dir: Path, nodes: dict[str, str]) -> None:
        import kubernetes.client
        import kubernetes.config

        self.work_dir = work_dir
        self.nodes = nodes
        self.kubeconfig = kubeconfig
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(kubeconfig), client_configuration=config)
        self.client = kubernetes.client.ApiClient(config)
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.pods: dict[str, _Pod] = {}
        self.stopping = False
        raw = yaml.safe_load(kubeconfig.read_text())
        self.server = raw["clusters"][0]["cluster"]["server"]
        self.ca_data = raw["clusters"][0]["cluster"]["certificate-authority-data"]

    # ---- nodes -----------------------------------------------------------------------------

    def register_nodes(self) -> None:
        """Create (if absent) and mark each node Ready, as a kubelet registering itself."""
        from kubernetes.client.exceptions import ApiException

        for name, zone in self.nodes.items():
            try:
                self.core.create_node(local_node_manifest(name, zone))
            except ApiException as error:
                if error.status != 409:
                    raise
            now = _now()
            status = {
                "capacity": {"cpu": "64", "memory": "256Gi", "pods": "110"},
                "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "110"},
                "addresses": [
                    {"type": "InternalIP", "address": POD_IP},
                    {"type": "Hostname", "address": name},
                ],
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "test kubelet (testbed/controlplane/kubelet.py)",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
                "nodeInfo": {"kubeletVersion": "test", "operatingSystem": "linux"},
            }
            self.core.patch_node_status(name, {"status": status})
            # Admission taints a new node not-ready; the node-lifecycle controller, which
            # would lift it once the node is Ready, does not run here.
            node = self.core.read_node(name)
            taints = [t for t in node.spec.taints or [] if t.key != "node.kubernetes.io/not-ready"]
            if len(taints) != len(node.spec.taints or []):
                node.spec.taints = taints
                self.core.replace_node(name, node)

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Sync until SIGTERM; then kill every container and return."""
        while not self.stopping:
            try:
                self.sync()
            except Exception as error:  # the API server may restart under a test; keep going
                print(f"kubelet: sync failed: {error!r}", flush=True)
            time.sleep(_POLL_S)
        for pod in self.pods.values():
            self._kill(pod, signal.SIGKILL)

    def sync(self) -> None:
        """One pass over the pods bound to our nodes."""
        seen = set()
        for pod in self.core.list_pod_for_all_namespaces().items:
            if pod.spec.node_name not in self.nodes:
                continue
            uid = pod.metadata.uid
            seen.add(uid)
            state = self.pods.get(uid)
            if pod.metadata.deletion_timestamp is not None:
                self._terminate(pod, state)
            elif state is None:
                if pod.status.phase in ("Succeeded", "Failed"):
                    continue
                self._start(pod)
            elif not state.terminal:
                self._check(pod, state)
        for uid in set(self.pods) - seen:  # removed behind our back (force delete)
            gone = self.pods.pop(uid)
            self._kill(gone, signal.SIGKILL)
            shutil.rmtree(gone.directory, ignore_errors=True)

    # ---- one pod ---------------------------------------------------------------------------

    def _start(self, pod: Any) -> None:
        namespace, name, uid = pod.metadata.namespace, pod.metadata.name, pod.metadata.uid
        services = [s.metadata.name for s in self.core.list_namespaced_service(namespace).items]
        container = pod.spec.containers[0]
        literal_env = {e.name: e.value for e in (container.env or []) if e.value is not None}
        master = literal_env.get("MASTER_ADDR")
        if master and master not in services:
            return  # what the init-pytorch container waits for; try again next pass
        if any(s not in services for s in self._siblings(pod)):
            return  # the names the job's pods reach each other by do not resolve yet
        directory = self.work_dir / "pods" / f"{namespace}_{name}_{uid}"
        directory.mkdir(parents=True, exist_ok=True)
        state = _Pod(uid=uid, namespace=namespace, name=name, directory=directory)
        self.pods[uid] = state
        try:
            argv, env = self._container_config(pod, container, services, directory)
        except (KeyError, ValueError) as error:
            state.terminal = True
            self._report(
                pod,
                state,
                phase="Pending",
                container_state={
                    "waiting": {"reason": "CreateContainerConfigError", "message": str(error)}
                },
            )
            return
        state.argv, state.env = argv, env
        self._spawn(pod, state)

    def _spawn(self, pod: Any, state: _Pod) -> None:
        container = pod.spec.containers[0]
        log = (state.directory / f"{container.name}.log").open("ab")
        try:
            state.process = subprocess.Popen(
                state.argv,
                env=state.env,
                cwd=container.working_dir or state.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as error:
            state.terminal = True
            self._report(
                pod,
                state,
                phase="Failed",
                container_state={
                    "terminated": {"exitCode": 128, "reason": "StartError", "message": str(error)}
                },
            )
            return
        finally:
            log.close()
        state.started_at = _now()
        self._report(
            pod,
            state,
            phase="Running",
            container_state={"running": {"startedAt": state.started_at}},
        )
        print(
            f"kubelet: started {state.namespace}/{state.name} pid {state.process.pid}", flush=True
        )

    def _check(self, pod: Any, state: _Pod) -> None:
        if state.restart_at is not None:
            if time.monotonic() >= state.restart_at:
                state.restart_at = None
                self._spawn(pod, state)
            return
        process = state.process
        if process is None or process.poll() is None:
            return
        code = _exit_code(process.returncode)
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": state.started_at,
            "finishedAt": _now(),
        }
        policy = pod.spec.restart_policy or "Always"
        print(f"kubelet: {state.namespace}/{state.name} exited {code} ({policy})", flush=True)
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            # Back-off as the kubelet's, but from 0.5 s (not 10 s) up to 30 s (not 5 min).
            state.restarts += 1
            state.last_state = {"terminated": terminated}
            state.process = None
            state.restart_at = time.monotonic() + min(0.5 * 2 ** (state.restarts - 1), 30.0)
            self._report(
                pod,
                state,
                phase="Running",
                container_state={"waiting": {"reason": "CrashLoopBackOff"}},
            )
            return
        state.terminal = True
        state.process = None
        self._report(
            pod,
            state,
            phase="Succeeded" if code == 0 else "Failed",
            container_state={"terminated": terminated},
        )

    def _terminate(self, pod: Any, state: _Pod | None) -> None:
        from kubernetes.client.exceptions import ApiException

        if state is not None and state.process is not None and state.process.poll() is None:
            if state.kill_at is None:
                grace = pod.metadata.deletion_grace_period_seconds or 0
                state.kill_at = time.monotonic() + grace
                self._kill(state, signal.SIGTERM)
            if time.monotonic() < state.kill_at:
                return
            self._kill(state, signal.SIGKILL)
        if state is not None and state.process is not None and group_alive(state.process.pid):
            self._kill(state, signal.SIGKILL)
            return
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(
                pod.metadata.name,
                pod.metadata.namespace,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": pod.metadata.uid}},
            )
        print(f"kubelet: removed {pod.metadata.namespace}/{pod.metadata.name}", flush=True)
        if state is not None:
            self.pods.pop(state.uid, None)
            shutil.rmtree(state.directory, ignore_errors=True)

    @staticmethod
    def _kill(state: _Pod, sig: signal.Signals) -> None:
        if state.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(state.process.pid, sig)
        if sig == signal.SIGKILL:
            with contextlib.suppress(subprocess.TimeoutExpired):
                state.process.wait(timeout=5)

    def _siblings(self, pod: Any) -> list[str]:
        """The pods of ``pod``'s PyTorchJob: the training-operator gives each a headless
        Service of the same name, which is how they reach each other (a job without a
        Master rendezvouses at a worker's); names in a pod's command line are rewritten to
        this machine only for Services that exist, so a pod starts once they all do."""
        job = (pod.metadata.labels or {}).get(JOB_NAME_LABEL)
        if not job:
            return []
        selector = f"{JOB_NAME_LABEL}={job}"
        listed = self.core.list_namespaced_pod(pod.metadata.namespace, label_selector=selector)
        return [p.metadata.name for p in listed.items]

    # ---- container configuration -----------------------------------------------------------

    def _container_config(
        self, pod: Any, container: Any, services: list[str], directory: Path
    ) -> tuple[list[str], dict[str, str]]:
        namespace = pod.metadata.namespace
        mounts = self._empty_dirs(pod, container, directory)

        def local(text: str) -> str:
            text = rewrite_hosts(text, services, namespace)
            for mount_path, path in mounts.items():
                text = rewrite_mount(text, mount_path, path)
            return text

        env: dict[str, str] = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(directory),
            "HOSTNAME": pod.metadata.name,
            "TMPDIR": str(directory),
        }
        for name in ("PYTHONPATH", "VIRTUAL_ENV", "LANG"):
            if name in os.environ:
                env[name] = os.environ[name]
        if pod.spec.automount_service_account_token is not False:
            env["KUBECONFIG"] = str(self._pod_kubeconfig(pod, directory))
        for var in container.env or []:
            if var.value is not None:
                env[var.name] = local(expand(var.value, env))
            elif var.value_from is not None:
                env[var.name] = self._value_from(pod, var.name, var.value_from)
            else:
                env[var.name] = ""
        argv = [
            local(expand(a, env)) for a in [*(container.command or []), *(container.args or [])]
        ]
        if not argv:
            raise ValueError(f"container {container.name} has no command (images are not run here)")
        return argv, env

    def _empty_dirs(self, pod: Any, container: Any, directory: Path) -> dict[str, Path]:
        empty = {v.name for v in (pod.spec.volumes or []) if v.empty_dir is not None}
        mounts: dict[str, Path] = {}
        for mount in container.volume_mounts or []:
            if mount.name in empty:
                path = directory / "volumes" / mount.name
                path.mkdir(parents=True, exist_ok=True)
                mounts[mount.mount_path] = path
        return mounts

    def _value_from(self, pod: Any, name: str, source: Any) -> str:
        if source.field_ref is not None:
            return _field(pod, source.field_ref.field_path)
        if source.config_map_key_ref is not None:
            ref = source.config_map_key_ref
            data = self.core.read_namespaced_config_map(ref.name, pod.metadata.namespace).data
            return (data or {})[ref.key]
        if source.secret_key_ref is not None:
            ref = source.secret_key_ref
            data = self.core.read_namespaced_secret(ref.name, pod.metadata.namespace).data
            return base64.b64decode((data or {})[ref.key]).decode()
        raise ValueError(
            f"env {name}: only fieldRef, configMapKeyRef and secretKeyRef are supported"
        )

    def _pod_kubeconfig(self, pod: Any, directory: Path) -> Path:
        account = pod.spec.service_account_name or "default"
        request = self.core.create_namespaced_service_account_token(
            account,
            pod.metadata.namespace,
            {
                "spec": {
                    "audiences": None,
                    "expirationSeconds": 3600,
                    "boundObjectRef": {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": pod.metadata.name,
                        "uid": pod.metadata.uid,
                    },
                }
            },
        )
        user = f"system:serviceaccount:{pod.metadata.namespace}:{account}"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "cluster",
                    "cluster": {"server": self.server, "certificate-authority-data": self.ca_data},
                }
            ],
            "users": [{"name": user, "user": {"token": request.status.token}}],
            "contexts": [
                {
                    "name": user,
                    "context": {
                        "cluster": "cluster",
                        "user": user,
                        "namespace": pod.metadata.namespace,
                    },
                }
            ],
            "current-context": user,
        }
        path = directory / "kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    # ---- status ----------------------------------------------------------------------------

    def _report(
        self, pod: Any, state: _Pod, *, phase: str, container_state: dict[str, Any]
    ) -> None:
        now = _now()
        running = "running" in container_state
        ready = "True" if running else "False"
        containers = pod.spec.containers
        statuses = []
        for index, container in enumerate(containers):
            status: dict[str, Any] = {
                "name": container.name,
                "image": container.image or "",
                "imageID": "",
                "ready": running and index == 0,
                "started": running and index == 0,
                "restartCount": state.restarts if index == 0 else 0,
                "state": container_state
                if index == 0
                else {"waiting": {"reason": "NotRunByTestKubelet"}},
            }
            if index == 0 and state.process is not None:
                status["containerID"] = f"local://{state.process.pid}"
            if index == 0 and state.last_state:
                status["lastState"] = state.last_state
            statuses.append(status)
        init_statuses = [
            {
                "name": c.name,
                "image": c.image or "",
                "imageID": "",
                "ready": True,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
            }
            for c in pod.spec.init_containers or []
        ]
        status = {
            "phase": phase,
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": pod.status.start_time.strftime("%Y-%m-%dT%H:%M:%SZ")
            if pod.status.start_time
            else now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
                {"type": "Ready", "status": ready, "lastTransitionTime": now},
            ],
            "containerStatuses": statuses,
            "initContainerStatuses": init_statuses,
        }
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.patch_namespaced_pod_status(state.name, state.namespace, {"status": status})
        except ApiException as error:
            if error.status != 404:
                raise


def _field(pod: Any, path: str) -> str:
    """The downward API's ``fieldRef`` paths a pod may use in env."""
    simple = {
        "metadata.name": pod.metadata.name,
        "metadata.namespace": pod.metadata.namespace,
        "metadata.uid": pod.metadata.uid,
        "spec.nodeName": pod.spec.node_name,
        "spec.serviceAccountName": pod.spec.service_account_name,
        "status.podIP": POD_IP,
        "status.hostIP": POD_IP,
    }
    if path in simple:
        return simple[path] or ""
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        values = getattr(pod.metadata, match.group(1)) or {}
        return values.get(match.group(2), "")
    raise ValueError(f"fieldRef {path!r} is not supported by the test kubelet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.controlplane.kubelet")
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--node", action="append", required=True, help="NAME=ZONE")
    args = parser.parse_args(argv)
    nodes = {}
    for spec in args.node:
        name, _, zone = spec.partition("=")
        nodes[name] = zone or "zone-a"
    kubelet = Kubelet(args.kubeconfig, args.work_dir, nodes)

    def stop(signum: int, frame: object) -> None:
        kubelet.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    kubelet.register_nodes()
    print(f"kubelet: nodes {', '.join(nodes)} registered", flush=True)
    kubelet.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
