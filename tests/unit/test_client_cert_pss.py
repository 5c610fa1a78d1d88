"""Issue 12 item 5, client direction: an id-RSASSA-PSS *client* certificate signs its
CertificateVerify with ``rsa_pss_pss_*`` (RFC 8446 §4.2.3), derived from its SPKI by the same
function as the server's own certificates (pqproxy.crypto.spki).

The peer is pyOpenSSL (cryptography's bundled OpenSSL) through memory BIOs. OpenSSL only
ever signs what fits its key, so the CertificateVerify a misbehaving client would send is
made by ``_Tap``: it reads the handshake with the secrets OpenSSL's key log gives, replaces
the client's CertificateVerify (and so its Finished) and seals the flight again, exactly as
that client would have sent it. A positive control (a re-signed, correct CertificateVerify)
shows the rewriting itself is sound.
"""

from __future__ import annotations

import base64
import hashlib
import os
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from OpenSSL import SSL

from pqproxy.crypto import der, spki
from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.client_auth import DEFAULT_SIGNATURE_SCHEMES, X509ClientVerifier
from pqproxy.crypto.provider import CertificateRejected, CertifiedKey
from pqproxy.tls.codec import u16, vec16
from pqproxy.tls.enums import AlertDescription, SignatureScheme
from pqproxy.tls.events import ConnectionTerminated, Event, HandshakeComplete
from pqproxy.tls.key_schedule import SUITES, KeySchedule
from pqproxy.tls.messages import client_certificate_verify_input
from pqproxy.tls.record import RecordProtection, RecordReader
from pqproxy.tls.server import ClientAuth, ServerConfig, ServerConnection, resolve_inline
from tests.certs_factory import Issued, bundle_pem, make_ca, make_client
from tests.peers import client_context, memory_client

PROVIDER = OpenSSLProvider()
SUITE = SUITES[0x1301]
SHA256, SHA384 = "2.16.840.1.101.3.4.2.1", "2.16.840.1.101.3.4.2.2"
PSS_SCHEMES = {
    SignatureScheme.rsa_pss_pss_sha256,
    SignatureScheme.rsa_pss_pss_sha384,
    SignatureScheme.rsa_pss_pss_sha512,
}
CERTIFICATE, CERTIFICATE_REQUEST, CERTIFICATE_VERIFY, FINISHED = 11, 13, 15, 20
HANDSHAKE, CCS = 22, 20
SIGNATURE_ALGORITHMS = 13


# --- id-RSASSA-PSS client certificates ---------------------------------------------------------


def _hash_id(oid: str) -> bytes:
    return der.sequence(der.encode_oid(oid), der.encode(der.NULL, b""))


def _pss_params(hash_oid: str, salt: int) -> bytes:
    """RSASSA-PSS-params (RFC 4055 §3.1): hash, MGF1 over the same hash, minimum salt."""
    mgf = der.sequence(der.encode_oid(spki.MGF1), _hash_id(hash_oid))
    return der.sequence(
        der.encode(der.context(0), _hash_id(hash_oid)),
        der.encode(der.context(1), mgf),
        der.encode(der.context(2), der.encode_integer(salt)),
    )


# SPKI AlgorithmIdentifier variants: restricted to one hash, or (no parameters) to none.
RESTRICTED_SHA256 = der.sequence(der.encode_oid(spki.RSASSA_PSS), _pss_params(SHA256, 32))
RESTRICTED_SHA384 = der.sequence(der.encode_oid(spki.RSASSA_PSS), _pss_params(SHA384, 48))
UNRESTRICTED = der.sequence(der.encode_oid(spki.RSASSA_PSS))


@dataclass
class PssClient:
    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey
    root: Issued

    def write(self, directory: Path, algorithm: bytes) -> tuple[Path, Path]:
        """The chain and a PKCS#8 key under ``algorithm`` (as `openssl genpkey -algorithm
        RSA-PSS` writes it), so that OpenSSL holds it as an RSA-PSS key."""
        pkcs8 = self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        version, _rsa, private, *rest = der.children(der.read_one(pkcs8, der.SEQUENCE).value)
        info = der.sequence(version.encoded, algorithm, private.encoded, *(r.encoded for r in rest))
        chain = directory / "pss-client.pem"
        key_path = directory / "pss-client.key"
        chain.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem("PRIVATE KEY", info))
        return chain, key_path


