"""Development certificates: a throwaway CA and a server certificate it signs.

For demos and tests only. The CA's private key is never written: nothing can
be signed with this CA after the call returns, so trusting ``ca.pem`` trusts
exactly one server certificate.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .crypto import der

_KeyFactory = Callable[[], CertificateIssuerPrivateKeyTypes]

_RSA_PSS: Final = "rsa-pss"
# RFC 8446 §4.2.3: MGF1 over the signature's hash, salt as long as the hash.
_PSS_PADDING: Final = padding.PSS(
    mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH
)

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
    # An id-RSASSA-PSS key (RFC 4055 §3.1), restricted to SHA-256: it signs TLS 1.3 with
    # rsa_pss_pss_sha256 only. See _with_pss_key for how the certificates are made.
    _RSA_PSS: (
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
    rsa_padding = _PSS_PADDING if key_type == _RSA_PSS else None

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
        .sign(ca_key, hash_algorithm, rsa_padding=rsa_padding)
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
        .sign(ca_key, hash_algorithm, rsa_padding=rsa_padding)
    )
    leaf_key_der = leaf_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if key_type == _RSA_PSS:
        assert isinstance(ca_key, rsa.RSAPrivateKey)
        ca_cert = _with_pss_key(ca_cert, ca_key)
        leaf_cert = _with_pss_key(leaf_cert, ca_key)
        leaf_key_der = _pss_private_key_info(leaf_key_der, _pss_algorithm(leaf_cert))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = DevCertPaths(
        ca=out_dir / "ca.pem", cert=out_dir / "server.pem", key=out_dir / "server.key"
    )
    _write_private(paths.key, _pem("PRIVATE KEY", leaf_key_der))
    paths.cert.write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def _pem(label: str, body: bytes) -> bytes:
    text = base64.encodebytes(body).decode("ascii").replace("\n", "")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    text = f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"
    return text.encode("ascii")


# -- id-RSASSA-PSS keys ------------------------------------------------------------------------
# cryptography signs with RSASSA-PSS but writes every RSA public key as rsaEncryption. A
# certificate for an id-RSASSA-PSS key is therefore built by cryptography and then given the
# PSS SubjectPublicKeyInfo by hand: the same key bits under an AlgorithmIdentifier equal to
# the certificate's PSS signature algorithm (id-RSASSA-PSS, SHA-256, MGF1-SHA-256, salt 32:
# RFC 4055 §3.1 lets key and signature parameters be the same), and signed again. The key
# file gets the same AlgorithmIdentifier, as `openssl genpkey -algorithm RSA-PSS` writes it.


def _pss_algorithm(cert: x509.Certificate) -> bytes:
    """The certificate's signatureAlgorithm (id-RSASSA-PSS with its parameters), DER."""
    outer = der.children(
        der.read_one(cert.public_bytes(serialization.Encoding.DER), der.SEQUENCE).value
    )
    return outer[1].encoded


def _with_pss_key(cert: x509.Certificate, issuer_key: rsa.RSAPrivateKey) -> x509.Certificate:
    tbs, algorithm, _signature = der.children(
        der.read_one(cert.public_bytes(serialization.Encoding.DER), der.SEQUENCE).value
    )
    fields = der.children(tbs.value)
    # TBSCertificate: [0] version, serial, signature, issuer, validity, subject, SPKI, ...
    index = 6 if fields[0].tag == der.context(0) else 5
    _old_algorithm, public_key_bits = der.children(fields[index].value)
    new_fields = [f.encoded for f in fields]
    new_fields[index] = der.sequence(algorithm.encoded, public_key_bits.encoded)
    new_tbs = der.sequence(*new_fields)
    signature = issuer_key.sign(new_tbs, _PSS_PADDING, hashes.SHA256())
    certificate = der.sequence(
        new_tbs, algorithm.encoded, der.encode(der.BIT_STRING, b"\x00" + signature)
    )
    return x509.load_der_x509_certificate(certificate)


def _pss_private_key_info(pkcs8: bytes, algorithm: bytes) -> bytes:
    """PrivateKeyInfo (RFC 5208 §5) with ``algorithm`` in place of rsaEncryption."""
    version, _algorithm, private_key, *rest = der.children(der.read_one(pkcs8, der.SEQUENCE).value)
    return der.sequence(
        version.encoded, algorithm, private_key.encoded, *(item.encoded for item in rest)
    )
