"""The training-operator's prepared pieces, without a cluster: where its manifests are
found, the webhook configuration aimed at loopback, and certificates its rotator keeps."""

from __future__ import annotations

import base64
import datetime
import ipaddress
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from testbed.controlplane import _training_operator as to


def _cache(tmp_path: Path, webhooks: list[dict[str, object]] | None = None) -> Path:
    """A fake cache key directory: bin/training-operator and manifests/training-operator/."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "training-operator").write_text("")
    manifests = tmp_path / "manifests" / "training-operator"
    manifests.mkdir(parents=True)
    (manifests / "kubeflow.org_pytorchjobs.yaml").write_text("kind: CustomResourceDefinition\n")
    hooks = webhooks or [
        {"name": f"validator.{kind}.x", "clientConfig": {"service": {"path": f"/validate-{kind}"}}}
        for kind in ("kubeflow-org-v1-tfjob", "kubeflow-org-v1-pytorchjob")
    ]
    config = {"kind": "ValidatingWebhookConfiguration", "metadata": {"name": "x"}}
    (manifests / "manifests.yaml").write_text(yaml.safe_dump({**config, "webhooks": hooks}))
    return tmp_path


def test_manifests_are_found_next_to_the_binary_or_named_as_missing(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    assert to.manifests_dir(cache / "bin") == cache / "manifests" / "training-operator"
    (cache / "manifests" / "training-operator" / "kubeflow.org_pytorchjobs.yaml").unlink()
    with pytest.raises(to.ManifestsMissingError, match="make tools"):
        to.manifests_dir(cache / "bin")


def test_webhook_configuration_keeps_only_pytorchjob_and_points_at_loopback(
    tmp_path: Path,
) -> None:
    directory = to.manifests_dir(_cache(tmp_path) / "bin")
    config = to.webhook_configuration(directory, 4443, b"CA")
    assert config["metadata"] == {"name": to.WEBHOOK_CONFIGURATION}
    (hook,) = config["webhooks"]
    assert hook["clientConfig"] == {
        "url": f"https://127.0.0.1:4443{to.PYTORCH_WEBHOOK_PATH}",
        "caBundle": base64.b64encode(b"CA").decode(),
    }


def test_webhook_configuration_without_the_pytorchjob_hook_is_an_error(tmp_path: Path) -> None:
    hooks = [{"name": "only-tf", "clientConfig": {"service": {"path": "/validate-tf"}}}]
    directory = to.manifests_dir(_cache(tmp_path, hooks) / "bin")
    with pytest.raises(ValueError, match="found 0"):
        to.webhook_configuration(directory, 1, b"CA")


def test_certificates_are_valid_for_the_names_the_rotator_and_api_server_check() -> None:
    tls = to.make_webhook_tls()
    ca = x509.load_pem_x509_certificate(tls.ca_cert)
    cert = x509.load_pem_x509_certificate(tls.cert)
    ca_names = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ca_names.get_values_for_type(x509.DNSName) == [to.CA_NAME]
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["training-operator.kubeflow.svc"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert cert.issuer == ca.subject
    # Beyond the rotator's 90-day look-ahead, so it never replaces them under a test.
    horizon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=91)
    assert cert.not_valid_after_utc > horizon and ca.not_valid_after_utc > horizon
    assert tls.ca_key.startswith(b"-----BEGIN RSA PRIVATE KEY-----")  # PKCS#1, as it parses
    secret = to.webhook_secret(tls)
    assert set(secret["data"]) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