def _pem(label: str, body: bytes) -> bytes:
    text = "\n".join(textwrap.wrap(base64.b64encode(body).decode("ascii"), 64))
    return f"-----BEGIN {label}-----\n{text}\n-----END {label}-----\n".encode("ascii")


def make_pss_client(algorithm: bytes, root: Issued | None = None) -> PssClient:
    """A client certificate from an ECDSA root whose SPKI is id-RSASSA-PSS under
    ``algorithm``: cryptography writes every RSA key as rsaEncryption, so the SPKI's
    AlgorithmIdentifier is replaced and the certificate signed again by the root."""
    root = root or make_ca("ecdsa-p256")
    issued = make_client(root, "rsa2048", dns_names=("pss-client.example",))
    key = issued.private_key
    assert isinstance(key, rsa.RSAPrivateKey)
    tbs, signature_algorithm, _sig = der.children(der.read_one(issued.der, der.SEQUENCE).value)
    fields = der.children(tbs.value)
    index = 6 if fields[0].tag == der.context(0) else 5
    _rsa_encryption, bits = der.children(fields[index].value)
    rebuilt = [f.encoded for f in fields]
    rebuilt[index] = der.sequence(algorithm, bits.encoded)
    new_tbs = der.sequence(*rebuilt)
    assert isinstance(root.private_key, ec.EllipticCurvePrivateKey)
    signature = root.private_key.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    cert = der.sequence(
        new_tbs, signature_algorithm.encoded, der.encode(der.BIT_STRING, b"\x00" + signature)
    )
    return PssClient(x509.load_der_x509_certificate(cert), key, root)


# --- a handshake whose client flight can be rewritten ------------------------------------------


