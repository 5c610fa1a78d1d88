"""The default backend: ``cryptography`` and the OpenSSL it bundles.

``cryptography`` is a hard dependency of the whole proxy (the record layer and
key schedule use it), so it is imported at module level; whether *this* build
has ML-KEM and ML-DSA is what ``is_available()`` and ``capabilities()`` probe.

Error policy at this edge: a bad peer share is ``InvalidKeyShare``
(illegal_parameter); anything else the library raises during an exchange or a
signature is ``BackendError`` (internal_error). Messages carry the operation
and the exception type only, never input or key material.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

import cryptography
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa, mlkem, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ...tls.enums import NamedGroup, SignatureScheme, group_name
from .. import mldsa_keys
from ..hybrid import compose_groups
from ..provider import (
    BackendError,
    ClientKeyExchange,
    InvalidKeyShare,
    Kem,
    KxGroup,
    SharedSecret,
    check_share_length,
)

NAME: Final = "openssl"

_X962: Final = serialization.Encoding.X962
_UNCOMPRESSED: Final = serialization.PublicFormat.UncompressedPoint
_ECDH: Final = ec.ECDH()


def _backend_error(operation: str, exc: BaseException) -> BackendError:
    # Only the type: library messages may echo their input.
    return BackendError(f"openssl backend: {operation} failed ({type(exc).__name__})")


# --- X25519 (RFC 7748, RFC 8446 §7.4.2) ---------------------------------------------------

_X25519_LENGTH: Final = 32


def _x25519_agree(private_key: X25519PrivateKey, peer_share: bytes) -> SharedSecret:
    # Every 32-byte string is a valid u-coordinate, so loading cannot fail;
    # cryptography raises ValueError from exchange() only for the all-zero
    # output of a small-order point, which RFC 8446 §7.4.2 says to reject.
    try:
        return SharedSecret(private_key.exchange(X25519PublicKey.from_public_bytes(peer_share)))
    except ValueError:
        raise InvalidKeyShare("x25519: all-zero shared secret (RFC 8446 §7.4.2)") from None


class X25519Group:
    __slots__ = ()

    @property
    def group(self) -> int:
        return NamedGroup.x25519

    @property
    def backend(self) -> str:
        return NAME

    @property
    def client_share_length(self) -> int:
        return _X25519_LENGTH

    @property
    def server_share_length(self) -> int:
        return _X25519_LENGTH

    def server_exchange(self, client_share: bytes) -> tuple[bytes, SharedSecret]:
        check_share_length("x25519 client share", client_share, _X25519_LENGTH)
        try:
            private_key = X25519PrivateKey.generate()
            secret = _x25519_agree(private_key, client_share)
            return private_key.public_key().public_bytes_raw(), secret
        except InvalidKeyShare:
            raise
        except Exception as exc:
            raise _backend_error("x25519 key exchange", exc) from exc

    def start(self) -> ClientKeyExchange:
        try:
            return _X25519Client(X25519PrivateKey.generate())
        except Exception as exc:
            raise _backend_error("x25519 key generation", exc) from exc

    def __repr__(self) -> str:
        return "<X25519Group backend=openssl>"


class _X25519Client:
    __slots__ = ("_private_key", "_share")

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._private_key = private_key
        self._share = private_key.public_key().public_bytes_raw()

    @property
    def share(self) -> bytes:
        return self._share

    def complete(self, server_share: bytes) -> SharedSecret:
        check_share_length("x25519 server share", server_share, _X25519_LENGTH)
        return _x25519_agree(self._private_key, server_share)

    def __repr__(self) -> str:
        return "<X25519Client>"


# --- ECDH on the NIST curves (RFC 8446 §4.2.8.2, §7.4.1) ---------------------------------


class EcdhGroup:
    """ECDHE on one NIST curve. Shares are uncompressed points only, and the
    secret is the x-coordinate, as cryptography's ECDH returns it."""

    __slots__ = ("_group", "_curve", "_name", "_share_length")

    def __init__(self, group: NamedGroup, curve: ec.EllipticCurve) -> None:
        self._group = group
        self._curve = curve
        self._name = group.name
        # 0x04 ‖ X ‖ Y, each coordinate the size of the field.
        self._share_length = 1 + 2 * ((curve.key_size + 7) // 8)

    @property
    def group(self) -> int:
        return self._group

    @property
    def backend(self) -> str:
        return NAME

    @property
    def client_share_length(self) -> int:
        return self._share_length

    @property
    def server_share_length(self) -> int:
        return self._share_length

    def load_share(self, share: bytes) -> ec.EllipticCurvePublicKey:
        check_share_length(f"{self._name} share", share, self._share_length)
        # RFC 8446 §4.2.8.2: TLS 1.3 has only the uncompressed form.
        if share[0] != 4:
            raise InvalidKeyShare(f"{self._name}: not an uncompressed point")
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(self._curve, share)
        except ValueError:
            raise InvalidKeyShare(f"{self._name}: point is not on the curve") from None

    def agree(self, private_key: ec.EllipticCurvePrivateKey, share: bytes) -> SharedSecret:
        peer = self.load_share(share)
        try:
            return SharedSecret(private_key.exchange(_ECDH, peer))
        except ValueError:
            raise InvalidKeyShare(f"{self._name}: key agreement rejected the point") from None

    def server_exchange(self, client_share: bytes) -> tuple[bytes, SharedSecret]:
        try:
            peer = self.load_share(client_share)
            private_key = ec.generate_private_key(self._curve)
            secret = SharedSecret(private_key.exchange(_ECDH, peer))
            return private_key.public_key().public_bytes(_X962, _UNCOMPRESSED), secret
        except InvalidKeyShare:
            raise
        except Exception as exc:
            raise _backend_error(f"{self._name} key exchange", exc) from exc

    def start(self) -> ClientKeyExchange:
        try:
            return _EcdhClient(self, ec.generate_private_key(self._curve))
        except Exception as exc:
            raise _backend_error(f"{self._name} key generation", exc) from exc

    def __repr__(self) -> str:
        return f"<EcdhGroup {self._name} backend=openssl>"


class _EcdhClient:
    __slots__ = ("_group", "_private_key", "_share")

    def __init__(self, group: EcdhGroup, private_key: ec.EllipticCurvePrivateKey) -> None:
        self._group = group
        self._private_key = private_key
        self._share = private_key.public_key().public_bytes(_X962, _UNCOMPRESSED)

    @property
    def share(self) -> bytes:
        return self._share

    def complete(self, server_share: bytes) -> SharedSecret:
        return self._group.agree(self._private_key, server_share)

    def __repr__(self) -> str:
        return f"<EcdhClient {self._group.group:#06x}>"


# --- ML-KEM (FIPS 203) --------------------------------------------------------------------

_MlKemPublicKey = mlkem.MLKEM768PublicKey | mlkem.MLKEM1024PublicKey
_MlKemPrivateKey = mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey


class MlKem:
    """ML-KEM on cryptography. ``encapsulate`` returns (ciphertext, secret):
    cryptography's own order is (secret, ciphertext)."""

    __slots__ = ("_name", "_load_public", "_generate", "_ek_length", "_ct_length")

    def __init__(
        self,
        name: str,
        load_public: Callable[[bytes], _MlKemPublicKey],
        generate: Callable[[], _MlKemPrivateKey],
        encapsulation_key_length: int,
        ciphertext_length: int,
    ) -> None:
        self._name = name
        self._load_public = load_public
        self._generate = generate
        self._ek_length = encapsulation_key_length
        self._ct_length = ciphertext_length

    @property
    def name(self) -> str:
        return self._name

    @property
    def backend(self) -> str:
        return NAME

    @property
    def encapsulation_key_length(self) -> int:
        return self._ek_length

    @property
    def ciphertext_length(self) -> int:
        return self._ct_length

    def encapsulate(self, encapsulation_key: bytes) -> tuple[bytes, SharedSecret]:
        check_share_length(f"{self._name} encapsulation key", encapsulation_key, self._ek_length)
        # With the length right, the only ValueError left is the FIPS 203
        # §7.2 modulus check (a coefficient ≥ q), which OpenSSL runs on load.
        try:
            public_key = self._load_public(encapsulation_key)
        except ValueError:
            raise InvalidKeyShare(
                f"{self._name}: encapsulation key fails the FIPS 203 §7.2 modulus check"
            ) from None
        try:
            secret, ciphertext = public_key.encapsulate()
        except Exception as exc:
            raise _backend_error(f"{self._name} encapsulation", exc) from exc
        return ciphertext, SharedSecret(secret)

    def generate(self) -> _MlKemDecapsulator:
        try:
            return _MlKemDecapsulator(self._name, self._generate(), self._ct_length)
        except Exception as exc:
            raise _backend_error(f"{self._name} key generation", exc) from exc

    def __repr__(self) -> str:
        return f"<MlKem {self._name} backend=openssl>"


class _MlKemDecapsulator:
    __slots__ = ("_name", "_private_key", "_encapsulation_key", "_ct_length")

    def __init__(self, name: str, private_key: _MlKemPrivateKey, ciphertext_length: int) -> None:
        self._name = name
        self._private_key = private_key
        self._encapsulation_key = private_key.public_key().public_bytes_raw()
        self._ct_length = ciphertext_length

    @property
    def encapsulation_key(self) -> bytes:
        return self._encapsulation_key

    def decapsulate(self, ciphertext: bytes) -> SharedSecret:
        check_share_length(f"{self._name} ciphertext", ciphertext, self._ct_length)
        # ML-KEM decapsulation of a well-sized ciphertext cannot fail (implicit
        # rejection), so a failure here is the library's: internal_error per
        # draft-ietf-tls-ecdhe-mlkem §3.1.2.
        try:
            return SharedSecret(self._private_key.decapsulate(ciphertext))
        except Exception as exc:
            raise _backend_error(f"{self._name} decapsulation", exc) from exc

    def __repr__(self) -> str:
        return f"<MlKemDecapsulator {self._name}>"


# --- Signing ------------------------------------------------------------------------------

_ECDSA: Final[dict[str, tuple[str, int, ec.ECDSA]]] = {
    # curve name → (key type, TLS 1.3 scheme, algorithm); RFC 8446 §4.2.3 ties
    # each curve to one hash.
    "secp256r1": ("ecdsa-p256", SignatureScheme.ecdsa_secp256r1_sha256, ec.ECDSA(hashes.SHA256())),
    "secp384r1": ("ecdsa-p384", SignatureScheme.ecdsa_secp384r1_sha384, ec.ECDSA(hashes.SHA384())),
    "secp521r1": ("ecdsa-p521", SignatureScheme.ecdsa_secp521r1_sha512, ec.ECDSA(hashes.SHA512())),
}


def _pss(hash_algorithm: hashes.HashAlgorithm) -> tuple[padding.PSS, hashes.HashAlgorithm]:
    # RFC 8446 §4.2.3: MGF1 with the signature's hash, salt as long as the hash.
    return (
        padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size),
        hash_algorithm,
    )


