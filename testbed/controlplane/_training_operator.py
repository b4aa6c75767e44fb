"""What the real Kubeflow training-operator needs to start on the test control plane: its
manifests at the pinned version, a webhook serving certificate, the webhook configuration
pointed at loopback, least-privilege RBAC and its command line.

Why each piece exists:
- `make tools` copies the operator's own PyTorchJob CRD, webhook configuration and
  ClusterRole from its Go module (``manifests/base/``) next to the binaries
  (``<cache>/manifests/training-operator/``), so the CRD always matches the controller.
- The operator's certificate rotator only accepts an existing Secret whose CA is valid for
  the name ``training-operator-ca`` and whose serving certificate is valid for
  ``training-operator.<namespace>.svc``; it then injects the CA into the webhook
  configuration and waits for ``tls.crt`` to appear in its certificate directory (a
  mounted Secret in a real cluster). We write that Secret, with a serving certificate that
  also names 127.0.0.1, so the API server can call the webhook at ``https://127.0.0.1:<port>``
  (there is no Service routing here).
- The webhook server reads its certificate from ``$TMPDIR/k8s-webhook-server/serving-certs``
  (controller-runtime's default), which we point at the control plane's work directory. The
  rotator, however, only checks that ``/tmp/k8s-webhook-server/serving-certs/tls.crt``
  exists (a path fixed in the operator's source); we create that file when it is absent and
  never read it.

Invariants: nothing here starts a process; keys and certificates are throw-away (RSA 2048,
PKCS#1, as the rotator parses its CA key) and valid for a year, beyond the rotator's 90-day
look-ahead, so it never rotates them under a test.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "NAMESPACE",
    "SERVICE_ACCOUNT",
    "WEBHOOK_CONFIGURATION",
    "ManifestsMissingError",
    "WebhookTls",
    "cluster_role",
    "crd",
    "make_webhook_tls",
    "manifests_dir",
    "prepare_cert_dirs",
    "training_operator_argv",
    "webhook_configuration",
    "webhook_secret",
]

NAMESPACE = "kubeflow"
SERVICE_ACCOUNT = "training-operator"
SERVICE_NAME = "training-operator"  # the operator's --webhook-service-name default
SECRET_NAME = "training-operator-webhook-cert"  # its --webhook-secret-name default
WEBHOOK_CONFIGURATION = "validator.training-operator.kubeflow.org"  # fixed in its source
CA_NAME = "training-operator-ca"  # fixed in its source
PYTORCH_WEBHOOK_PATH = "/validate-kubeflow-org-v1-pytorchjob"
ROTATOR_CERT_FILE = Path("/tmp/k8s-webhook-server/serving-certs/tls.crt")
_VALIDITY = datetime.timedelta(days=365)


class ManifestsMissingError(RuntimeError):
    """The training-operator manifests are not next to the binaries; `make tools` puts them
    there."""


def manifests_dir(bin_dir: Path) -> Path:
    """``<cache>/manifests/training-operator`` for the cache ``bin_dir``'s binaries live in."""
    binary = (bin_dir / "training-operator").resolve()
    directory = binary.parent.parent / "manifests" / "training-operator"
    if not (directory / "kubeflow.org_pytorchjobs.yaml").is_file():
        raise ManifestsMissingError(
            f"the training-operator manifests are missing from {directory}; "
            "run `make tools` to build the binaries and copy them"
        )
    return directory


def crd(directory: Path) -> dict[str, Any]:
    """The operator's own PyTorchJob CustomResourceDefinition."""
    return yaml.safe_load((directory / "kubeflow.org_pytorchjobs.yaml").read_text())


def cluster_role(directory: Path) -> dict[str, Any]:
    """The operator's own ClusterRole (its name, ``training-operator``, as shipped)."""
    return yaml.safe_load((directory / "role.yaml").read_text())