def _messages(data: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(data):
        length = int.from_bytes(data[at + 1 : at + 4], "big")
        out.append(data[at : at + 4 + length])
        at += 4 + length
    assert at == len(data)
    return out


def _records(data: bytes) -> list[tuple[int, bytes]]:
    reader = RecordReader()
    reader.feed(data)
    out = []
    while (record := reader.next_record()) is not None:
        content_type, _version, body = record
        out.append((content_type, body))
    return out


def _read_flight(data: bytes, secret: bytes) -> list[bytes]:
    """The handshake messages in ``data``: plaintext ones, then those protected under
    ``secret`` (from the first protected record on)."""
    protection = RecordProtection(SUITE, secret)
    plain = b""
    for content_type, body in _records(data):
        if content_type == HANDSHAKE:
            plain += body
        elif content_type == 23:
            header = bytes([23, 3, 3]) + len(body).to_bytes(2, "big")
            inner_type, content = protection.open(header, body)
            if inner_type == HANDSHAKE:
                plain += content
    return _messages(plain)


def _certificate_verify(scheme: int, signature: bytes) -> bytes:
    body = u16(scheme) + vec16(signature)
    return bytes([CERTIFICATE_VERIFY]) + len(body).to_bytes(3, "big") + body


def _sigalgs_of_request(request: bytes) -> list[int]:
    # CertificateRequest: context<0..255>, extensions<2..2^16-1> (§4.3.2).
    at = 4 + 1 + request[4]
    end = at + 2 + int.from_bytes(request[at : at + 2], "big")
    at += 2
    while at < end:
        kind, length = (
            int.from_bytes(request[at : at + 2]),
            int.from_bytes(request[at + 2 : at + 4]),
        )
        body = request[at + 4 : at + 4 + length]
        if kind == SIGNATURE_ALGORITHMS:
            return [int.from_bytes(body[i : i + 2]) for i in range(2, len(body), 2)]
        at += 4 + length
    raise AssertionError("CertificateRequest without signature_algorithms")


# Given the signed content and the client's own CertificateVerify (scheme, signature),
# return the CertificateVerify to send instead.
Rewrite = Callable[[bytes, int, bytes], tuple[int, bytes]]


@dataclass
class Outcome:
    events: list[Event]
    requested: list[int] = field(default_factory=list)
    client_scheme: int | None = None

    @property
    def end(self) -> HandshakeComplete | ConnectionTerminated:
        for event in self.events:
            if isinstance(event, HandshakeComplete | ConnectionTerminated):
                return event
        raise AssertionError(f"no outcome in {self.events}")

    def alert(self) -> AlertDescription:
        end = self.end
        assert isinstance(end, ConnectionTerminated), end
        assert end.sent and end.alert is not None
        return end.alert


def _handshake(
    certified: CertifiedKey,
    dev_certs: Any,
    root: Issued,
    chain: Path,
    key: Path,
    rewrite: Rewrite | None = None,
    verifier: X509ClientVerifier | None = None,
) -> Outcome:
    """One mTLS handshake of a pyOpenSSL client holding ``chain``/``key`` against the
    engine; ``rewrite`` replaces the client's CertificateVerify."""
    lines: list[bytes] = []
    ctx = client_context(dev_certs.ca, groups="X25519", ciphersuites="TLS_AES_128_GCM_SHA256")
    ctx.use_certificate_chain_file(str(chain))
    ctx.use_privatekey_file(str(key))
    ctx.set_keylog_callback(lambda _conn, line: lines.append(line))
    client = memory_client(ctx)
    server = ServerConnection(
        ServerConfig(
            certificates=(certified,),
            client_auth=ClientAuth.REQUIRE,
            client_verifier=verifier or X509ClientVerifier(bundle_pem(root)),
        ),
        PROVIDER,
        os.urandom,
        clock=time.time,
    )
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    client_hello = client.bio_read(65536)
    server.receive_data(client_hello)
    events = resolve_inline(server)
    server_flight = server.data_to_send()
    client.bio_write(server_flight)
    client.do_handshake()  # a TLS 1.3 client is done once it has sent its Finished
    client_flight = client.bio_read(65536)

    secrets = dict(line.split(b" ")[0::2] for line in lines)
    client_secret = bytes.fromhex(secrets[b"CLIENT_HANDSHAKE_TRAFFIC_SECRET"].decode())
    server_secret = bytes.fromhex(secrets[b"SERVER_HANDSHAKE_TRAFFIC_SECRET"].decode())
    transcript = _read_flight(client_hello, b"\0" * 32) + _read_flight(server_flight, server_secret)
    client_messages = _read_flight(client_flight, client_secret)
    outcome = Outcome(events)
    outcome.requested = next(
        _sigalgs_of_request(m) for m in transcript if m[0] == CERTIFICATE_REQUEST
    )
    if [m[0] for m in client_messages] != [CERTIFICATE, CERTIFICATE_VERIFY, FINISHED]:
        # OpenSSL found no offered scheme its key can sign with and sent no certificate.
        rewrite = None
    else:
        certificate, verify, _finished = client_messages
        client_scheme = outcome.client_scheme = int.from_bytes(verify[4:6], "big")

    if rewrite is None:
        server.receive_data(client_flight)
    else:
        content = client_certificate_verify_input(
            hashlib.sha256(b"".join(transcript) + certificate).digest()
        )
        scheme, signature = rewrite(content, client_scheme, verify[8:])
        verify = _certificate_verify(scheme, signature)
        finished_hash = hashlib.sha256(b"".join(transcript) + certificate + verify).digest()
        verify_data = KeySchedule(SUITE).finished_verify_data(client_secret, finished_hash)
        finished = bytes([FINISHED]) + len(verify_data).to_bytes(3, "big") + verify_data
        sealed = RecordProtection(SUITE, client_secret).seal(
            HANDSHAKE, certificate + verify + finished
        )
        server.receive_data(b"\x14\x03\x03\x00\x01\x01" + sealed)
    outcome.events += resolve_inline(server)
    return outcome


@pytest.fixture(scope="module")
def certified(dev_certs: Any) -> CertifiedKey:
    return load_certified_key(dev_certs.cert, dev_certs.key)


def _pss_handshake(
    certified: CertifiedKey,
    dev_certs: Any,
    tmp_path: Path,
    algorithm: bytes,
    rewrite: Rewrite | None = None,
) -> tuple[PssClient, Outcome]:
    client = make_pss_client(algorithm)
    chain, key = client.write(tmp_path, algorithm)
    return client, _handshake(certified, dev_certs, client.root, chain, key, rewrite)


def _sign(key: rsa.RSAPrivateKey, algorithm: hashes.HashAlgorithm, salt: int) -> Rewrite:
    def rewrite(content: bytes, scheme: int, _signature: bytes) -> tuple[int, bytes]:
        pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=salt)
        return scheme, key.sign(content, pss, algorithm)

    return rewrite


