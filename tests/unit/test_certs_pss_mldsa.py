"""Issue 12 items 5 and 11: which schemes an RSASSA-PSS certificate signs with, and ML-DSA
keys in the PKCS#8 forms OpenSSL writes.

The peer is pyOpenSSL on cryptography's bundled OpenSSL 4.0, talking to ``ServerConnection``
through memory BIOs; the ML-DSA "both" keys are written by that same OpenSSL.
"""

from __future__ import annotations

import base64
import datetime
import os
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import mldsa, padding, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from pqproxy import devcert
from pqproxy.crypto import der, mldsa_keys, spki
from pqproxy.crypto.backends import openssl
from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import CertificateLoadError, load_certified_key
from pqproxy.devcert import DevCertPaths, generate_dev_certs
from pqproxy.tls.enums import AlertDescription, SignatureScheme
from pqproxy.tls.events import ConnectionTerminated, HandshakeComplete
from pqproxy.tls.server import ServerConfig, ServerConnection
from tests.peers import client_context, memory_client, pump

PROVIDER = OpenSSLProvider()
PSS_OID = "1.2.840.113549.1.1.10"


def _handshake(
    certs: DevCertPaths | tuple[Path, Path, Path], sigalgs: str
) -> tuple[list[object], list[SSL.Error], SSL.Connection]:
    ca, cert, key = (certs.ca, certs.cert, certs.key) if isinstance(certs, DevCertPaths) else certs
    server = ServerConnection(
        ServerConfig(certificates=(load_certified_key(cert, key),)), PROVIDER, os.urandom
    )
    client = memory_client(client_context(ca=ca, sigalgs=sigalgs))
    errors: list[SSL.Error] = []
    events = pump(client, server, errors)
    return list(events), errors, client


def _completed(events: list[object]) -> HandshakeComplete:
    done = [e for e in events if isinstance(e, HandshakeComplete)]
    assert len(done) == 1, events
    return done[0]


def _alert(events: list[object]) -> AlertDescription | None:
    ends = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert ends, events
    assert ends[0].sent
    return ends[0].alert


@pytest.fixture(scope="module")
def pss_certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertPaths:
    return generate_dev_certs(tmp_path_factory.mktemp("pss"), key_type="rsa-pss")


@pytest.fixture(scope="module")
def rsae_certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertPaths:
    return generate_dev_certs(tmp_path_factory.mktemp("rsae"), key_type="rsa2048")


# -- item 5: RSASSA-PSS certificates -------------------------------------------------------------


def test_item5_gen_cert_rsa_pss_writes_id_rsassa_pss_keys(pss_certs: DevCertPaths) -> None:
    leaf = x509.load_pem_x509_certificate(pss_certs.cert.read_bytes())
    assert leaf.public_key_algorithm_oid.dotted_string == PSS_OID
    params = spki.pss_parameters(spki.subject_public_key_info(leaf))
    assert params == spki.PssParameters(
        hash_oid="2.16.840.1.101.3.4.2.1", mgf_hash_oid="2.16.840.1.101.3.4.2.1", min_salt_length=32
    )
    # The key file carries the same AlgorithmIdentifier, as `openssl genpkey` writes it.
    body = pss_certs.key.read_bytes().split(b"-----")[2]
    info = der.children(der.read_one(base64.b64decode(body), der.SEQUENCE).value)
    assert der.decode_oid(der.children(info[1].value)[0].value) == PSS_OID


def test_item5_pss_certificate_completes_with_rsa_pss_pss_sha256_only(
    pss_certs: DevCertPaths,
) -> None:
    events, errors, client = _handshake(pss_certs, "rsa_pss_pss_sha256")
    assert errors == []
    done = _completed(events)
    assert done.signature_scheme == SignatureScheme.rsa_pss_pss_sha256
    # OpenSSL checked the CertificateVerify against the id-RSASSA-PSS leaf it verified.
    peer = client.get_peer_certificate()
    assert peer is not None
    assert peer.to_cryptography().public_key_algorithm_oid.dotted_string == PSS_OID


