"""The chart's runtime Role, rendered with the real helm: exactly what the runtime needs, in
each training namespace, bound to the ServiceAccount the user names; and, on the control
plane, nothing more (``kubectl auth can-i`` as that account)."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from testbed.operator_process import CHART, CRD
from tests.cluster_e2e.support import RUNTIME_SA, render_runtime_rbac
from tests.controlplane.fixtures import require_bin_dir

EXPECTED = [
    {"apiGroups": ["peerrecovery.io"], "resources": ["peerrecoveries"],
     "verbs": ["get", "list", "watch", "create"]},
    {"apiGroups": ["peerrecovery.io"], "resources": ["peerrecoveries/status"], "verbs": ["patch"]},
]  # fmt: skip


def test_one_role_and_binding_per_namespace_with_exactly_the_runtime_rights() -> None:
    helm = require_bin_dir() / "helm"
    argv = [str(helm), "template", "rel", str(CHART), "--namespace", "ops",
            "--show-only", "templates/runtime-rbac.yaml",
            "--set", "runtime.serviceAccountName=trainer",
            "--set", "runtime.namespaces[0]=team-a", "--set", "runtime.namespaces[1]=team-b"]  # fmt: skip
    docs = [d for d in yaml.safe_load_all(subprocess.check_output(argv, text=True)) if d]
    roles = [d for d in docs if d["kind"] == "Role"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["rules"] == EXPECTED for r in roles)
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "trainer",
             "namespace": binding["metadata"]["namespace"]}
        ]  # fmt: skip
        assert binding["roleRef"]["kind"] == "Role"
    assert {d["kind"] for d in docs} == {"Role", "RoleBinding"}  # no ClusterRole


def test_no_namespaced_runtime_role_is_rendered_without_a_service_account() -> None:
    # By default the operator binds the runtime's ClusterRole in each namespace with an
    # opted-in job (docs/webhook.md): the chart renders that ClusterRole, with exactly the
    # runtime's rights, and no Role or RoleBinding of its own for the runtime.
    helm = require_bin_dir() / "helm"
    out = subprocess.check_output([str(helm), "template", "rel", str(CHART)], text=True)
    docs = [d for d in yaml.safe_load_all(out) if d]
    runtime = [d for d in docs if d["metadata"]["name"].endswith("-runtime")]
    assert [(d["kind"], d["metadata"]["name"]) for d in runtime] == [
        ("ClusterRole", "rel-peer-recovery-runtime")
    ]
    assert runtime[0]["rules"] == EXPECTED


@pytest.mark.cluster
def test_the_runtime_account_may_do_exactly_that(control_plane: Any, namespace: str) -> None:
    control_plane.kubectl("apply", "-f", str(CRD))
    control_plane.kubectl(
        "apply", "-f", "-",
        input=render_runtime_rbac(control_plane.bin_dir / "helm", "pr", namespace),
    )  # fmt: skip
    kubeconfig = control_plane.service_account_kubeconfig(namespace, RUNTIME_SA)

    def can(*what: str, ns: str = namespace) -> bool:
        result = control_plane.kubectl(
            "auth", "can-i", *what, "-n", ns, kubeconfig=kubeconfig, check=False
        )
        return result.stdout.strip() == "yes"

    for verb in ("get", "list", "watch", "create"):
        assert can(verb, "peerrecoveries.peerrecovery.io")
    assert can("patch", "peerrecoveries.peerrecovery.io", "--subresource=status")
    for verb in ("update", "patch", "delete"):
        assert not can(verb, "peerrecoveries.peerrecovery.io")
    assert not can("update", "peerrecoveries.peerrecovery.io", "--subresource=status")
    assert not can("get", "pods") and not can("get", "pytorchjobs.kubeflow.org")
    assert not can("create", "events") and not can("get", "secrets")
    assert not can("get", "peerrecoveries.peerrecovery.io", ns="default")
