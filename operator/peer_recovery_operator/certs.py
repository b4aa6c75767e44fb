"""The webhook's TLS: a self-signed CA and a serving certificate, made by the operator.

Used when the chart does not hand the operator a certificate from cert-manager
(docs/webhook.md). The operator makes a fresh CA and serving certificate at start-up,
keeps the key in memory and in a private temporary directory only (never in a Secret: the
operator gets no rights on Secrets), and writes the CA into the
MutatingWebhookConfiguration's ``caBundle`` itself. Every replica makes its own pair; the
configuration carries every replica's CA that is still current (see
:func:`merge_bundle`), so the API server trusts whichever replica it reaches.

Pure except :func:`write_files` and :func:`server_context`.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = [
    "ServingCert",
    "make_self_signed",
    "merge_bundle",
    "server_context",
    "write_files",
]

#: How long a made certificate is valid; the operator makes a new one at each start.
VALIDITY = timedelta(days=365)
#: A CA in the bundle whose certificate ended longer ago than this is dropped.
_EXPIRED_GRACE = timedelta(days=1)


@dataclass(frozen=True)
class ServingCert:
    """PEM bytes: the CA's certificate, and the serving certificate and its key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def make_self_signed(hosts: Sequence[str], *, now: datetime, common_name: str) -> ServingCert:
    """A new CA and a serving certificate for ``hosts`` (DNS names or IP addresses).

    Raises ValueError when ``hosts`` is empty: a certificate for nothing would fail every
    TLS handshake, later and less clearly.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("the webhook certificate needs at least one host name or IP address")
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    start, end = now - timedelta(minutes=5), now + VALIDITY

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(x509), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return ServingCert(
        ca_pem=ca.public_bytes(pem),
        cert_pem=cert.public_bytes(pem),
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def _ca_usage(x509: Any) -> Any:
    """Key usage of a CA that signs certificates and nothing else."""
    flags = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
         "encipher_only", "decipher_only"), False)  # fmt: skip
    return x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **flags)


def merge_bundle(current: bytes, ca_pem: bytes, *, now: datetime) -> bytes:
    """The caBundle with ``ca_pem`` added to ``current``, dropping CAs expired a day ago.

    Each operator replica adds its own CA; keeping the others' lets every replica be
    trusted. A restart adds a new CA and the old one drops out when it expires.
    """
    from cryptography import x509

    kept: list[bytes] = []
    for cert in x509.load_pem_x509_certificates(current) if current.strip() else ():
        if cert.not_valid_after_utc + _EXPIRED_GRACE < now:
            continue
        from cryptography.hazmat.primitives.serialization import Encoding

        pem = cert.public_bytes(Encoding.PEM)
        if pem not in kept:
            kept.append(pem)
    if ca_pem not in kept:
        kept.append(ca_pem)
    return b"".join(kept)


def write_files(cert: ServingCert, directory: Path) -> tuple[Path, Path]:
    """Write the serving certificate and key (mode 0600) into ``directory``."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(cert.key_pem)
    return cert_path, key_path


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 at least) for the webhook; errors name the files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(
            f"cannot load the webhook certificate {cert_file} / {key_file}: {error}"
        ) from None
    return context