def test_item5_pss_certificate_refuses_a_client_offering_only_rsae(
    pss_certs: DevCertPaths,
) -> None:
    events, errors, _client = _handshake(
        pss_certs, "rsa_pss_rsae_sha256:rsa_pss_rsae_sha384:rsa_pss_rsae_sha512"
    )
    assert _alert(events) == AlertDescription.handshake_failure
    assert errors and "handshake failure" in str(errors[0])


def test_item5_rsae_certificate_refuses_a_client_offering_only_pss(
    rsae_certs: DevCertPaths,
) -> None:
    events, errors, _client = _handshake(rsae_certs, "rsa_pss_pss_sha256:rsa_pss_pss_sha384")
    assert _alert(events) == AlertDescription.handshake_failure
    assert errors
    events, errors, _client = _handshake(rsae_certs, "rsa_pss_rsae_sha384")
    assert errors == []
    assert _completed(events).signature_scheme == SignatureScheme.rsa_pss_rsae_sha384


def _pss_cert_with_hash(
    tmp_path: Path,
    hash_algorithm: hashes.SHA256 | hashes.SHA384,
    spki_algorithm: bytes | None = None,
) -> Path:
    """A self-signed id-RSASSA-PSS certificate whose key is restricted to ``hash_algorithm``
    (MGF1 over the same hash, salt as long as the hash), or carries ``spki_algorithm`` as
    its AlgorithmIdentifier, with its key; returns the directory."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pss = padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=padding.PSS.DIGEST_LENGTH)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hash_algorithm, rsa_padding=pss)
    )
    tbs, algorithm, _sig = der.children(
        der.read_one(cert.public_bytes(serialization.Encoding.DER), der.SEQUENCE).value
    )
    fields = [f.encoded for f in der.children(tbs.value)]
    bits = der.children(der.read_one(fields[6], der.SEQUENCE).value)[1]
    fields[6] = der.sequence(spki_algorithm or algorithm.encoded, bits.encoded)
    new_tbs = der.sequence(*fields)
    signature = key.sign(new_tbs, pss, hash_algorithm)
    rebuilt = der.sequence(
        new_tbs, algorithm.encoded, der.encode(der.BIT_STRING, b"\x00" + signature)
    )
    pem = x509.load_der_x509_certificate(rebuilt).public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tmp_path


def test_item5_pss_key_hash_restriction_is_honoured(tmp_path: Path) -> None:
    directory = _pss_cert_with_hash(tmp_path, hashes.SHA384())
    cert, key = directory / "cert.pem", directory / "key.pem"
    certified = load_certified_key(cert, key)
    assert certified.signer.schemes == (SignatureScheme.rsa_pss_pss_sha384,)
    paths = (cert, cert, key)  # self-signed: the certificate is its own anchor
    events, errors, _client = _handshake(paths, "rsa_pss_pss_sha256:rsa_pss_pss_sha512")
    assert _alert(events) == AlertDescription.handshake_failure
    events, errors, _client = _handshake(paths, "rsa_pss_pss_sha256:rsa_pss_pss_sha384")
    assert errors == []
    assert _completed(events).signature_scheme == SignatureScheme.rsa_pss_pss_sha384


def _hash_id(oid: str) -> bytes:
    return der.sequence(der.encode_oid(oid), der.encode(der.NULL, b""))


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        # Parameters present but without a hash: RFC 4055's default, SHA-1.
        (der.sequence(), "RSA-PSS key restricted to hash 1.3.14.3.2.26"),
        # SHA-384 with the default MGF1-SHA-1, as `openssl genpkey -pkeyopt
        # rsa_pss_keygen_md:sha384` writes it.
        (
            der.sequence(der.encode(der.context(0), _hash_id("2.16.840.1.101.3.4.2.2"))),
            "MGF1 over 1.3.14.3.2.26",
        ),
        # A minimum salt longer than TLS uses.
        (
            der.sequence(
                der.encode(der.context(0), _hash_id("2.16.840.1.101.3.4.2.1")),
                der.encode(
                    der.context(1),
                    der.sequence(der.encode_oid(spki.MGF1), _hash_id("2.16.840.1.101.3.4.2.1")),
                ),
                der.encode(der.context(2), der.encode_integer(48)),
            ),
            "salt of at least 48 bytes",
        ),
    ],
    ids=["sha1-by-default", "mgf1-sha1", "salt-too-long"],
)
def test_item5_pss_key_unusable_in_tls_is_refused_at_load(
    tmp_path: Path, params: bytes, reason: str
) -> None:
    algorithm = der.sequence(der.encode_oid(PSS_OID), params)
    directory = _pss_cert_with_hash(tmp_path, hashes.SHA256(), spki_algorithm=algorithm)
    with pytest.raises(CertificateLoadError, match=r"cert\.pem: ") as caught:
        load_certified_key(directory / "cert.pem", directory / "key.pem")
    assert reason in str(caught.value)


def test_item5_schemes_come_from_the_spki_in_one_place(
    pss_certs: DevCertPaths, rsae_certs: DevCertPaths
) -> None:
    for paths, expected in (
        (pss_certs, (SignatureScheme.rsa_pss_pss_sha256,)),
        (rsae_certs, spki.RSAE_SCHEMES),
    ):
        leaf = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        assert spki.certificate_schemes(leaf) == expected
        assert load_certified_key(paths.cert, paths.key).signer.schemes == expected
    # The signature a PSS certificate's key makes verifies as rsa_pss_pss_sha256.
    leaf_key = x509.load_pem_x509_certificate(pss_certs.cert.read_bytes()).public_key()
    signer = load_certified_key(pss_certs.cert, pss_certs.key).signer
    signature = signer.sign(SignatureScheme.rsa_pss_pss_sha256, b"message")
    openssl.verify_signature(leaf_key, SignatureScheme.rsa_pss_pss_sha256, b"message", signature)
    with pytest.raises(ValueError, match="does not sign with scheme"):
        signer.sign(SignatureScheme.rsa_pss_rsae_sha256, b"message")


def test_item5_gen_cert_offers_rsa_pss() -> None:
    assert "rsa-pss" in devcert.KEY_TYPES


# -- item 11: ML-DSA keys in the PKCS#8 "both" form -------------------------------------------

_MlDsaKey = mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey
_MLDSA: dict[str, type[_MlDsaKey]] = {
    "mldsa44": mldsa.MLDSA44PrivateKey,
    "mldsa65": mldsa.MLDSA65PrivateKey,
    "mldsa87": mldsa.MLDSA87PrivateKey,
}


def _openssl_writes(
    key: _MlDsaKey,
) -> bytes:
    """The key as OpenSSL 4.0 writes PKCS#8 by default (seed and expanded key), DER."""
    seed_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pkey = crypto.load_privatekey(crypto.FILETYPE_PEM, seed_pem)
        written: bytes = crypto.dump_privatekey(crypto.FILETYPE_ASN1, pkey)
    return written


