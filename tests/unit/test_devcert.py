"""Development certificates: each key type gives a chain that an X.509
verifier accepts and a key the proxy can sign with."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from pqproxy.crypto.backends import openssl
from pqproxy.crypto.certs import load_certified_key
from pqproxy.devcert import KEY_TYPES, generate_dev_certs

if TYPE_CHECKING:
    from tests.conftest import DevCertFactory

EXPECTED_SCHEMES = {
    "ecdsa-p256": (0x0403,),
    "ecdsa-p384": (0x0503,),
    "ed25519": (0x0807,),
    "rsa2048": (0x0804, 0x0805, 0x0806),
    # An id-RSASSA-PSS key restricted to SHA-256 (RFC 8446 §4.2.3: rsa_pss_pss_* only).
    "rsa-pss": (0x0809,),
    "mldsa44": (0x0904,),
    "mldsa65": (0x0905,),
    "mldsa87": (0x0906,),
}


def _load(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def test_key_types() -> None:
    assert KEY_TYPES == tuple(EXPECTED_SCHEMES)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_chain_verifies(dev_certs_factory: DevCertFactory, key_type: str) -> None:
    paths = dev_certs_factory(key_type)
    (ca,) = _load(paths.ca)
    (leaf,) = _load(paths.cert)  # the leaf only: the CA is the trust anchor
    if key_type == "rsa-pss":
        # The CA/Browser Forum profile forbids id-RSASSA-PSS keys too; the issuer's
        # signature (RSASSA-PSS over the rebuilt TBSCertificate) is what is checked here.
        assert leaf.public_key_algorithm_oid.dotted_string == "1.2.840.113549.1.1.10"
        assert ca.public_key_algorithm_oid.dotted_string == "1.2.840.113549.1.1.10"
        leaf.verify_directly_issued_by(ca)
        ca.verify_directly_issued_by(ca)
        return
    if key_type == "ed25519":
        # cryptography's verifier follows the CA/Browser Forum profile, which
        # forbids Ed25519 keys ("Forbidden public key algorithm"); check the
        # signature with the CA's key instead. (ML-DSA it does accept.)
        ca_key = ca.public_key()
        assert isinstance(ca_key, ed25519.Ed25519PublicKey)
        ca_key.verify(leaf.signature, leaf.tbs_certificate_bytes)
        leaf.verify_directly_issued_by(ca)
        return
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("localhost"))
    chain = verifier.verify(leaf, [])
    assert chain == [leaf, ca]


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_certified_key_signs_for_every_scheme(
    dev_certs_factory: DevCertFactory, key_type: str
) -> None:
    paths = dev_certs_factory(key_type)
    certified = load_certified_key(paths.cert, paths.key)
    assert certified.signer.schemes == EXPECTED_SCHEMES[key_type]
    leaf_key = _load(paths.cert)[0].public_key()
    message = b"certificate verify content"
    for scheme in certified.signer.schemes:
        signature = certified.signer.sign(scheme, message)
        openssl.verify_signature(leaf_key, scheme, message, signature)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_ca_and_leaf_use_the_same_key_type(
    dev_certs_factory: DevCertFactory, key_type: str
) -> None:
    paths = dev_certs_factory(key_type)
    (ca,) = _load(paths.ca)
    (leaf,) = _load(paths.cert)
    assert type(ca.public_key()) is type(leaf.public_key())
    assert ca.public_key() != leaf.public_key()


def test_key_file_is_private_pkcs8(dev_certs_factory: DevCertFactory) -> None:
    paths = dev_certs_factory()
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    pem = paths.key.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert pem.count(b"-----BEGIN") == 1


def test_existing_key_file_is_tightened(tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    key.write_bytes(b"old")
    key.chmod(0o644)
    generate_dev_certs(tmp_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes() != b"old"


def test_extensions(dev_certs_factory: DevCertFactory) -> None:
    paths = dev_certs_factory()
    (ca,) = _load(paths.ca)
    (leaf,) = _load(paths.cert)

    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical and ca_bc.value.ca
    ca_ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_ku.key_cert_sign and ca_ku.crl_sign and not ca_ku.digital_signature
    assert ca.issuer == ca.subject

    leaf_bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert leaf_bc.critical and not leaf_bc.value.ca
    leaf_ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert leaf_ku.digital_signature and not leaf_ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    leaf_ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert leaf_ski.digest == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key()).digest
    assert leaf.issuer == ca.subject


def test_default_and_extra_sans(tmp_path: Path) -> None:
    paths = generate_dev_certs(tmp_path, sans=["api.example.com", "10.0.0.7", "fd00::1"])
    (ca,) = _load(paths.ca)
    (leaf,) = _load(paths.cert)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "api.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("fd00::1"),
    ]
    store = Store([ca])
    for subject in (
        x509.DNSName("api.example.com"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ):
        PolicyBuilder().store(store).build_server_verifier(subject).verify(leaf, [])


def test_duplicate_sans_are_written_once(tmp_path: Path) -> None:
    paths = generate_dev_certs(tmp_path, sans=["localhost", "127.0.0.1"])
    (leaf,) = _load(paths.cert)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(list(san)) == 3


def test_validity_period(tmp_path: Path) -> None:
    before = datetime.datetime.now(datetime.UTC)
    paths = generate_dev_certs(tmp_path / "a" / "b", days=30)
    after = datetime.datetime.now(datetime.UTC)
    (leaf,) = _load(paths.cert)
    assert paths.cert.parent == tmp_path / "a" / "b"
    assert leaf.not_valid_before_utc <= before
    # Certificate times have whole seconds.
    assert before + datetime.timedelta(days=30, seconds=-1) <= leaf.not_valid_after_utc
    assert leaf.not_valid_after_utc <= after + datetime.timedelta(days=30)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key_type": "dsa"}, "unknown key type 'dsa'; choose one of ecdsa-p256"),
        ({"days": 0}, "days must be at least 1"),
        ({"sans": [""]}, "empty or padded name"),
        ({"sans": [" example.com"]}, "empty or padded name"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_dev_certs(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