def _relabel(scheme: int) -> Rewrite:
    """The client's own signature under another code point."""
    return lambda _content, _scheme, signature: (scheme, signature)


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        (RESTRICTED_SHA256, {SignatureScheme.rsa_pss_pss_sha256}),
        (RESTRICTED_SHA384, {SignatureScheme.rsa_pss_pss_sha384}),
        (UNRESTRICTED, PSS_SCHEMES),
    ],
    ids=["sha256-only", "sha384-only", "unrestricted"],
)
def test_item5_client_pss_certificate_is_accepted_with_rsa_pss_pss(
    certified: CertifiedKey,
    dev_certs: Any,
    tmp_path: Path,
    algorithm: bytes,
    expected: set[int],
) -> None:
    _client, outcome = _pss_handshake(certified, dev_certs, tmp_path, algorithm)
    # §4.3.2: the CertificateRequest offers what the server can verify, pss_pss included.
    assert PSS_SCHEMES <= set(outcome.requested)
    assert outcome.client_scheme in expected
    done = outcome.end
    assert isinstance(done, HandshakeComplete), done
    assert done.peer_identity is not None
    assert done.peer_identity.dns_names == ("pss-client.example",)


def test_item5_certificate_request_offers_every_scheme_the_verifier_checks() -> None:
    assert PSS_SCHEMES <= set(DEFAULT_SIGNATURE_SCHEMES)
    root = make_ca("ecdsa-p256")
    verifier = X509ClientVerifier(bundle_pem(root))
    assert PSS_SCHEMES <= set(verifier.signature_schemes)


@pytest.mark.parametrize(
    "scheme",
    [
        SignatureScheme.rsa_pss_rsae_sha256,  # the same PSS computation, the wrong key OID
        SignatureScheme.rsa_pss_pss_sha384,  # the key is restricted to SHA-256
    ],
    ids=["rsae", "other-hash"],
)
def test_item5_client_pss_key_refuses_schemes_that_do_not_fit_it(
    certified: CertifiedKey, dev_certs: Any, tmp_path: Path, scheme: int
) -> None:
    """§4.4.3: the scheme must fit the key; a valid signature under a scheme that does not
    is illegal_parameter (OpenSSL and BoringSSL; Go says decrypt_error)."""
    hash_algorithm = hashes.SHA384() if scheme == SignatureScheme.rsa_pss_pss_sha384 else None
    holder: dict[str, rsa.RSAPrivateKey] = {}

    def rewrite(content: bytes, _scheme: int, signature: bytes) -> tuple[int, bytes]:
        if hash_algorithm is None:
            return scheme, signature  # OpenSSL's own rsa_pss_pss_sha256 signature
        pss = padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=48)
        return scheme, holder["key"].sign(content, pss, hash_algorithm)

    client = make_pss_client(RESTRICTED_SHA256)
    holder["key"] = client.private_key
    chain, key = client.write(tmp_path, RESTRICTED_SHA256)
    outcome = _handshake(certified, dev_certs, client.root, chain, key, rewrite)
    assert outcome.client_scheme == SignatureScheme.rsa_pss_pss_sha256
    assert outcome.alert() == AlertDescription.illegal_parameter


