"""Which TLS 1.3 signature schemes a certificate's key may sign with: decided here, once.

RFC 8446 §4.2.3 ties each scheme to a kind of key, and the kind is the certificate's
SubjectPublicKeyInfo algorithm, not the private key file:

- rsaEncryption (1.2.840.113549.1.1.1) signs with ``rsa_pss_rsae_*`` only;
- id-RSASSA-PSS (1.2.840.113549.1.1.10) signs with ``rsa_pss_pss_*`` only, and when the SPKI
  carries RSASSA-PSS-params (RFC 4055 §3.1) only with the scheme of that hash, MGF1 over the
  same hash, and a minimum salt no longer than the hash (TLS fixes the salt at the hash
  length);
- ECDSA by curve, Ed25519, Ed448 and ML-DSA by their own OIDs.

cryptography loads an id-RSASSA-PSS key as an ordinary RSA key and does not expose its
parameters, so they are read from the certificate's DER (``pss_parameters``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from ..tls.enums import SignatureScheme
from . import der

RSA_ENCRYPTION: Final = "1.2.840.113549.1.1.1"
RSASSA_PSS: Final = "1.2.840.113549.1.1.10"
MGF1: Final = "1.2.840.113549.1.1.8"
EC_PUBLIC_KEY: Final = "1.2.840.10045.2.1"
ED25519: Final = "1.3.101.112"
ED448: Final = "1.3.101.113"
SHA1: Final = "1.3.14.3.2.26"

# hash OID → (name, digest length, the rsa_pss_pss scheme of that hash)
PSS_HASHES: Final[dict[str, tuple[str, int, int]]] = {
    "2.16.840.1.101.3.4.2.1": ("sha256", 32, SignatureScheme.rsa_pss_pss_sha256),
    "2.16.840.1.101.3.4.2.2": ("sha384", 48, SignatureScheme.rsa_pss_pss_sha384),
    "2.16.840.1.101.3.4.2.3": ("sha512", 64, SignatureScheme.rsa_pss_pss_sha512),
}

RSAE_SCHEMES: Final[tuple[int, ...]] = (
    SignatureScheme.rsa_pss_rsae_sha256,
    SignatureScheme.rsa_pss_rsae_sha384,
    SignatureScheme.rsa_pss_rsae_sha512,
)
PSS_SCHEMES: Final[tuple[int, ...]] = (
    SignatureScheme.rsa_pss_pss_sha256,
    SignatureScheme.rsa_pss_pss_sha384,
    SignatureScheme.rsa_pss_pss_sha512,
)
# The same RSASSA-PSS operation (MGF1 over the hash, salt as long as the hash) under the
# other key OID: rsa_pss_pss_shaN signs exactly as rsa_pss_rsae_shaN does.
PSS_TO_RSAE: Final[dict[int, int]] = dict(zip(PSS_SCHEMES, RSAE_SCHEMES, strict=True))

_ECDSA_BY_CURVE: Final[dict[str, int]] = {
    "secp256r1": SignatureScheme.ecdsa_secp256r1_sha256,
    "secp384r1": SignatureScheme.ecdsa_secp384r1_sha384,
    "secp521r1": SignatureScheme.ecdsa_secp521r1_sha512,
}
_BY_OID: Final[dict[str, tuple[int, ...]]] = {
    RSA_ENCRYPTION: RSAE_SCHEMES,
    ED25519: (SignatureScheme.ed25519,),
    ED448: (SignatureScheme.ed448,),
    "2.16.840.1.101.3.4.3.17": (SignatureScheme.mldsa44,),
    "2.16.840.1.101.3.4.3.18": (SignatureScheme.mldsa65,),
    "2.16.840.1.101.3.4.3.19": (SignatureScheme.mldsa87,),
}


class UnusableKey(ValueError):
    """The certificate's key cannot sign any TLS 1.3 CertificateVerify; says why."""


@dataclass(frozen=True)
class PssParameters:
    """RSASSA-PSS-params of a key (RFC 4055 §3.1), defaults filled in."""

    hash_oid: str = SHA1
    mgf_hash_oid: str = SHA1
    min_salt_length: int = 20
    trailer_field: int = 1


def subject_public_key_info(cert: x509.Certificate) -> bytes:
    """The leaf's SubjectPublicKeyInfo exactly as the certificate encodes it.

    TBSCertificate (RFC 5280 §4.1): [0] version (optional), serialNumber, signature,
    issuer, validity, subject, subjectPublicKeyInfo, ..."""
    tbs = der.read_one(cert.tbs_certificate_bytes, der.SEQUENCE)
    fields = der.children(tbs.value)
    if fields and fields[0].tag == der.context(0):
        fields = fields[1:]
    if len(fields) < 6 or fields[5].tag != der.SEQUENCE:
        raise der.DerError("TBSCertificate has no subjectPublicKeyInfo")
    return fields[5].encoded


