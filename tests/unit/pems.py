"""Real PEM files for the first-boot TLS checks: a CA, a certificate it signed and that
certificate's key (EC P-256, made once per test run; nothing here is secret)."""

from __future__ import annotations

import datetime
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@cache
def tls_files() -> dict[str, bytes]:
    """``ca``, ``cert`` and ``key`` (the cert's), plus ``other_key`` that fits nothing."""
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())

    def cert(subject: str, key: ec.EllipticCurvePrivateKey) -> bytes:
        built = (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(_name("meshbake test CA"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(ca_key, hashes.SHA256())
        )
        return built.public_bytes(serialization.Encoding.PEM)

    return {
        "ca": cert("meshbake test CA", ca_key),
        "cert": cert("client.dc1.consul", leaf_key),
        "key": _key_pem(leaf_key),
        "other_key": _key_pem(ec.generate_private_key(ec.SECP256R1())),
    }