def test_item5_rsae_client_key_refuses_rsa_pss_pss(
    certified: CertifiedKey, dev_certs: Any, tmp_path: Path
) -> None:
    """The other direction: an rsaEncryption client key may not claim rsa_pss_pss_*."""
    root = make_ca("ecdsa-p256")
    chain, key = make_client(root, "rsa2048").write_pem_files(tmp_path, "rsae")
    plain = _handshake(certified, dev_certs, root, chain, key)
    assert plain.client_scheme == SignatureScheme.rsa_pss_rsae_sha256
    assert isinstance(plain.end, HandshakeComplete)
    relabelled = _handshake(
        certified, dev_certs, root, chain, key, _relabel(SignatureScheme.rsa_pss_pss_sha256)
    )
    assert relabelled.alert() == AlertDescription.illegal_parameter


@pytest.mark.parametrize(("salt", "accepted"), [(32, True), (0, False), (20, False), (64, False)])
def test_item5_client_pss_signature_salt_is_the_hash_length(
    certified: CertifiedKey, dev_certs: Any, tmp_path: Path, salt: int, accepted: bool
) -> None:
    """§4.2.3: RSASSA-PSS with MGF1 over the scheme's hash and a salt exactly as long as the
    hash. A re-signed CertificateVerify with salt 32 completes (the rewriting is sound);
    any other salt length is decrypt_error (§4.4.3)."""
    holder: dict[str, rsa.RSAPrivateKey] = {}

    def rewrite(content: bytes, scheme: int, signature: bytes) -> tuple[int, bytes]:
        return _sign(holder["key"], hashes.SHA256(), salt)(content, scheme, signature)

    client = make_pss_client(UNRESTRICTED)
    holder["key"] = client.private_key
    chain, key = client.write(tmp_path, UNRESTRICTED)
    outcome = _handshake(certified, dev_certs, client.root, chain, key, rewrite)
    assert outcome.client_scheme == SignatureScheme.rsa_pss_pss_sha256
    if accepted:
        assert isinstance(outcome.end, HandshakeComplete), outcome.end
    else:
        assert outcome.alert() == AlertDescription.decrypt_error


def test_item5_client_schemes_come_from_spki() -> None:
    """One mapping for both directions: the verifier accepts exactly the CertificateVerify
    schemes spki.certificate_schemes gives the leaf, and refuses the key spki refuses."""
    root = make_ca("ecdsa-p256")
    verifier = X509ClientVerifier(bundle_pem(root))
    message = b"client certificate verify"
    for algorithm, hash_algorithm in (
        (RESTRICTED_SHA256, hashes.SHA256()),
        (RESTRICTED_SHA384, hashes.SHA384()),
    ):
        client = make_pss_client(algorithm, root)
        leaf = client.certificate.public_bytes(serialization.Encoding.DER)
        (allowed,) = spki.certificate_schemes(client.certificate)
        pss = padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size)
        signature = client.private_key.sign(message, pss, hash_algorithm)
        verifier.verify_chain((leaf,), time.time())
        verifier.verify_signature(leaf, allowed, message, signature)
        for other in (PSS_SCHEMES - {allowed}) | {SignatureScheme.rsa_pss_rsae_sha256}:
            with pytest.raises(CertificateRejected) as refused:
                verifier.verify_signature(leaf, other, message, signature)
            assert refused.value.alert == "illegal_parameter"
    # SHA-384 with the default MGF1 over SHA-1 (as `openssl genpkey -pkeyopt
    # rsa_pss_keygen_md:sha384` writes it): no TLS 1.3 scheme fits, and spki says why.
    only_hash = der.sequence(der.encode(der.context(0), _hash_id(SHA384)))
    bad = der.sequence(der.encode_oid(spki.RSASSA_PSS), only_hash)
    client = make_pss_client(bad, root)
    with pytest.raises(spki.UnusableKey, match="MGF1"):
        spki.certificate_schemes(client.certificate)
    with pytest.raises(CertificateRejected) as refused:
        verifier.verify_chain(
            (client.certificate.public_bytes(serialization.Encoding.DER),), time.time()
        )
    assert refused.value.alert == "unsupported_certificate"
    assert "MGF1" in refused.value.reason
