"""Development certificates: a throwaway CA and a server certificate it signs.

For demos and tests only. The CA's private key is never written: nothing can
be signed with this CA after the call returns, so trusting ``ca.pem`` trusts
exactly one server certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_KeyFactory = Callable[[], CertificateIssuerPrivateKeyTypes]

# key type → (key generator, hash for the certificate signature; None where
# the algorithm fixes its own, as Ed25519 and ML-DSA do).
_KEY_FACTORIES: Final[dict[str, tuple[_KeyFactory, hashes.SHA256 | hashes.SHA384 | None]]] = {
    "ecdsa-p256": (lambda: ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()),
    "ecdsa-p384": (lambda: ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()),
    "ed25519": (ed25519.Ed25519PrivateKey.generate, None),
    "rsa2048": (
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        hashes.SHA256(),
    ),
    "mldsa44": (mldsa.MLDSA44PrivateKey.generate, None),
    "mldsa65": (mldsa.MLDSA65PrivateKey.generate, None),
    "mldsa87": (mldsa.MLDSA87PrivateKey.generate, None),
}

KEY_TYPES: Final[tuple[str, ...]] = tuple(_KEY_FACTORIES)

# Always present so that the certificate works for local connections however
# the client spells the address.
DEFAULT_SANS: Final[tuple[str, ...]] = ("localhost", "127.0.0.1", "::1")

# Issued a little in the past so a client whose clock lags still accepts it.
_BACKDATE: Final = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class DevCertPaths:
    ca: Path  # the CA certificate, to give clients as their trust anchor
    cert: Path  # the server certificate (leaf only)
    key: Path  # the server's private key, PKCS#8 PEM, mode 0600


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pqproxy development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start so the key is never readable by others, even
    # briefly; an existing file is truncated and its mode tightened.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
    finally:
        if fd != -1:
            os.close(fd)


def generate_dev_certs(
    out_dir: Path,
    key_type: str = "ecdsa-p256",
    sans: Sequence[str] = (),
    days: int = 365,
) -> DevCertPaths:
    """Write ``ca.pem``, ``server.pem`` and ``server.key`` into ``out_dir``.

    The leaf is valid for localhost, 127.0.0.1 and ::1 plus ``sans`` (an IP
    address string becomes an IP SAN, anything else a DNS name). The CA uses
    the same key type as the leaf.
    """
    if key_type not in _KEY_FACTORIES:
        raise ValueError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    if any(not s or s != s.strip() for s in sans):
        raise ValueError(f"empty or padded name in sans: {list(sans)!r}")
    generate, hash_algorithm = _KEY_FACTORIES[key_type]

    now = datetime.datetime.now(datetime.UTC)
    not_before = now - _BACKDATE
    not_after = now + datetime.timedelta(days=days)

    ca_key = generate()
    ca_name = _name("pqproxy development CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hash_algorithm)
    )

    leaf_key = generate()
    names = list(dict.fromkeys([*DEFAULT_SANS, *sans]))
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False
        )
        .sign(ca_key, hash_algorithm)
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = DevCertPaths(
        ca=out_dir / "ca.pem", cert=out_dir / "server.pem", key=out_dir / "server.key"
    )
    _write_private(
        paths.key,
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    paths.cert.write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return paths
