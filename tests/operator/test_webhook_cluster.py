"""The mutating webhook on the real control plane: the kube-apiserver calls the operator's
webhook at 127.0.0.1 over TLS (the operator's self-signed CA, written into the
configuration's caBundle by the operator itself, under the chart's RBAC).

Pods are created the way the training-operator creates them (testbed's pytorchjob
helpers); the API server runs the webhook on each create.
"""

from __future__ import annotations

import base64
import copy
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from peer_recovery.contract import names
from testbed.controlplane import pytorchjob as pj
from testbed.operator_process import CHART, REPO, OperatorProcess, free_port, wait_for

pytestmark = pytest.mark.cluster

ENABLED = {names.ANNOTATION_ENABLED: names.ANNOTATION_ENABLED_VALUE}
RUNTIME_SA = "peer-recovery-runtime"
TEMPLATES = (
    "templates/operator-rbac.yaml",
    "templates/operator-serviceaccount.yaml",
    "templates/webhook-rbac.yaml",
)
IDENTITY = ("POD_NAME", "POD_UID", "POD_NAMESPACE", "NODE_NAME")


class Webhook:
    """The operator with its webhook, and the MutatingWebhookConfiguration pointing at it."""

    def __init__(self, plane: Any, namespace: str, tmp_path: Path) -> None:
        self.plane, self.namespace = plane, namespace
        self.release = f"pr-{uuid.uuid4().hex[:8]}"
        self.fullname = f"{self.release}-peer-recovery"
        self.port = free_port()
        argv = [str(plane.bin_dir / "helm"), "template", self.release, str(CHART),
                "--namespace", namespace, "--set", f"watchNamespaces[0]={namespace}"]  # fmt: skip
        for template in TEMPLATES:
            argv += ["--show-only", template]
        self.rbac = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        self.operator = OperatorProcess(
            plane.service_account_kubeconfig(namespace, self.fullname),
            namespace,
            tmp_path / "operator.log",
            "--webhook-address", f"127.0.0.1:{self.port}",
            "--webhook-hosts", "127.0.0.1",
            "--webhook-config-name", self.fullname,
            "--runtime-service-account", RUNTIME_SA,
            "--runtime-cluster-role", f"{self.fullname}-runtime",
        )  # fmt: skip

    def configuration(self, port: int) -> dict[str, Any]:
        """As the chart's templates/webhook.yaml, but reached by URL on loopback."""
        return {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": self.fullname},
            "webhooks": [
                {
                    "name": "pods.peerrecovery.io",
                    "admissionReviewVersions": ["v1"],
                    "failurePolicy": "Ignore",
                    "sideEffects": "NoneOnDryRun",
                    "timeoutSeconds": 5,
                    "clientConfig": {"url": f"https://127.0.0.1:{port}/mutate-pods"},
                    "rules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["pods"],
                        }
                    ],
                    "objectSelector": {
                        "matchExpressions": [{"key": names.LABEL_JOB_NAME, "operator": "Exists"}]
                    },
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": self.namespace}
                    },
                }
            ],
        }

    def __enter__(self) -> Webhook:
        self.plane.kubectl("apply", "-f", "-", input=self.rbac)
        self.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(self.configuration(self.port)))
        self.operator.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.operator.stop()
        # A generous limit: on a loaded machine kubectl alone can take most of a minute.
        self.plane.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-",
                           input=self.rbac, check=False, timeout=300)  # fmt: skip
        self.plane.kubectl("delete", "--ignore-not-found", "--wait=false",
                           "mutatingwebhookconfiguration", self.fullname, check=False,
                           timeout=300)  # fmt: skip
        print(self.operator.log()[-6000:])

    def point_at(self, port: int) -> None:
        """Re-point the configuration (keeping the operator's caBundle)."""
        patch = [{"op": "replace", "path": "/webhooks/0/clientConfig/url",
                  "value": f"https://127.0.0.1:{port}/mutate-pods"}]  # fmt: skip
        self.plane.kubectl("patch", "mutatingwebhookconfiguration", self.fullname,
                           "--type=json", "-p", yaml.safe_dump(patch))  # fmt: skip


@pytest.fixture
def webhook(control_plane: Any, namespace: str, crd: None, tmp_path: Path) -> Iterator[Webhook]:
    with Webhook(control_plane, namespace, tmp_path) as hook:
        yield hook


