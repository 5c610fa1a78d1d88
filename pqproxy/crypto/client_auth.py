"""Client certificates for mutual TLS: chain validation and the client's CertificateVerify.

Chains are validated by cryptography's X.509 verifier (``cryptography.x509.verification``)
with its client profile, adjusted in two places (see ``_ee_policy``). One fallback exists,
for chains that contain an Ed25519 signature: the library's profile is the CA/B Forum's
(Baseline Requirements §7.1.3.1), which permits only RSA and NIST-curve ECDSA (and, in this
release, ML-DSA) as *issuer* keys, and has no switch to allow Ed25519; an Ed25519 *leaf*
key it accepts. Such a chain is validated by ``_fallback_path``, which writes out the same
rules; every other chain goes through the library alone.

Which alert (RFC 8446 §6.2):

- a chain or certificate that does not parse, or breaks the profile      → bad_certificate
- a certificate outside its validity period at ``now``                   → certificate_expired
- no certificate in the chain is issued by a trust anchor               → unknown_ca
- a leaf key, or a certificate signature algorithm, we cannot use       → unsupported_certificate
- a leaf not meant for client authentication (an EKU without clientAuth, a KeyUsage without
  digitalSignature, a CA certificate as the leaf) → bad_certificate: §6.2 keeps
  unsupported_certificate for a certificate "of an unsupported type", and a certificate of
  a supported type issued for another purpose is a bad one for this purpose.

Before the library sees a chain, three cheap refusals bound what a client can make its path
builder do (a crafted 1-4 KB chain of self-issued "CAs" sharing one name and key costs it
10-15 ms, 25-70x a normal verification, as every ordering of them checks out):

- more than ``max_chain_depth`` certificates (default 5: the leaf, three intermediates and
  the root a client may include)                                         → bad_certificate
  (our limit on a list the client sent, not an unknown issuer; Go and rustls answer
  bad_certificate for their own limits)
- two certificates with the same subject and the same key               → bad_certificate
  (no path holds both; a chain that does is malformed. A client sending both forms of a
  cross-signed CA must send one.)
- a self-issued certificate (subject = issuer) after the leaf that is not a trust anchor
  (same subject and key as one)                                          → unknown_ca
  (OpenSSL's X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN answers unknown_ca: such a certificate
  can only end a path, and it is not one we trust. Key-rollover certificates, self-issued
  with another key, are refused with it: client PKIs do not send them.)

The library says only *that* a chain failed, in a message that is no interface, so the
alert is chosen afterwards by ``_classify``. Those checks run only on a chain the library
(or the fallback) has already rejected: they pick the alert, never the verdict.

In the CertificateVerify, a scheme that does not fit the leaf's key, or that we did not
offer, is illegal_parameter (§6.2: a field "inconsistent with other fields"; what OpenSSL
and BoringSSL send for both, Go for an unoffered one; Go answers a scheme of the wrong key
type with decrypt_error); a signature that does not verify is decrypt_error (§4.4.3). Which
schemes fit is the leaf's SPKI's to say (spki.certificate_schemes, one mapping for our own
certificates and the client's): an id-RSASSA-PSS key signs with rsa_pss_pss_* only, and
only with the hash its parameters name; an rsaEncryption key with rsa_pss_rsae_* only.

Two deliberate departures from the library's client profile, both towards what private
client PKIs issue: a leaf without subjectAltName is accepted (the identity is then its
subject DN; the library insists on a SAN), and a leaf without authorityKeyIdentifier is
accepted (a path-building hint only: the signatures bind the chain). A leaf with no EKU at
all is accepted, as RFC 5280 §4.2.1.12 says (no EKU: no restriction), as the library,
OpenSSL and Go do; one whose EKU lacks clientAuth is not.
"""

from __future__ import annotations

