"""The chart's operator RBAC, rendered with the real helm: least privilege, no wildcards."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from testbed.operator_process import CHART, render_rbac
from tests.controlplane.fixtures import require_bin_dir

WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}


def rules(manifest: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    return [rule for d in docs if d["kind"] in ("ClusterRole", "Role") for rule in d["rules"]]


@pytest.mark.parametrize(
    "values",
    [
        {},
        {
            "watchNamespaces[0]": "team-a",
            "leaderElection.enabled": "false",
            "operator.replicas": "1",
        },
    ],
)
def test_rbac_is_least_privilege(values: dict[str, str]) -> None:
    helm = require_bin_dir() / "helm"
    manifest = render_rbac(helm, "rel", "ops", **values)
    granted = rules(manifest)
    assert granted
    for rule in granted:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert "secrets" not in rule["resources"], rule
        writes = set(rule["verbs"]) & WRITE_VERBS
        if writes:
            assert set(rule["resources"]) <= {
                "peerrecoveries",
                "peerrecoveries/status",
                "events",
                "leases",
            }, rule
            if "delete" in writes:  # finished records past the retention policy only
                assert rule["resources"] == ["peerrecoveries"], rule
            if "update" in writes:  # only the one Lease the replicas share
                assert rule["resourceNames"] == ["rel-peer-recovery-operator"], rule
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    lease_roles = [d for d in docs if d["kind"] == "Role"]
    if values.get("leaderElection.enabled") == "false":
        assert not lease_roles
        assert not any("leases" in r["resources"] for r in granted)
    else:  # namespaced to the release's namespace, never a ClusterRole
        assert [d["metadata"]["namespace"] for d in lease_roles] == ["ops"]
        assert all(
            "leases" not in r["resources"]
            for d in docs
            if d["kind"] == "ClusterRole"
            for r in d["rules"]
        )
    bound = {(d["kind"], d["metadata"].get("namespace")) for d in docs if "Binding" in d["kind"]}
    assert ("RoleBinding", "team-a") in bound or not values


def test_the_namespaced_rights_are_exactly_the_calls_the_operator_makes() -> None:
    helm = require_bin_dir() / "helm"
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules(render_rbac(helm, "rel", "ops")):
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                if resource not in ("nodes", "namespaces", "customresourcedefinitions"):
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == {
        ("coordination.k8s.io", "leases"): {"create", "get", "update"},
        ("", "pods"): {"get", "list", "watch"},
        ("kubeflow.org", "pytorchjobs"): {"get", "list", "watch"},
        ("peerrecovery.io", "peerrecoveries"): {"get", "list", "watch", "create", "delete"},
        ("peerrecovery.io", "peerrecoveries/status"): {"patch"},
        ("", "events"): {"create", "get", "patch"},  # Events aggregated into series
    }


def deployment(*values: str) -> dict[str, Any]:
    import subprocess

    helm = require_bin_dir() / "helm"
    argv = [str(helm), "template", "rel", str(CHART), "--namespace", "ops"]
    for value in values:
        argv += ["--set", value]
    argv += ["--show-only", "templates/operator-deployment.yaml"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    return dict(yaml.safe_load(out))


def test_deployment_is_two_replicas_electing_a_leader_spread_and_quick_off_lost_nodes() -> None:
    spec = deployment()["spec"]
    pod = spec["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert "--all-namespaces" in args
    assert {"--lease-namespace=ops", "--lease-name=rel-peer-recovery-operator"} <= set(args)
    assert "--identity=$(POD_NAME)" in args
    assert {t["key"]: t["tolerationSeconds"] for t in pod["tolerations"]} == {
        "node.kubernetes.io/not-ready": 30,
        "node.kubernetes.io/unreachable": 30,
    }
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_without_leader_election_it_is_one_replica_with_recreate_and_no_pdb() -> None:
    import subprocess

    spec = deployment("leaderElection.enabled=false", "operator.replicas=1")["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert not any(
        a.startswith("--lease") for a in spec["template"]["spec"]["containers"][0]["args"]
    )
    helm = require_bin_dir() / "helm"
    refused = subprocess.run(
        [str(helm), "template", "rel", str(CHART), "--set", "leaderElection.enabled=false"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "operator.replicas > 1 needs leaderElection.enabled=true" in refused.stderr
    single = subprocess.run(
        [str(helm), "template", "rel", str(CHART), "--set", "operator.replicas=1"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert "PodDisruptionBudget" not in single
    pdb = subprocess.run(
        [str(helm), "template", "rel", str(CHART), "--show-only", "templates/operator-pdb.yaml"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert yaml.safe_load(pdb)["spec"]["minAvailable"] == 1
