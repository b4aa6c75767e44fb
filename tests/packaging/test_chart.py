"""The chart with the real helm, no cluster: lint, what it renders with default and other
values (checked as objects, not text), values the schema refuses (each message names the
value), and manifests/install.yaml kept in step with the chart."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from peer_recovery_operator.cli import build_parser
from peer_recovery_operator.config import from_sources
from tests.controlplane.fixtures import require_bin_dir
from tests.packaging.chart_support import (
    CHART,
    REPO,
    by_kind,
    helm,
    metrics_service,
    one,
    render,
)


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    return require_bin_dir()


def test_lint_strict(bin_dir: Path) -> None:
    result = helm(bin_dir, "lint", "--strict", str(CHART), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_values_are_all_documented_and_the_schema_is_closed() -> None:
    """Every leaf key of values.yaml has a comment starting with its dotted key; every
    object in the schema refuses unknown keys (maps of labels say what their values are)."""
    text = (CHART / "values.yaml").read_text()

    def leaves(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict) and node and prefix.rstrip(".") != "operator.resources":
            return [k for key, v in node.items() for k in leaves(v, f"{prefix}{key}.")]
        return [prefix.rstrip(".")]

    for key in leaves(yaml.safe_load(text), ""):
        assert f"# {key} -- " in text, f"values.yaml: {key} has no comment starting with its key"
    schema = json.loads((CHART / "values.schema.json").read_text())

    def closed(node: dict[str, Any], where: str) -> None:
        if node.get("type") == "object" or "properties" in node:
            assert "additionalProperties" in node, f"{where} accepts unknown keys"
            assert (
                node["additionalProperties"] is False
                or where.endswith(("nodeSelector", "labels", "global"))
                or "type" in node["additionalProperties"]
            ), where
        for key, child in node.get("properties", {}).items():
            closed(child, f"{where}.{key}")
        if isinstance(node.get("items"), dict):
            closed(node["items"], f"{where}[]")

    schema["properties"]["global"]["additionalProperties"] = True  # Helm's own, left open
    closed(schema, "values")


def test_default_values_render_a_locked_down_operator(bin_dir: Path) -> None:
    objects = render(bin_dir)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ClusterRole"] * 7 + ["ClusterRoleBinding"] * 4 + [
        "Deployment", "MutatingWebhookConfiguration", "PodDisruptionBudget", "Role",
        "RoleBinding", "Service", "Service", "ServiceAccount"]  # fmt: skip
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    selector = spec["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "peer-recovery",
                        "app.kubernetes.io/instance": "rel"}  # fmt: skip
    assert "app.kubernetes.io/version" in deployment["metadata"]["labels"]
    assert spec["template"]["metadata"]["labels"] == selector
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532,
                                      "runAsGroup": 65532,
                                      "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"liveness": 8080, "metrics": 9090, "webhook": 9443}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    args = container["args"]
    assert "--all-namespaces" in args
    assert "--liveness=http://0.0.0.0:8080/healthz" in args
    assert "--metrics-address=0.0.0.0:9090" in args
    service = metrics_service(objects)
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    for o in objects:
        if o["kind"] in ("Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"):
            assert o["metadata"]["namespace"] == "ops", o["kind"]


def test_other_values_render_what_they_say(bin_dir: Path) -> None:
    objects = render(
        bin_dir,
        "watchNamespaces={team-a,team-b}",
        "serviceAccount.name=pr-operator",
        "operator.runAsUser=null",
        "operator.nodeSelector.pool=system",
        "operator.imagePullSecrets[0].name=regcred",
        "operator.image.repository=registry.example.com/pr",
        "operator.image.tag=dev",
        "operator.metricsPort=9100",
        "metrics.service.port=8443",
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.labels.release=prom",
        "runtime.serviceAccountName=trainer",
        "runtime.namespaces={team-a}",
        "operator.keepFinished=2",
        "operator.finishedTTL=3600",
    )
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "--keep-finished=2" in container["args"] and "--finished-ttl=3600" in container["args"]
    assert container["image"] == "registry.example.com/pr:dev"
    assert "--namespace=team-a" in container["args"] and "--namespace=team-b" in container["args"]
    assert "--all-namespaces" not in container["args"]
    assert "--metrics-address=0.0.0.0:9100" in container["args"]
    assert pod["serviceAccountName"] == "pr-operator"
    assert "runAsUser" not in pod["securityContext"]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    bindings = {
        (b["metadata"]["namespace"], b["roleRef"]["kind"]) for b in by_kind(objects, "RoleBinding")
    }
    lease = ("ops", "Role")  # the leader-election Lease, in the release's namespace
    assert bindings == {
        ("team-a", "ClusterRole"),
        ("team-b", "ClusterRole"),
        ("team-a", "Role"),
        lease,
    }
    # nodes/CRDs, and the webhook's cluster-scoped rights (docs/webhook.md)
    assert len(by_kind(objects, "ClusterRoleBinding")) == 2
    roles = {r["metadata"]["name"]: r["metadata"]["namespace"] for r in by_kind(objects, "Role")}
    assert sorted(roles.values()) == ["ops", "team-a"]
    assert metrics_service(objects)["spec"]["ports"][0]["port"] == 8443
    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= metrics_service(objects)["metadata"]["labels"].items()


def test_switches_turn_objects_off(bin_dir: Path) -> None:
    objects = render(
        bin_dir, "rbac.create=false", "serviceAccount.create=false",
        "serviceAccount.name=existing", "metrics.service.enabled=false", "webhook.enabled=false",
        "runtime.namespaceAccess.enabled=false",
    )  # fmt: skip
    assert [o["kind"] for o in objects] == ["PodDisruptionBudget", "Deployment"]
    args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if a.startswith(("--webhook", "--runtime"))]
    assert (
        one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("operator.maxAttempts=0", "at '/operator/maxAttempts': minimum: got 0, want 1"),
        ("operator.logFormat=xml", "at '/operator/logFormat'"),
        ("operator.replicas=0", "at '/operator/replicas': minimum: got 0, want 1"),
        ("operator.replica=2", "at '/operator': additional properties 'replica' not allowed"),
        ("leaderElection.leaseDuration=0", "at '/leaderElection/leaseDuration'"),
        ("watchNamespace=team-a", "additional properties 'watchNamespace' not allowed"),
        ("watchNamespaces={Team_A}", "at '/watchNamespaces/0'"),
        ("operator.metricsPort=70000", "at '/operator/metricsPort'"),
        ("operator.planDeadline=0", "at '/operator/planDeadline'"),
        ("operator.keepFinished=0", "at '/operator/keepFinished': minimum: got 0, want 1"),
        ("operator.finishedTTL=0", "at '/operator/finishedTTL'"),
        ("rbac.create=yes", "at '/rbac/create'"),
        ("operator.image=registry.example.com/pr:dev", "at '/operator/image'"),
        ("operator.image.repository=ghcr.io/x/op:1.0", "at '/operator/image/repository'"),
        ("operator.image.digest=latest", "at '/operator/image/digest'"),
        ("operator.imagePullSecrets={regcred}", "at '/operator/imagePullSecrets/0'"),
        ("operator.extraArgs={verbose}", "at '/operator/extraArgs/0'"),
        ("operator.affinity.nodeAfinity.x=y", "additional properties 'nodeAfinity' not allowed"),
        ("nameOverride=Peer_Recovery", "at '/nameOverride'"),
        ("metrics.serviceMonitor.interval=soon", "at '/metrics/serviceMonitor/interval'"),
        ("operator.resources.limits.memory=lots", "at '/operator/resources/limits/memory'"),
    ],
)
def test_bad_values_are_refused_naming_the_value(bin_dir: Path, value: str, message: str) -> None:
    result = helm(bin_dir, "template", "rel", str(CHART), "--set", value, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_service_monitor_without_the_service_is_refused(bin_dir: Path) -> None:
    result = helm(bin_dir, "template", "rel", str(CHART), "--set",
                  "metrics.serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false",
                  check=False)  # fmt: skip
    assert result.returncode != 0 and "needs metrics.service.enabled" in result.stderr


def test_install_manifest_is_the_chart_rendered_with_defaults(bin_dir: Path) -> None:
    fresh = subprocess.run(
        [str(REPO / "manifests" / "render.sh"), "-"], capture_output=True, text=True,
        env={"HELM": str(bin_dir / "helm"), "PATH": "/usr/bin:/bin"}, timeout=120, check=True,
    ).stdout  # fmt: skip
    committed = (REPO / "manifests" / "install.yaml").read_text()
    assert committed == fresh, "manifests/install.yaml is stale: run `make manifests`"
    objects = [d for d in yaml.safe_load_all(committed) if d]
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "CustomResourceDefinition", "Deployment", "ClusterRole"} <= kinds
    namespaced = [o for o in objects if o["kind"] in ("Deployment", "Service", "ServiceAccount")]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"peer-recovery"}


def test_webhook_configuration_rbac_and_certificate_options(bin_dir: Path) -> None:
    objects = render(bin_dir, "watchNamespaces={team-a}")
    (config,) = by_kind(objects, "MutatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    assert hook["failurePolicy"] == "Ignore" and hook["sideEffects"] == "NoneOnDryRun"
    assert hook["clientConfig"]["service"]["name"] == "rel-peer-recovery-webhook"
    assert hook["clientConfig"]["service"]["path"] == "/mutate-pods"
    assert hook["rules"][0]["operations"] == ["CREATE"] and hook["rules"][0]["resources"] == [
        "pods"
    ]
    assert hook["objectSelector"]["matchExpressions"][0]["key"] == "training.kubeflow.org/job-name"
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a"]
    args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--webhook-address=0.0.0.0:9443" in args
    assert "--webhook-config-name=rel-peer-recovery" in args
    assert "--webhook-hosts=rel-peer-recovery-webhook.ops.svc" in args
    assert "--runtime-service-account=peer-recovery-runtime" in args
    assert "--runtime-cluster-role=rel-peer-recovery-runtime" in args
    roles = {r["metadata"]["name"]: r for r in by_kind(objects, "ClusterRole")}
    rules = roles["rel-peer-recovery-operator-webhook"]["rules"] + roles[
        "rel-peer-recovery-operator-access"]["rules"]  # fmt: skip
    # The access rights are bound in the watched namespaces only.
    access = [b for b in by_kind(objects, "RoleBinding")
              if b["roleRef"]["name"] == "rel-peer-recovery-operator-access"]  # fmt: skip
    assert [b["metadata"]["namespace"] for b in access] == ["team-a"]
    # The operator may bind the runtime ClusterRole and no other, and touch one configuration.
    assert {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
            "resourceNames": ["rel-peer-recovery-runtime"], "verbs": ["bind"]} in rules  # fmt: skip
    assert {"apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": ["rel-peer-recovery"], "verbs": ["get", "patch"]} in rules  # fmt: skip
    for rule in rules:
        assert "*" not in rule["verbs"] and "escalate" not in rule["verbs"], rule
        if "delete" in rule["verbs"]:
            assert rule["resourceNames"] == ["peer-recovery-runtime"], rule
    assert (
        roles["rel-peer-recovery-runtime"]["rules"]
        == one(
            render(
                bin_dir,
                "runtime.serviceAccountName=t",
                "leaderElection.enabled=false",
                "operator.replicas=1",
            ),
            "Role",
        )["rules"]
    )

    # The operator accepts the flags the chart gives it, with and without cert-manager.
    from_sources(vars(build_parser().parse_args(args)), env={})

    managed = render(bin_dir, "webhook.certManager.enabled=true")
    (config,) = by_kind(managed, "MutatingWebhookConfiguration")
    assert config["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": "ops/rel-peer-recovery-webhook"
    }
    assert one(managed, "Certificate")["spec"]["dnsNames"][0] == "rel-peer-recovery-webhook.ops.svc"
    assert one(managed, "Issuer")["spec"] == {"selfSigned": {}}
    pod = one(managed, "Deployment")["spec"]["template"]["spec"]
    assert "--webhook-cert-dir=/webhook-tls" in pod["containers"][0]["args"]
    from_sources(vars(build_parser().parse_args(pod["containers"][0]["args"])), env={})
    assert {
        "name": "webhook-tls",
        "secret": {"secretName": "rel-peer-recovery-webhook-tls"},
    } in pod["volumes"]
    rules = {r["metadata"]["name"]: r for r in by_kind(managed, "ClusterRole")}
    assert "rel-peer-recovery-operator-webhook" not in rules  # cert-manager injects the CA
    assert "rel-peer-recovery-operator-access" in rules
    issuer = render(bin_dir, "webhook.certManager.enabled=true",
                    "webhook.certManager.issuerRef.kind=ClusterIssuer",
                    "webhook.certManager.issuerRef.name=corp")  # fmt: skip
    assert by_kind(issuer, "Issuer") == []
    assert one(issuer, "Certificate")["spec"]["issuerRef"] == {
        "kind": "ClusterIssuer",
        "name": "corp",
    }