_RSA_PSS: Final[dict[int, tuple[padding.PSS, hashes.HashAlgorithm]]] = {
    SignatureScheme.rsa_pss_rsae_sha256: _pss(hashes.SHA256()),
    SignatureScheme.rsa_pss_rsae_sha384: _pss(hashes.SHA384()),
    SignatureScheme.rsa_pss_rsae_sha512: _pss(hashes.SHA512()),
}
# rsa_pss_pss_* is the same computation for a key whose certificate says id-RSASSA-PSS
# (RFC 8446 §4.2.3). cryptography loads such a key as a plain RSA key, so a signer cannot
# tell which family it may offer: it offers rsae, signs both, and the certificate decides
# (pqproxy.crypto.spki; a process-mode worker is asked for the pss code point directly).
_RSA_PSS_PSS: Final[dict[int, tuple[padding.PSS, hashes.HashAlgorithm]]] = {
    SignatureScheme.rsa_pss_pss_sha256: _RSA_PSS[SignatureScheme.rsa_pss_rsae_sha256],
    SignatureScheme.rsa_pss_pss_sha384: _RSA_PSS[SignatureScheme.rsa_pss_rsae_sha384],
    SignatureScheme.rsa_pss_pss_sha512: _RSA_PSS[SignatureScheme.rsa_pss_rsae_sha512],
}

