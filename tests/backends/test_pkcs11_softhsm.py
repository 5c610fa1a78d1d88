"""The pkcs11 backend against a real token: SoftHSM2, set up from nothing in a temporary
directory (tests/backends/softhsm.py).

The keys get into the token the two ways an operator would: an ECDSA P-256 key generated
inside the token (it never existed anywhere else), an RSA-2048 key imported from a PKCS#8
file with softhsm2-util (the file is deleted afterwards). Certificates for them come from a
throwaway CA. Independent clients (pyOpenSSL on OpenSSL 4.0, the stdlib ssl module on the
system's OpenSSL 3.0) then complete handshakes and verify the chain and the CertificateVerify;
the token's own operation counters show that the signature and the ECDH derive happened inside
it.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import queue
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from pqproxy.crypto.backends import BACKEND_MODULES, openssl
from pqproxy.crypto.backends import pkcs11 as p11
from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import CertificateLoadError, load_certified_key
from pqproxy.crypto.provider import (
    BackendError,
    CertifiedKey,
    CryptoProvider,
    InvalidKeyShare,
)
from pqproxy.demo_upstream import serve_demo_upstream
from pqproxy.io.tls_server import ListenerSettings, TLSListener
from pqproxy.tls.enums import NamedGroup, SignatureScheme
from pqproxy.tls.events import HandshakeComplete
from pqproxy.tls.server import ServerConfig, ServerConnection
from tests.backends.softhsm import SoftHsmToken, softhsm_token
from tests.peers import client_context, memory_client, pump

T = TypeVar("T")
WAIT = 20.0
REQUEST = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
EC_KEY, RSA_KEY, BLIND_KEY = "ec-p256", "rsa-2048", "ec-no-public"


# --- Token and certificates ---------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    cert: Path  # leaf, then the CA
    key_uri: Path  # the "key file": a pkcs11: URI
    public_key: PublicKeyTypes


@dataclass(frozen=True)
class TokenSetup:
    hsm: SoftHsmToken
    ca: Path
    ecdsa: Chain
    rsa: Chain
    blind: Chain  # EC key imported without its public-key object
    stranger: Chain  # a certificate for a key the token does not hold, naming the EC key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, public_key: PublicKeyTypes
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("pqproxy pkcs11 test CA"))
        .issuer_name(_name("pqproxy pkcs11 test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenSetup]:
    directory = tmp_path_factory.mktemp("softhsm")
    with softhsm_token(directory / "hsm") as hsm:
        ec_public = hsm.generate_ec_key(EC_KEY, b"\x01", "secp256r1")
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        hsm.import_key(rsa_key, RSA_KEY, b"\x02")
        blind_key = ec.generate_private_key(ec.SECP256R1())
        hsm.import_key(blind_key, BLIND_KEY, b"\x03", with_public_key=False)

        ca_key, ca_cert = _make_ca()
        ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
        ca_path = directory / "ca.pem"
        ca_path.write_bytes(ca_pem)

        def chain(name: str, public_key: PublicKeyTypes, key_label: str) -> Chain:
            leaf = _issue(ca_key, ca_cert, public_key)
            cert_path = directory / f"{name}.pem"
            cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + ca_pem)
            uri_path = directory / f"{name}.uri"
            uri_path.write_text(hsm.uri(key_label) + "\n")
            return Chain(cert_path, uri_path, public_key)

        stranger_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        yield TokenSetup(
            hsm=hsm,
            ca=ca_path,
            ecdsa=chain("ecdsa", ec_public, EC_KEY),
            rsa=chain("rsa", rsa_key.public_key(), RSA_KEY),
            blind=chain("blind", blind_key.public_key(), BLIND_KEY),
            stranger=chain("stranger", stranger_key, EC_KEY),
        )


@pytest.fixture
def token(setup: TokenSetup) -> Iterator[p11.Pkcs11Token]:
    token = p11.open_token(setup.hsm.config())
    yield token
    token.close()
    # Every test releases what it opened: the next one starts without a session.
    assert not p11._REGISTRY, p11._REGISTRY


@pytest.fixture
def ecdh_provider(setup: TokenSetup, token: p11.Pkcs11Token) -> Iterator[p11.Pkcs11Provider]:
    provider = p11.create_provider(setup.hsm.config(frozenset({"ecdh"})))
    assert provider.token is token  # one shared, logged-in session per token
    yield provider
    provider.close()


def _certified(chain: Chain, token: p11.Pkcs11Token) -> CertifiedKey:
    return load_certified_key(chain.cert, chain.key_uri, load_signer=token.signer_loader())


def _session_objects(token: p11.Pkcs11Token) -> int:
    """Objects living in the session (ephemeral ECDH keys and derived secrets)."""
    import pkcs11

    return token.run(
        "counting session objects",
        None,
        lambda session: len(list(session.get_objects({pkcs11.Attribute.TOKEN: False}))),
    )


# --- Clients ------------------------------------------------------------------------------


def _verified_chain_length(client: SSL.Connection) -> int:
    """How many certificates OpenSSL verified up to the trusted CA (0: none)."""
    chain = client.get_verified_chain()
    return 0 if chain is None else len(chain)


def _memory_handshake(
    certified: CertifiedKey,
    provider: CryptoProvider,
    ca: Path,
    groups: str,
    sigalgs: str | None = None,
) -> tuple[HandshakeComplete, SSL.Connection]:
    server = ServerConnection(ServerConfig(certificates=(certified,)), provider, os.urandom)
    client = memory_client(client_context(ca, groups=groups, sigalgs=sigalgs))
    done = [e for e in pump(client, server) if isinstance(e, HandshakeComplete)]
    assert len(done) == 1
    return done[0], client


@dataclass
class Served:
    port: int
    handshakes: queue.Queue[HandshakeComplete]

    def next_handshake(self) -> HandshakeComplete:
        return self.handshakes.get(timeout=WAIT)


@contextmanager
def _serving(
    certified: CertifiedKey, provider: CryptoProvider, groups: tuple[int, ...] | None = None
) -> Iterator[Served]:
    """A real TLSListener on a socket, in front of the demo upstream, on an event loop in a
    background thread (the same arrangement as tests/interop/conftest.py)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, loop)
        return future.result(timeout=WAIT)

    served = Served(0, queue.Queue())
    server_config = (
        ServerConfig(certificates=(certified,))
        if groups is None
        else ServerConfig(certificates=(certified,), groups=groups)
    )

    async def start() -> tuple[asyncio.Server, TLSListener]:
        upstream = await serve_demo_upstream("127.0.0.1", 0, token_interval=0.0)
        settings = ListenerSettings(
            host="127.0.0.1",
            port=0,
            server_config=server_config,
            provider=provider,
            upstream_host="127.0.0.1",
            upstream_port=upstream.sockets[0].getsockname()[1],
        )
        listener = TLSListener(settings, on_handshake=lambda e, _peer: served.handshakes.put(e))
        await listener.start()
        return upstream, listener

    async def stop(upstream: asyncio.Server, listener: TLSListener) -> None:
        await listener.close(grace=1.0)
        upstream.close()
        await upstream.wait_closed()

    try:
        upstream, listener = run(start())
        served.port = listener.port
        try:
            yield served
        finally:
            run(stop(upstream, listener))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=WAIT)
        loop.close()


