"""A real Kubernetes control plane on loopback for tests: etcd, kube-apiserver (TLS, RBAC,
service-account tokens, an admin client certificate), kube-controller-manager (garbage
collector, namespace and service-account controllers) and KWOK's controller with fake Ready
nodes, so pods bound to them (``spec.nodeName``) become Running and Ready.

With ``real_controller=True`` it runs, instead of KWOK and the hand-made PyTorchJob CRD, the
real Kubeflow training-operator (PyTorchJob scheme only, its own CRD, webhook and ClusterRole),
kube-scheduler, and the test kubelet (testbed/controlplane/kubelet.py) on local nodes, which
runs each scheduled pod's command as a local process.

Invariants: every component listens on a free 127.0.0.1 port and keeps its state and logs
under one temporary directory; the test PyTorchJob CRD is installed before the controller
manager starts (so its garbage collector watches PyTorchJobs from the first moment);
``stop()`` kills every process group and returns only when they are gone; the API server can
be stopped and started again on the same port against the same etcd.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from testbed.controlplane import _training_operator as to
from testbed.controlplane._commands import (
    FAKE_NODE_ANNOTATION,
    apiserver_argv,
    controller_manager_argv,
    etcd_argv,
    kwok_argv,
    node_manifest,
    scheduler_argv,
)
from testbed.controlplane._pki import Pki, make_pki
from testbed.controlplane._proc import Component
from testbed.controlplane._support import (
    REPO_ROOT,
    find_bin_dir,
    free_ports,
    poll,
    write_kubeconfig,
)

if TYPE_CHECKING:
    import kubernetes.client

__all__ = ["FAKE_NODE_ANNOTATION", "ControlPlane", "KubectlError"]

_HERE = Path(__file__).resolve().parent
CRD_PATH = _HERE / "pytorchjob-crd.yaml"
STAGES_PATH = _HERE / "kwok-stages.yaml"
_START_TIMEOUT_S = 60.0


class KubectlError(subprocess.CalledProcessError):
    """kubectl exited non-zero; the message carries its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {(self.stderr or '').strip()}"