MIN_RSA_BITS: Final = 2048

_MLDSA_SCHEMES: Final = frozenset(
    {SignatureScheme.mldsa44, SignatureScheme.mldsa65, SignatureScheme.mldsa87}
)

_SIGNING_SCHEMES: Final = frozenset(
    {e[1] for e in _ECDSA.values()}
    | set(_RSA_PSS)
    | {SignatureScheme.ed25519, SignatureScheme.ed448}
    | _MLDSA_SCHEMES
)

_SUPPORTED_KEYS: Final = (
    "ECDSA on P-256/P-384/P-521, Ed25519, Ed448, RSA of at least 2048 bits, or ML-DSA-44/65/87"
)


class OpenSSLSigner:
    """A private key in this process. Each scheme maps to a pre-bound signing
    call, so ``sign`` is a dictionary lookup and one library call."""

    __slots__ = ("_key_type", "_calls", "_schemes", "_public_key_der")

    def __init__(
        self,
        key_type: str,
        calls: Mapping[int, Callable[[bytes], bytes]],
        public_key: PublicKeyTypes,
        also_signs: Mapping[int, Callable[[bytes], bytes]] | None = None,
    ) -> None:
        self._key_type = key_type
        self._calls = dict(calls)
        self._schemes = tuple(self._calls)
        # Schemes sign() accepts without offering them (see _RSA_PSS_PSS).
        self._calls.update(also_signs or {})
        self._public_key_der = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def schemes(self) -> tuple[int, ...]:
        return self._schemes

    @property
    def backend(self) -> str:
        return NAME

    @property
    def key_type(self) -> str:
        return self._key_type

    @property
    def public_key_der(self) -> bytes:
        """SubjectPublicKeyInfo DER, to check the key against its certificate."""
        return self._public_key_der

    def sign(self, scheme: int, message: bytes) -> bytes:
        call = self._calls.get(scheme)
        if call is None:
            raise ValueError(f"a {self._key_type} key cannot sign with scheme {scheme:#06x}")
        try:
            return call(message)
        except Exception as exc:
            raise _backend_error(f"{self._key_type} signature", exc) from exc

    def __repr__(self) -> str:
        return f"<OpenSSLSigner {self._key_type}>"


