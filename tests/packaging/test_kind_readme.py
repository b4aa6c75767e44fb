"""The chart on the test control plane, driven by manifests/kind/README.md: its helm and
kubectl lines (all but those marked ``# kind only``) run here in order, so the README's steps
are the ones tested. ``helm install`` creates the CRD, RBAC, ServiceAccount, Service and
Deployment; ``kubectl explain`` describes the spec; both example jobs pass ``peer-recovery
doctor`` and apply (the control plane has the test PyTorchJob CRD); ``helm uninstall``
removes what it installed and, as documented, leaves the CRD."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.packaging.chart_support import REPO

README = REPO / "manifests" / "kind" / "README.md"
EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml"))
RELEASE, NAMESPACE, TRAINING = "peer-recovery", "peer-recovery", "team-a"


def blocks() -> list[list[str]]:
    """The README's sh blocks, each a list of command lines (``# kind only`` ones dropped)."""
    found = re.findall(r"```sh\n(.*?)```", README.read_text(), re.DOTALL)
    return [
        [line.strip() for line in block.splitlines() if line.strip() and "# kind only" not in line]
        for block in found
    ]


def test_readme_steps_are_the_chart_commands() -> None:
    install, watch, cleanup = blocks()
    assert watch == []  # needs pods that run: kind only
    assert any(line.startswith(f"helm install {RELEASE} charts/peer-recovery") for line in install)
    assert f"helm uninstall {RELEASE} --namespace {NAMESPACE}" in cleanup
    for line in install + cleanup:
        assert line.split()[0] in ("helm", "kubectl", "peer-recovery"), line


class Shell:
    def __init__(self, control_plane: Any) -> None:
        path = f"{control_plane.bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
        self.env = {**os.environ, "PATH": path, "KUBECONFIG": str(control_plane.kubeconfig)}

    def __call__(self, line: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["bash", "-c", line], cwd=REPO, env=self.env, capture_output=True,
                                text=True, timeout=120, check=False)  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"{line}\nexit {result.returncode}\n{result.stdout}{result.stderr}"
            )
        return result

    def objects(self, line: str) -> list[dict[str, Any]]:
        return yaml.safe_load(self(line + " -o yaml").stdout)["items"]


@pytest.mark.cluster
def test_readme_install_examples_and_uninstall(control_plane: Any) -> None:
    sh = Shell(control_plane)
    install, _, cleanup = blocks()
    try:
        outputs = {line: sh(line) for line in install}
        notes = next(r.stdout for line, r in outputs.items() if line.startswith("helm install"))
        assert "Next steps" in notes and "kubectl get peerrecoveries" in notes
        explain = outputs["kubectl explain peerrecovery.spec"].stdout
        for field in ("jobName", "target", "source", "mode", "reason", "attempt", "plannedBy"):
            assert re.search(rf"^\s+{field}\s+<\w+>", explain, re.MULTILINE), field
        assert "DESCRIPTION" in explain and len(explain.split()) > 80

        selector = f"-l app.kubernetes.io/instance={RELEASE}"
        (deployment,) = sh.objects(f"kubectl -n {NAMESPACE} get deployments {selector}")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        version = yaml.safe_load((REPO / "charts/peer-recovery/Chart.yaml").read_text())
        # The name `make images` tags and kind loads: the chart's default for its appVersion.
        assert container["image"] == f"ghcr.io/peer-recovery/operator:{version['appVersion']}"
        assert container["imagePullPolicy"] == "Never"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert len(sh.objects(f"kubectl -n {NAMESPACE} get serviceaccounts {selector}")) == 1
        # metrics and the webhook
        assert len(sh.objects(f"kubectl -n {NAMESPACE} get services {selector}")) == 2
        # operator, operator-cluster, operator-webhook, operator-access, runtime; + view, edit
        assert len(sh.objects(f"kubectl get clusterroles {selector}")) == 7
        assert len(sh.objects(f"kubectl get clusterrolebindings {selector}")) == 4
        # No per-namespace setup: the operator binds the runtime's rights where a job opts
        # in (tests/operator/test_webhook_cluster.py runs that part).
        assert sh.objects(f"kubectl -n {TRAINING} get roles {selector}") == []
        sh("kubectl get crd peerrecoveries.peerrecovery.io")
        assert sh(f"kubectl -n {TRAINING} get pytorchjob ddp -o name").stdout.strip()

        for example in EXAMPLES:  # the HSDP example too: doctor, then apply
            doctor = sh(f"peer-recovery doctor --pod-yaml {example}")
            assert "all checks passed" in doctor.stdout
            applied = sh(f"kubectl create namespace {TRAINING} --dry-run=client -o yaml"
                         f" | kubectl apply -f - && kubectl apply -f {example}")  # fmt: skip
            assert "pytorchjob.kubeflow.org/" in applied.stdout
        jobs = sh.objects(f"kubectl -n {TRAINING} get pytorchjobs")
        assert sorted(j["metadata"]["name"] for j in jobs) == ["ddp", "hsdp"]
        assert all(j["metadata"]["annotations"]["peer-recovery"] == "enabled" for j in jobs)
        sh(f"kubectl -n {TRAINING} delete pytorchjob hsdp")

        for line in cleanup:
            sh(line)
        assert sh(f"helm status {RELEASE} -n {NAMESPACE}", check=False).returncode != 0
        for kind in ("deployments", "serviceaccounts", "services"):
            assert sh.objects(f"kubectl -n {NAMESPACE} get {kind} {selector}") == [], kind
        assert sh.objects(f"kubectl get clusterroles,clusterrolebindings {selector}") == []
        # Helm never deletes CRDs: the CRD, and what it holds, stay until deleted by hand.
        sh("kubectl get crd peerrecoveries.peerrecovery.io")
    finally:
        sh(f"helm uninstall {RELEASE} --namespace {NAMESPACE} --ignore-not-found", check=False)
        sh(f"kubectl delete namespace {TRAINING} {NAMESPACE} --ignore-not-found --wait=false",
           check=False)  # fmt: skip
