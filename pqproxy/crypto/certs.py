"""Certificate chains and their keys, loaded once at start-up.

Every error names the file and what is wrong with it: these messages are what
an operator sees when the proxy refuses to start.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from ..tls.enums import SignatureScheme
from . import spki
from .backends import openssl
from .provider import CertifiedKey, Signer

LoadSigner = Callable[[bytes, bytes | None], Signer]


class CertificateLoadError(ValueError):
    """A certificate or key file cannot be used; the message says which and why."""


@runtime_checkable
class _KnowsPublicKey(Protocol):
    @property
    def public_key_der(self) -> bytes: ...


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CertificateLoadError(f"{what} {os.fspath(path)}: no such file") from None
    except OSError as exc:
        raise CertificateLoadError(
            f"{what} {os.fspath(path)}: cannot read: {exc.strerror or exc}"
        ) from None


def _pem_is_encrypted(pem: bytes) -> bool:
    # PKCS#8 encrypted keys and the legacy OpenSSL "Proc-Type" form.
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in pem or b"Proc-Type: 4,ENCRYPTED" in pem


def load_certified_key(
    cert_pem_path: str | os.PathLike[str],
    key_pem_path: str | os.PathLike[str],
    password: bytes | None = None,
    load_signer: LoadSigner = openssl.load_signer,
) -> CertifiedKey:
    """Load a PEM chain (leaf first) and the leaf's private key.

    The chain is DER-encoded here, once, for every handshake to reuse. The key
    must match the leaf's public key. ``names`` holds the leaf's SAN DNS names
    (lower-cased) and IP addresses, or its CN when it has no SAN.
    """
    cert_file = os.fspath(cert_pem_path)
    key_file = os.fspath(key_pem_path)

    cert_pem = _read(cert_pem_path, "certificate file")
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise CertificateLoadError(f"certificate file {cert_file}: no PEM certificate in file")
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise CertificateLoadError(f"certificate file {cert_file}: malformed PEM: {exc}") from None
    for i in range(len(certs) - 1):
        # RFC 8446 §4.4.2: each certificate certifies the one before it.
        if certs[i].issuer != certs[i + 1].subject:
            raise CertificateLoadError(
                f"certificate file {cert_file}: certificate {i + 1} is not issued by "
                f"certificate {i + 2}; the chain must be in order, leaf first"
            )
    leaf = certs[0]
    chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)

    key_pem = _read(key_pem_path, "key file")
    if password is None and _pem_is_encrypted(key_pem):
        raise CertificateLoadError(f"key file {key_file}: key is encrypted and no password given")
    try:
        signer = load_signer(key_pem, password)
    except (ValueError, TypeError) as exc:
        raise CertificateLoadError(f"key file {key_file}: {exc}") from None

    _check_key_matches(signer, leaf, cert_file, key_file)
    try:
        allowed = spki.certificate_schemes(leaf)
    except spki.UnusableKey as exc:
        raise CertificateLoadError(f"certificate file {cert_file}: {exc}") from None
    certified_signer = signer_for_certificate(signer, allowed)
    if not certified_signer.schemes:
        raise CertificateLoadError(
            f"key file {key_file}: the {signer.backend} backend cannot sign with any scheme "
            f"the certificate in {cert_file} allows ({_scheme_names(allowed)})"
        )
    return CertifiedKey(chain=chain, signer=certified_signer, names=leaf_names(leaf))


def _scheme_names(schemes: tuple[int, ...]) -> str:
    names = []
    for scheme in schemes:
        try:
            names.append(SignatureScheme(scheme).name)
        except ValueError:
            names.append(f"0x{scheme:04x}")
    return ", ".join(names)


class CertificateSigner:
    """A backend's signer seen through its certificate: it offers only the schemes the
    certificate's SPKI allows (pqproxy.crypto.spki), and signs ``rsa_pss_pss_*`` with the
    backend's ``rsa_pss_rsae_*`` operation of the same hash, which is the same RSASSA-PSS
    computation (RFC 8446 §4.2.3: the two families differ only in the key's OID)."""

    __slots__ = ("_inner", "_schemes", "_backend_scheme")

    def __init__(self, inner: Signer, backend_scheme: dict[int, int]) -> None:
        self._inner = inner
        self._backend_scheme = backend_scheme
        self._schemes = tuple(backend_scheme)

    @property
    def schemes(self) -> tuple[int, ...]:
        return self._schemes

    @property
    def backend(self) -> str:
        return self._inner.backend

    @property
    def inner(self) -> Signer:
        return self._inner

    def sign(self, scheme: int, message: bytes) -> bytes:
        backend_scheme = self._backend_scheme.get(scheme)
        if backend_scheme is None:
            raise ValueError(f"this certificate's key does not sign with scheme {scheme:#06x}")
        return self._inner.sign(backend_scheme, message)

    def __repr__(self) -> str:
        return f"<CertificateSigner {self._inner!r} schemes={[hex(s) for s in self._schemes]}>"


def signer_for_certificate(signer: Signer, allowed: tuple[int, ...]) -> Signer:
    """``signer`` restricted to the schemes in ``allowed`` (a certificate's, from
    spki.certificate_schemes), in the signer's order of preference; the signer itself when
    that changes nothing. An id-RSASSA-PSS certificate gets ``rsa_pss_pss_*`` where the
    signer offers the ``rsa_pss_rsae_*`` of the same hash."""
    mapping: dict[int, int] = {}
    for scheme in signer.schemes:
        if scheme in allowed:
            mapping[scheme] = scheme
            continue
        for pss, rsae in spki.PSS_TO_RSAE.items():
            if rsae == scheme and pss in allowed:
                mapping[pss] = rsae
    if all(k == v for k, v in mapping.items()) and tuple(mapping) == tuple(signer.schemes):
        return signer
    return CertificateSigner(signer, mapping)


def _check_key_matches(
    signer: Signer, leaf: x509.Certificate, cert_file: str, key_file: str
) -> None:
    try:
        public_key = leaf.public_key()
    except UnsupportedAlgorithm as exc:
        raise CertificateLoadError(
            f"certificate file {cert_file}: unsupported public key algorithm in the leaf: {exc}"
        ) from None
    if isinstance(signer, _KnowsPublicKey):
        spki = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        matches = signer.public_key_der == spki
    else:
        # A signer that cannot show its public key (one on a token, say)
        # proves that it holds the leaf's key by signing.
        matches = _proves_possession(signer, public_key)
    if not matches:
        raise CertificateLoadError(
            f"key file {key_file}: key does not match the certificate in {cert_file}"
        )


def _proves_possession(signer: Signer, public_key: CertificatePublicKeyTypes) -> bool:
    message = b"pqproxy: key matches certificate"
    for scheme in signer.schemes:
        signature = signer.sign(scheme, message)
        try:
            openssl.verify_signature(public_key, scheme, message, signature)
        except ValueError:
            # The scheme does not fit the leaf's key type at all.
            return False
        except InvalidSignature:
            return False
        return True
    return False


def leaf_names(leaf: x509.Certificate) -> tuple[str, ...]:
    """The names a leaf certificate is valid for: SAN DNS names (lower-cased)
    and IP addresses; the subject CNs only when there is no SAN at all."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return tuple(
            str(attr.value).lower()
            for attr in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        )
    dns = [name.lower() for name in san.get_values_for_type(x509.DNSName)]
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return tuple(dict.fromkeys(dns + ips))