def signer_from_private_key(key: PrivateKeyTypes) -> OpenSSLSigner:
    """A signer for an already-loaded key; ValueError for a key TLS 1.3 cannot use."""
    calls: dict[int, Callable[[bytes], bytes]]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        entry = _ECDSA.get(key.curve.name)
        if entry is None:
            raise ValueError(
                f"unsupported ECDSA curve {key.curve.name}: TLS 1.3 signs with P-256, P-384 "
                "or P-521"
            )
        key_type, scheme, algorithm = entry
        calls = {scheme: functools.partial(key.sign, signature_algorithm=algorithm)}
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        key_type, calls = "ed25519", {SignatureScheme.ed25519: key.sign}
    elif isinstance(key, ed448.Ed448PrivateKey):
        key_type, calls = "ed448", {SignatureScheme.ed448: key.sign}
    elif isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(
                f"RSA key of {key.key_size} bits is too small: at least {MIN_RSA_BITS} required"
            )
        key_type = f"rsa{key.key_size}"
        calls = {
            scheme: functools.partial(key.sign, padding=pss, algorithm=algorithm)
            for scheme, (pss, algorithm) in _RSA_PSS.items()
        }
        aliases = {pss: calls[rsae] for pss, rsae in zip(_RSA_PSS_PSS, _RSA_PSS, strict=True)}
        return OpenSSLSigner(key_type, calls, key.public_key(), also_signs=aliases)
    # draft-ietf-tls-mldsa: pure ML-DSA with the empty context string, which is
    # what sign() does without a context argument.
    elif isinstance(key, mldsa.MLDSA44PrivateKey):
        key_type, calls = "mldsa44", {SignatureScheme.mldsa44: key.sign}
    elif isinstance(key, mldsa.MLDSA65PrivateKey):
        key_type, calls = "mldsa65", {SignatureScheme.mldsa65: key.sign}
    elif isinstance(key, mldsa.MLDSA87PrivateKey):
        key_type, calls = "mldsa87", {SignatureScheme.mldsa87: key.sign}
    else:
        raise ValueError(
            f"unsupported private key type {type(key).__name__}: expected {_SUPPORTED_KEYS}"
        )
    return OpenSSLSigner(key_type, calls, key.public_key())