def webhook_configuration(directory: Path, port: int, ca_pem: bytes) -> dict[str, Any]:
    """The operator's ValidatingWebhookConfiguration, reduced to its PyTorchJob webhook (the
    only scheme enabled), named as the operator expects and aimed at loopback by URL."""
    config = yaml.safe_load((directory / "manifests.yaml").read_text())
    hooks = [
        hook
        for hook in config["webhooks"]
        if hook["clientConfig"].get("service", {}).get("path") == PYTORCH_WEBHOOK_PATH
    ]
    if len(hooks) != 1:
        raise ValueError(
            f"expected one webhook for {PYTORCH_WEBHOOK_PATH} in {directory / 'manifests.yaml'}, "
            f"found {len(hooks)}"
        )
    hooks[0]["clientConfig"] = {
        "url": f"https://127.0.0.1:{port}{PYTORCH_WEBHOOK_PATH}",
        "caBundle": base64.b64encode(ca_pem).decode(),
    }
    config["metadata"] = {"name": WEBHOOK_CONFIGURATION}
    config["webhooks"] = hooks
    return config


@dataclass(frozen=True)
class WebhookTls:
    """PEM bytes of the webhook's CA and serving certificate."""

    ca_cert: bytes
    ca_key: bytes
    cert: bytes
    key: bytes


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1, what the rotator parses
        serialization.NoEncryption(),
    )


def make_webhook_tls(namespace: str = NAMESPACE) -> WebhookTls:
    """A CA valid for the rotator's CA name and a serving certificate for the operator's
    Service name and 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = _rsa_key(), _rsa_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(CA_NAME)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    dns = f"{SERVICE_NAME}.{namespace}.svc"
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(dns), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return WebhookTls(
        ca_cert=ca.public_bytes(serialization.Encoding.PEM),
        ca_key=_pem_key(ca_key),
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=_pem_key(key),
    )


def webhook_secret(tls: WebhookTls, namespace: str = NAMESPACE) -> dict[str, Any]:
    """The Secret the rotator reads (and keeps, since every certificate in it is valid)."""
    data = {"ca.crt": tls.ca_cert, "ca.key": tls.ca_key, "tls.crt": tls.cert, "tls.key": tls.key}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET_NAME, "namespace": namespace},
        "type": "Opaque",
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def prepare_cert_dirs(tmp_dir: Path, tls: WebhookTls) -> None:
    """Write the serving pair where the webhook server reads it (``tmp_dir`` is the operator's
    TMPDIR), and make sure the file the rotator checks for exists."""
    serving = tmp_dir / "k8s-webhook-server" / "serving-certs"
    serving.mkdir(parents=True, exist_ok=True)
    (serving / "tls.crt").write_bytes(tls.cert)
    key_path = serving / "tls.key"
    key_path.write_bytes(tls.key)
    key_path.chmod(0o600)
    if not ROTATOR_CERT_FILE.exists():
        ROTATOR_CERT_FILE.parent.mkdir(parents=True, exist_ok=True)
        # Any content passes the rotator's existence check; a certificate, not a key.
        tmp = ROTATOR_CERT_FILE.with_name(f".tls.crt.{os.getpid()}")
        tmp.write_bytes(tls.cert)
        os.replace(tmp, ROTATOR_CERT_FILE)


def training_operator_argv(bin_dir: Path, ports: dict[str, int]) -> list[str]:
    """The operator with only the PyTorchJob scheme, its metrics and health endpoints on
    loopback (off their 8080/8081 defaults) and its webhook on a free loopback port (the
    host flag is our main's, tools/training-operator/main.go; upstream's has none)."""
    return [
        str(bin_dir / "training-operator"),
        "--enable-scheme=pytorchjob",
        f"--metrics-bind-address=127.0.0.1:{ports['to-metrics']}",
        f"--health-probe-bind-address=127.0.0.1:{ports['to-health']}",
        "--webhook-server-host=127.0.0.1",
        f"--webhook-server-port={ports['to-webhook']}",
        "--leader-elect=false",
        "--zap-log-level=info",
    ]