import datetime
import math
import warnings
from collections.abc import Sequence
from typing import Final, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import (
    ExtendedKeyUsageOID,
    ExtensionOID,
    SignatureAlgorithmOID,
)
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from ..tls.enums import SignatureScheme
from . import spki
from .backends import openssl
from .provider import CertificateRejected, PeerIdentity

DEFAULT_SIGNATURE_SCHEMES: Final[tuple[int, ...]] = (
    SignatureScheme.mldsa65,
    SignatureScheme.mldsa87,
    SignatureScheme.mldsa44,
    SignatureScheme.ecdsa_secp256r1_sha256,
    SignatureScheme.ecdsa_secp384r1_sha384,
    SignatureScheme.ed25519,
    SignatureScheme.rsa_pss_rsae_sha256,
    SignatureScheme.rsa_pss_rsae_sha384,
    SignatureScheme.rsa_pss_rsae_sha512,
    # For id-RSASSA-PSS client keys (RFC 8446 §4.2.3). Go and BoringSSL do not offer
    # these; OpenSSL does, and an OpenSSL client holding such a key sends no certificate
    # at all unless one is offered.
    SignatureScheme.rsa_pss_pss_sha256,
    SignatureScheme.rsa_pss_pss_sha384,
    SignatureScheme.rsa_pss_pss_sha512,
)

# The library's own default (RFC 5280 counting: intermediates below the anchor, the leaf
# not counted); the fallback uses the same number so both paths accept the same depths.
MAX_INTERMEDIATES: Final = 8
# What a client may send at most, whatever max_chain_depth says: the leaf,
# MAX_INTERMEDIATES intermediates, and the root some clients include although RFC 8446
# §4.4.2 lets them omit it. A longer list only makes the path search (and, on failure, the
# alert search) do more work for an attacker.
MAX_CHAIN_LENGTH: Final = MAX_INTERMEDIATES + 2
# The default limit on certificates in a client's chain: the leaf, three intermediates and
# a root. Real client PKIs use one or two intermediates.
DEFAULT_MAX_CHAIN_DEPTH: Final = 5

# CertificateRejected.check of the cheap refusals (metrics labels).
CHECK_CHAIN_TOO_LONG: Final = "chain_too_long"
CHECK_DUPLICATE: Final = "duplicate_certificate"
CHECK_SELF_ISSUED: Final = "self_issued_intermediate"

# Library reasons and certificate names are attacker-influenced text bound for a log line.
_MAX_REASON: Final = 300

MIN_RSA_BITS: Final = openssl.MIN_RSA_BITS

# The curves the fallback accepts in an issuer's key (the library's).
_ISSUER_CURVES: Final = frozenset({"secp256r1", "secp384r1", "secp521r1"})
# Every scheme verify_signature can check (openssl.verify_signature's repertoire). Which of
# them a given leaf may use is spki.certificate_schemes' answer, the same one the server's
# own certificates get.
VERIFIABLE_SCHEMES: Final = frozenset(
    {
        SignatureScheme.ecdsa_secp256r1_sha256,
        SignatureScheme.ecdsa_secp384r1_sha384,
        SignatureScheme.ecdsa_secp521r1_sha512,
        *spki.RSAE_SCHEMES,
        *spki.PSS_SCHEMES,
        SignatureScheme.ed25519,
        SignatureScheme.ed448,
        SignatureScheme.mldsa44,
        SignatureScheme.mldsa65,
        SignatureScheme.mldsa87,
    }
)