def _retry(conn: SSL.Connection, sock: socket.socket, call: Callable[[], T]) -> T:
    while True:
        try:
            return call()
        except SSL.WantReadError:
            ready, _, _ = select.select([sock], [], [], WAIT)
            if not ready:
                raise TimeoutError(f"no data from pqproxy within {WAIT} s") from None


def _pyopenssl_get(port: int, ctx: SSL.Context) -> tuple[SSL.Connection, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(b"localhost")
    conn.set_connect_state()
    _retry(conn, sock, conn.do_handshake)
    conn.sendall(REQUEST)
    response = b""
    while True:
        try:
            chunk = _retry(conn, sock, lambda: conn.recv(65536))
        except SSL.ZeroReturnError:
            break
        if not chunk:
            break
        response += chunk
    conn.close()
    return conn, response


def _stdlib_get(port: int, ca: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(REQUEST)
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
            assert tls.version() == "TLSv1.3"
    return response


def _assert_models_response(response: bytes) -> None:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"pqproxy-demo" in body


# --- Capability probing and refusal ------------------------------------------------------


def test_registered_as_a_backend() -> None:
    assert BACKEND_MODULES["pkcs11"] == "pqproxy.crypto.backends.pkcs11"


def test_probe_reads_the_token_mechanism_list(setup: TokenSetup) -> None:
    offered = p11.probe_capabilities(setup.hsm.module, setup.hsm.label)
    assert {"CKM_ECDSA", "CKM_RSA_PKCS_PSS", "CKM_EC_KEY_PAIR_GEN", "CKM_ECDH1_DERIVE"} <= offered
    # SoftHSM 2.6 implements PKCS#11 2.40: no ML-KEM.
    assert "CKM_ML_KEM" not in offered
    assert len(offered) > 20  # the whole list, not only what pqproxy uses


def test_ml_kem_on_softhsm_is_refused_naming_the_mechanism(setup: TokenSetup) -> None:
    config = setup.hsm.config(frozenset({"ml-kem"}))
    with pytest.raises(BackendError) as refused:
        p11.create_provider(config)
    message = str(refused.value)
    assert message.startswith("token 'pqproxy-test' lacks CKM_ML_KEM (ML-KEM key encapsulation)")
    assert "'ml-kem' operation" in message
    assert not p11._REGISTRY  # the refused start-up released its session
    # The self-test, what start-up runs, refuses the same way.
    with pytest.raises(BackendError, match="lacks CKM_ML_KEM"):
        p11.self_test(config)


def test_check_required_names_a_missing_function_flag() -> None:
    # A token that lists CKM_ECDSA for verification only (CKF_VERIFY, no CKF_SIGN).
    with pytest.raises(BackendError, match="offers CKM_ECDSA but not with CKF_SIGN"):
        p11.check_required("t", {p11.CKM_ECDSA: 0x2000}, [p11.CKM_ECDSA], "signing")
    p11.check_required("t", {p11.CKM_ECDSA: p11.CKF_SIGN}, [p11.CKM_ECDSA], "signing")


def test_capabilities_report(setup: TokenSetup) -> None:
    caps = p11.capabilities(setup.hsm.config())
    assert caps["token"] == ["pqproxy-test"]
    assert any(line.startswith("SoftHSM") for line in caps["library"]), caps["library"]
    assert "CKM_ML_KEM" in caps["missing_mechanisms"]
    assert caps["kems"] == []  # ML-KEM halves would come from openssl
    assert caps["token_groups"] == [
        "SecP256r1MLKEM768",
        "SecP384r1MLKEM1024",
        "secp256r1",
        "secp384r1",
    ]
    assert {"X25519MLKEM768", "x25519"} <= set(caps["groups"])
    assert "ecdsa_secp256r1_sha256" in caps["signature_schemes"]
    assert "rsa_pss_rsae_sha256" in caps["signature_schemes"]


def test_self_test_passes_on_softhsm(setup: TokenSetup) -> None:
    p11.self_test(setup.hsm.config(frozenset({"ecdh"}), key_label=EC_KEY))
    assert not p11._REGISTRY


def test_availability_follows_the_environment(
    setup: TokenSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (p11.ENV_MODULE, p11.ENV_TOKEN, p11.ENV_PIN, p11.ENV_PIN_FILE):
        monkeypatch.delenv(name, raising=False)
    assert p11.unavailable_reason() == f"no PKCS#11 module configured: set {p11.ENV_MODULE}"
    monkeypatch.setenv(p11.ENV_MODULE, "/nonexistent/libnothing.so")
    monkeypatch.setenv(p11.ENV_TOKEN, setup.hsm.label)
    monkeypatch.setenv(p11.ENV_PIN_FILE, str(setup.hsm.pin_file))
    assert p11.unavailable_reason() == "PKCS#11 module /nonexistent/libnothing.so: no such file"
    monkeypatch.setenv(p11.ENV_MODULE, setup.hsm.module)
    assert p11.is_available()
    config = p11.Pkcs11Config.from_env()
    assert config.pin == setup.hsm.pin  # read from the PIN file, newline stripped
    assert config.operations == frozenset({"ecdh"})


# --- PIN handling -------------------------------------------------------------------------


def test_wrong_pin_is_a_clear_error_without_the_pin(setup: TokenSetup) -> None:
    wrong = "wrong-pin-93715"
    config = setup.hsm.config(pin=wrong)
    assert wrong not in repr(config)
    with pytest.raises(BackendError) as refused:
        p11.open_token(config)
    assert str(refused.value) == "token 'pqproxy-test': login failed: incorrect PIN"
    assert wrong not in str(refused.value)
    assert not p11._REGISTRY


def test_wrong_pin_refused_while_the_token_is_already_open(
    setup: TokenSetup, token: p11.Pkcs11Token
) -> None:
    # The session is logged in already, so the token itself would not check this PIN.
    with pytest.raises(BackendError, match="incorrect PIN") as refused:
        p11.open_token(setup.hsm.config(pin="another-wrong-pin"))
    assert "another-wrong-pin" not in str(refused.value)


def test_unknown_token_lists_the_present_ones(setup: TokenSetup) -> None:
    config = p11.Pkcs11Config(setup.hsm.module, "no-such-token", setup.hsm.pin)
    with pytest.raises(BackendError, match=r"no token labelled 'no-such-token'.*'pqproxy-test'"):
        p11.open_token(config)


def test_pin_file(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_text("s3cret-pin\r\nignored second line\n")
    assert p11.read_pin_file(path) == "s3cret-pin"
    path.write_text("\n")
    with pytest.raises(BackendError, match="empty"):
        p11.read_pin_file(path)
    with pytest.raises(BackendError, match="cannot read"):
        p11.read_pin_file(tmp_path / "missing")


# --- RFC 7512 URIs ------------------------------------------------------------------------


def test_uri_parsing() -> None:
    uri = p11.parse_pkcs11_uri("pkcs11:token=my%20token;object=tls-key;id=%01%ff;type=private")
    assert uri == p11.Pkcs11Uri("my token", "tls-key", b"\x01\xff", "private", None)
    with_pin_file = p11.parse_pkcs11_uri("pkcs11:object=k?pin-source=file:/run/pqproxy/pin")
    assert with_pin_file.pin_source == "/run/pqproxy/pin"


@pytest.mark.parametrize(
    ("uri", "complaint"),
    [
        ("pkcs11:object=k?pin-value=1234", "pin-value is refused"),
        ("pkcs11:object=k?module-path=/tmp/evil.so", "module-path is refused"),
        ("pkcs11:object=k;serial=42", "'serial' is not supported"),
        ("pkcs11:object=k;type=public", "type=public cannot sign"),
        ("pkcs11:token=t", "name the key"),
        ("file:///key.pem", "not a PKCS#11 URI"),
        ("pkcs11:object=a;object=b", "given twice"),
    ],
)
def test_uri_refusals(uri: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as refused:
        p11.parse_pkcs11_uri(uri)
    assert "1234" not in str(refused.value)


def test_config_from_uri(setup: TokenSetup) -> None:
    uri = f"pkcs11:token={setup.hsm.label};object={EC_KEY}?pin-source={setup.hsm.pin_file}"
    config, parsed = p11.config_from_uri(uri, module=setup.hsm.module, environ={})
    assert (config.token_label, config.key_label, config.pin) == (
        setup.hsm.label,
        EC_KEY,
        setup.hsm.pin,
    )
    assert parsed.object == EC_KEY
    with pytest.raises(ValueError, match="no PKCS#11 PIN"):
        p11.config_from_uri(f"pkcs11:token=t;object={EC_KEY}", module="/x.so", environ={})


# --- Signing inside the token ------------------------------------------------------------


def test_token_key_never_leaves_the_token(setup: TokenSetup) -> None:
    facts = setup.hsm.key_facts(EC_KEY)
    assert facts.local and facts.sensitive and facts.never_extractable
    assert not facts.extractable


def test_certificate_matched_by_the_public_key_from_the_token(
    setup: TokenSetup, token: p11.Pkcs11Token
) -> None:
    before = token.operations["CKM_ECDSA"]
    certified = _certified(setup.ecdsa, token)
    assert isinstance(certified.signer, p11.Pkcs11KeyPairSigner)
    assert certified.signer.schemes == (SignatureScheme.ecdsa_secp256r1_sha256,)
    # The match compared public keys: nothing was signed.
    assert token.operations["CKM_ECDSA"] == before
    with pytest.raises(CertificateLoadError, match="does not match"):
        _certified(setup.stranger, token)


def test_key_without_public_object_proves_possession_by_signing(
    setup: TokenSetup, token: p11.Pkcs11Token
) -> None:
    before = token.operations["CKM_ECDSA"]
    certified = _certified(setup.blind, token)
    assert not isinstance(certified.signer, p11.Pkcs11KeyPairSigner)
    assert token.operations["CKM_ECDSA"] == before + 1  # certs.py's sign-and-verify
    # The EC key's certificate does not fit this key: the same check refuses it.
    stranger = Chain(setup.ecdsa.cert, setup.blind.key_uri, setup.ecdsa.public_key)
    with pytest.raises(CertificateLoadError, match="does not match"):
        _certified(stranger, token)


def test_signatures_verify_with_the_certified_key(
    setup: TokenSetup, token: p11.Pkcs11Token
) -> None:
    message = b"\x20" * 64 + b"TLS 1.3, server CertificateVerify\x00" + os.urandom(32)
    for chain, key_label in ((setup.ecdsa, EC_KEY), (setup.rsa, RSA_KEY)):
        signer = token.load_signer(setup.hsm.uri(key_label))
        for scheme in signer.schemes:
            signature = signer.sign(scheme, message)
            openssl.verify_signature(chain.public_key, scheme, message, signature)
            with pytest.raises(InvalidSignature):
                openssl.verify_signature(chain.public_key, scheme, message + b"!", signature)
    rsa_signer = token.load_signer(setup.hsm.uri(RSA_KEY))
    assert rsa_signer.key_type == "rsa2048"
    assert rsa_signer.schemes == (
        SignatureScheme.rsa_pss_rsae_sha256,
        SignatureScheme.rsa_pss_rsae_sha384,
        SignatureScheme.rsa_pss_rsae_sha512,
    )
    with pytest.raises(ValueError, match="cannot sign with scheme"):
        rsa_signer.sign(SignatureScheme.rsa_pkcs1_sha256, message)


def test_missing_key_and_wrong_token_in_uri(setup: TokenSetup, token: p11.Pkcs11Token) -> None:
    with pytest.raises(ValueError, match="no private key labelled 'absent'"):
        token.load_signer(setup.hsm.uri("absent"))
    with pytest.raises(ValueError, match="names token 'other'"):
        token.load_signer(f"pkcs11:token=other;object={EC_KEY}")


def test_concurrent_signing_is_serialised_on_the_session(
    setup: TokenSetup, token: p11.Pkcs11Token
) -> None:
    # A thread pool, as the offload layer may use: every signature must still be right.
    signer = token.load_signer(setup.hsm.uri(EC_KEY))
    messages = [os.urandom(48) for _ in range(64)]
    before = token.operations["CKM_ECDSA"]
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    with ThreadPoolExecutor(max_workers=8) as pool:
        signatures = list(pool.map(lambda m: signer.sign(scheme, m), messages))
    for message, signature in zip(messages, signatures, strict=True):
        openssl.verify_signature(setup.ecdsa.public_key, scheme, message, signature)
    assert token.operations["CKM_ECDSA"] == before + len(messages)


@pytest.mark.parametrize(
    ("chain_name", "sigalgs", "scheme", "mechanism"),
    [
        ("ecdsa", None, SignatureScheme.ecdsa_secp256r1_sha256, "CKM_ECDSA"),
        ("rsa", "rsa_pss_rsae_sha256", SignatureScheme.rsa_pss_rsae_sha256, "CKM_RSA_PKCS_PSS"),
    ],
)
def test_x25519mlkem768_handshake_signed_in_token_memory_bio(
    setup: TokenSetup,
    token: p11.Pkcs11Token,
    chain_name: str,
    sigalgs: str | None,
    scheme: int,
    mechanism: str,
) -> None:
    certified = _certified(getattr(setup, chain_name), token)
    before = token.operations[mechanism]
    done, client = _memory_handshake(
        certified, OpenSSLProvider(), setup.ca, "X25519MLKEM768", sigalgs
    )
    assert done.group == NamedGroup.X25519MLKEM768
    assert done.signature_scheme == scheme
    assert client.get_group_name() == "X25519MLKEM768"
    # pyOpenSSL verified the chain to the CA and the CertificateVerify; the one signature
    # of the handshake was made by the token.
    assert _verified_chain_length(client) == 2
    assert token.operations[mechanism] == before + 1


@pytest.mark.interop
@pytest.mark.parametrize(
    ("chain_name", "sigalgs", "scheme", "mechanism"),
    [
        ("ecdsa", None, SignatureScheme.ecdsa_secp256r1_sha256, "CKM_ECDSA"),
        ("rsa", "rsa_pss_rsae_sha256", SignatureScheme.rsa_pss_rsae_sha256, "CKM_RSA_PKCS_PSS"),
    ],
)
def test_x25519mlkem768_over_a_socket_signed_in_token(
    setup: TokenSetup,
    token: p11.Pkcs11Token,
    chain_name: str,
    sigalgs: str | None,
    scheme: int,
    mechanism: str,
) -> None:
    certified = _certified(getattr(setup, chain_name), token)
    before = token.operations[mechanism]
    with _serving(certified, OpenSSLProvider()) as served:
        ctx = client_context(setup.ca, groups="X25519MLKEM768", sigalgs=sigalgs)
        conn, response = _pyopenssl_get(served.port, ctx)
        _assert_models_response(response)
        assert conn.get_group_name() == "X25519MLKEM768"
        done = served.next_handshake()
        assert (done.group, done.signature_scheme) == (NamedGroup.X25519MLKEM768, scheme)
        assert token.operations[mechanism] == before + 1

        # A second independent client, the stdlib on the system's OpenSSL 3.0 (no ML-KEM):
        # it verifies the same token-made CertificateVerify over a classical group.
        _assert_models_response(_stdlib_get(served.port, setup.ca))
        assert served.next_handshake().signature_scheme == scheme
        assert token.operations[mechanism] == before + 2


# --- ECDH derive inside the token -------------------------------------------------------


def test_provider_groups_run_ecdh_in_the_token(ecdh_provider: p11.Pkcs11Provider) -> None:
    backends = {NamedGroup(code): group.backend for code, group in ecdh_provider.groups.items()}
    assert backends == {
        NamedGroup.X25519MLKEM768: "openssl",  # the token has no X25519
        NamedGroup.SecP256r1MLKEM768: "pkcs11+openssl",
        NamedGroup.SecP384r1MLKEM1024: "pkcs11+openssl",
        NamedGroup.x25519: "openssl",
        NamedGroup.secp256r1: "pkcs11",
        NamedGroup.secp384r1: "pkcs11",
        NamedGroup.secp521r1: "openssl",
    }
    # Hybrids first, as compose_groups orders them for every backend.
    assert list(backends)[:3] == [
        NamedGroup.X25519MLKEM768,
        NamedGroup.SecP256r1MLKEM768,
        NamedGroup.SecP384r1MLKEM1024,
    ]


@pytest.mark.parametrize("group", [NamedGroup.secp256r1, NamedGroup.secp384r1])
def test_token_ecdh_agrees_with_host_ecdh(
    ecdh_provider: p11.Pkcs11Provider, group: NamedGroup
) -> None:
    token = ecdh_provider.token
    before = token.operations["CKM_ECDH1_DERIVE"]
    host = openssl.classical_groups()[group.name]
    for server, client_side in (
        (ecdh_provider.groups[group], host),
        (host, ecdh_provider.groups[group]),
    ):
        client = client_side.start()
        share, secret = server.server_exchange(client.share)
        assert client.complete(share) == secret
        assert len(secret) == {NamedGroup.secp256r1: 32, NamedGroup.secp384r1: 48}[group]
    assert token.operations["CKM_ECDH1_DERIVE"] == before + 2
    assert _session_objects(token) == 0  # ephemeral keys and secrets destroyed


def test_bad_peer_point_is_invalid_key_share_before_the_token(
    ecdh_provider: p11.Pkcs11Provider,
) -> None:
    token = ecdh_provider.token
    group = ecdh_provider.groups[NamedGroup.secp256r1]
    before = token.operations["CKM_ECDH1_DERIVE"]
    off_curve = b"\x04" + (1).to_bytes(32, "big") * 2
    with pytest.raises(InvalidKeyShare, match="not on the curve"):
        group.server_exchange(off_curve)
    with pytest.raises(InvalidKeyShare, match="expected 65 bytes"):
        group.server_exchange(b"\x04" * 64)
    assert token.operations["CKM_ECDH1_DERIVE"] == before


def test_secp256r1mlkem768_with_token_ecdh_memory_bio(
    setup: TokenSetup, ecdh_provider: p11.Pkcs11Provider
) -> None:
    token = ecdh_provider.token
    certified = _certified(setup.ecdsa, token)
    derives, signs = token.operations["CKM_ECDH1_DERIVE"], token.operations["CKM_ECDSA"]
    done, client = _memory_handshake(certified, ecdh_provider, setup.ca, "SecP256r1MLKEM768")
    assert done.group == NamedGroup.SecP256r1MLKEM768
    assert client.get_group_name() == "SecP256r1MLKEM768"
    assert _verified_chain_length(client) == 2
    assert token.operations["CKM_ECDH1_DERIVE"] == derives + 1
    assert token.operations["CKM_ECDSA"] == signs + 1
    assert _session_objects(token) == 0


@pytest.mark.interop
def test_secp256r1mlkem768_over_a_socket_with_token_ecdh(
    setup: TokenSetup, ecdh_provider: p11.Pkcs11Provider
) -> None:
    token = ecdh_provider.token
    certified = _certified(setup.ecdsa, token)
    derives = token.operations["CKM_ECDH1_DERIVE"]
    # Only the groups whose classical half the token derives: all key agreement in the token.
    token_groups = (NamedGroup.SecP256r1MLKEM768, NamedGroup.secp256r1)
    with _serving(certified, ecdh_provider, groups=token_groups) as served:
        conn, response = _pyopenssl_get(
            served.port, client_context(setup.ca, groups="X25519MLKEM768:SecP256r1MLKEM768")
        )
        _assert_models_response(response)
        assert conn.get_group_name() == "SecP256r1MLKEM768"
        assert served.next_handshake().group == NamedGroup.SecP256r1MLKEM768
        assert token.operations["CKM_ECDH1_DERIVE"] == derives + 1

        # The stdlib client sends an X25519 share first; the server asks for P-256
        # (HelloRetryRequest) and derives that on the token.
        _assert_models_response(_stdlib_get(served.port, setup.ca))
        done = served.next_handshake()
        assert (done.group, done.hello_retry) == (NamedGroup.secp256r1, True)
        assert token.operations["CKM_ECDH1_DERIVE"] == derives + 2
    assert _session_objects(token) == 0


def test_forked_child_is_refused_the_parents_session(
    setup: TokenSetup, token: p11.Pkcs11Token
) -> None:
    # A process pool (fork) would hand the child a session it must not use; it must fail
    # loudly instead of calling into a module that was never initialised for it.
    signer = token.load_signer(setup.hsm.uri(EC_KEY))
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        code = 1
        try:
            signer.sign(SignatureScheme.ecdsa_secp256r1_sha256, b"from the child")
        except BackendError as exc:
            code = 0 if "not in a process pool" in str(exc) else 2
        except BaseException:
            code = 3
        try:
            p11.open_token(setup.hsm.config())
        except BackendError as exc:
            code = code or (0 if "before this one was forked" in str(exc) else 4)
        else:
            code = code or 5
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's session is untouched.
    signature = signer.sign(SignatureScheme.ecdsa_secp256r1_sha256, b"parent")
    openssl.verify_signature(
        setup.ecdsa.public_key, SignatureScheme.ecdsa_secp256r1_sha256, b"parent", signature
    )