def _pem(body: bytes) -> bytes:
    text = base64.encodebytes(body).replace(b"\n", b"")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return b"-----BEGIN PRIVATE KEY-----\n" + b"\n".join(lines) + b"\n-----END PRIVATE KEY-----\n"


def _self_signed(
    key: _MlDsaKey,
) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("key_type", sorted(_MLDSA))
def test_item11_mldsa_both_form_loads_from_its_seed(tmp_path: Path, key_type: str) -> None:
    key = _MLDSA[key_type].generate()
    written = _openssl_writes(key)
    parsed = mldsa_keys.parse_pkcs8(written)
    assert parsed is not None and parsed.form == "both"  # what OpenSSL writes by default
    with pytest.raises(ValueError):
        # The library alone cannot read it: this is the defect.
        serialization.load_der_private_key(written, None)
    (tmp_path / "key.pem").write_bytes(_pem(written))
    (tmp_path / "cert.pem").write_bytes(_self_signed(key))
    certified = load_certified_key(tmp_path / "cert.pem", tmp_path / "key.pem")
    (scheme,) = certified.signer.schemes
    message = b"certificate verify"
    openssl.verify_signature(
        key.public_key(), scheme, message, certified.signer.sign(scheme, message)
    )
    # The expanded key the seed derives here is OpenSSL's, byte for byte.
    assert parsed.seed is not None and parsed.expanded_key is not None
    derived = mldsa_keys.expanded_key_from_seed(parsed.parameters, parsed.seed)
    assert derived == parsed.expanded_key


