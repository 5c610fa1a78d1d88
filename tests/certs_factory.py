"""Test certificates: CAs, intermediates and client leaves of any key type, good or broken.

Used by the client-authentication unit tests, the engine's mutual-TLS tests and the interop
tests (pyOpenSSL loads what ``Issued.write_pem_files`` writes). Nothing here is for
production: keys are generated in memory and written unencrypted.

    root = make_ca("mldsa65")
    inter = make_ca("ecdsa-p256", issuer=root, common_name="intermediate")
    client = make_client(inter, "ed25519", uris=(SPIFFE_CLIENT,))
    client.chain_der()          # (leaf, intermediate) as a TLS client sends it
    bundle_pem(root)            # the server's trust anchors
    client.write_pem_files(tmp_path, "client")   # for use_certificate_chain_file & co.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = CertificateIssuerPrivateKeyTypes
_Hash = hashes.SHA224 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512

# key type → (generator, hash for the certificates this key signs; None where the algorithm
# fixes its own, as EdDSA and ML-DSA do).
_KEYS: Final[dict[str, tuple[Callable[[], PrivateKey], _Hash | None]]] = {
    "ecdsa-p256": (lambda: ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()),
    "ecdsa-p384": (lambda: ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()),
    "ecdsa-p521": (lambda: ec.generate_private_key(ec.SECP521R1()), hashes.SHA512()),
    "ed25519": (ed25519.Ed25519PrivateKey.generate, None),
    "ed448": (ed448.Ed448PrivateKey.generate, None),
    # rsaEncryption keys: usable with rsa_pss_rsae_* in TLS 1.3 (RFC 8446 §4.2.3).
    "rsa2048": (
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        hashes.SHA256(),
    ),
    # Too small for TLS 1.3 use here: only for tests that expect a refusal.
    "rsa1024": (
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        hashes.SHA256(),
    ),
    "mldsa44": (mldsa.MLDSA44PrivateKey.generate, None),
    "mldsa65": (mldsa.MLDSA65PrivateKey.generate, None),
    "mldsa87": (mldsa.MLDSA87PrivateKey.generate, None),
}

KEY_TYPES: Final[tuple[str, ...]] = tuple(_KEYS)
# The key types a client certificate may have under the verifier's default schemes.
CLIENT_KEY_TYPES: Final = (
    "ecdsa-p256",
    "ecdsa-p384",
    "ed25519",
    "rsa2048",
    "mldsa44",
    "mldsa65",
    "mldsa87",
)

SPIFFE_CLIENT: Final = "spiffe://example.org/ns/default/sa/client"

# Issued a little in the past so a peer whose clock lags still accepts it.
BACKDATE: Final = datetime.timedelta(hours=1)
LIFETIME: Final = datetime.timedelta(days=30)

Eku = Literal["clientAuth", "serverAuth", "both", "none"]
_EKU_OIDS: Final[dict[str, tuple[x509.ObjectIdentifier, ...]]] = {
    "clientAuth": (ExtendedKeyUsageOID.CLIENT_AUTH,),
    "serverAuth": (ExtendedKeyUsageOID.SERVER_AUTH,),
    "both": (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
}

PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER


def generate_key(key_type: str) -> PrivateKey:
    if key_type not in _KEYS:
        raise ValueError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    return _KEYS[key_type][0]()


@dataclass(frozen=True, repr=False)
class Issued:
    """A certificate, its private key, and the certificate that issued it (None when
    self-signed)."""

    certificate: x509.Certificate
    private_key: PrivateKey
    key_type: str
    issuer: Issued | None

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(DER)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(PEM)

    @property
    def key_pem(self) -> bytes:
        """PKCS#8, unencrypted (what pyOpenSSL's use_privatekey_file reads)."""
        return self.private_key.private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    def path(self) -> tuple[Issued, ...]:
        """This certificate and every issuer above it, up to the self-signed root."""
        path: list[Issued] = [self]
        while path[-1].issuer is not None:
            issuer = path[-1].issuer
            assert issuer is not None
            path.append(issuer)
        return tuple(path)

    def chain(self, *, include_root: bool = False) -> tuple[Issued, ...]:
        """What a TLS peer sends: this certificate then its intermediates, leaf first; the
        root only when asked (RFC 8446 §4.4.2 lets a peer omit it)."""
        path = self.path()
        if include_root or len(path) == 1:
            return path
        return path[:-1]

    def chain_der(self, *, include_root: bool = False) -> tuple[bytes, ...]:
        return tuple(c.der for c in self.chain(include_root=include_root))

    def chain_pem(self, *, include_root: bool = False) -> bytes:
        return b"".join(c.pem for c in self.chain(include_root=include_root))

    def write_pem_files(
        self, directory: Path, stem: str, *, include_root: bool = False
    ) -> tuple[Path, Path]:
        """Write ``<stem>.pem`` (the chain, leaf first, for use_certificate_chain_file) and
        ``<stem>.key`` (PKCS#8, mode 0600, for use_privatekey_file); returns both paths."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / f"{stem}.pem"
        key_path = directory / f"{stem}.key"
        cert_path.write_bytes(self.chain_pem(include_root=include_root))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)
        return cert_path, key_path

    def __repr__(self) -> str:
        return f"<Issued {self.key_type} {self.subject}>"


def bundle_pem(*cas: Issued) -> bytes:
    """A CA bundle (concatenated PEM) of the given certificates."""
    return b"".join(ca.pem for ca in cas)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pqproxy tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, digital_signature: bool, key_cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _validity(
    now: datetime.datetime | None, expired: bool, not_yet_valid: bool
) -> tuple[datetime.datetime, datetime.datetime]:
    if expired and not_yet_valid:
        raise ValueError("a certificate cannot be both expired and not yet valid")
    base = now if now is not None else datetime.datetime.now(datetime.UTC)
    if expired:
        return base - 2 * LIFETIME, base - datetime.timedelta(days=1)
    if not_yet_valid:
        return base + datetime.timedelta(days=1), base + LIFETIME
    return base - BACKDATE, base + LIFETIME


def _sign(
    builder: x509.CertificateBuilder,
    signer: PrivateKey,
    signer_type: str,
    pss: bool,
    signature_hash: _Hash | None = None,
) -> x509.Certificate:
    hash_algorithm = signature_hash or _KEYS[signer_type][1]
    if pss:
        if not isinstance(signer, rsa.RSAPrivateKey):
            raise ValueError("pss=True needs an RSA issuer")
        assert hash_algorithm is not None
        # RFC 4055 parameters with the salt as long as the hash: the only PSS form
        # CA/B Forum (and so cryptography's verifier) accepts.
        pss_padding = padding.PSS(
            mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size
        )
        return builder.sign(signer, hash_algorithm, rsa_padding=pss_padding)
    return builder.sign(signer, hash_algorithm)


def _issuer_of(
    issuer: Issued | None, unknown_ca: bool, key_type: str, now: datetime.datetime | None
) -> Issued | None:
    if not unknown_ca:
        return issuer
    # A CA nobody trusts, of the same key type as the real one so the only difference a
    # verifier can see is the missing trust anchor.
    return make_ca(
        issuer.key_type if issuer is not None else key_type, common_name="unknown CA", now=now
    )


def make_ca(
    key_type: str = "ecdsa-p256",
    *,
    common_name: str = "pqproxy test CA",
    issuer: Issued | None = None,
    path_length: int | None = None,
    is_ca: bool = True,
    key_cert_sign: bool = True,
    expired: bool = False,
    not_yet_valid: bool = False,
    unknown_ca: bool = False,
    pss: bool = False,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    now: datetime.datetime | None = None,
) -> Issued:
    """A root CA (self-signed, when ``issuer`` is None) or an intermediate signed by ``issuer``.

    ``is_ca=False`` / ``key_cert_sign=False`` make a broken issuer; ``pss`` signs with RSA-PSS
    when the issuer is RSA; ``extensions`` are added as (value, critical).
    """
    key = generate_key(key_type)
    not_before, not_after = _validity(now, expired, not_yet_valid)
    signer = _issuer_of(issuer, unknown_ca, key_type, now)
    subject = _name(common_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.certificate.subject if signer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=path_length if is_ca else None),
            critical=True,
        )
        .add_extension(
            _key_usage(digital_signature=False, key_cert_sign=key_cert_sign), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if signer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.private_key.public_key()),
            critical=False,
        )
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    if signer is None:
        certificate = _sign(builder, key, key_type, pss)
    else:
        certificate = _sign(builder, signer.private_key, signer.key_type, pss)
    return Issued(certificate, key, key_type, signer)


def make_client(
    issuer: Issued,
    key_type: str = "ecdsa-p256",
    *,
    common_name: str = "client",
    dns_names: Sequence[str] = (),
    uris: Sequence[str] = (),
    eku: Eku = "clientAuth",
    key_usage: bool = True,
    digital_signature: bool = True,
    is_ca: bool = False,
    authority_key_id: bool = True,
    expired: bool = False,
    not_yet_valid: bool = False,
    unknown_ca: bool = False,
    pss: bool = False,
    signature_hash: _Hash | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    now: datetime.datetime | None = None,
) -> Issued:
    """A client (end-entity) certificate signed by ``issuer``.

    By default: EKU clientAuth, KeyUsage digitalSignature, SAN with ``dns_names`` and ``uris``
    (no SAN extension at all when both are empty). ``eku="serverAuth"`` or ``"none"``,
    ``digital_signature=False``, ``is_ca=True``, ``expired``, ``not_yet_valid`` and
    ``unknown_ca`` (signed by a fresh CA that no bundle holds) make the broken variants;
    ``authority_key_id=False`` leaves out the AKI extension; ``signature_hash`` replaces the
    hash an RSA or ECDSA issuer signs with (SHA-224, say, for a refused algorithm).
    """
    key = generate_key(key_type)
    not_before, not_after = _validity(now, expired, not_yet_valid)
    signer = _issuer_of(issuer, unknown_ca, key_type, now)
    assert signer is not None
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(signer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if authority_key_id:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.private_key.public_key()),
            critical=False,
        )
    if key_usage:
        builder = builder.add_extension(
            _key_usage(digital_signature=digital_signature, key_cert_sign=is_ca), critical=True
        )
    if eku != "none":
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(_EKU_OIDS[eku])), critical=False)
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    certificate = _sign(builder, signer.private_key, signer.key_type, pss, signature_hash)
    return Issued(certificate, key, key_type, signer)
