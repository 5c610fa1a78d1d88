"""Loading certificate chains and keys, and matching server names."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pqproxy.crypto.backends import openssl
from pqproxy.crypto.certs import (
    CertificateLoadError,
    leaf_names,
    load_certified_key,
)
from pqproxy.crypto.provider import Signer, matches_server_name
from pqproxy.devcert import DevCertPaths, generate_dev_certs

if TYPE_CHECKING:
    from tests.conftest import DevCertFactory

PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER


def _self_signed(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


class KeylessSigner:
    """A signer that cannot show its public key, as one on a hardware token."""

    def __init__(self, inner: Signer) -> None:
        self._inner = inner

    @property
    def schemes(self) -> tuple[int, ...]:
        return self._inner.schemes

    @property
    def backend(self) -> str:
        return "token"

    def sign(self, scheme: int, message: bytes) -> bytes:
        return self._inner.sign(scheme, message)


def _keyless_loader(key_pem: bytes, password: bytes | None) -> Signer:
    return KeylessSigner(openssl.load_signer(key_pem, password))


# --- loading -------------------------------------------------------------------------------


def test_loads_chain_signer_and_names(dev_certs: DevCertPaths) -> None:
    certified = load_certified_key(dev_certs.cert, dev_certs.key)
    leaf = x509.load_pem_x509_certificate(dev_certs.cert.read_bytes())
    assert certified.chain == (leaf.public_bytes(DER),)
    assert certified.signer.schemes == (0x0403,)
    assert certified.names == ("localhost", "127.0.0.1", "::1")


def test_chain_keeps_intermediates_in_order(dev_certs: DevCertPaths, tmp_path: Path) -> None:
    # The dev CA stands in for an intermediate: leaf, then its issuer.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(dev_certs.cert.read_bytes() + dev_certs.ca.read_bytes())
    certified = load_certified_key(bundle, dev_certs.key)
    ca = x509.load_pem_x509_certificate(dev_certs.ca.read_bytes())
    assert len(certified.chain) == 2
    assert certified.chain[1] == ca.public_bytes(DER)


def test_chain_out_of_order_is_refused(dev_certs: DevCertPaths, tmp_path: Path) -> None:
    bundle = tmp_path / "reversed.pem"
    bundle.write_bytes(dev_certs.ca.read_bytes() + dev_certs.cert.read_bytes())
    with pytest.raises(CertificateLoadError, match=r"reversed\.pem.*leaf first"):
        load_certified_key(bundle, dev_certs.key)


def test_missing_certificate_file(tmp_path: Path, dev_certs: DevCertPaths) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(CertificateLoadError, match=r"certificate file .*nope\.pem: no such file"):
        load_certified_key(missing, dev_certs.key)


def test_missing_key_file(tmp_path: Path, dev_certs: DevCertPaths) -> None:
    with pytest.raises(CertificateLoadError, match=r"key file .*nokey\.pem: no such file"):
        load_certified_key(dev_certs.cert, tmp_path / "nokey.pem")


def test_file_without_certificate(tmp_path: Path, dev_certs: DevCertPaths) -> None:
    # A key where the certificate should be: a common mix-up.
    with pytest.raises(CertificateLoadError, match=r"server\.key: no PEM certificate in file"):
        load_certified_key(dev_certs.key, dev_certs.key)


def test_malformed_certificate(tmp_path: Path, dev_certs: DevCertPaths) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateLoadError, match=r"bad\.pem"):
        load_certified_key(bad, dev_certs.key)


def test_key_that_does_not_match(
    dev_certs: DevCertPaths, dev_certs_factory: DevCertFactory, tmp_path: Path
) -> None:
    other = generate_dev_certs(tmp_path, "ecdsa-p256")
    with pytest.raises(CertificateLoadError, match="key does not match the certificate"):
        load_certified_key(dev_certs.cert, other.key)
    # A key of another type entirely.
    with pytest.raises(CertificateLoadError, match="key does not match"):
        load_certified_key(dev_certs.cert, dev_certs_factory("ed25519").key)


def test_unusable_key_names_the_file(tmp_path: Path, dev_certs: DevCertPaths) -> None:
    key = tmp_path / "k1.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256K1()).private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(CertificateLoadError, match=r"k1\.pem: unsupported ECDSA curve"):
        load_certified_key(dev_certs.cert, key)


def test_encrypted_key(tmp_path: Path, dev_certs: DevCertPaths) -> None:
    key = serialization.load_pem_private_key(dev_certs.key.read_bytes(), None)
    formats = {
        "pkcs8": serialization.PrivateFormat.PKCS8,
        "traditional": serialization.PrivateFormat.TraditionalOpenSSL,
    }
    for label, fmt in formats.items():
        encrypted = tmp_path / f"enc-{label}.key"
        encrypted.write_bytes(
            key.private_bytes(PEM, fmt, serialization.BestAvailableEncryption(b"pw"))
        )
        with pytest.raises(CertificateLoadError, match="encrypted and no password given"):
            load_certified_key(dev_certs.cert, encrypted)
        with pytest.raises(CertificateLoadError, match=encrypted.name):
            load_certified_key(dev_certs.cert, encrypted, password=b"wrong")
        certified = load_certified_key(dev_certs.cert, encrypted, password=b"pw")
        assert certified.signer.schemes == (0x0403,)


def test_signer_without_public_key_proves_possession(
    dev_certs: DevCertPaths, tmp_path: Path
) -> None:
    certified = load_certified_key(dev_certs.cert, dev_certs.key, load_signer=_keyless_loader)
    assert certified.signer.backend == "token"
    other = generate_dev_certs(tmp_path, "ecdsa-p256")
    with pytest.raises(CertificateLoadError, match="key does not match"):
        load_certified_key(dev_certs.cert, other.key, load_signer=_keyless_loader)


def test_names_fall_back_to_the_cn_without_san(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_signed(key, "Legacy.Example.COM")
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_path.write_bytes(cert.public_bytes(PEM))
    key_path.write_bytes(
        key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    assert load_certified_key(cert_path, key_path).names == ("legacy.example.com",)


def test_san_names_win_over_the_cn(tmp_path: Path) -> None:
    paths = generate_dev_certs(tmp_path, sans=["API.example.com", "*.svc.local", "10.1.2.3"])
    leaf = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    assert leaf_names(leaf) == (
        "localhost",
        "api.example.com",
        "*.svc.local",
        "127.0.0.1",
        "::1",
        "10.1.2.3",
    )


# --- server names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "server_name", "expected"),
    [
        (["example.com"], "example.com", True),
        (["example.com"], "EXAMPLE.com", True),
        (["Example.COM"], "example.com", True),
        (["example.com"], "example.com.", True),
        (["example.com"], "www.example.com", False),
        (["*.example.com"], "www.example.com", True),
        (["*.example.com"], "WWW.Example.Com", True),
        (["*.example.com"], "example.com", False),
        (["*.example.com"], "a.b.example.com", False),
        (["*.example.com"], ".example.com", False),
        (["*.example.com"], "wwwexample.com", False),
        (["*.example.com"], "www.example.org", False),
        (["w*.example.com"], "www.example.com", False),
        (["www.*.com"], "www.example.com", False),
        (["a.example.com", "*.example.org"], "x.example.org", True),
        (["127.0.0.1"], "127.0.0.1", True),
        ([], "example.com", False),
        (["example.com"], "", False),
    ],
)
def test_matches_server_name(names: list[str], server_name: str, expected: bool) -> None:
    assert matches_server_name(names, server_name) is expected
