"""What is specific to the cryptography/OpenSSL backend: its edges (return
orders, error mapping), its signers, its reports. The behaviour every backend
shares is in tests/backends/test_backend_suite.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import (
    dsa,
    ec,
    ed448,
    ed25519,
    mldsa,
    mlkem,
    padding,
    rsa,
    x25519,
)
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from pqproxy.crypto.backends import openssl
from pqproxy.crypto.provider import (
    BackendError,
    CryptoProvider,
    InvalidKeyShare,
    Kem,
    KemDecapsulator,
    KxGroup,
    SharedSecret,
    Signer,
)

PEM = serialization.Encoding.PEM
PKCS8 = serialization.PrivateFormat.PKCS8
X962 = serialization.Encoding.X962
UNCOMPRESSED = serialization.PublicFormat.UncompressedPoint
MESSAGE = b" " * 64 + b"TLS 1.3, server CertificateVerify\x00" + bytes(range(48))


def _pem(key: PrivateKeyTypes, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if password is None
        else serialization.BestAvailableEncryption(password)
    )
    return key.private_bytes(PEM, PKCS8, encryption)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# --- provider and reports ------------------------------------------------------------------


def test_provider_groups_and_order() -> None:
    provider = openssl.create_provider()
    assert isinstance(provider, openssl.OpenSSLProvider)
    checked: CryptoProvider = provider
    assert checked.name == "openssl"
    assert list(provider.groups) == [0x11EC, 0x11EB, 0x11ED, 0x001D, 0x0017, 0x0018, 0x0019]
    for group in provider.groups.values():
        assert isinstance(group, KxGroup)
        assert group.backend == "openssl"


def test_provider_groups_are_read_only() -> None:
    groups = openssl.create_provider().groups
    with pytest.raises(TypeError):
        groups[0x0017] = groups[0x001D]  # type: ignore[index]


def test_is_available_and_capabilities() -> None:
    assert openssl.is_available()
    assert openssl.unavailable_reason() is None
    caps = openssl.capabilities()
    assert caps["groups"] == [
        "X25519MLKEM768",
        "SecP256r1MLKEM768",
        "SecP384r1MLKEM1024",
        "x25519",
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ]
    assert caps["kems"] == ["ML-KEM-768", "ML-KEM-1024"]
    assert {"mldsa65", "ed25519", "rsa_pss_rsae_sha256", "ecdsa_secp256r1_sha256"} <= set(
        caps["signature_schemes"]
    )
    assert "rsa_pkcs1_sha256" not in caps["signature_schemes"]
    assert caps["library"][0].startswith("cryptography ")
    assert "OpenSSL" in caps["library"][1]


def test_self_test_passes() -> None:
    openssl.self_test()


# --- ML-KEM --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ek_length", "ct_length"), [("ML-KEM-768", 1184, 1088), ("ML-KEM-1024", 1568, 1568)]
)
def test_mlkem_encapsulate_returns_ciphertext_then_secret(
    name: str, ek_length: int, ct_length: int
) -> None:
    kem = openssl.kems()[name]
    assert isinstance(kem, Kem)
    assert (kem.name, kem.backend) == (name, "openssl")
    assert (kem.encapsulation_key_length, kem.ciphertext_length) == (ek_length, ct_length)
    # An independently generated key: decapsulating what our encapsulate
    # calls the ciphertext must give what it calls the secret.
    private: mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey = (
        mlkem.MLKEM768PrivateKey.generate()
        if name == "ML-KEM-768"
        else mlkem.MLKEM1024PrivateKey.generate()
    )
    ciphertext, secret = kem.encapsulate(private.public_key().public_bytes_raw())
    assert isinstance(secret, SharedSecret)
    assert len(ciphertext) == ct_length
    assert len(secret) == 32
    assert private.decapsulate(ciphertext) == secret


def test_mlkem_decapsulator_matches_independent_encapsulation() -> None:
    decapsulator = openssl.kems()["ML-KEM-768"].generate()
    assert isinstance(decapsulator, KemDecapsulator)
    public = mlkem.MLKEM768PublicKey.from_public_bytes(decapsulator.encapsulation_key)
    secret, ciphertext = public.encapsulate()
    assert decapsulator.decapsulate(ciphertext) == secret
    assert repr(decapsulator) == "<MlKemDecapsulator ML-KEM-768>"


def test_mlkem_all_ff_key_fails_the_modulus_check() -> None:
    with pytest.raises(InvalidKeyShare, match="FIPS 203"):
        openssl.kems()["ML-KEM-768"].encapsulate(b"\xff" * 1184)


def test_mlkem_single_coefficient_out_of_range_fails_the_modulus_check() -> None:
    # The first 12-bit coefficient of t̂ is byte 0 | (byte 1 & 0x0F) << 8;
    # 0xFFF = 4095 ≥ q = 3329. Everything else stays valid.
    key = bytearray(mlkem.MLKEM768PrivateKey.generate().public_key().public_bytes_raw())
    key[0] = 0xFF
    key[1] |= 0x0F
    with pytest.raises(InvalidKeyShare, match="FIPS 203"):
        openssl.kems()["ML-KEM-768"].encapsulate(bytes(key))


@pytest.mark.parametrize("length", [0, 1183, 1185, 1568])
def test_mlkem_wrong_key_length(length: int) -> None:
    with pytest.raises(
        InvalidKeyShare, match=f"encapsulation key: expected 1184 bytes, got {length}$"
    ):
        openssl.kems()["ML-KEM-768"].encapsulate(bytes(length))


def test_mlkem_wrong_ciphertext_length() -> None:
    decapsulator = openssl.kems()["ML-KEM-1024"].generate()
    with pytest.raises(InvalidKeyShare, match="ciphertext: expected 1568 bytes, got 1088$"):
        decapsulator.decapsulate(bytes(1088))


# --- classical groups ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "curve", "point_length", "secret_length"),
    [
        ("secp256r1", ec.SECP256R1(), 65, 32),
        ("secp384r1", ec.SECP384R1(), 97, 48),
        ("secp521r1", ec.SECP521R1(), 133, 66),
    ],
)
def test_ecdh_secret_is_the_x_coordinate(
    name: str, curve: ec.EllipticCurve, point_length: int, secret_length: int
) -> None:
    group = openssl.classical_groups()[name]
    peer = ec.generate_private_key(curve)
    server_share, secret = group.server_exchange(peer.public_key().public_bytes(X962, UNCOMPRESSED))
    assert len(server_share) == point_length
    assert server_share[0] == 4
    server_point = ec.EllipticCurvePublicKey.from_encoded_point(curve, server_share)
    # cryptography's ECDH output is the x-coordinate, padded to the field
    # size (RFC 8446 §7.4.1).
    assert secret == peer.exchange(ec.ECDH(), server_point)
    assert len(secret) == secret_length


def test_ecdh_rejects_a_point_of_another_curve() -> None:
    p384_point = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(InvalidKeyShare, match="expected 65 bytes, got 97"):
        openssl.classical_groups()["secp256r1"].server_exchange(
            p384_point.public_bytes(X962, UNCOMPRESSED)
        )


def test_x25519_against_rfc7748_vector_through_the_client() -> None:
    # RFC 7748 §6.1: Bob's public key as the "server share", Alice's key
    # installed through an independent path gives the published secret.
    alice = x25519.X25519PrivateKey.from_private_bytes(
        bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob_public = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    secret = openssl._x25519_agree(alice, bob_public)
    assert secret.hex() == "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


def test_x25519_server_exchange_matches_independent_peer() -> None:
    peer = x25519.X25519PrivateKey.generate()
    share, secret = openssl.classical_groups()["x25519"].server_exchange(
        peer.public_key().public_bytes_raw()
    )
    assert secret == peer.exchange(x25519.X25519PublicKey.from_public_bytes(share))


def test_x25519_all_zero_names_the_rule() -> None:
    with pytest.raises(InvalidKeyShare, match="all-zero"):
        openssl.classical_groups()["x25519"].server_exchange(bytes(32))


# --- signers -------------------------------------------------------------------------------


def _verify_independently(key: PrivateKeyTypes, scheme: int, signature: bytes) -> None:
    """Verification written from RFC 8446 §4.2.3, not through our helper."""
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        digest = {0x0403: hashes.SHA256(), 0x0503: hashes.SHA384(), 0x0603: hashes.SHA512()}
        public.verify(signature, MESSAGE, ec.ECDSA(digest[scheme]))
    elif isinstance(public, rsa.RSAPublicKey):
        hash_algorithm = {
            0x0804: hashes.SHA256(),
            0x0805: hashes.SHA384(),
            0x0806: hashes.SHA512(),
        }[scheme]
        # An exact salt length makes OpenSSL check it: it must equal the hash length.
        pss = padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size)
        public.verify(signature, MESSAGE, pss, hash_algorithm)
    elif isinstance(
        public, mldsa.MLDSA44PublicKey | mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey
    ):
        # draft-ietf-tls-mldsa: the empty context.
        public.verify(signature, MESSAGE, b"")
    elif isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        public.verify(signature, MESSAGE)
    else:
        raise AssertionError(f"unexpected key {type(public).__name__}")


SIGNER_CASES: list[tuple[str, tuple[int, ...]]] = [
    ("ecdsa-p256", (0x0403,)),
    ("ecdsa-p384", (0x0503,)),
    ("ecdsa-p521", (0x0603,)),
    ("ed25519", (0x0807,)),
    ("ed448", (0x0808,)),
    ("rsa2048", (0x0804, 0x0805, 0x0806)),
    ("mldsa44", (0x0904,)),
    ("mldsa65", (0x0905,)),
    ("mldsa87", (0x0906,)),
]


def _make_key(key_type: str, rsa_key: rsa.RSAPrivateKey) -> PrivateKeyTypes:
    factories: dict[str, Callable[[], PrivateKeyTypes]] = {
        "ecdsa-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "ecdsa-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "ecdsa-p521": lambda: ec.generate_private_key(ec.SECP521R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
        "ed448": ed448.Ed448PrivateKey.generate,
        "rsa2048": lambda: rsa_key,
        "mldsa44": mldsa.MLDSA44PrivateKey.generate,
        "mldsa65": mldsa.MLDSA65PrivateKey.generate,
        "mldsa87": mldsa.MLDSA87PrivateKey.generate,
    }
    return factories[key_type]()


@pytest.mark.parametrize(("key_type", "schemes"), SIGNER_CASES)
def test_load_signer_signs_every_scheme(
    rsa_key: rsa.RSAPrivateKey, key_type: str, schemes: tuple[int, ...]
) -> None:
    key = _make_key(key_type, rsa_key)
    signer = openssl.load_signer(_pem(key))
    assert isinstance(signer, Signer)
    assert signer.schemes == schemes
    assert signer.backend == "openssl"
    assert signer.key_type == key_type
    assert repr(signer) == f"<OpenSSLSigner {key_type}>"
    for scheme in schemes:
        signature = signer.sign(scheme, MESSAGE)
        _verify_independently(key, scheme, signature)
        openssl.verify_signature(key.public_key(), scheme, MESSAGE, signature)
        with pytest.raises(InvalidSignature):
            openssl.verify_signature(key.public_key(), scheme, MESSAGE + b"x", signature)


def test_signer_public_key_der_is_the_spki(rsa_key: rsa.RSAPrivateKey) -> None:
    signer = openssl.signer_from_private_key(rsa_key)
    assert signer.public_key_der == rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_mldsa_signature_uses_the_empty_context() -> None:
    key = mldsa.MLDSA65PrivateKey.generate()
    signature = openssl.signer_from_private_key(key).sign(0x0905, MESSAGE)
    key.public_key().verify(signature, MESSAGE)
    with pytest.raises(InvalidSignature):
        key.public_key().verify(signature, MESSAGE, b"tls13")


def test_signer_refuses_a_scheme_it_does_not_have() -> None:
    signer = openssl.signer_from_private_key(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ValueError, match="ecdsa-p256 key cannot sign with scheme 0x0503"):
        signer.sign(0x0503, MESSAGE)


def test_verify_signature_refuses_a_scheme_that_does_not_fit() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    signature = key.sign(MESSAGE)
    with pytest.raises(ValueError, match="does not fit"):
        openssl.verify_signature(key.public_key(), 0x0808, MESSAGE, signature)


def test_small_rsa_key_is_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="1024 bits is too small"):
        openssl.load_signer(_pem(key))


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (lambda: ec.generate_private_key(ec.SECP256K1()), "unsupported ECDSA curve secp256k1"),
        (lambda: dsa.generate_private_key(2048), "unsupported private key type DSAPrivateKey"),
        (x25519.X25519PrivateKey.generate, "unsupported private key type X25519PrivateKey"),
    ],
    ids=["secp256k1", "dsa", "x25519"],
)
def test_unsupported_key_types_are_refused(
    key: Callable[[], PrivateKeyTypes], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        openssl.load_signer(_pem(key()))


def test_encrypted_key_needs_its_password() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = _pem(key, b"s3cret")
    assert openssl.load_signer(pem, b"s3cret").schemes == (0x0503,)
    with pytest.raises(ValueError, match="cannot load private key"):
        openssl.load_signer(pem)
    with pytest.raises(ValueError):
        openssl.load_signer(pem, b"wrong")
    with pytest.raises(ValueError, match="cannot load private key"):
        openssl.load_signer(_pem(key), b"unneeded")


def test_garbage_is_refused() -> None:
    with pytest.raises(ValueError):
        openssl.load_signer(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


# --- library failures ----------------------------------------------------------------------


def _failing_keygen() -> mlkem.MLKEM768PrivateKey:
    # The message stands for whatever a library might echo: key material.
    raise RuntimeError("leaked 5ec7e7")


def _failing_sign(message: bytes) -> bytes:
    raise RuntimeError("leaked 5ec7e7")


def test_library_failure_in_keygen_is_a_backend_error_without_its_message() -> None:
    kem = openssl.MlKem(
        "ML-KEM-768", mlkem.MLKEM768PublicKey.from_public_bytes, _failing_keygen, 1184, 1088
    )
    with pytest.raises(BackendError) as info:
        kem.generate()
    assert str(info.value) == "openssl backend: ML-KEM-768 key generation failed (RuntimeError)"
    assert "5ec7e7" not in str(info.value)


def test_library_failure_in_signing_is_a_backend_error_without_its_message() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    signer = openssl.OpenSSLSigner("ed25519", {0x0807: _failing_sign}, key.public_key())
    with pytest.raises(BackendError) as info:
        signer.sign(0x0807, MESSAGE)
    assert str(info.value) == "openssl backend: ed25519 signature failed (RuntimeError)"
    assert isinstance(info.value.__cause__, RuntimeError)