def _algorithm(element: der.Element) -> tuple[str, der.Element | None]:
    """An AlgorithmIdentifier: its OID and its parameters (None when absent)."""
    if element.tag != der.SEQUENCE:
        raise der.DerError("AlgorithmIdentifier is not a SEQUENCE")
    parts = der.children(element.value)
    if not parts or parts[0].tag != der.OID or len(parts) > 2:
        raise der.DerError("malformed AlgorithmIdentifier")
    return der.decode_oid(parts[0].value), parts[1] if len(parts) == 2 else None


def pss_parameters(spki: bytes) -> PssParameters | None:
    """The RSASSA-PSS-params of an id-RSASSA-PSS SubjectPublicKeyInfo; None when the key
    has none (RFC 4055 §3.1: absent parameters mean the key may be used with any)."""
    outer = der.read_one(spki, der.SEQUENCE)
    parts = der.children(outer.value)
    if len(parts) != 2:
        raise der.DerError("malformed SubjectPublicKeyInfo")
    oid, params = _algorithm(parts[0])
    if oid != RSASSA_PSS:
        raise der.DerError(f"not an id-RSASSA-PSS key ({oid})")
    if params is None or params.tag == der.NULL:
        return None
    if params.tag != der.SEQUENCE:
        raise der.DerError("RSASSA-PSS-params is not a SEQUENCE")
    found = PssParameters()
    hash_oid, mgf_hash, salt, trailer = found.hash_oid, found.mgf_hash_oid, 20, 1
    for field in der.children(params.value):
        # Each field is an EXPLICIT tag around exactly one element.
        inner, end = der.read(field.value)
        if end != len(field.value):
            raise der.DerError("trailing bytes in an RSASSA-PSS-params field")
        if field.tag == der.context(0):
            hash_oid = _algorithm(inner)[0]
        elif field.tag == der.context(1):
            mgf_oid, mgf_params = _algorithm(inner)
            if mgf_oid != MGF1 or mgf_params is None:
                raise UnusableKey(f"RSA-PSS key with mask generation {mgf_oid}, not MGF1")
            mgf_hash = _algorithm(mgf_params)[0]
        elif field.tag == der.context(2) and inner.tag == der.INTEGER:
            salt = der.decode_integer(inner.value)
        elif field.tag == der.context(3) and inner.tag == der.INTEGER:
            trailer = der.decode_integer(inner.value)
        else:
            raise der.DerError(f"unexpected field 0x{field.tag:02x} in RSASSA-PSS-params")
    return PssParameters(hash_oid, mgf_hash, salt, trailer)


def _pss_schemes(cert: x509.Certificate) -> tuple[int, ...]:
    try:
        params = pss_parameters(subject_public_key_info(cert))
    except der.DerError as exc:
        raise UnusableKey(f"RSA-PSS key with unreadable parameters: {exc}") from None
    if params is None:
        return PSS_SCHEMES
    entry = PSS_HASHES.get(params.hash_oid)
    if entry is None:
        raise UnusableKey(
            f"RSA-PSS key restricted to hash {params.hash_oid}; TLS 1.3 signs with SHA-256, "
            "SHA-384 or SHA-512 (RFC 8446 §4.2.3)"
        )
    name, digest_size, scheme = entry
    if params.mgf_hash_oid != params.hash_oid:
        raise UnusableKey(
            f"RSA-PSS key restricted to MGF1 over {params.mgf_hash_oid} with {name}; TLS 1.3 "
            "uses MGF1 over the signature's own hash"
        )
    if params.min_salt_length > digest_size:
        raise UnusableKey(
            f"RSA-PSS key needs a salt of at least {params.min_salt_length} bytes; TLS 1.3 "
            f"uses {digest_size} with {name}"
        )
    if params.trailer_field != 1:
        raise UnusableKey(f"RSA-PSS key with trailer field {params.trailer_field}")
    return (scheme,)


def certificate_schemes(cert: x509.Certificate) -> tuple[int, ...]:
    """The TLS 1.3 schemes ``cert``'s key may sign a CertificateVerify with, by its SPKI
    algorithm (and, for RSASSA-PSS, its parameters). Raises UnusableKey when there is none."""
    oid = cert.public_key_algorithm_oid.dotted_string
    if oid == RSASSA_PSS:
        return _pss_schemes(cert)
    if oid == EC_PUBLIC_KEY:
        try:
            public_key = cert.public_key()
        except (ValueError, UnsupportedAlgorithm):
            raise UnusableKey("EC key on a curve this library does not know") from None
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise UnusableKey("EC key of an unexpected type")
        scheme = _ECDSA_BY_CURVE.get(public_key.curve.name)
        if scheme is None:
            raise UnusableKey(f"ECDSA on {public_key.curve.name} has no TLS 1.3 scheme")
        return (scheme,)
    schemes = _BY_OID.get(oid)
    if schemes is None:
        raise UnusableKey(f"public key algorithm {oid} has no TLS 1.3 signature scheme")
    return schemes