def test_item11_mldsa_both_form_serves_a_handshake(tmp_path: Path) -> None:
    key = mldsa.MLDSA65PrivateKey.generate()
    (tmp_path / "key.pem").write_bytes(_pem(_openssl_writes(key)))
    (tmp_path / "cert.pem").write_bytes(_self_signed(key))
    cert = tmp_path / "cert.pem"
    events, errors, _client = _handshake((cert, cert, tmp_path / "key.pem"), "mldsa65")
    assert errors == []
    assert _completed(events).signature_scheme == SignatureScheme.mldsa65


def _both(parameters: mldsa_keys.ParameterSet, seed: bytes, expanded: bytes) -> bytes:
    inner = der.sequence(der.encode(der.OCTET_STRING, seed), der.encode(der.OCTET_STRING, expanded))
    return der.sequence(
        der.encode_integer(0),
        der.sequence(der.encode_oid(parameters.oid)),
        der.encode(der.OCTET_STRING, inner),
    )


def test_item11_mldsa_both_form_with_mismatched_halves_is_refused(tmp_path: Path) -> None:
    key = mldsa.MLDSA44PrivateKey.generate()
    parsed = mldsa_keys.parse_pkcs8(_openssl_writes(key))
    assert parsed is not None and parsed.seed is not None and parsed.expanded_key is not None
    other = mldsa_keys.parse_pkcs8(_openssl_writes(mldsa.MLDSA44PrivateKey.generate()))
    assert other is not None and other.expanded_key is not None
    flipped = bytearray(parsed.expanded_key)
    flipped[-1] ^= 1  # inside t0: only the full derivation sees it
    (tmp_path / "cert.pem").write_bytes(_self_signed(key))
    for expanded in (bytes(flipped), other.expanded_key):
        (tmp_path / "key.pem").write_bytes(_pem(_both(parsed.parameters, parsed.seed, expanded)))
        with pytest.raises(CertificateLoadError, match="expanded key does not match") as caught:
            load_certified_key(tmp_path / "cert.pem", tmp_path / "key.pem")
        assert "key.pem" in str(caught.value)


def test_item11_mldsa_expanded_only_form_is_refused_with_how_to_convert(tmp_path: Path) -> None:
    key = mldsa.MLDSA65PrivateKey.generate()
    parsed = mldsa_keys.parse_pkcs8(_openssl_writes(key))
    assert parsed is not None and parsed.expanded_key is not None
    expanded_only = der.sequence(
        der.encode_integer(0),
        der.sequence(der.encode_oid(parsed.parameters.oid)),
        der.encode(der.OCTET_STRING, der.encode(der.OCTET_STRING, parsed.expanded_key)),
    )
    (tmp_path / "key.pem").write_bytes(_pem(expanded_only))
    (tmp_path / "cert.pem").write_bytes(_self_signed(key))
    with pytest.raises(CertificateLoadError) as caught:
        load_certified_key(tmp_path / "cert.pem", tmp_path / "key.pem")
    message = str(caught.value)
    assert "ML-DSA-65" in message and "expandedKey form" in message
    assert "ml-dsa.output_formats=seed-only" in message


def test_item11_mldsa_seed_form_and_bad_sizes(tmp_path: Path) -> None:
    key = mldsa.MLDSA87PrivateKey.generate()
    seed_only = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    parsed = mldsa_keys.parse_pkcs8(seed_only)
    assert parsed is not None and parsed.form == "seed" and parsed.seed == key.private_bytes_raw()
    params = parsed.parameters
    with pytest.raises(mldsa_keys.MlDsaKeyError, match="expanded key of 10 bytes"):
        mldsa_keys.parse_pkcs8(_both(params, bytes(32), bytes(10)))
    with pytest.raises(mldsa_keys.MlDsaKeyError, match="seed of 31 bytes"):
        mldsa_keys.parse_pkcs8(_both(params, bytes(31), bytes(params.expanded_key_size)))