def probe(client: Any, namespace: str, job: dict[str, Any]) -> dict[str, Any]:
    """A dry-run create of one of ``job``'s pods: what the API server would store."""
    from kubernetes.client import CoreV1Api

    manifest = pj._pod_manifest(job, "Master", 0, 0, 1, "nowhere")
    manifest["metadata"]["name"] = f"probe-{uuid.uuid4().hex[:6]}"
    created = CoreV1Api(client).create_namespaced_pod(namespace, manifest, dry_run="All")
    return dict(client.sanitize_for_serialization(created))


def mutated(pod: dict[str, Any]) -> bool:
    return names.ANNOTATION_MUTATED in (pod["metadata"].get("annotations") or {})


def wait_webhook_answers(client: Any, namespace: str, job: dict[str, Any], up: bool) -> None:
    """Probe with dry runs until the webhook is up (or down). A dry run makes no account
    (sideEffects NoneOnDryRun), so first wait for the one the job's watch event makes."""
    from kubernetes.client import CoreV1Api

    core = CoreV1Api(client)
    wait_for("the runtime's ServiceAccount", lambda: exists(
        core.read_namespaced_service_account, RUNTIME_SA, namespace), timeout=60)  # fmt: skip
    wait_for(
        f"the webhook to be {'up' if up else 'down'}",
        lambda: mutated(probe(client, namespace, job)) == up,
        timeout=60,
    )


def env_names(pod: dict[str, Any]) -> dict[str, Any]:
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "pytorch")
    return {e["name"]: e for e in container.get("env") or ()}


def shm_volume(pod: dict[str, Any]) -> dict[str, Any] | None:
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "pytorch")
    mount = next(
        (m for m in container.get("volumeMounts") or () if m["mountPath"] == "/dev/shm"), None
    )
    if mount is None:
        return None
    return next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])


def exists(read: Any, *args: Any) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        read(*args)
        return True
    except ApiException as error:
        if error.status == 404:
            return False
        raise


def test_opted_in_pods_come_out_complete_others_untouched_users_settings_kept(
    control_plane: Any, namespace: str, webhook: Webhook, client: Any
) -> None:
    from kubernetes.client import AdmissionregistrationV1Api, CoreV1Api, RbacAuthorizationV1Api

    core, rbac = CoreV1Api(client), RbacAuthorizationV1Api(client)
    # The operator wrote its CA into the configuration's caBundle (it started with none).
    config = AdmissionregistrationV1Api(client).read_mutating_webhook_configuration(
        webhook.fullname
    )
    assert b"BEGIN CERTIFICATE" in base64.b64decode(config.webhooks[0].client_config.ca_bundle)

    annotations = {**ENABLED, names.ANNOTATION_PODS_PER_REPLICA: "2"}
    limits = {"containers": [{"name": "pytorch", "image": pj.DEFAULT_IMAGE,
                              "resources": {"limits": {"memory": "4Gi"}}}]}  # fmt: skip
    job = pj.create_job(client, namespace, "a", workers=3, annotations=annotations,
                        pod_spec_overrides=limits, pods=False)  # fmt: skip
    # The job's watch event makes the runtime's account and its binding in the namespace.
    wait_for("the runtime's ServiceAccount", lambda: exists(
        core.read_namespaced_service_account, RUNTIME_SA, namespace), timeout=60)  # fmt: skip
    binding = rbac.read_namespaced_role_binding(RUNTIME_SA, namespace)
    assert binding.role_ref.kind == "ClusterRole"
    assert binding.role_ref.name == f"{webhook.fullname}-runtime"
    assert [(s.kind, s.name) for s in binding.subjects] == [("ServiceAccount", RUNTIME_SA)]
    wait_webhook_answers(client, namespace, job, up=True)

    pods = [client.sanitize_for_serialization(p) for p in pj.create_pods(client, job)]
    pods = pj.job_pods(client, namespace, "a")
    assert len(pods) == 4
    for pod in pods:
        env = env_names(pod)
        for name in IDENTITY:
            assert "fieldRef" in env[name]["valueFrom"], (name, env[name])
        assert env["PEER_RECOVERY_PODS_PER_REPLICA"]["value"] == "2"
        assert env["RANK"]["value"] in "0123"  # the training-operator's env is kept
        assert shm_volume(pod) == {"name": "peer-recovery-shm",
                                   "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}  # fmt: skip
        assert pod["spec"]["serviceAccountName"] == RUNTIME_SA
        assert mutated(pod)

    # A job that is not opted in: its pods are created exactly as written.
    pj.create_job(client, namespace, "plain", workers=1)
    for pod in pj.job_pods(client, namespace, "plain"):
        assert not mutated(pod)
        assert "POD_UID" not in env_names(pod) and shm_volume(pod) is None
        assert pod["spec"]["serviceAccountName"] == "default"

    # The user's own /dev/shm volume, env and account are kept; the rest is added.
    own = {
        "serviceAccountName": "default",
        "containers": [{
            "name": "pytorch", "image": pj.DEFAULT_IMAGE,
            "env": [{"name": "POD_NAME", "value": "mine"}],
            "volumeMounts": [{"name": "my-shm", "mountPath": "/dev/shm"}],
        }],
        "volumes": [{"name": "my-shm", "emptyDir": {"medium": "Memory", "sizeLimit": "3Gi"}}],
    }  # fmt: skip
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "mine"}})
    own_sa = {**copy.deepcopy(own), "serviceAccountName": "mine"}
    pj.create_job(
        client, namespace, "own", workers=0, annotations=ENABLED, pod_spec_overrides=own_sa
    )
    (pod,) = pj.job_pods(client, namespace, "own")
    env = env_names(pod)
    assert env["POD_NAME"] == {"name": "POD_NAME", "value": "mine"}
    assert "fieldRef" in env["POD_UID"]["valueFrom"]
    assert [v["name"] for v in pod["spec"]["volumes"] if "emptyDir" in v] == ["my-shm"]
    assert shm_volume(pod) == own["volumes"][0]
    assert pod["spec"]["serviceAccountName"] == "mine"
    assert mutated(pod)

    # The namespace's last opted-in jobs gone: the account and its binding are removed.
    for name in ("a", "own"):
        pj.delete_job(client, namespace, name)
    wait_for("the runtime's binding removed", lambda: not exists(
        rbac.read_namespaced_role_binding, RUNTIME_SA, namespace), timeout=60)  # fmt: skip
    wait_for("the runtime's account removed", lambda: not exists(
        core.read_namespaced_service_account, RUNTIME_SA, namespace), timeout=60)  # fmt: skip


