"""X509ClientVerifier: client certificate chains and the client's CertificateVerify."""

from __future__ import annotations

import datetime
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqproxy.crypto.backends.openssl import signer_from_private_key
from pqproxy.crypto.client_auth import (
    DEFAULT_SIGNATURE_SCHEMES,
    MAX_CHAIN_LENGTH,
    X509ClientVerifier,
)
from pqproxy.crypto.provider import CertificateRejected, ClientCertificateVerifier, PeerIdentity
from pqproxy.tls.enums import SignatureScheme
from tests.certs_factory import (
    CLIENT_KEY_TYPES,
    SPIFFE_CLIENT,
    Issued,
    bundle_pem,
    make_ca,
    make_client,
)

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
NOW_TS = NOW.timestamp()
MESSAGE = b" " * 64 + b"TLS 1.3, client CertificateVerify\x00" + bytes(range(48))


def _alert(verifier: X509ClientVerifier, chain: tuple[bytes, ...], now: float = NOW_TS) -> str:
    with pytest.raises(CertificateRejected) as caught:
        verifier.verify_chain(chain, now)
    assert caught.value.reason  # something for the log
    return caught.value.alert


def _verifier(
    *cas: Issued, schemes: tuple[int, ...] = DEFAULT_SIGNATURE_SCHEMES
) -> X509ClientVerifier:
    return X509ClientVerifier(bundle_pem(*cas), signature_schemes=schemes)


# --- fixtures: one root and one intermediate per key type, made once --------------------------


@pytest.fixture(scope="module")
def roots() -> dict[str, Issued]:
    return {kt: make_ca(kt, common_name=f"root {kt}", now=NOW) for kt in CLIENT_KEY_TYPES}


@pytest.fixture(scope="module")
def p256_root(roots: dict[str, Issued]) -> Issued:
    return roots["ecdsa-p256"]


@pytest.fixture(scope="module")
def ed_root(roots: dict[str, Issued]) -> Issued:
    # Chains under an Ed25519 CA take the fallback path (the library refuses Ed25519 issuers).
    return roots["ed25519"]


@pytest.fixture(scope="module")
def verifier(roots: dict[str, Issued]) -> X509ClientVerifier:
    return _verifier(*roots.values())


def test_satisfies_the_protocol(verifier: X509ClientVerifier) -> None:
    checked: ClientCertificateVerifier = verifier  # mypy checks the structural match
    assert checked.signature_schemes == DEFAULT_SIGNATURE_SCHEMES
    assert "BEGIN" not in repr(verifier)