# Certificate signature algorithms accepted anywhere in a chain: the library's set (CA/B
# BR §7.1.3.2 plus ML-DSA) and Ed25519 through the fallback. Only used to pick
# unsupported_certificate for a chain that failed, and by the fallback itself.
_CERT_SIGNATURE_ALGORITHMS: Final = frozenset(
    {
        SignatureAlgorithmOID.RSA_WITH_SHA256,
        SignatureAlgorithmOID.RSA_WITH_SHA384,
        SignatureAlgorithmOID.RSA_WITH_SHA512,
        SignatureAlgorithmOID.RSASSA_PSS,
        SignatureAlgorithmOID.ECDSA_WITH_SHA256,
        SignatureAlgorithmOID.ECDSA_WITH_SHA384,
        SignatureAlgorithmOID.ECDSA_WITH_SHA512,
        SignatureAlgorithmOID.ED25519,
        SignatureAlgorithmOID.ML_DSA_44,
        SignatureAlgorithmOID.ML_DSA_65,
        SignatureAlgorithmOID.ML_DSA_87,
    }
)

# The extensions the library's profile understands (RFC 5280 §4.2: a critical extension
# that is not understood rejects the certificate). The fallback uses the same list.
_KNOWN_EXTENSIONS: Final = frozenset(
    {
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.NAME_CONSTRAINTS,
        ExtensionOID.EXTENDED_KEY_USAGE,
    }
)

# Extensions the library's profile requires to be non-critical wherever they appear.
_NEVER_CRITICAL: Final = frozenset(
    {
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.EXTENDED_KEY_USAGE,
    }
)

_CHECK_ERRORS: Final = (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm)
_STRONG_HASHES: Final = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_DER: Final = Encoding.DER

_Ext = TypeVar("_Ext", bound=x509.ExtensionType)


class _Rejected(Exception):
    """The chain fails; ``reason`` goes to the log, the alert is chosen by ``_classify``."""


def _loggable(text: str) -> str:
    # Subject names and library messages come from the client's certificates: no control
    # characters (a newline would forge a log line) and a bounded length.
    cleaned = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return cleaned if len(cleaned) <= _MAX_REASON else cleaned[: _MAX_REASON - 3] + "..."


def _describe(cert: x509.Certificate) -> str:
    try:
        return _loggable(cert.subject.rfc4514_string())
    except ValueError:
        return "<unparseable subject>"


_PARSE_ERRORS: Final = (
    ValueError,
    TypeError,
    x509.InvalidVersion,
    UnsupportedAlgorithm,
    CryptographyDeprecationWarning,
)


def _parse(position: int, der: bytes) -> x509.Certificate:
    """One certificate of the client's chain; bad_certificate if any part of it that this
    module reads does not decode."""
    try:
        # cryptography warns (and will one day refuse) on what RFC 5280 forbids but old
        # certificates contain, such as a serial number that is not positive. From a client
        # that is a malformed certificate, and its warning must not reach our stderr.
        # (catch_warnings is process-wide state: fine on the event loop's one thread.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(der)
            # cryptography decodes names, validity and extensions lazily, on first access:
            # touch them all now, so that a malformed field is bad_certificate here and not
            # an exception from deep inside the checks below.
            _ = (cert.version, cert.serial_number, cert.subject, cert.issuer)
            _ = (cert.signature_algorithm_oid, cert.not_valid_before_utc, cert.not_valid_after_utc)
            for extension in cert.extensions:
                _ = extension.value
    except _PARSE_ERRORS as exc:
        raise CertificateRejected(
            "bad_certificate",
            f"certificate {position} of the chain does not parse ({type(exc).__name__})",
        ) from None
    return cert


def _validation_time(now: float) -> datetime.datetime:
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite Unix time, got {now!r}")
    return datetime.datetime.fromtimestamp(now, datetime.UTC)


def _is_valid_at(cert: x509.Certificate, when: datetime.datetime) -> bool:
    # RFC 5280 §4.1.2.5: both ends of the period are inclusive.
    return cert.not_valid_before_utc <= when <= cert.not_valid_after_utc


def _extension(cert: x509.Certificate, kind: type[_Ext]) -> _Ext | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _signature_algorithm_allowed(cert: x509.Certificate) -> bool:
    if cert.signature_algorithm_oid not in _CERT_SIGNATURE_ALGORITHMS:
        return False
    if cert.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS:
        # The PSS hash is a parameter, not part of the OID: hold it to the library's set.
        try:
            return isinstance(cert.signature_hash_algorithm, _STRONG_HASHES)
        except UnsupportedAlgorithm:
            return False
    return True


