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
    "values", [{}, {"watchNamespaces[0]": "team-a", "peering.enabled": "true"}]
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
                "kopfpeerings",
                "clusterkopfpeerings",
            }, rule
            if "delete" in writes:  # finished records past the retention policy only
                assert rule["resources"] == ["peerrecoveries"], rule
    kinds = [d["kind"] for d in yaml.safe_load_all(manifest) if d]
    peering = any(
        "kopfpeerings" in r["resources"] or "clusterkopfpeerings" in r["resources"] for r in granted
    )
    assert peering == bool(values.get("peering.enabled"))
    assert ("RoleBinding" in kinds) == bool(values)


def test_the_namespaced_rights_are_exactly_the_calls_the_operator_makes() -> None:
    helm = require_bin_dir() / "helm"
    granted = {
        (group, resource): set(rule["verbs"])
        for rule in rules(render_rbac(helm, "rel", "ops"))
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        if resource not in ("nodes", "namespaces", "customresourcedefinitions")
    }
    assert granted == {
        ("", "pods"): {"get", "list", "watch"},
        ("kubeflow.org", "pytorchjobs"): {"get", "list", "watch"},
        ("peerrecovery.io", "peerrecoveries"): {"get", "list", "watch", "create", "delete"},
        ("peerrecovery.io", "peerrecoveries/status"): {"patch"},
        ("", "events"): {"create", "get", "patch"},  # Events aggregated into series
    }


def test_deployment_is_one_replica_with_recreate() -> None:
    import subprocess

    helm = require_bin_dir() / "helm"
    out = subprocess.run(
        [str(helm), "template", "rel", str(CHART), "--show-only", "templates/operator-deployment.yaml"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    deployment = yaml.safe_load(out)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--all-namespaces" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