_MLDSA_FROM_SEED: Final[dict[str, Callable[[bytes], PrivateKeyTypes]]] = {
    "ML-DSA-44": mldsa.MLDSA44PrivateKey.from_seed_bytes,
    "ML-DSA-65": mldsa.MLDSA65PrivateKey.from_seed_bytes,
    "ML-DSA-87": mldsa.MLDSA87PrivateKey.from_seed_bytes,
}


def _pem_body(pem: bytes, label: bytes) -> bytes | None:
    """The DER inside the first ``-----BEGIN <label>-----`` block, or None."""
    begin, end = b"-----BEGIN " + label + b"-----", b"-----END " + label + b"-----"
    start = pem.find(begin)
    stop = pem.find(end, start + len(begin))
    if start < 0 or stop < 0:
        return None
    try:
        return base64.b64decode(b"".join(pem[start + len(begin) : stop].split()), validate=True)
    except binascii.Error:
        return None


def _load_mldsa_pkcs8(key_pem: bytes, password: bytes | None) -> PrivateKeyTypes | None:
    """An ML-DSA key in a form cryptography does not read (RFC 9881 §6 ``both``, as OpenSSL
    3.5+ writes by default): loaded from its seed once the expanded key is checked against
    it. None: not such a key, the library reads it as it is. MlDsaKeyError (a ValueError)
    for the ``expandedKey`` form and for a ``both`` whose halves disagree."""
    body = _pem_body(key_pem, b"PRIVATE KEY")
    if body is None:
        return None
    parsed = mldsa_keys.parse_pkcs8(body)
    if parsed is None or parsed.form == "seed":
        return None
    name = parsed.parameters.name
    if parsed.form == "expandedKey" or parsed.seed is None or parsed.expanded_key is None:
        raise mldsa_keys.MlDsaKeyError(
            f"{name} private key holds only the expanded key (the expandedKey form of RFC "
            "9881 §6, OpenSSL's priv-only): pqproxy signs from the 32-byte seed, which this "
            "form does not carry and cannot be recovered from it; use the key file with its "
            f"seed, or {mldsa_keys.CONVERT_HINT} from a copy that has it"
        )
    if password is not None:
        raise ValueError(
            "cannot load private key: a password was given but the key is not encrypted"
        )
    mldsa_keys.check_expanded_key(parsed.parameters, parsed.seed, parsed.expanded_key)
    return _MLDSA_FROM_SEED[name](parsed.seed)


def load_signer(key_pem: bytes, password: bytes | None = None) -> OpenSSLSigner:
    """Load a PEM private key (PKCS#8 or the traditional formats). Every
    failure is a ValueError saying what is wrong."""
    try:
        mldsa_key = _load_mldsa_pkcs8(key_pem, password)
        if mldsa_key is not None:
            return signer_from_private_key(mldsa_key)
        key = serialization.load_pem_private_key(key_pem, password)
    except TypeError as exc:
        # cryptography's signal for a password given to a clear key, or none
        # given to an encrypted one.
        raise ValueError(f"cannot load private key: {exc}") from exc
    except UnsupportedAlgorithm as exc:
        raise ValueError(
            f"unsupported private key algorithm: {exc}; expected {_SUPPORTED_KEYS}"
        ) from exc
    return signer_from_private_key(key)


