"""The command lines of the control plane's components and the fake nodes' manifests: pure
functions of paths and ports, so the flags are visible in one place and testable alone.

Invariants: every component listens on 127.0.0.1 only; the controller manager runs just the
controllers tests rely on (garbage collector, namespace, service accounts, root CA publisher,
ClusterRole aggregation) with per-controller service-account credentials, as a real cluster
does; KWOK manages only nodes annotated ``kwok.x-k8s.io/node=fake``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from testbed.controlplane._pki import Pki

__all__ = [
    "CONTROLLERS",
    "FAKE_NODE_ANNOTATION",
    "apiserver_argv",
    "controller_manager_argv",
    "etcd_argv",
    "kwok_argv",
    "node_manifest",
    "scheduler_argv",
]

FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
    # Folds ClusterRoles labelled aggregate-to-view/edit/admin into the default roles.
    "clusterrole-aggregation-controller",
)


def etcd_argv(bin_dir: Path, work_dir: Path, ports: dict[str, int]) -> list[str]:
    """etcd: one member, data under ``work_dir/etcd``."""
    client = f"http://127.0.0.1:{ports['etcd']}"
    peer = f"http://127.0.0.1:{ports['etcd-peer']}"
    return [
        str(bin_dir / "etcd"),
        "--name=test",
        f"--data-dir={work_dir / 'etcd'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=test={peer}",
        "--unsafe-no-fsync",  # test data; durability across power loss is not needed
        "--log-level=warn",
    ]


def apiserver_argv(bin_dir: Path, work_dir: Path, ports: dict[str, int], pki: Pki) -> list[str]:
    """kube-apiserver: TLS from ``pki``, client certificates, RBAC, service-account tokens."""
    return [
        str(bin_dir / "kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={ports['apiserver']}",
        f"--cert-dir={work_dir / 'apiserver-certs'}",
        f"--tls-cert-file={pki.serving_cert}",
        f"--tls-private-key-file={pki.serving_key}",
        f"--client-ca-file={pki.ca_cert}",
        "--authorization-mode=RBAC",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        "--service-cluster-ip-range=10.0.0.0/24",
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        "--v=1",
    ]


def controller_manager_argv(
    bin_dir: Path, work_dir: Path, ports: dict[str, int], pki: Pki
) -> list[str]:
    """kube-controller-manager with only ``CONTROLLERS``; no leader election."""
    return [
        str(bin_dir / "kube-controller-manager"),
        f"--kubeconfig={work_dir / 'controller-manager.kubeconfig'}",
        f"--controllers={','.join(CONTROLLERS)}",
        f"--root-ca-file={pki.ca_cert}",
        "--leader-elect=false",
        # Each controller acts as its own ServiceAccount with its bootstrap ClusterRole; the
        # manager's own identity (system:kube-controller-manager) may do little else.
        "--use-service-account-credentials=true",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports['kcm']}",
        f"--cert-dir={work_dir / 'controller-manager-certs'}",
        "--concurrent-gc-syncs=5",
        "--profiling=false",
        "--v=1",
    ]


def scheduler_argv(
    bin_dir: Path, work_dir: Path, kubeconfig: Path, ports: dict[str, int]
) -> list[str]:
    """kube-scheduler as ``system:kube-scheduler`` (its bootstrap ClusterRole); no leader
    election; its health endpoint on a free loopback port."""
    return [
        str(bin_dir / "kube-scheduler"),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        # The API server has no front-proxy CA; looking it up only fills the log with errors.
        "--authentication-skip-lookup=true",
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports['scheduler']}",
        f"--cert-dir={work_dir / 'scheduler-certs'}",
        "--profiling=false",
        "--v=1",
    ]


def kwok_argv(bin_dir: Path, kubeconfig: Path, stages: Path, ports: dict[str, int]) -> list[str]:
    """KWOK's controller, playing the kubelet of every annotated fake node."""
    return [
        str(bin_dir / "kwok"),
        f"--kubeconfig={kubeconfig}",
        f"--config={stages}",
        f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
        "--node-ip=10.1.0.1",
        "--cidr=10.244.0.0/16",
        f"--server-address=127.0.0.1:{ports['kwok']}",
        "--node-lease-duration-seconds=0",
    ]


def node_manifest(name: str, zone: str) -> dict[str, Any]:
    """A fake node KWOK manages, with the hostname and zone labels topology code reads."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/zone": zone,
                "type": "kwok",
            },
        },
    }
