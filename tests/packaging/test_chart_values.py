"""The chart's conventional values, rendered by the real helm: the image block (tag from the
chart's appVersion unless set, digest pinning), name overrides, pull secrets as objects,
affinity, tolerations, pod annotations and extra arguments; the view/edit ClusterRoles
aggregated into Kubernetes' default roles, and (on the test control plane) that namespace
users bound to ``view`` and ``edit`` really get those rights; NOTES that paste."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from peer_recovery_operator.cli import build_parser
from tests.controlplane.fixtures import require_bin_dir
from tests.packaging.chart_support import CHART, by_kind, helm, metrics_service, one, render

APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    return require_bin_dir()


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return found


@pytest.mark.parametrize(
    ("sets", "image"),
    [
        ((), f"ghcr.io/peer-recovery/operator:{APP_VERSION}"),
        (("operator.image.tag=0.2.0-rc.1",), "ghcr.io/peer-recovery/operator:0.2.0-rc.1"),
        (("operator.image.repository=localhost:5000/pr", f"operator.image.digest={DIGEST}"),
         f"localhost:5000/pr:{APP_VERSION}@{DIGEST}"),
    ],
)  # fmt: skip
def test_image_reference(bin_dir: Path, sets: tuple[str, ...], image: str) -> None:
    objects = render(bin_dir, *sets, "operator.image.pullPolicy=Never")
    assert container(objects)["image"] == image
    assert container(objects)["imagePullPolicy"] == "Never"


def test_name_overrides(bin_dir: Path) -> None:
    named = render(bin_dir, "nameOverride=pr")
    deployment = one(named, "Deployment")
    assert deployment["metadata"]["name"] == "rel-pr-operator"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "pr", "app.kubernetes.io/instance": "rel"}
    assert metrics_service(named)["spec"]["selector"] == selector

    full = render(bin_dir, "fullnameOverride=recovery", "runtime.serviceAccountName=trainer")
    names = {(o["kind"], o["metadata"]["name"]) for o in full}
    assert ("Deployment", "recovery-operator") in names
    assert ("ServiceAccount", "recovery") in names
    assert ("Role", "recovery-runtime") in names
    assert {("ClusterRole", "recovery-view"), ("ClusterRole", "recovery-edit")} <= names
    assert all(name.startswith("recovery") for _, name in names), names
    bindings = by_kind(full, "ClusterRoleBinding")
    assert {b["subjects"][0]["name"] for b in bindings} == {"recovery"}


def test_pod_placement_annotations_and_extra_args(bin_dir: Path) -> None:
    objects = render(
        bin_dir,
        "operator.imagePullSecrets[0].name=regcred",
        "operator.imagePullSecrets[1].name=mirror",
        "operator.podAnnotations.example\\.com/team=ml",
        "operator.tolerations[0].key=dedicated",
        "operator.tolerations[0].operator=Exists",
        "operator.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].key=pool",
        "operator.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
        "operator.extraArgs={--max-attempts=5,--log-format=plain}",
    )
    template = one(objects, "Deployment")["spec"]["template"]
    pod = template["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    assert template["metadata"]["annotations"] == {"example.com/team": "ml"}
    assert pod["tolerations"][-1] == {"key": "dedicated", "operator": "Exists"}  # after the
    # chart's own two (not-ready, unreachable: 30 s)
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"] == [
        {"key": "pool", "operator": "Exists"}
    ]
    args = container(objects)["args"]
    assert args[-2:] == ["--max-attempts=5", "--log-format=plain"]
    # After the chart's own, so the operator's parser keeps the extra value.
    parsed = build_parser().parse_args(args)
    assert parsed.max_attempts == 5 and parsed.log_format == "plain"
    plain = one(render(bin_dir), "Deployment")["spec"]["template"]
    assert "annotations" not in plain["metadata"]
    assert "imagePullSecrets" not in plain["spec"]
    # by default: only the node-loss tolerations, and replicas preferring different nodes
    assert len(plain["spec"]["tolerations"]) == 2
    assert list(plain["spec"]["affinity"]) == ["podAntiAffinity"]


def test_aggregated_roles_read_for_view_delete_for_edit(bin_dir: Path) -> None:
    roles = {r["metadata"]["name"]: r for r in by_kind(render(bin_dir), "ClusterRole")}
    view, edit = roles["rel-peer-recovery-view"], roles["rel-peer-recovery-edit"]
    prefix = "rbac.authorization.k8s.io/aggregate-to-"
    assert {k for k, v in view["metadata"]["labels"].items() if k.startswith(prefix)} == {
        prefix + "view",
        prefix + "edit",
        prefix + "admin",
    }
    assert {k for k, v in edit["metadata"]["labels"].items() if k.startswith(prefix)} == {
        prefix + "edit",
        prefix + "admin",
    }
    assert view["rules"] == [{"apiGroups": ["peerrecovery.io"],
                              "resources": ["peerrecoveries", "peerrecoveries/status"],
                              "verbs": ["get", "list", "watch"]}]  # fmt: skip
    assert edit["rules"] == [{"apiGroups": ["peerrecovery.io"], "resources": ["peerrecoveries"],
                              "verbs": ["delete", "deletecollection"]}]  # fmt: skip
    off = render(bin_dir, "rbac.aggregateToDefaultRoles=false")
    assert {r["metadata"]["name"] for r in by_kind(off, "ClusterRole")} == {
        "rel-peer-recovery-operator", "rel-peer-recovery-operator-cluster",
        "rel-peer-recovery-operator-webhook", "rel-peer-recovery-operator-access",
        "rel-peer-recovery-runtime",
    }  # fmt: skip


def notes(control_plane: Any, *sets: str) -> str:
    """NOTES as ``helm install`` prints them (a client-side dry run: nothing is installed;
    Helm still asks the API server for its version)."""
    argv = ["install", "rel", str(CHART), "--dry-run=client", "--namespace", "ops",
            "--kubeconfig", str(control_plane.kubeconfig)]  # fmt: skip
    for s in sets:
        argv += ["--set", s]
    out = helm(control_plane.bin_dir, *argv).stdout
    return out.split("NOTES:\n", 1)[1]


@pytest.mark.cluster
def test_notes_commands_paste_one_per_line(control_plane: Any) -> None:
    """Each command in NOTES is a line of its own: none chains a command that never returns
    (a port-forward) in front of another, and the metrics are read in one command."""
    text = notes(control_plane, "runtime.serviceAccountName=trainer", "runtime.namespaces={team-a}")
    commands = [line.strip() for line in text.splitlines()
                if re.match(r"^\s+(kubectl|curl|helm|peer-recovery)\b", line)]  # fmt: skip
    assert any("port-forward" in c for c in commands)
    for command in commands:
        if "port-forward" in command or "rollout status" in command:
            assert not re.search(r"&&|;|\|", command), command
    raw = [c for c in commands if c.startswith("kubectl get --raw")]
    assert raw == [
        "kubectl get --raw /api/v1/namespaces/ops/services/rel-peer-recovery-metrics:metrics"
        "/proxy/metrics"
    ]
    assert "kubectl -n <namespace> create serviceaccount trainer" in commands
    assert "team-a" in text
    assert "get --raw" not in notes(control_plane, "metrics.service.enabled=false")


@pytest.mark.cluster
def test_namespace_users_see_peerrecoveries_through_default_roles(
    control_plane: Any, namespace: str
) -> None:
    """Installed for real: a user bound to ``view`` in a namespace may read PeerRecoveries but
    not delete them; one bound to ``edit`` may delete them; neither may create them or write
    their status (the operator's and the runtime's job). The roles reach the users through
    the controller manager's ClusterRole aggregation, as on any cluster."""
    from testbed.controlplane._support import poll

    release = f"agg-{uuid.uuid4().hex[:6]}"
    kubectl = control_plane.kubectl
    installed = helm(control_plane.bin_dir, "install", release, str(CHART), "--namespace",
                     namespace, "--kubeconfig", str(control_plane.kubeconfig), "--set",
                     f"watchNamespaces={{{namespace}}}", check=False)  # fmt: skip
    try:
        assert installed.returncode == 0, installed.stderr
        # The metrics line of NOTES names a Service and port the API server finds (no pod
        # runs here, so it answers that the Service has no endpoints, not that it is absent).
        (raw,) = re.findall(r"kubectl get --raw (\S+)", installed.stdout)
        proxied = kubectl("get", "--raw", raw, check=False)
        assert proxied.returncode != 0 and "not found" not in proxied.stderr, proxied.stderr
        assert "endpoints" in proxied.stderr, proxied.stderr
        for user, role in (("alice", "view"), ("bob", "edit")):
            kubectl("-n", namespace, "create", "rolebinding", f"{user}-{role}",
                    f"--clusterrole={role}", f"--user={user}")  # fmt: skip

        def can(user: str, verb: str, resource: str = "peerrecoveries.peerrecovery.io") -> bool:
            answer = kubectl("auth", "can-i", verb, resource, "-n", namespace, "--as", user,
                             check=False).stdout.strip()  # fmt: skip
            return answer == "yes"

        poll("view aggregated", lambda: can("alice", "list"), timeout=60)
        poll("edit aggregated", lambda: can("bob", "delete"), timeout=60)
        assert can("alice", "get") and can("alice", "watch") and can("bob", "list")
        assert not can("alice", "delete")
        for user in ("alice", "bob"):
            assert not can(user, "create")
            assert not can(user, "patch", "peerrecoveries.peerrecovery.io/status")
    finally:
        helm(control_plane.bin_dir, "uninstall", release, "--namespace", namespace,
             "--kubeconfig", str(control_plane.kubeconfig), "--ignore-not-found",
             check=False)  # fmt: skip
    gone = kubectl("get", "clusterroles", "-l", f"app.kubernetes.io/instance={release}", "-o",
                   "name").stdout  # fmt: skip
    assert gone.strip() == ""
