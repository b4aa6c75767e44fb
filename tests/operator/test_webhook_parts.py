"""The webhook's pure parts: certificates, the AdmissionReview answer, the bookkeeping of
namespaces that need the runtime's access and of pods that came through unmutated."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from peer_recovery.contract import names
from peer_recovery_operator.certs import (
    VALIDITY,
    make_self_signed,
    merge_bundle,
    server_context,
    write_files,
)
from peer_recovery_operator.config import ConfigError, from_sources
from peer_recovery_operator.mutation import Mutation
from peer_recovery_operator.namespace_access import AccessChange, OptedInJobs
from peer_recovery_operator.unmutated import UnmutatedPods
from peer_recovery_operator.webhook import job_of, review_response

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
ON = {names.ANNOTATION_ENABLED: names.ANNOTATION_ENABLED_VALUE}


def test_self_signed_certificate_serves_tls_that_its_ca_verifies(tmp_path: Path) -> None:
    cert = make_self_signed(["127.0.0.1", "webhook.ns.svc"], now=datetime.now(timezone.utc),
                            common_name="webhook.ns.svc")  # fmt: skip
    server = server_context(*write_files(cert, tmp_path))
    assert (tmp_path / "tls.key").stat().st_mode & 0o777 == 0o600
    client = ssl.create_default_context(cadata=cert.ca_pem.decode())
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.recv(2) == b"ok"
        thread.join(10)
    other = make_self_signed(["127.0.0.1"], now=NOW, common_name="x")
    assert other.ca_pem != cert.ca_pem  # a fresh CA each time


def test_a_certificate_needs_a_host() -> None:
    with pytest.raises(ValueError, match="at least one host"):
        make_self_signed([], now=NOW, common_name="x")


def test_bad_certificate_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "tls.crt").write_text("nope")
    (tmp_path / "tls.key").write_text("nope")
    with pytest.raises(ValueError, match=r"tls\.crt"):
        server_context(tmp_path / "tls.crt", tmp_path / "tls.key")


def test_ca_bundle_keeps_other_replicas_cas_and_drops_expired_ones() -> None:
    first = make_self_signed(["a"], now=NOW, common_name="a").ca_pem
    second = make_self_signed(["b"], now=NOW, common_name="b").ca_pem
    bundle = merge_bundle(b"", first, now=NOW)
    assert bundle == first
    both = merge_bundle(bundle, second, now=NOW)
    assert both == first + second
    assert merge_bundle(both, second, now=NOW) == both  # idempotent
    later = NOW + VALIDITY + timedelta(days=2)
    third = make_self_signed(["c"], now=later, common_name="c").ca_pem
    assert merge_bundle(both, third, now=later) == third


def test_review_response_carries_the_patch_and_warnings() -> None:
    review = {"apiVersion": "admission.k8s.io/v1", "request": {"uid": "u-1"}}
    patch = [{"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}]
    answer = review_response(review, Mutation(patch=patch, warnings=["small"]))
    response = answer["response"]
    assert answer["kind"] == "AdmissionReview" and response["uid"] == "u-1"
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(response["patch"])) == patch
    assert response["warnings"] == ["small"]
    assert review_response(review, None)["response"] == {"uid": "u-1", "allowed": True}


def test_job_of_a_pod_prefers_its_controller() -> None:
    owned = {
        "metadata": {
            "labels": {names.LABEL_JOB_NAME: "label"},
            "ownerReferences": [{"kind": "PyTorchJob", "name": "owner", "controller": True}],
        }
    }
    assert job_of(owned) == "owner"
    assert job_of({"metadata": {"labels": {names.LABEL_JOB_NAME: "label"}}}) == "label"
    assert job_of({"metadata": {}}) is None


def job(uid: str, ns: str = "a", annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"uid": uid, "namespace": ns, "name": uid, "annotations": annotations}}


def test_namespace_is_bound_with_its_first_opted_in_job_and_unbound_after_its_last() -> None:
    jobs = OptedInJobs()
    assert jobs.observe(None, job("1", annotations=ON)) == AccessChange("bind", "a")
    assert jobs.observe("ADDED", job("2", annotations=ON)) is None
    assert jobs.observe("MODIFIED", job("3")) is None  # not opted in: no access needed
    assert jobs.observe("DELETED", job("1", annotations=ON)) is None
    assert jobs.observe("MODIFIED", job("2")) == AccessChange("unbind", "a")  # opted out
    assert not jobs.has_jobs("a")
    prefixed = {names.ANNOTATION_ENABLED_PREFIXED: "true"}
    assert jobs.observe("ADDED", job("4", "b", prefixed)) == AccessChange("bind", "b")
    assert jobs.observe("DELETED", job("4", "b", prefixed)) == AccessChange("unbind", "b")


def pod(uid: str, *, mutated: bool, job_name: str = "j") -> dict[str, Any]:
    annotations = {names.ANNOTATION_MUTATED: "1"} if mutated else {}
    return {
        "metadata": {
            "uid": uid,
            "name": f"pod-{uid}",
            "namespace": "a",
            "labels": {names.LABEL_JOB_NAME: job_name},
            "annotations": annotations,
        }
    }


def test_unmutated_pods_of_opted_in_jobs_are_reported_once() -> None:
    audit = UnmutatedPods()
    known = {("a", "j"): True, ("a", "off"): False}.get
    assert audit.pod_event("ADDED", pod("1", mutated=True), lambda *k: known(k)) == []
    found = audit.pod_event("ADDED", pod("2", mutated=False), lambda *k: known(k))
    assert [(f.pod, f.job) for f in found] == [("pod-2", "j")]
    assert audit.pod_event("MODIFIED", pod("2", mutated=False), lambda *k: known(k)) == []
    off = pod("3", mutated=False, job_name="off")
    assert audit.pod_event("ADDED", off, lambda *k: known(k)) == []


def test_a_pod_seen_before_its_job_waits_for_it() -> None:
    audit = UnmutatedPods()
    assert audit.pod_event("ADDED", pod("1", mutated=False, job_name="late"), lambda *k: None) == []
    assert [f.pod for f in audit.job_known("a", "late", True)] == ["pod-1"]
    assert audit.job_known("a", "late", True) == []
    audit.pod_event("ADDED", pod("2", mutated=False, job_name="off"), lambda *k: None)
    assert audit.job_known("a", "off", False) == []


def test_webhook_flags_are_checked() -> None:
    base = {"namespaces": ["a"]}
    with pytest.raises(ConfigError, match="--webhook-address must be HOST:PORT"):
        from_sources({**base, "webhook_address": "nowhere"}, env={})
    with pytest.raises(ConfigError, match="--webhook-cert-dir or --webhook-hosts"):
        from_sources({**base, "webhook_address": "127.0.0.1:9443"}, env={})
    with pytest.raises(ConfigError, match="go together"):
        from_sources({**base, "runtime_service_account": "sa"}, env={})
    config = from_sources(
        {**base, "webhook_address": "127.0.0.1:9443", "webhook_hosts": "127.0.0.1"},
        env={"PEER_RECOVERY_WEBHOOK_CONFIG_NAME": "pr"},
    )
    assert config.webhook_config_name == "pr"


def test_namespace_access_is_made_removed_and_remade_after_another_replica_removed_it() -> None:
    from peer_recovery_operator.namespace_access import ENSURED_TTL, NamespaceAccess
    from tests.fake_api import FakeApi

    api, now = FakeApi(), [0.0]
    access = NamespaceAccess(api, service_account="rt", cluster_role="cr", clock=lambda: now[0])
    change = access.job_event("ADDED", job("1", annotations=ON))
    assert change == AccessChange("bind", "a")
    access.apply(change)
    assert api.service_accounts == {("a", "rt")}
    assert api.role_bindings == {("a", "rt"): {"roleRef": "cr", "subject": "rt"}}
    calls = len(api.calls)
    access.ensure("a")  # remembered: no API call per pod
    assert len(api.calls) == calls
    access.release("a")  # a job is still there: kept
    assert api.role_bindings
    api.role_bindings.clear()  # as another replica would, after the namespace's last job
    api.service_accounts.clear()
    now[0] += ENSURED_TTL
    access.ensure("a")
    assert ("a", "rt") in api.role_bindings and ("a", "rt") in api.service_accounts
    gone = access.job_event("DELETED", job("1", annotations=ON))
    assert gone == AccessChange("unbind", "a")
    access.apply(gone)
    assert api.role_bindings == {} and api.service_accounts == set()