# --- valid chains -------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", CLIENT_KEY_TYPES)
def test_chain_through_an_intermediate_of_each_key_type(
    key_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    root = roots[key_type]
    inter = make_ca(key_type, common_name=f"intermediate {key_type}", issuer=root, now=NOW)
    client = make_client(
        inter,
        key_type,
        common_name=f"client {key_type}",
        dns_names=("Client.Example.org",),
        uris=(SPIFFE_CLIENT,),
        now=NOW,
    )
    identity = verifier.verify_chain(client.chain_der(), NOW_TS)
    assert identity == PeerIdentity(
        subject=f"CN=client {key_type},O=pqproxy tests",
        dns_names=("client.example.org",),
        uris=(SPIFFE_CLIENT,),
        chain=(client.der, inter.der, root.der),
    )


@pytest.mark.parametrize(
    ("root_type", "inter_type", "leaf_type"),
    [
        ("ecdsa-p256", "mldsa65", "ed25519"),  # library: Ed25519 leaf keys are fine
        ("mldsa87", "rsa2048", "mldsa44"),
        ("ed25519", "ecdsa-p384", "mldsa65"),  # fallback: Ed25519 root
        ("mldsa44", "ed25519", "rsa2048"),  # fallback: Ed25519 intermediate
    ],
)
def test_mixed_key_type_chains(
    root_type: str,
    inter_type: str,
    leaf_type: str,
    roots: dict[str, Issued],
    verifier: X509ClientVerifier,
) -> None:
    inter = make_ca(inter_type, common_name="mixed intermediate", issuer=roots[root_type], now=NOW)
    client = make_client(inter, leaf_type, uris=(SPIFFE_CLIENT,), now=NOW)
    identity = verifier.verify_chain(client.chain_der(), NOW_TS)
    assert identity.uris == (SPIFFE_CLIENT,)
    assert identity.chain == (client.der, inter.der, roots[root_type].der)


def test_rsa_pss_signed_chain(roots: dict[str, Issued], verifier: X509ClientVerifier) -> None:
    inter = make_ca(
        "rsa2048", common_name="pss intermediate", issuer=roots["rsa2048"], pss=True, now=NOW
    )
    client = make_client(inter, "rsa2048", pss=True, now=NOW)
    assert verifier.verify_chain(client.chain_der(), NOW_TS).subject == "CN=client,O=pqproxy tests"


def test_leaf_directly_under_the_root_and_a_root_sent_along(
    p256_root: Issued, ed_root: Issued, verifier: X509ClientVerifier
) -> None:
    for root in (p256_root, ed_root):
        client = make_client(root, "ecdsa-p256", now=NOW)
        assert verifier.verify_chain(client.chain_der(), NOW_TS).chain == (client.der, root.der)
        with_root = client.chain_der(include_root=True)
        assert verifier.verify_chain(with_root, NOW_TS).chain == (client.der, root.der)


def test_no_san_identity_is_the_subject(
    p256_root: Issued, ed_root: Issued, verifier: X509ClientVerifier
) -> None:
    for root in (p256_root, ed_root):
        client = make_client(root, common_name="svc-a", now=NOW)
        identity = verifier.verify_chain(client.chain_der(), NOW_TS)
        assert (identity.subject, identity.dns_names, identity.uris) == (
            "CN=svc-a,O=pqproxy tests",
            (),
            (),
        )


def test_no_eku_is_accepted(
    p256_root: Issued, ed_root: Issued, verifier: X509ClientVerifier
) -> None:
    # RFC 5280 §4.2.1.12: no EKU extension, no restriction (as the library, OpenSSL and Go).
    for root in (p256_root, ed_root):
        client = make_client(root, eku="none", now=NOW)
        verifier.verify_chain(client.chain_der(), NOW_TS)


def test_no_authority_key_identifier_is_accepted(
    p256_root: Issued, ed_root: Issued, verifier: X509ClientVerifier
) -> None:
    # The library's client profile insists on an AKI in the leaf; we relax that (a hint
    # for path building only, the signatures bind the chain).
    for root in (p256_root, ed_root):
        client = make_client(root, authority_key_id=False, now=NOW)
        verifier.verify_chain(client.chain_der(), NOW_TS)


def test_library_still_refuses_ed25519_issuers(ed_root: Issued) -> None:
    # Why the fallback exists. When this fails, cryptography accepts Ed25519 issuers and
    # X509ClientVerifier._fallback_path can go.
    client = make_client(ed_root, now=NOW)
    verifier = PolicyBuilder().store(Store([ed_root.certificate])).time(NOW).build_client_verifier()
    with pytest.raises(VerificationError):
        verifier.verify(client.certificate, [])


def test_both_ekus_and_no_key_usage_are_accepted(
    p256_root: Issued, ed_root: Issued, verifier: X509ClientVerifier
) -> None:
    for root in (p256_root, ed_root):
        verifier.verify_chain(make_client(root, eku="both", now=NOW).chain_der(), NOW_TS)
        verifier.verify_chain(make_client(root, key_usage=False, now=NOW).chain_der(), NOW_TS)


# --- rejected chains and their alerts -----------------------------------------------------------

# Each case runs under an ECDSA root (the library's verdict) and an Ed25519 root (the
# fallback's), which must agree.
ROOTS = ("ecdsa-p256", "ed25519")


@pytest.mark.parametrize("root_type", ROOTS)
def test_unknown_ca(root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier) -> None:
    client = make_client(roots[root_type], unknown_ca=True, now=NOW)
    assert _alert(verifier, client.chain_der()) == "unknown_ca"
    assert _alert(verifier, client.chain_der(include_root=True)) == "unknown_ca"


@pytest.mark.parametrize("root_type", ROOTS)
def test_impostor_ca_with_a_trusted_name(
    root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    # Same name as a trusted root, different key: not matched with a trust anchor.
    impostor = make_ca(root_type, common_name=f"root {root_type}", now=NOW)
    assert impostor.certificate.subject == roots[root_type].certificate.subject
    client = make_client(impostor, now=NOW)
    assert _alert(verifier, client.chain_der()) == "unknown_ca"


@pytest.mark.parametrize("root_type", ROOTS)
def test_missing_intermediate(
    root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    inter = make_ca(
        "ecdsa-p256", common_name="unsent intermediate", issuer=roots[root_type], now=NOW
    )
    client = make_client(inter, now=NOW)
    assert _alert(verifier, (client.der,)) == "unknown_ca"


@pytest.mark.parametrize("root_type", ROOTS)
@pytest.mark.parametrize("when", ["expired", "not_yet_valid"])
def test_leaf_outside_its_validity(
    root_type: str, when: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    client = make_client(
        roots[root_type], expired=when == "expired", not_yet_valid=when == "not_yet_valid", now=NOW
    )
    assert _alert(verifier, client.chain_der()) == "certificate_expired"


@pytest.mark.parametrize("root_type", ROOTS)
def test_expired_intermediate(
    root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    inter = make_ca(
        "mldsa65", common_name="old intermediate", issuer=roots[root_type], expired=True, now=NOW
    )
    client = make_client(inter, now=NOW)
    assert _alert(verifier, client.chain_der()) == "certificate_expired"


@pytest.mark.parametrize("root_type", ROOTS)
def test_expired_trust_anchor(root_type: str) -> None:
    root = make_ca(root_type, common_name="expired root", expired=True, now=NOW)
    client = make_client(root, now=NOW)  # itself valid now, under a root that is not
    assert _alert(_verifier(root), client.chain_der()) == "certificate_expired"


def test_validity_is_judged_at_now_not_the_wall_clock(p256_root: Issued, ed_root: Issued) -> None:
    verifier = _verifier(p256_root, ed_root)
    for root in (p256_root, ed_root):
        chain = make_client(root, now=NOW).chain_der()
        verifier.verify_chain(chain, NOW_TS)
        assert _alert(verifier, chain, NOW_TS + 90 * 86400) == "certificate_expired"
        assert _alert(verifier, chain, NOW_TS - 2 * 86400) == "certificate_expired"


@pytest.mark.parametrize("root_type", ROOTS)
def test_server_auth_only_eku(
    root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    client = make_client(roots[root_type], eku="serverAuth", now=NOW)
    assert _alert(verifier, client.chain_der()) == "bad_certificate"


@pytest.mark.parametrize("root_type", ROOTS)
def test_key_usage_without_digital_signature(
    root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    client = make_client(roots[root_type], digital_signature=False, now=NOW)
    assert _alert(verifier, client.chain_der()) == "bad_certificate"


@pytest.mark.parametrize("root_type", ROOTS)
def test_ca_certificate_as_the_leaf(
    root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    client = make_client(roots[root_type], is_ca=True, now=NOW)
    assert _alert(verifier, client.chain_der()) == "bad_certificate"
    # The trust anchor itself, presented as a client certificate.
    assert _alert(verifier, (roots[root_type].der,)) == "bad_certificate"


@pytest.mark.parametrize("root_type", ROOTS)
def test_intermediate_that_is_not_a_ca(
    root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    not_ca = make_ca(
        "ecdsa-p256", common_name="not a CA", issuer=roots[root_type], is_ca=False, now=NOW
    )
    assert _alert(verifier, make_client(not_ca, now=NOW).chain_der()) == "bad_certificate"
    no_sign = make_ca(
        "ecdsa-p256",
        common_name="no keyCertSign",
        issuer=roots[root_type],
        key_cert_sign=False,
        now=NOW,
    )
    assert _alert(verifier, make_client(no_sign, now=NOW).chain_der()) == "bad_certificate"


@pytest.mark.parametrize("root_type", ROOTS)
def test_intermediate_restricted_to_server_auth(
    root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    server_only = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    inter = make_ca(
        "ecdsa-p256",
        common_name="server-only intermediate",
        issuer=roots[root_type],
        extensions=[(server_only, False)],
        now=NOW,
    )
    assert _alert(verifier, make_client(inter, now=NOW).chain_der()) == "bad_certificate"
    # anyExtendedKeyUsage on a CA is accepted (the library does; so does the fallback).
    any_eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE])
    inter = make_ca(
        "ecdsa-p256",
        common_name="any-EKU intermediate",
        issuer=roots[root_type],
        extensions=[(any_eku, False)],
        now=NOW,
    )
    verifier.verify_chain(make_client(inter, now=NOW).chain_der(), NOW_TS)


@pytest.mark.parametrize("root_type", ROOTS)
def test_weak_rsa_intermediate(
    root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    inter = make_ca("rsa1024", common_name="weak intermediate", issuer=roots[root_type], now=NOW)
    assert _alert(verifier, make_client(inter, now=NOW).chain_der()) == "bad_certificate"


@pytest.mark.parametrize("root_type", ROOTS)
def test_critical_eku(
    root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    # The profile requires EKU to be non-critical; both paths hold to it.
    critical = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    client = make_client(roots[root_type], eku="none", extensions=[(critical, True)], now=NOW)
    assert _alert(verifier, client.chain_der()) == "bad_certificate"


@pytest.mark.parametrize("root_type", ROOTS)
def test_path_length_constraint(
    root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    upper = make_ca(
        "ecdsa-p256", common_name="pathlen 0", issuer=roots[root_type], path_length=0, now=NOW
    )
    lower = make_ca("ecdsa-p256", common_name="below pathlen 0", issuer=upper, now=NOW)
    assert _alert(verifier, make_client(lower, now=NOW).chain_der()) == "bad_certificate"
    # pathlen 0 still allows a leaf directly below, and pathlen 1 one more intermediate.
    verifier.verify_chain(make_client(upper, now=NOW).chain_der(), NOW_TS)
    upper = make_ca(
        "ecdsa-p256", common_name="pathlen 1", issuer=roots[root_type], path_length=1, now=NOW
    )
    lower = make_ca("ecdsa-p256", common_name="below pathlen 1", issuer=upper, now=NOW)
    verifier.verify_chain(make_client(lower, now=NOW).chain_der(), NOW_TS)
    lowest = make_ca("ecdsa-p256", common_name="two below pathlen 1", issuer=lower, now=NOW)
    assert _alert(verifier, make_client(lowest, now=NOW).chain_der()) == "bad_certificate"


@pytest.mark.parametrize("root_type", ROOTS)
def test_unknown_critical_extension(
    root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    odd = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    client = make_client(roots[root_type], extensions=[(odd, True)], now=NOW)
    assert _alert(verifier, client.chain_der()) == "bad_certificate"
    # The same extension, not critical, is ignored (RFC 5280 §4.2).
    verifier.verify_chain(
        make_client(roots[root_type], extensions=[(odd, False)], now=NOW).chain_der(), NOW_TS
    )


def test_name_constraints_are_refused_by_the_fallback(
    ed_root: Issued, verifier: X509ClientVerifier
) -> None:
    # The fallback does not evaluate name constraints, so it refuses them rather than
    # ignoring them, even when the leaf would satisfy them.
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("example.org")], excluded_subtrees=None
    )
    inter = make_ca(
        "ecdsa-p256",
        common_name="constrained",
        issuer=ed_root,
        extensions=[(constraints, True)],
        now=NOW,
    )
    client = make_client(inter, dns_names=("a.example.org",), now=NOW)
    assert _alert(verifier, client.chain_der()) == "bad_certificate"


def test_name_constraints_are_enforced_by_the_library(
    p256_root: Issued, verifier: X509ClientVerifier
) -> None:
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("example.org")], excluded_subtrees=None
    )
    inter = make_ca(
        "ecdsa-p256",
        common_name="constrained",
        issuer=p256_root,
        extensions=[(constraints, True)],
        now=NOW,
    )
    inside = make_client(inter, dns_names=("a.example.org",), now=NOW)
    assert verifier.verify_chain(inside.chain_der(), NOW_TS).dns_names == ("a.example.org",)
    outside = make_client(inter, dns_names=("a.example.com",), now=NOW)
    assert _alert(verifier, outside.chain_der()) == "bad_certificate"


def test_garbage(p256_root: Issued, verifier: X509ClientVerifier) -> None:
    client = make_client(p256_root, now=NOW)
    assert _alert(verifier, (b"not a certificate",)) == "bad_certificate"
    assert _alert(verifier, (client.der[:-1],)) == "bad_certificate"
    assert _alert(verifier, (client.der, b"\x30\x03\x02\x01\x00")) == "bad_certificate"
    assert _alert(verifier, ()) == "bad_certificate"
    assert _alert(verifier, (client.der,) * (MAX_CHAIN_LENGTH + 1)) == "bad_certificate"


@pytest.mark.parametrize("root_type", ROOTS)
def test_tampered_signature(
    root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    der = bytearray(make_client(roots[root_type], now=NOW).der)
    der[-3] ^= 0x01  # inside the signature: still parses, no longer verifies
    assert _alert(verifier, (bytes(der),)) == "unknown_ca"


@pytest.mark.parametrize("key_type", ["ecdsa-p521", "ed448", "rsa1024"])
def test_unsupported_leaf_keys(
    key_type: str, p256_root: Issued, verifier: X509ClientVerifier
) -> None:
    client = make_client(p256_root, key_type, now=NOW)
    assert _alert(verifier, client.chain_der()) == "unsupported_certificate"


def test_leaf_key_outside_the_configured_schemes(p256_root: Issued) -> None:
    ecdsa_only = _verifier(p256_root, schemes=(SignatureScheme.ecdsa_secp256r1_sha256,))
    ecdsa_only.verify_chain(make_client(p256_root, "ecdsa-p256", now=NOW).chain_der(), NOW_TS)
    for key_type in ("mldsa65", "ecdsa-p384", "rsa2048"):
        client = make_client(p256_root, key_type, now=NOW)
        assert _alert(ecdsa_only, client.chain_der()) == "unsupported_certificate"


@pytest.mark.parametrize("root_type", ROOTS)
def test_weak_certificate_signature_hash(
    root_type: str, roots: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    inter = make_ca("rsa2048", common_name="rsa intermediate", issuer=roots[root_type], now=NOW)
    client = make_client(inter, signature_hash=hashes.SHA224(), now=NOW)
    assert _alert(verifier, client.chain_der()) == "unsupported_certificate"


def test_unsupported_certificate_signature_algorithm(
    p256_root: Issued, verifier: X509ClientVerifier
) -> None:
    # An Ed448 CA: a certificate signature algorithm that neither path accepts.
    ed448_root = make_ca("ed448", common_name="ed448 root", now=NOW)
    client = make_client(ed448_root, now=NOW)
    assert _alert(_verifier(p256_root, ed448_root), client.chain_der()) == "unsupported_certificate"


def test_reasons_cannot_forge_log_lines(p256_root: Issued, verifier: X509ClientVerifier) -> None:
    client = make_client(p256_root, common_name="evil\nFAKE LOG LINE", expired=True, now=NOW)
    with pytest.raises(CertificateRejected) as caught:
        verifier.verify_chain(client.chain_der(), NOW_TS)
    assert "\n" not in caught.value.reason and "FAKE LOG LINE" in caught.value.reason


# --- the CA bundle ------------------------------------------------------------------------------


def test_bundle_errors(p256_root: Issued) -> None:
    with pytest.raises(ValueError, match="no PEM certificate"):
        X509ClientVerifier(b"")
    with pytest.raises(ValueError, match="malformed PEM"):
        X509ClientVerifier(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    leaf = make_client(p256_root, now=NOW)
    with pytest.raises(
        ValueError, match=r"certificate 2 \(CN=client,O=pqproxy tests\) is not a CA"
    ):
        X509ClientVerifier(bundle_pem(p256_root, leaf))


def test_scheme_errors(p256_root: Issued) -> None:
    pem = bundle_pem(p256_root)
    with pytest.raises(ValueError, match="empty"):
        X509ClientVerifier(pem, signature_schemes=())
    with pytest.raises(ValueError, match="0x0401"):
        X509ClientVerifier(pem, signature_schemes=(SignatureScheme.rsa_pkcs1_sha256,))
    with pytest.raises(ValueError, match="twice"):
        X509ClientVerifier(
            pem, signature_schemes=(SignatureScheme.ed25519, SignatureScheme.ed25519)
        )


# --- CertificateVerify --------------------------------------------------------------------------

# key type → the scheme it signs with in TLS 1.3 (RSA: all three PSS hashes).
SCHEMES: dict[str, tuple[int, ...]] = {
    "ecdsa-p256": (SignatureScheme.ecdsa_secp256r1_sha256,),
    "ecdsa-p384": (SignatureScheme.ecdsa_secp384r1_sha384,),
    "ed25519": (SignatureScheme.ed25519,),
    "rsa2048": (
        SignatureScheme.rsa_pss_rsae_sha256,
        SignatureScheme.rsa_pss_rsae_sha384,
        SignatureScheme.rsa_pss_rsae_sha512,
    ),
    "mldsa44": (SignatureScheme.mldsa44,),
    "mldsa65": (SignatureScheme.mldsa65,),
    "mldsa87": (SignatureScheme.mldsa87,),
}


@pytest.fixture(scope="module")
def clients(p256_root: Issued) -> dict[str, Issued]:
    return {kt: make_client(p256_root, kt, now=NOW) for kt in CLIENT_KEY_TYPES}


def _sign(client: Issued, scheme: int, message: bytes = MESSAGE) -> bytes:
    return signer_from_private_key(client.private_key).sign(scheme, message)


def _verify_alert(verifier: X509ClientVerifier, leaf: bytes, scheme: int, signature: bytes) -> str:
    with pytest.raises(CertificateRejected) as caught:
        verifier.verify_signature(leaf, scheme, MESSAGE, signature)
    return caught.value.alert


@pytest.mark.parametrize("key_type", CLIENT_KEY_TYPES)
def test_certificate_verify(
    key_type: str, clients: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    client = clients[key_type]
    for scheme in SCHEMES[key_type]:
        signature = _sign(client, scheme)
        verifier.verify_signature(client.der, scheme, MESSAGE, signature)
        # Another message, a damaged signature, an empty one: decrypt_error (§4.4.3).
        with pytest.raises(CertificateRejected) as caught:
            verifier.verify_signature(client.der, scheme, MESSAGE + b"!", signature)
        assert caught.value.alert == "decrypt_error"
        damaged = bytes([signature[0] ^ 1]) + signature[1:]
        assert _verify_alert(verifier, client.der, scheme, damaged) == "decrypt_error"
        assert _verify_alert(verifier, client.der, scheme, b"") == "decrypt_error"


def test_signature_by_another_key_of_the_same_type(
    clients: dict[str, Issued], p256_root: Issued, verifier: X509ClientVerifier
) -> None:
    other = make_client(p256_root, "mldsa65", now=NOW)
    signature = _sign(other, SignatureScheme.mldsa65)
    assert (
        _verify_alert(verifier, clients["mldsa65"].der, SignatureScheme.mldsa65, signature)
        == "decrypt_error"
    )


@pytest.mark.parametrize(
    ("key_type", "scheme"),
    [
        ("ecdsa-p256", SignatureScheme.ecdsa_secp384r1_sha384),  # curve bound to its hash
        ("ecdsa-p384", SignatureScheme.ecdsa_secp256r1_sha256),
        ("ecdsa-p256", SignatureScheme.rsa_pss_rsae_sha256),
        ("rsa2048", SignatureScheme.ecdsa_secp256r1_sha256),
        ("rsa2048", SignatureScheme.ed25519),
        ("ed25519", SignatureScheme.mldsa44),
        ("mldsa44", SignatureScheme.mldsa65),  # the parameter set is part of the scheme
        ("mldsa87", SignatureScheme.mldsa65),
        ("mldsa65", SignatureScheme.ed25519),
    ],
)
def test_scheme_that_does_not_fit_the_key(
    key_type: str, scheme: int, clients: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    client = clients[key_type]
    # Whatever the bytes, even a valid signature of the key's own scheme.
    own = _sign(client, SCHEMES[key_type][0])
    assert _verify_alert(verifier, client.der, scheme, own) == "illegal_parameter"


def test_scheme_not_offered(clients: dict[str, Issued], p256_root: Issued) -> None:
    verifier = _verifier(p256_root, schemes=(SignatureScheme.mldsa65,))
    client = clients["ecdsa-p256"]
    signature = _sign(client, SignatureScheme.ecdsa_secp256r1_sha256)
    assert (
        _verify_alert(verifier, client.der, SignatureScheme.ecdsa_secp256r1_sha256, signature)
        == "illegal_parameter"
    )
    # rsa_pkcs1_* is never valid in a TLS 1.3 CertificateVerify (RFC 8446 §4.2.3).
    rsa = clients["rsa2048"]
    assert (
        _verify_alert(_verifier(p256_root), rsa.der, SignatureScheme.rsa_pkcs1_sha256, b"x")
        == "illegal_parameter"
    )


def test_certificate_verify_with_a_garbage_leaf(verifier: X509ClientVerifier) -> None:
    assert _verify_alert(verifier, b"junk", SignatureScheme.ed25519, b"x" * 64) == "bad_certificate"


# --- nothing but CertificateRejected escapes, whatever the client sends ------------------------


@pytest.fixture(scope="module")
def sample_chain(ed_root: Issued) -> tuple[bytes, ...]:
    inter = make_ca("ecdsa-p256", common_name="fuzz intermediate", issuer=ed_root, now=NOW)
    return make_client(inter, "mldsa44", uris=(SPIFFE_CLIENT,), now=NOW).chain_der()


FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _only_rejections(call: Callable[..., object], *args: object) -> None:
    try:
        call(*args)
    except CertificateRejected as rejected:
        assert rejected.alert in {
            "bad_certificate",
            "unknown_ca",
            "certificate_expired",
            "unsupported_certificate",
            "decrypt_error",
            "illegal_parameter",
        }


@FUZZ
@given(chain=st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_random_chains(chain: list[bytes], verifier: X509ClientVerifier) -> None:
    _only_rejections(verifier.verify_chain, tuple(chain), NOW_TS)


@FUZZ
@given(data=st.data())
def test_mutated_chains(
    data: st.DataObject, sample_chain: tuple[bytes, ...], verifier: X509ClientVerifier
) -> None:
    index = data.draw(st.integers(0, len(sample_chain) - 1))
    der = bytearray(sample_chain[index])
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(der) - 1))
        der[position] = data.draw(st.integers(0, 255))
    chain = list(sample_chain)
    chain[index] = bytes(der)
    _only_rejections(verifier.verify_chain, tuple(chain), NOW_TS)


@FUZZ
@given(scheme=st.sampled_from(list(SignatureScheme)), signature=st.binary(max_size=5000))
def test_random_certificate_verify(
    scheme: int, signature: bytes, clients: dict[str, Issued], verifier: X509ClientVerifier
) -> None:
    for client in clients.values():
        _only_rejections(verifier.verify_signature, client.der, scheme, MESSAGE, signature)


def test_wall_clock_time_works_too(p256_root: Issued, verifier: X509ClientVerifier) -> None:
    # The engine passes its clock's time(); a float of now must be accepted as is.
    verifier.verify_chain(make_client(p256_root, now=NOW).chain_der(), time.time())


# --- the test-certificate factory, as pyOpenSSL peers use it ----------------------------------


@pytest.mark.parametrize("key_type", CLIENT_KEY_TYPES)
def test_factory_files_load_in_pyopenssl(key_type: str, tmp_path: Path) -> None:
    from OpenSSL import SSL

    root = make_ca("ecdsa-p256", now=NOW)
    inter = make_ca(key_type, common_name="intermediate", issuer=root, now=NOW)
    client = make_client(inter, key_type, uris=(SPIFFE_CLIENT,), now=NOW)
    cert_path, key_path = client.write_pem_files(tmp_path, "client")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert cert_path.read_bytes() == client.pem + inter.pem  # leaf first, no root
    context = SSL.Context(SSL.TLS_METHOD)
    context.use_certificate_chain_file(str(cert_path))
    context.use_privatekey_file(str(key_path))
    context.check_privatekey()  # raises if the key does not match the leaf