def _require_scheme(scheme: int, expected: int, key_kind: str) -> None:
    if scheme != expected:
        raise ValueError(f"scheme {scheme:#06x} does not fit a {key_kind} key")


def verify_signature(
    public_key: PublicKeyTypes, scheme: int, message: bytes, signature: bytes
) -> None:
    """Check a TLS 1.3 signature (a CertificateVerify, a self-test). Raises
    cryptography's InvalidSignature for a bad signature and ValueError for a
    scheme that does not fit the key."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        entry = _ECDSA.get(public_key.curve.name)
        if entry is None:
            raise ValueError(f"unsupported ECDSA curve {public_key.curve.name}")
        _require_scheme(scheme, entry[1], entry[0])
        public_key.verify(signature, message, entry[2])
    elif isinstance(public_key, rsa.RSAPublicKey):
        # Which family fits is the certificate's to say (pqproxy.crypto.spki).
        pss_entry = _RSA_PSS.get(scheme) or _RSA_PSS_PSS.get(scheme)
        if pss_entry is None:
            raise ValueError(f"scheme {scheme:#06x} does not fit an RSA key")
        public_key.verify(signature, message, pss_entry[0], pss_entry[1])
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        _require_scheme(scheme, SignatureScheme.ed25519, "ed25519")
        public_key.verify(signature, message)
    elif isinstance(public_key, ed448.Ed448PublicKey):
        _require_scheme(scheme, SignatureScheme.ed448, "ed448")
        public_key.verify(signature, message)
    elif isinstance(public_key, mldsa.MLDSA44PublicKey):
        _require_scheme(scheme, SignatureScheme.mldsa44, "mldsa44")
        public_key.verify(signature, message)
    elif isinstance(public_key, mldsa.MLDSA65PublicKey):
        _require_scheme(scheme, SignatureScheme.mldsa65, "mldsa65")
        public_key.verify(signature, message)
    elif isinstance(public_key, mldsa.MLDSA87PublicKey):
        _require_scheme(scheme, SignatureScheme.mldsa87, "mldsa87")
        public_key.verify(signature, message)
    else:
        raise ValueError(f"unsupported public key type {type(public_key).__name__}")


# --- Groups and provider ------------------------------------------------------------------


@functools.cache
def classical_groups() -> Mapping[str, KxGroup]:
    """The classical groups keyed by NamedGroup name; shared, stateless instances
    (each holds its cached curve object)."""
    groups: dict[str, KxGroup] = {
        "x25519": X25519Group(),
        "secp256r1": EcdhGroup(NamedGroup.secp256r1, ec.SECP256R1()),
        "secp384r1": EcdhGroup(NamedGroup.secp384r1, ec.SECP384R1()),
        "secp521r1": EcdhGroup(NamedGroup.secp521r1, ec.SECP521R1()),
    }
    return MappingProxyType(groups)


@functools.cache
def kems() -> Mapping[str, Kem]:
    """The ML-KEM parameter sets this build of OpenSSL has, keyed by name."""
    if unavailable_reason() is not None:
        return MappingProxyType({})
    found: dict[str, Kem] = {
        "ML-KEM-768": MlKem(
            "ML-KEM-768",
            mlkem.MLKEM768PublicKey.from_public_bytes,
            mlkem.MLKEM768PrivateKey.generate,
            1184,
            1088,
        ),
        "ML-KEM-1024": MlKem(
            "ML-KEM-1024",
            mlkem.MLKEM1024PublicKey.from_public_bytes,
            mlkem.MLKEM1024PrivateKey.generate,
            1568,
            1568,
        ),
    }
    return MappingProxyType(found)


class OpenSSLProvider:
    """All groups on cryptography: the three hybrids, then the classical ones."""

    __slots__ = ("_groups",)

    def __init__(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise BackendError(f"openssl backend unavailable: {reason}")
        self._groups: Mapping[int, KxGroup] = MappingProxyType(
            compose_groups(kems(), classical_groups())
        )

    @property
    def name(self) -> str:
        return NAME

    @property
    def groups(self) -> Mapping[int, KxGroup]:
        return self._groups

    def __repr__(self) -> str:
        return f"<OpenSSLProvider groups={len(self._groups)}>"


def create_provider() -> OpenSSLProvider:
    """The provider a listener gets when its configuration names this backend."""
    return OpenSSLProvider()


@functools.cache
def unavailable_reason() -> str | None:
    """Why this backend cannot serve hybrid groups, or None if it can. The
    probe generates one key of each ML-KEM size: the only reliable way to know
    the bundled OpenSSL has the algorithm enabled."""
    try:
        mlkem.MLKEM768PrivateKey.generate()
        mlkem.MLKEM1024PrivateKey.generate()
    except UnsupportedAlgorithm:
        return f"ML-KEM is not supported by {_openssl_version()}"
    return None


def is_available() -> bool:
    return unavailable_reason() is None


@functools.cache
def _mldsa_supported() -> bool:
    try:
        mldsa.MLDSA44PrivateKey.generate()
    except UnsupportedAlgorithm:
        return False
    return True


def _openssl_version() -> str:
    from cryptography.hazmat.backends.openssl.backend import backend

    return str(backend.openssl_version_text())


def capabilities() -> dict[str, list[str]]:
    """What this build can do, for the start-up report and ``pqproxy backends``."""
    groups = compose_groups(kems(), classical_groups())
    schemes = [s for s in SignatureScheme if s in _SIGNING_SCHEMES]
    if not _mldsa_supported():
        schemes = [s for s in schemes if s not in _MLDSA_SCHEMES]
    return {
        "library": [f"cryptography {cryptography.__version__}", _openssl_version()],
        "groups": [group_name(g) for g in groups],
        "kems": list(kems()),
        "signature_schemes": [s.name for s in schemes],
    }


# RFC 7748 §6.1: Alice's private key, Bob's public key, their shared secret.
_X25519_KAT: Final = (
    bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"),
    bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"),
    bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"),
)


def self_test() -> None:
    """Known answers and round trips through every group and a signer of each
    family; raises BackendError naming the first thing that is wrong."""
    reason = unavailable_reason()
    if reason is not None:
        raise BackendError(f"openssl backend unavailable: {reason}")

    alice, bob_public, expected = _X25519_KAT
    try:
        got = _x25519_agree(X25519PrivateKey.from_private_bytes(alice), bob_public)
    except Exception as exc:
        raise _backend_error("self-test x25519 known answer", exc) from exc
    if got != expected:
        raise BackendError("openssl backend: self-test x25519 known answer mismatch")

    for code, group in OpenSSLProvider().groups.items():
        name = group_name(code)
        try:
            client = group.start()
            server_share, server_secret = group.server_exchange(client.share)
            client_secret = client.complete(server_share)
        except Exception as exc:
            raise _backend_error(f"self-test {name} round trip", exc) from exc
        if len(client.share) != group.client_share_length:
            raise BackendError(f"openssl backend: self-test {name} client share length")
        if len(server_share) != group.server_share_length:
            raise BackendError(f"openssl backend: self-test {name} server share length")
        if not server_secret or client_secret != server_secret:
            raise BackendError(f"openssl backend: self-test {name} secrets differ")

    # RSA is left out: generating a key costs more than the whole rest.
    keys: list[PrivateKeyTypes] = [
        ec.generate_private_key(ec.SECP256R1()),
        ed25519.Ed25519PrivateKey.generate(),
    ]
    if _mldsa_supported():
        keys.append(mldsa.MLDSA44PrivateKey.generate())
    message = b"pqproxy self-test"
    for key in keys:
        signer = signer_from_private_key(key)
        for scheme in signer.schemes:
            try:
                verify_signature(key.public_key(), scheme, message, signer.sign(scheme, message))
            except Exception as exc:
                raise _backend_error(f"self-test signature {scheme:#06x}", exc) from exc