class ControlPlane:
    """A control plane for tests; ``start()`` it (or use it as a context manager)."""

    def __init__(
        self,
        *,
        nodes: int = 4,
        zones: int = 2,
        bin_dir: Path | None = None,
        work_dir: Path | None = None,
        real_controller: bool = False,
    ) -> None:
        if nodes < 1 or zones < 1 or zones > nodes:
            raise ValueError(f"need 1 <= zones <= nodes, got nodes={nodes} zones={zones}")
        self.bin_dir = bin_dir or find_bin_dir()
        self._own_work_dir = work_dir is None
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="peer-recovery-cp-"))
        self.log_dir = self.work_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.real_controller = real_controller
        prefix = "local-node" if real_controller else "kwok-node"
        self.nodes = [f"{prefix}-{i}" for i in range(nodes)]
        self.zones = {
            node: f"zone-{chr(ord('a') + i * zones // nodes)}" for i, node in enumerate(self.nodes)
        }
        etcd_client, etcd_peer, apiserver, kcm, kwok = free_ports(5)
        self.server = f"https://127.0.0.1:{apiserver}"
        self._ports = {
            "etcd": etcd_client,
            "etcd-peer": etcd_peer,
            "apiserver": apiserver,
            "kcm": kcm,
            "kwok": kwok,
        }
        if real_controller:
            names = ("scheduler", "to-metrics", "to-health", "to-webhook")
            self._ports.update(zip(names, free_ports(len(names)), strict=True))
        self.kubeconfig = self.work_dir / "admin.kubeconfig"
        self.startup_seconds: float | None = None
        self._pki: Pki | None = None
        self._components: dict[str, Component] = {}
        self._sa_kubeconfigs = 0

    # ---- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start every component and wait until nodes are Ready and the CRD is served."""
        began = time.monotonic()
        try:
            self._start()
        except BaseException as error:
            tails = "\n".join(
                f"--- {c.name} (last lines of {c.log_path}):\n{c.log_tail(20)}"
                for c in self._components.values()
            )
            self.stop(remove_work_dir=False)
            if isinstance(error, Exception):
                raise RuntimeError(
                    f"test control plane failed to start: {error}\n"
                    f"logs kept in {self.log_dir}\n{tails}"
                ) from error
            raise
        self.startup_seconds = time.monotonic() - began

    def _start(self) -> None:
        etcd = self._component("etcd", etcd_argv(self.bin_dir, self.work_dir, self._ports))
        etcd.start()
        self._pki = pki = make_pki(self.work_dir / "pki")
        write_kubeconfig(
            self.kubeconfig,
            server=self.server,
            ca_cert=pki.ca_cert,
            user="admin",
            client_cert=pki.admin_cert,
            client_key=pki.admin_key,
        )
        write_kubeconfig(
            self.work_dir / "controller-manager.kubeconfig",
            server=self.server,
            ca_cert=pki.ca_cert,
            user="system:kube-controller-manager",
            client_cert=pki.controller_manager_cert,
            client_key=pki.controller_manager_key,
        )
        etcd_url = f"http://127.0.0.1:{self._ports['etcd']}/health"
        poll(
            "etcd /health", lambda: _http_ok(etcd_url), timeout=_START_TIMEOUT_S, alive=self.exited
        )
        self._component(
            "kube-apiserver", apiserver_argv(self.bin_dir, self.work_dir, self._ports, pki)
        )
        self.start_apiserver()
        manifests = to.manifests_dir(self.bin_dir) if self.real_controller else None
        self._install_crd(to.crd(manifests) if manifests else yaml.safe_load(CRD_PATH.read_text()))
        self._component(
            "kube-controller-manager",
            controller_manager_argv(self.bin_dir, self.work_dir, self._ports, pki),
        ).start()
        if manifests is None:
            self._component(
                "kwok", kwok_argv(self.bin_dir, self.kubeconfig, STAGES_PATH, self._ports)
            ).start()
            self._create_nodes()
        else:
            self._start_real_controller(manifests, pki)
        self._wait_controllers_ready()

    def _start_real_controller(self, manifests: Path, pki: Pki) -> None:
        """kube-scheduler, the training-operator (after its RBAC, webhook Secret and
        configuration) and the test kubelet with its nodes."""
        import kubernetes.client
        from kubernetes.utils import create_from_dict

        scheduler_kubeconfig = write_kubeconfig(
            self.work_dir / "scheduler.kubeconfig",
            server=self.server,
            ca_cert=pki.ca_cert,
            user="system:kube-scheduler",
            client_cert=pki.scheduler_cert,
            client_key=pki.scheduler_key,
        )
        self._component(
            "kube-scheduler",
            scheduler_argv(self.bin_dir, self.work_dir, scheduler_kubeconfig, self._ports),
        ).start()

        tls = to.make_webhook_tls()
        with self.api_client() as client:
            core = kubernetes.client.CoreV1Api(client)
            core.create_namespace({"metadata": {"name": to.NAMESPACE}})
            role = to.cluster_role(manifests)
            binding = {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": role["metadata"]["name"]},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": role["metadata"]["name"],
                },
                "subjects": [
                    {
                        "kind": "ServiceAccount",
                        "name": to.SERVICE_ACCOUNT,
                        "namespace": to.NAMESPACE,
                    }
                ],
            }
            for manifest in (
                role,
                binding,
                to.webhook_secret(tls),
                to.webhook_configuration(manifests, self._ports["to-webhook"], tls.ca_cert),
            ):
                create_from_dict(client, manifest)
        operator_kubeconfig = self.service_account_kubeconfig(
            to.NAMESPACE, to.SERVICE_ACCOUNT, expiration_seconds=86400
        )
        tmp_dir = self.work_dir / "training-operator-tmp"
        to.prepare_cert_dirs(tmp_dir, tls)
        env = {
            **os.environ,
            "HOME": str(self.work_dir),
            "TMPDIR": str(tmp_dir),
            "KUBECONFIG": str(operator_kubeconfig),
            "MY_POD_NAMESPACE": to.NAMESPACE,
        }
        self._component(
            "training-operator", to.training_operator_argv(self.bin_dir, self._ports), env=env
        ).start()

        kubelet_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        argv = [
            sys.executable,
            "-m",
            "testbed.controlplane.kubelet",
            f"--kubeconfig={self.kubeconfig}",
            f"--work-dir={self.work_dir / 'kubelet'}",
            *(f"--node={node}={self.zones[node]}" for node in self.nodes),
        ]
        self._component("kubelet", argv, env=kubelet_env).start()

    def stop(self, *, remove_work_dir: bool = True) -> None:
        """Stop every component (reverse start order); remove the work dir if we made it."""
        for component in reversed(list(self._components.values())):
            component.stop()
        if remove_work_dir and self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def stop_apiserver(self) -> None:
        """Stop the API server only; etcd and the rest keep running."""
        self._components["kube-apiserver"].stop()

    def start_apiserver(self) -> None:
        """(Re)start the API server on its port and wait until /readyz answers ok.

        On a restart, the controller manager and KWOK are restarted with it: after an outage
        their watches back off for tens of seconds, and a test that follows would wait for a
        namespace's ServiceAccount or a pod's status that nobody is yet there to write.
        """
        dependents = [
            self._components[name]
            for name in ("kube-controller-manager", "kwok", "kube-scheduler", "training-operator")
            if name in self._components
        ]
        for component in dependents:
            component.stop()
        self._components["kube-apiserver"].start()
        poll(
            "kube-apiserver /readyz",
            self._apiserver_ready,
            timeout=_START_TIMEOUT_S,
            alive=self.exited,
        )
        if dependents:
            for component in dependents:
                component.start()
            self._wait_controllers_ready()

    def _wait_controllers_ready(self) -> None:
        kcm_url = f"https://127.0.0.1:{self._ports['kcm']}/healthz"
        poll(
            "kube-controller-manager /healthz",
            lambda: _http_ok(kcm_url, verify=False),
            timeout=_START_TIMEOUT_S,
            alive=self.exited,
        )
        if "kube-scheduler" in self._components:
            scheduler_url = f"https://127.0.0.1:{self._ports['scheduler']}/healthz"
            poll(
                "kube-scheduler /healthz",
                lambda: _http_ok(scheduler_url, verify=False),
                timeout=_START_TIMEOUT_S,
                alive=self.exited,
            )
        if "training-operator" in self._components:
            # Ready once its certificates are in place and its webhook server listens.
            operator_url = f"http://127.0.0.1:{self._ports['to-health']}/readyz"
            poll(
                "training-operator /readyz",
                lambda: _http_ok(operator_url),
                timeout=_START_TIMEOUT_S,
                alive=self.exited,
            )
        poll("nodes Ready", self._nodes_ready, timeout=_START_TIMEOUT_S, alive=self.exited)

    def pids(self) -> dict[str, int]:
        """Process (and process group) ids of the running components, by name."""
        return {n: c.pid for n, c in self._components.items() if c.pid is not None and c.running()}

    def components(self) -> dict[str, Component]:
        """The components by name, for logs and exit status."""
        return dict(self._components)

    # ---- clients ---------------------------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl (admin unless ``kubeconfig`` is given); text in and out."""
        argv = [
            str(self.bin_dir / "kubectl"),
            f"--kubeconfig={kubeconfig or self.kubeconfig}",
            f"--cache-dir={self.work_dir / 'kubectl-cache'}",
            *args,
        ]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def api_client(self) -> kubernetes.client.ApiClient:
        """A new admin ApiClient (client certificate); the caller closes it."""
        import kubernetes.client

        assert self._pki is not None, "control plane not started"
        config = kubernetes.client.Configuration()
        config.host = self.server
        config.ssl_ca_cert = str(self._pki.ca_cert)
        config.cert_file = str(self._pki.admin_cert)
        config.key_file = str(self._pki.admin_key)
        return kubernetes.client.ApiClient(config)

    def service_account_kubeconfig(
        self, namespace: str, name: str, *, expiration_seconds: int = 3600
    ) -> Path:
        """A kubeconfig acting as ServiceAccount ``namespace/name`` (created if absent), with a
        token from the TokenRequest API; it has exactly the rights RBAC grants that account."""
        import kubernetes.client
        from kubernetes.client.exceptions import ApiException

        assert self._pki is not None, "control plane not started"
        with self.api_client() as client:
            core = kubernetes.client.CoreV1Api(client)
            try:
                core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
            except ApiException as error:
                if error.status != 409:
                    raise
            request = core.create_namespaced_service_account_token(
                name,
                namespace,
                {"spec": {"audiences": None, "expirationSeconds": expiration_seconds}},
            )
        self._sa_kubeconfigs += 1
        path = self.work_dir / f"sa-{namespace}-{name}-{self._sa_kubeconfigs}.kubeconfig"
        return write_kubeconfig(
            path,
            server=self.server,
            ca_cert=self._pki.ca_cert,
            user=f"system:serviceaccount:{namespace}:{name}",
            token=request.status.token,
            namespace=namespace,
        )

    @property
    def ca_cert(self) -> Path:
        """The cluster CA certificate (PEM)."""
        assert self._pki is not None, "control plane not started"
        return self._pki.ca_cert

    # ---- internals -------------------------------------------------------------------------

    def _component(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> Component:
        if name == "kwok":  # keep KWOK away from a user's ~/.kwok configuration
            env = {**os.environ, "HOME": str(self.work_dir)}
        component = Component(name, argv, self.log_dir, env=env)
        self._components[name] = component
        return component

    def exited(self) -> str | None:
        """A description of the first component that has exited, or None while all run."""
        for component in self._components.values():
            code = component.exit_code()
            if code is not None:
                return f"{component.name} exited with status {code}:\n{component.log_tail(20)}"
        return None

    def _apiserver_ready(self) -> bool:
        pki = self._pki
        assert pki is not None
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        return _http_ok(f"{self.server}/readyz", context=context)

    def _install_crd(self, crd: dict[str, Any]) -> None:
        import kubernetes.client
        from kubernetes.client.exceptions import ApiException

        with self.api_client() as client:
            api = kubernetes.client.ApiextensionsV1Api(client)
            with contextlib.suppress(ApiException):
                api.create_custom_resource_definition(crd)

            def established() -> bool:
                status = api.read_custom_resource_definition(crd["metadata"]["name"]).status
                return any(
                    c.type == "Established" and c.status == "True"
                    for c in (status.conditions or [])
                )

            poll("the PyTorchJob CRD to be Established", established, timeout=_START_TIMEOUT_S)
            # Served means discoverable: wait until a list through the new resource works.
            custom = kubernetes.client.CustomObjectsApi(client)
            poll(
                "kubeflow.org/v1 pytorchjobs to be served",
                lambda: (
                    custom.list_cluster_custom_object("kubeflow.org", "v1", "pytorchjobs")
                    is not None
                ),
                timeout=_START_TIMEOUT_S,
            )

    def _create_nodes(self) -> None:
        import kubernetes.client

        with self.api_client() as client:
            core = kubernetes.client.CoreV1Api(client)
            for name in self.nodes:
                core.create_node(node_manifest(name, self.zones[name]))

    def _nodes_ready(self) -> bool:
        import kubernetes.client

        with self.api_client() as client:
            items = kubernetes.client.CoreV1Api(client).list_node().items
        ready = {
            n.metadata.name
            for n in items
            if any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))
        }
        return set(self.nodes) <= ready


def _http_ok(url: str, *, context: ssl.SSLContext | None = None, verify: bool = True) -> bool:
    if context is None and url.startswith("https") and not verify:
        context = ssl._create_unverified_context()  # the controller manager's self-signed cert
    with urllib.request.urlopen(url, timeout=2, context=context) as response:
        return response.status == 200