def test_ddp_example_shrinks_to_what_the_user_writes_and_doctor_passes_the_mutated_pod(
    control_plane: Any, namespace: str, webhook: Webhook, client: Any, tmp_path: Path
) -> None:
    from kubernetes.client import CustomObjectsApi

    example = yaml.safe_load((REPO / "manifests" / "examples" / "ddp-pytorchjob.yaml").read_text())
    spec = example["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (container,) = spec["containers"]
    assert set(spec) == {"containers"}, "no volumes or account left to write by hand"
    assert not container.get("env") and not container.get("volumeMounts")
    example["metadata"]["namespace"] = namespace
    job = CustomObjectsApi(client).create_namespaced_custom_object(
        names.PYTORCHJOB_GROUP, names.PYTORCHJOB_VERSION, namespace, names.PYTORCHJOB_PLURAL,
        example,
    )  # fmt: skip
    wait_webhook_answers(client, namespace, job, up=True)
    pj.create_pods(client, job)
    pod = next(
        p for p in pj.job_pods(client, namespace, "ddp") if "master" in p["metadata"]["name"]
    )
    assert mutated(pod)
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", **pod}))
    checked = subprocess.run(
        [sys.executable, "-m", "peer_recovery.cli", "doctor", "--pod-yaml", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "all checks passed" in checked.stdout


def test_webhook_down_lets_pods_through_and_the_operator_reports_them(
    control_plane: Any, namespace: str, webhook: Webhook, client: Any
) -> None:
    from kubernetes.client import CoreV1Api

    job = pj.create_job(client, namespace, "a", workers=1, annotations=ENABLED, pods=False)
    wait_webhook_answers(client, namespace, job, up=True)
    webhook.point_at(free_port())  # nothing listens there: the webhook is down
    wait_webhook_answers(client, namespace, job, up=False)
    pj.create_pods(client, job)
    pods = pj.job_pods(client, namespace, "a")
    assert len(pods) == 2 and not any(mutated(p) for p in pods)
    assert all("POD_UID" not in env_names(p) for p in pods)

    def reported() -> tuple[int, set[str]]:
        events = CoreV1Api(client).list_namespaced_event(
            namespace, field_selector="involvedObject.name=a,reason=PodNotMutated"
        )
        return len(events.items), {e.message.split()[1] for e in events.items}

    # Events are aggregated: one series on the job, counted once per unmutated pod, its
    # message naming the latest pod.
    def counted() -> int:
        events = CoreV1Api(client).list_namespaced_event(
            namespace, field_selector="involvedObject.name=a,reason=PodNotMutated"
        )
        return sum(e.count or 1 for e in events.items)

    want = {p["metadata"]["name"] for p in pods}
    wait_for("PodNotMutated counted once per pod", lambda: counted() == len(want), timeout=60)
    series, named = reported()
    assert series == 1 and named <= want, (series, named)