def _directly_issued(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s name and key sign ``child`` (the library's own check)."""
    try:
        child.verify_directly_issued_by(issuer)
    except _CHECK_ERRORS:
        return False
    return True


def _leaf_schemes(cert: x509.Certificate, public_key: CertificatePublicKeyTypes) -> frozenset[int]:
    """The TLS 1.3 schemes a leaf's key can sign a CertificateVerify with: the certificate's
    SPKI decides (spki.certificate_schemes, as for our own certificates: rsaEncryption →
    rsa_pss_rsae_*, id-RSASSA-PSS → rsa_pss_pss_* of its hash), then our key-size floor.
    Raises _Rejected naming the reason when there are none."""
    try:
        schemes = spki.certificate_schemes(cert)
    except spki.UnusableKey as exc:
        raise _Rejected(str(exc)) from None
    # An id-RSASSA-PSS key loads as an RSA key too, so this covers both RSA families.
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
        raise _Rejected(f"RSA key of {public_key.key_size} bits; at least {MIN_RSA_BITS}")
    return frozenset(schemes)


def _issuer_key_allowed(public_key: CertificatePublicKeyTypes) -> bool:
    """The issuer keys the fallback accepts: the library's (RSA ≥ 2048 bits, P-256/384/521,
    ML-DSA) and Ed25519."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return public_key.key_size >= MIN_RSA_BITS
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return public_key.curve.name in _ISSUER_CURVES
    return isinstance(
        public_key,
        ed25519.Ed25519PublicKey
        | mldsa.MLDSA44PublicKey
        | mldsa.MLDSA65PublicKey
        | mldsa.MLDSA87PublicKey,
    )


def _check_ee_key_usage(usage: x509.KeyUsage | None) -> None:
    # The library's own end-entity KeyUsage rule (no keyCertSign), and what it leaves out:
    # the key signs the CertificateVerify, so a KeyUsage, when present, must allow
    # digitalSignature (RFC 5280 §4.2.1.3, RFC 8446 §4.4.2.2).
    if usage is None:
        return
    if usage.key_cert_sign:
        raise ValueError("end-entity KeyUsage asserts keyCertSign")
    if not usage.digital_signature:
        raise ValueError("KeyUsage does not allow digitalSignature")


def _ee_key_usage(_policy: Policy, _cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    # A validator replaces the library's own for that extension, hence the full rule.
    _check_ee_key_usage(usage)


def _ee_policy() -> ExtensionPolicy:
    # The library's client profile, except: subjectAltName and authorityKeyIdentifier may be
    # absent (see the module docstring); KeyUsage as in _ee_key_usage.
    return (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None)
        .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ee_key_usage)
    )


def _identity(leaf: x509.Certificate, path: Sequence[x509.Certificate]) -> PeerIdentity:
    san = _extension(leaf, x509.SubjectAlternativeName)
    dns_names: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    if san is not None:
        # DNS names compare case-insensitively (RFC 4343); lower-cased once, here.
        dns_names = tuple(dict.fromkeys(n.lower() for n in san.get_values_for_type(x509.DNSName)))
        uris = tuple(dict.fromkeys(san.get_values_for_type(x509.UniformResourceIdentifier)))
    return PeerIdentity(
        subject=leaf.subject.rfc4514_string(),
        dns_names=dns_names,
        uris=uris,
        chain=tuple(c.public_bytes(_DER) for c in path),
        # The path validates until its first certificate expires (as a rule the leaf).
        not_after=min(c.not_valid_after_utc for c in path).timestamp(),
    )


def _name_and_key(cert: x509.Certificate) -> tuple[bytes, bytes] | None:
    """(subject DER, SubjectPublicKeyInfo DER), or None for a key that does not load (such a
    certificate can sign nothing, so it cannot feed a path search either)."""
    try:
        spki = cert.public_key().public_bytes(_DER, PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, UnsupportedAlgorithm):
        return None
    return cert.subject.public_bytes(), spki


def _load_bundle(ca_bundle_pem: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in ca_bundle_pem:
        raise ValueError("client CA bundle: no PEM certificate in it")
    try:
        anchors = x509.load_pem_x509_certificates(ca_bundle_pem)
    except ValueError as exc:
        raise ValueError(f"client CA bundle: malformed PEM: {exc}") from None
    for index, anchor in enumerate(anchors, start=1):
        try:
            constraints = _extension(anchor, x509.BasicConstraints)
        except ValueError as exc:
            raise ValueError(f"client CA bundle: certificate {index}: {exc}") from None
        # The library would silently refuse every chain through such a certificate; say so
        # at start-up instead of with an alert per connection.
        if constraints is None or not constraints.ca:
            raise ValueError(
                f"client CA bundle: certificate {index} ({_describe(anchor)}) is not a CA "
                "certificate (basicConstraints cA is not set)"
            )
    return anchors


class X509ClientVerifier:
    """Validates client certificate chains against a fixed set of trust anchors and checks
    the client's CertificateVerify. Implements provider.ClientCertificateVerifier.

    The bundle is parsed once, here; every call works only on its arguments, so one
    instance serves every connection (and nothing about one client outlives its call).
    """

    __slots__ = (
        "_anchors",
        "_anchor_names_and_keys",
        "_by_subject",
        "_builder",
        "_max_chain_depth",
        "_schemes",
        "_scheme_set",
    )

    def __init__(
        self,
        ca_bundle_pem: bytes,
        *,
        signature_schemes: tuple[int, ...] = DEFAULT_SIGNATURE_SCHEMES,
        max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
    ) -> None:
        if isinstance(max_chain_depth, bool) or not 1 <= max_chain_depth <= MAX_CHAIN_LENGTH:
            raise ValueError(f"max_chain_depth must be 1..{MAX_CHAIN_LENGTH}")
        self._max_chain_depth = max_chain_depth
        if not signature_schemes:
            raise ValueError("signature_schemes is empty")
        unknown = [s for s in signature_schemes if s not in VERIFIABLE_SCHEMES]
        if unknown:
            raise ValueError(
                "cannot verify client signatures with scheme(s) "
                + ", ".join(f"0x{s:04x}" for s in unknown)
            )
        if len(set(signature_schemes)) != len(signature_schemes):
            raise ValueError("signature_schemes lists a scheme twice")
        self._anchors: tuple[x509.Certificate, ...] = tuple(_load_bundle(ca_bundle_pem))
        # For choosing an alert and for the fallback: anchors by subject, so a client's
        # certificate is checked against the few that could have issued it.
        self._by_subject: dict[x509.Name, list[x509.Certificate]] = {}
        for anchor in self._anchors:
            self._by_subject.setdefault(anchor.subject, []).append(anchor)
        # What makes a presented certificate "the anchor": its subject and key.
        self._anchor_names_and_keys = frozenset(
            pair for pair in map(_name_and_key, self._anchors) if pair is not None
        )
        self._schemes = tuple(signature_schemes)
        self._scheme_set = frozenset(signature_schemes)
        # Everything but the validation time, which each call sets.
        self._builder = (
            PolicyBuilder()
            .store(Store(list(self._anchors)))
            .max_chain_depth(MAX_INTERMEDIATES)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_ee_policy()
            )
        )

    @property
    def signature_schemes(self) -> tuple[int, ...]:
        return self._schemes

    @property
    def max_chain_depth(self) -> int:
        return self._max_chain_depth

    def __repr__(self) -> str:
        return f"<X509ClientVerifier anchors={len(self._anchors)} schemes={len(self._schemes)}>"

    # --- chain -----------------------------------------------------------------------------

    def verify_chain(self, chain: tuple[bytes, ...], now: float) -> PeerIdentity:
        if not chain:
            raise CertificateRejected("bad_certificate", "empty certificate chain")
        if len(chain) > self._max_chain_depth:
            raise CertificateRejected(
                "bad_certificate",
                f"certificate chain of {len(chain)} certificates; "
                f"at most {self._max_chain_depth} (max_chain_depth)",
                CHECK_CHAIN_TOO_LONG,
            )
        when = _validation_time(now)
        certs = [_parse(index, der) for index, der in enumerate(chain, start=1)]
        leaf, intermediates = certs[0], certs[1:]
        self._refuse_crafted(certs)

        # Our own policy, checked before the chain: the leaf must carry a key that can sign
        # one of the schemes we offer, or no CertificateVerify could ever succeed.
        try:
            usable = _leaf_schemes(leaf, leaf.public_key()) & self._scheme_set
        except _Rejected as rejected:
            raise CertificateRejected("unsupported_certificate", f"leaf key: {rejected}") from None
        except (ValueError, UnsupportedAlgorithm):
            raise CertificateRejected(
                "unsupported_certificate", "leaf public key is of an unsupported type"
            ) from None
        if not usable:
            raise CertificateRejected(
                "unsupported_certificate", "leaf key fits none of the accepted signature schemes"
            )

        verifier = self._builder.time(when).build_client_verifier()
        try:
            path: Sequence[x509.Certificate] = verifier.verify(leaf, intermediates).chain
        except (VerificationError, ValueError) as exc:
            # (ValueError: in case some malformed field still reaches the library's own
            # decoder; a rejection is the right answer to it, never a crash.)
            if not any(c.signature_algorithm_oid == SignatureAlgorithmOID.ED25519 for c in certs):
                raise self._classify(certs, when, str(exc)) from None
            # The library refuses Ed25519 issuers by policy (module docstring): validate
            # this chain with the same rules written out.
            try:
                path = self._fallback_path(leaf, intermediates, when)
            except _Rejected as rejected:
                raise self._classify(certs, when, str(rejected)) from None
        try:
            return _identity(leaf, path)
        except ValueError:
            raise CertificateRejected("bad_certificate", "malformed subjectAltName") from None

    def _refuse_crafted(self, certs: Sequence[x509.Certificate]) -> None:
        """The cheap refusals of the module docstring, before any signature is checked: a
        chain no real client sends, and that would make the path builder try every ordering
        of certificates that all verify each other."""
        seen: dict[tuple[bytes, bytes], int] = {}
        for position, cert in enumerate(certs, start=1):
            pair = _name_and_key(cert)
            if pair is None:
                continue
            if pair in seen:
                raise CertificateRejected(
                    "bad_certificate",
                    f"certificates {seen[pair]} and {position} of the chain have the same "
                    f"subject and key ({_describe(cert)})",
                    CHECK_DUPLICATE,
                )
            seen[pair] = position
            if (
                position > 1
                and cert.subject == cert.issuer
                and pair not in self._anchor_names_and_keys
            ):
                raise CertificateRejected(
                    "unknown_ca",
                    f"certificate {position} of the chain is self-issued "
                    f"({_describe(cert)}) and not a trusted CA",
                    CHECK_SELF_ISSUED,
                )

    def _issuing_anchors(self, cert: x509.Certificate) -> list[x509.Certificate]:
        candidates = self._by_subject.get(cert.issuer, ())
        return [a for a in candidates if _directly_issued(cert, a)]

    def _classify(
        self, certs: Sequence[x509.Certificate], when: datetime.datetime, reason: str
    ) -> CertificateRejected:
        """The alert for a chain that has already been rejected (module docstring)."""
        reason = _loggable(reason)

        def rejected(alert: str, finding: str) -> CertificateRejected:
            # Our finding, then what the verifier said, unless that is the same thing.
            return CertificateRejected(
                alert, finding if reason.startswith(finding) else f"{finding}: {reason}"
            )

        for cert in certs:
            if not _is_valid_at(cert, when):
                return rejected("certificate_expired", f"{_describe(cert)} is not valid at {when}")
        problem = _leaf_usage_problem(certs[0])
        if problem is not None:
            return rejected("bad_certificate", problem)
        for cert in certs:
            if not _signature_algorithm_allowed(cert):
                return rejected(
                    "unsupported_certificate",
                    f"{_describe(cert)} is signed with an unsupported algorithm",
                )
        anchors = [a for cert in certs for a in self._issuing_anchors(cert)]
        if not anchors and not any(cert in self._anchors for cert in certs):
            return rejected("unknown_ca", "no certificate of the chain is issued by a trusted CA")
        if anchors and not any(_is_valid_at(a, when) for a in anchors):
            return rejected("certificate_expired", f"the trusted CA is not valid at {when}")
        return CertificateRejected("bad_certificate", reason)

    # --- the Ed25519 fallback --------------------------------------------------------------

    def _fallback_path(
        self,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        when: datetime.datetime,
    ) -> list[x509.Certificate]:
        """The path leaf → anchor under the library's client profile, for a chain that holds
        an Ed25519 signature. Raises _Rejected.

        The search is greedy (a trust anchor first, else the first presented certificate
        whose key signs the current one): enough for the chains clients send, in order, and
        it cannot accept anything the checks below would not.
        """
        path = [leaf]
        unused = list(intermediates)
        while True:
            current = path[-1]
            anchors = self._issuing_anchors(current)
            if anchors:
                path.append(anchors[0])
                break
            issuer = next((c for c in unused if _directly_issued(current, c)), None)
            if issuer is None:
                raise _Rejected(f"no issuer found for {_describe(current)}")
            if len(path) > MAX_INTERMEDIATES:
                raise _Rejected(f"more than {MAX_INTERMEDIATES} intermediate certificates")
            unused.remove(issuer)
            path.append(issuer)
        _check_path(path, when)
        return path

    # --- CertificateVerify -----------------------------------------------------------------

    def verify_signature(self, leaf: bytes, scheme: int, message: bytes, signature: bytes) -> None:
        if scheme not in self._scheme_set:
            raise CertificateRejected(
                "illegal_parameter", f"scheme 0x{scheme:04x} was not offered for client auth"
            )
        cert = _parse(1, leaf)
        try:
            public_key = cert.public_key()
            fits = scheme in _leaf_schemes(cert, public_key)
        except _Rejected as rejected:
            raise CertificateRejected("unsupported_certificate", str(rejected)) from None
        except (ValueError, UnsupportedAlgorithm):
            raise CertificateRejected(
                "unsupported_certificate", "leaf public key is of an unsupported type"
            ) from None
        if not fits:
            raise CertificateRejected(
                "illegal_parameter",
                f"scheme 0x{scheme:04x} does not fit the client's key "
                f"({cert.public_key_algorithm_oid.dotted_string})",
            )
        try:
            openssl.verify_signature(public_key, scheme, message, signature)
        except InvalidSignature:
            raise CertificateRejected(
                "decrypt_error", "client CertificateVerify signature does not verify"
            ) from None
        except ValueError:
            # verify_signature's own scheme/key check; _leaf_schemes has already agreed.
            raise CertificateRejected(
                "illegal_parameter", f"scheme 0x{scheme:04x} does not fit the client's key"
            ) from None


def _leaf_usage_problem(leaf: x509.Certificate) -> str | None:
    """Why ``leaf`` may not authenticate a TLS client, or None (the library's end-entity
    rules and ours: no CA flag, EKU clientAuth if there is an EKU, KeyUsage as
    _ee_key_usage)."""
    try:
        constraints = _extension(leaf, x509.BasicConstraints)
        eku = _extension(leaf, x509.ExtendedKeyUsage)
        usage = _extension(leaf, x509.KeyUsage)
    except ValueError as exc:
        return f"leaf extensions are malformed ({_loggable(str(exc))})"
    if constraints is not None and constraints.ca:
        return "leaf is a CA certificate"
    # The library, following CA/B BR §7.1.2.7.10, does not let anyExtendedKeyUsage stand in
    # for clientAuth on a leaf; neither do we.
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        return "leaf extended key usage does not include clientAuth"
    try:
        _check_ee_key_usage(usage)
    except ValueError as exc:
        return str(exc)
    return None


def _check_path(path: Sequence[x509.Certificate], when: datetime.datetime) -> None:
    """The library's client-profile rules for a built path (leaf first, anchor last), for
    the fallback. Anything this code does not evaluate (name constraints) is refused rather
    than ignored."""
    for cert in path:
        if cert.version is not x509.Version.v3:
            raise _Rejected(f"{_describe(cert)} is not an X.509 v3 certificate")
        if not _is_valid_at(cert, when):
            raise _Rejected(f"{_describe(cert)} is not valid at {when}")
        try:
            extensions = cert.extensions
        except ValueError as exc:
            raise _Rejected(f"{_describe(cert)} has malformed extensions ({exc})") from None
        for ext in extensions:
            if ext.critical and ext.oid not in _KNOWN_EXTENSIONS:
                raise _Rejected(f"{_describe(cert)} has an unknown critical extension {ext.oid}")
            if ext.critical and ext.oid in _NEVER_CRITICAL:
                raise _Rejected(f"{_describe(cert)}: extension {ext.oid} must not be critical")
            if ext.oid == ExtensionOID.NAME_CONSTRAINTS:
                raise _Rejected(f"{_describe(cert)}: name constraints are not supported here")
    for child in path[:-1]:
        if not _signature_algorithm_allowed(child):
            raise _Rejected(f"{_describe(child)} is signed with an unsupported algorithm")

    problem = _leaf_usage_problem(path[0])
    if problem is not None:
        raise _Rejected(problem)

    # Issuers: path[1:], the anchor last. RFC 5280 §4.2.1.9: pathLenConstraint counts the
    # non-self-issued intermediates below the CA, the leaf not included.
    below = 0
    for issuer in path[1:]:
        name = _describe(issuer)
        try:
            public_key = issuer.public_key()
        except (ValueError, UnsupportedAlgorithm):
            raise _Rejected(f"{name} has an unsupported public key") from None
        if not _issuer_key_allowed(public_key):
            raise _Rejected(f"{name} has a key not allowed for a CA")
        constraints_ext = _find(issuer, ExtensionOID.BASIC_CONSTRAINTS)
        if constraints_ext is None or not constraints_ext.critical:
            raise _Rejected(f"{name} lacks a critical basicConstraints")
        constraints = constraints_ext.value
        assert isinstance(constraints, x509.BasicConstraints)
        if not constraints.ca:
            raise _Rejected(f"{name} issues certificates but is not a CA")
        if constraints.path_length is not None and below > constraints.path_length:
            raise _Rejected(f"{name}: path length constraint exceeded")
        usage = _extension(issuer, x509.KeyUsage)
        if usage is None or not usage.key_cert_sign:
            raise _Rejected(f"{name}: KeyUsage does not allow keyCertSign")
        eku = _extension(issuer, x509.ExtendedKeyUsage)
        if eku is not None and not (
            ExtendedKeyUsageOID.CLIENT_AUTH in eku
            or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku
        ):
            raise _Rejected(f"{name}: extended key usage excludes clientAuth")
        if issuer.issuer != issuer.subject:
            below += 1


def _find(
    cert: x509.Certificate, oid: x509.ObjectIdentifier
) -> x509.Extension[x509.ExtensionType] | None:
    try:
        return cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
