"""Issue 12, items 1, 2 and 10, through real bytes into ``ServerConnection``:

1. a client-certificate identity does not outlive its certificate, nor ``max_auth_age``
   since its last CertificateVerify, however often its tickets are chained;
2. client chain verification is an engine event run off the loop, and crafted chains
   (a mesh of self-issued "CAs" sharing one name and key) are refused before
   cryptography's path builder;
10. KeyUpdate requests are answered with one KeyUpdate before our next data, however
    many arrive.

pyOpenSSL (cryptography's OpenSSL) is the client; the engine's clock is injected.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from pqproxy.config import ConfigError, parse_config
from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.client_auth import X509ClientVerifier
from pqproxy.crypto.offload import (
    Offloader,
    OffloadMode,
    OffloadSettings,
    Outcome,
    RecordingObserver,
    build_offloader,
)
from pqproxy.crypto.provider import CertificateRejected, CertifiedKey, PeerIdentity
from pqproxy.crypto.tickets import RotatingTicketKeys
from pqproxy.io.supervisor import build_runtime
from pqproxy.io.telemetry import Telemetry
from pqproxy.io.tls_server import ListenerSettings, TLSListener
from pqproxy.metrics import CLIENT_CERTIFICATE_RESULTS, ProxyMetrics
from pqproxy.tls.enums import AlertDescription, ContentType, HandshakeType
from pqproxy.tls.events import (
    CertificateVerificationNeeded,
    ConnectionTerminated,
    HandshakeComplete,
    KeyUpdated,
)
from pqproxy.tls.key_schedule import SUITES, next_traffic_secret
from pqproxy.tls.record import RecordProtection, RecordReader
from pqproxy.tls.server import ClientAuth, ServerConfig, ServerConnection, resolve_inline
from pqproxy.tls.session import SessionState, decode_session_state, encode_session_state
from tests.certs_factory import Issued, bundle_pem, make_ca, make_client
from tests.peers import client_context, drain_bio, memory_client, pump

PROVIDER = OpenSSLProvider()
HOUR = 3600
DAY = 24 * HOUR
STEP = 90 * 60  # resume every 1.5 h
WAIT = 20.0


class Clock:
    """The engine's clock: whole seconds, so the limits' boundaries are exact."""

    def __init__(self, start: float) -> None:
        self.now = float(int(start))

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def certified(dev_certs: Any) -> CertifiedKey:
    return load_certified_key(dev_certs.cert, dev_certs.key)


@pytest.fixture(scope="module")
def root() -> Issued:
    return make_ca("ecdsa-p256", common_name="client root")


# --- item 1: the identity's age and lifetime -----------------------------------------------------


def _mtls_config(
    certified: CertifiedKey,
    root: Issued,
    tickets: Any,
    mode: ClientAuth = ClientAuth.REQUIRE,
    **overrides: Any,
) -> ServerConfig:
    return ServerConfig(
        certificates=(certified,),
        client_auth=mode,
        client_verifier=X509ClientVerifier(bundle_pem(root)),
        tickets=tickets,
        ticket_lifetime=2 * HOUR,
        **overrides,
    )


def _client_context(dev_certs: Any, tmp_path: Path, issued: Issued | None) -> SSL.Context:
    ctx = client_context(dev_certs.ca, groups="X25519MLKEM768")
    if issued is not None:
        chain, key = issued.write_pem_files(tmp_path, f"client-{id(issued):x}")
        ctx.use_certificate_chain_file(str(chain))
        ctx.use_privatekey_file(str(key))
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    return ctx


@dataclass
class Connected:
    outcome: str  # "resumed", "full", or the name of the alert the server sent
    done: HandshakeComplete | None
    session: SSL.Session | None


def _connect(
    config: ServerConfig, clock: Clock, ctx: SSL.Context, session: SSL.Session | None
) -> Connected:
    """One connection: handshake (offering ``session``), one byte of data so the client
    takes in the tickets, a clean shutdown; returns the newest session the client holds."""
    server = ServerConnection(config, PROVIDER, os.urandom, clock=clock)
    client = memory_client(ctx)
    if session is not None:
        client.set_session(session)
    events = pump(client, server, [])
    done = next((e for e in events if isinstance(e, HandshakeComplete)), None)
    if done is None:
        (end,) = [e for e in events if isinstance(e, ConnectionTerminated)]
        assert end.sent and end.alert is not None
        return Connected(end.alert.name, None, None)
    server.send_data(b"x")
    client.bio_write(server.data_to_send())
    assert client.recv(10) == b"x"
    newest = client.get_session()
    client.shutdown()
    return Connected("resumed" if done.resumed else "full", done, newest)


def _chain(config: ServerConfig, clock: Clock, ctx: SSL.Context, steps: int) -> list[Connected]:
    """A full handshake, then ``steps`` connections STEP apart, each offering the newest
    ticket the client holds."""
    first = _connect(config, clock, ctx, None)
    assert first.outcome == "full"
    results = []
    session = first.session
    for _ in range(steps):
        clock.now += STEP
        result = _connect(config, clock, ctx, session)
        results.append(result)
        session = result.session if result.session is not None else session
    return results


def test_item1_chained_resumption_stops_at_max_auth_age(
    certified: CertifiedKey, root: Issued, dev_certs: Any, tmp_path: Path
) -> None:
    # A certificate valid 30 days; the default max_auth_age is 24 h.
    leaf = make_client(root, "ecdsa-p256", common_name="alice")
    clock = Clock(time.time())
    config = _mtls_config(certified, root, RotatingTicketKeys(os.urandom(32)))
    results = _chain(config, clock, _client_context(dev_certs, tmp_path, leaf), steps=20)
    outcomes = [r.outcome for r in results]
    # 1.5 h .. 24 h after the CertificateVerify: resumed; at 25.5 h a full handshake with a
    # new CertificateVerify, after which the chain resumes again.
    assert outcomes == ["resumed"] * 16 + ["full"] + ["resumed"] * 3
    for result in results:
        assert result.done is not None and result.done.peer_identity is not None
        assert result.done.peer_identity.subject == "CN=alice,O=pqproxy tests"


def test_item1_chained_resumption_stops_at_certificate_expiry(
    certified: CertifiedKey, root: Issued, dev_certs: Any, tmp_path: Path
) -> None:
    # The leaf expires a day before its CA; the chain starts 6 h before the leaf expires,
    # well inside max_auth_age, so the expiry is what ends it.
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    leaf = make_client(root, "ecdsa-p256", common_name="bob", now=start)
    not_after = leaf.certificate.not_valid_after_utc.timestamp()
    clock = Clock(not_after - 6 * HOUR)
    config = _mtls_config(certified, root, RotatingTicketKeys(os.urandom(32)))
    results = _chain(config, clock, _client_context(dev_certs, tmp_path, leaf), steps=6)
    outcomes = [r.outcome for r in results]
    # 4.5 h, 3 h, 1.5 h and 0 h before expiry: resumed; after it, the ticket no longer
    # carries the identity and the new full handshake meets the expired certificate.
    assert outcomes == ["resumed"] * 4 + ["certificate_expired"] * 2


def test_item1_session_without_client_certificate_is_unaffected(
    certified: CertifiedKey, root: Issued, dev_certs: Any, tmp_path: Path
) -> None:
    clock = Clock(time.time())
    config = _mtls_config(
        certified, root, RotatingTicketKeys(os.urandom(32)), mode=ClientAuth.OPTIONAL
    )
    results = _chain(config, clock, _client_context(dev_certs, tmp_path, None), steps=24)
    assert [r.outcome for r in results] == ["resumed"] * 24  # 36 h, far past max_auth_age
    assert all(r.done is not None and r.done.peer_identity is None for r in results)


class RecordingTickets:
    """A TicketProtector that keeps the plaintext of every ticket it seals (to read what a
    ticket carries); ``version`` rewrites the format byte, standing for tickets issued by a
    release whose session format was another."""

    def __init__(self, version: int | None = None) -> None:
        self._keys = RotatingTicketKeys(os.urandom(32))
        self._version = version
        self.sealed: list[bytes] = []

    def seal(self, plaintext: bytes, now: float) -> bytes:
        self.sealed.append(plaintext)
        if self._version is not None:
            plaintext = bytes((self._version,)) + plaintext[1:]
        return self._keys.seal(plaintext, now)

    def open(self, ticket: bytes, now: float) -> bytes | None:
        return self._keys.open(ticket, now)

    def states(self) -> list[SessionState]:
        states = [decode_session_state(p) for p in self.sealed]
        self.sealed.clear()
        assert all(s is not None for s in states)
        return [s for s in states if s is not None]


def test_item1_tickets_of_resumed_sessions_keep_the_original_proof(
    certified: CertifiedKey, root: Issued, dev_certs: Any, tmp_path: Path
) -> None:
    leaf = make_client(root, "ecdsa-p256", common_name="carol")
    clock = Clock(time.time())
    auth_time = clock.now  # the full handshake's CertificateVerify
    tickets = RecordingTickets()
    config = _mtls_config(certified, root, tickets)
    results = _chain(config, clock, _client_context(dev_certs, tmp_path, leaf), steps=3)
    assert [r.outcome for r in results] == ["resumed"] * 3
    states = tickets.states()
    assert len(states) == 4 * config.tickets_per_handshake
    for state in states:
        assert state.identity is not None and state.identity.subject == "CN=carol,O=pqproxy tests"
        assert state.auth_time == auth_time
        # The earliest notAfter of the verified path (the root here is made a moment before
        # the leaf, so it may end a second earlier).
        assert state.not_after == min(
            issued.certificate.not_valid_after_utc.timestamp() for issued in (leaf, root)
        )
    # Each ticket is new all the same: its own lifetime counts from when it was issued.
    assert sorted({s.created for s in states}) == [auth_time + i * STEP for i in range(4)]


def test_item1_tickets_never_outlive_the_identity_they_carry(
    certified: CertifiedKey, root: Issued, dev_certs: Any, tmp_path: Path
) -> None:
    leaf = make_client(root, "ecdsa-p256", common_name="dave")
    clock = Clock(time.time())
    tickets = RecordingTickets()
    config = _mtls_config(certified, root, tickets, max_auth_age=3 * HOUR)
    ctx = _client_context(dev_certs, tmp_path, leaf)
    first = _connect(config, clock, ctx, None)
    assert {s.lifetime for s in tickets.states()} == {2 * HOUR}
    clock.now += STEP
    second = _connect(config, clock, ctx, first.session)
    # 1.5 h of max_auth_age left: the tickets say so (RFC 8446 §4.6.1 lets a server cut it).
    assert second.outcome == "resumed"
    assert {s.lifetime for s in tickets.states()} == {STEP}
    clock.now += STEP
    third = _connect(config, clock, ctx, second.session)
    assert third.outcome == "resumed"  # exactly max_auth_age: still within it
    assert tickets.states() == []  # nothing left to resume: no ticket at all
    clock.now += STEP
    assert _connect(config, clock, ctx, third.session).outcome == "full"


def test_item1_a_lower_max_auth_age_refuses_tickets_issued_before(
    certified: CertifiedKey, root: Issued, dev_certs: Any, tmp_path: Path
) -> None:
    leaf = make_client(root, "ecdsa-p256", common_name="erin")
    clock = Clock(time.time())
    tickets = RecordingTickets()
    ctx = _client_context(dev_certs, tmp_path, leaf)
    first = _connect(_mtls_config(certified, root, tickets), clock, ctx, None)
    clock.now += STEP  # well within the ticket's own 2 h
    lowered = _mtls_config(certified, root, tickets, max_auth_age=HOUR)
    again = _connect(lowered, clock, ctx, first.session)
    assert again.outcome == "full"  # a full handshake, never an alert
    assert again.done is not None and again.done.peer_identity is not None


def test_item1_tickets_of_the_previous_format_do_not_resume(
    certified: CertifiedKey, root: Issued, dev_certs: Any, tmp_path: Path
) -> None:
    leaf = make_client(root, "ecdsa-p256", common_name="frank")
    clock = Clock(time.time())
    config = _mtls_config(certified, root, RecordingTickets(version=1))
    results = _chain(config, clock, _client_context(dev_certs, tmp_path, leaf), steps=2)
    assert [r.outcome for r in results] == ["full", "full"]


@pytest.mark.parametrize("seconds", [0, -1, 7 * DAY + 1])
def test_item1_max_auth_age_is_bounded(certified: CertifiedKey, root: Issued, seconds: int) -> None:
    with pytest.raises(ValueError, match="max_auth_age"):
        _mtls_config(certified, root, None, max_auth_age=seconds)
    assert _mtls_config(certified, root, None, max_auth_age=7 * DAY).max_auth_age == 7 * DAY


def test_item1_session_state_keeps_the_times_with_the_identity() -> None:
    identity = PeerIdentity("CN=x", ("x.example",), ("spiffe://e/x",))
    state = SessionState(
        cipher_suite=0x1301,
        psk=bytes(32),
        created=1_800_000_000.25,
        lifetime=7200,
        server_name="localhost",
        alpn=b"h2",
        identity=identity,
        auth_time=1_799_990_000.5,
        not_after=1_802_000_000.0,
    )
    decoded = decode_session_state(encode_session_state(state))
    assert decoded is not None
    assert (decoded.auth_time, decoded.not_after) == (1_799_990_000.5, 1_802_000_000.0)
    assert decoded.identity == identity and decoded.identity.not_after == 1_802_000_000.0
    # An identity without its times (or times without one) is not a session.
    with pytest.raises(ValueError):
        SessionState(0x1301, bytes(32), 0.0, 1, None, None, identity)
    with pytest.raises(ValueError):
        SessionState(0x1301, bytes(32), 0.0, 1, None, None, None, auth_time=1.0, not_after=2.0)
    # The previous format (version 1) does not decode.
    assert decode_session_state(b"\x01" + encode_session_state(state)[1:]) is None


# --- item 2: chain verification ------------------------------------------------------------------


def _mesh_chain(copies: int) -> tuple[tuple[bytes, ...], ec.EllipticCurvePrivateKey]:
    """A leaf issued by "Mesh CA", then ``copies`` self-issued "Mesh CA" certificates that all
    share one subject and one key: each verifies each, so a path builder that does not refuse
    them explores every ordering until its signature-check budget runs out. Returns the chain
    (DER, leaf first) and the leaf's key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mesh CA")])
    now = datetime.datetime.now(datetime.UTC)
    usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)

    def base(subject: x509.Name, serial: int) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(name)
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    cas = [
        base(name, serial)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
        for serial in range(1, copies + 1)
    ]
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        base(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh leaf")]), 1000)
        .public_key(leaf_key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return tuple(c.public_bytes(Encoding.DER) for c in (leaf, *cas)), leaf_key


def _cost(verifier: X509ClientVerifier, chain: tuple[bytes, ...], rounds: int) -> float:
    started = time.process_time()
    for _ in range(rounds):
        try:
            verifier.verify_chain(chain, time.time())
        except CertificateRejected:
            pass
    return time.process_time() - started


@pytest.mark.parametrize(
    ("copies", "depth", "alert", "check"),
    [
        # Within max_chain_depth: the self-issued "CAs" are refused, with unknown_ca as
        # OpenSSL answers a self-signed certificate in a chain.
        (4, 5, "unknown_ca", "self_issued_intermediate"),
        (9, 10, "unknown_ca", "self_issued_intermediate"),
        # Longer than max_chain_depth (the default 5): refused on the count alone.
        (9, 5, "bad_certificate", "chain_too_long"),
    ],
)
def test_item2_mesh_chain_is_refused_cheaply(
    root: Issued, copies: int, depth: int, alert: str, check: str
) -> None:
    mesh, _ = _mesh_chain(copies)
    assert 1000 <= sum(map(len, mesh)) <= 4096
    inter = make_ca("ecdsa-p256", common_name="client intermediate", issuer=root)
    normal = make_client(inter, "ecdsa-p256").chain_der()
    verifier = X509ClientVerifier(bundle_pem(root), max_chain_depth=depth)
    with pytest.raises(CertificateRejected) as caught:
        verifier.verify_chain(mesh, time.time())
    # The check that refused it runs before cryptography's path builder.
    assert (caught.value.alert, caught.value.check) == (alert, check)
    # The work of a refusal, against the work of accepting a normal chain of two: a ratio of
    # CPU time over many rounds, with a wide margin (before: 25-70x).
    verifier.verify_chain(normal, time.time())
    rounds = 40
    assert _cost(verifier, mesh, rounds) < 2 * _cost(verifier, normal, rounds)


class CountingVerifier:
    """The real verifier, counting the chains it is asked to verify and on which thread."""

    def __init__(self, inner: X509ClientVerifier) -> None:
        self.inner = inner
        self.chain_threads: list[int] = []

    @property
    def signature_schemes(self) -> tuple[int, ...]:
        return self.inner.signature_schemes

    def verify_chain(self, chain: tuple[bytes, ...], now: float) -> PeerIdentity:
        self.chain_threads.append(threading.get_ident())
        return self.inner.verify_chain(chain, now)

    def verify_signature(self, leaf: bytes, scheme: int, message: bytes, signature: bytes) -> None:
        self.inner.verify_signature(leaf, scheme, message, signature)


def _flight_until_verification(
    certified: CertifiedKey, root: Issued, dev_certs: Any, tmp_path: Path, issued: Issued
) -> tuple[ServerConnection, SSL.Connection, CountingVerifier, CertificateVerificationNeeded]:
    """A handshake driven up to the client's whole second flight (Certificate,
    CertificateVerify, Finished in one write), and the engine's request to verify the chain."""
    verifier = CountingVerifier(X509ClientVerifier(bundle_pem(root)))
    config = ServerConfig(
        certificates=(certified,), client_auth=ClientAuth.REQUIRE, client_verifier=verifier
    )
    server = ServerConnection(config, PROVIDER, os.urandom, clock=time.time)
    client = memory_client(_client_context(dev_certs, tmp_path, issued))
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    server.receive_data(drain_bio(client))
    assert resolve_inline(server) == []
    client.bio_write(server.data_to_send())
    client.do_handshake()  # TLS 1.3: the client is done once its Finished is out
    server.receive_data(drain_bio(client))
    event = server.next_event()
    assert isinstance(event, CertificateVerificationNeeded)
    assert server.next_event() is None  # the CertificateVerify and Finished wait
    assert verifier.chain_threads == []  # the engine did not verify anything itself
    assert event.chain == issued.chain_der() and event.verifier is verifier
    return server, client, verifier, event


def test_item2_chain_verification_is_an_engine_event(
    certified: CertifiedKey, root: Issued, dev_certs: Any, tmp_path: Path
) -> None:
    leaf = make_client(root, "ecdsa-p256", common_name="grace")
    server, client, verifier, event = _flight_until_verification(
        certified, root, dev_certs, tmp_path, leaf
    )
    # The caller resolves it wherever it likes; the rest of the flight then goes through.
    server.complete_certificate_verification(event.verifier.verify_chain(event.chain, event.now))
    events = resolve_inline(server)
    (done,) = [e for e in events if isinstance(e, HandshakeComplete)]
    assert done.peer_identity is not None
    assert done.peer_identity.subject == "CN=grace,O=pqproxy tests"
    server.send_data(b"ok")
    client.bio_write(server.data_to_send())
    assert client.recv(10) == b"ok"


@pytest.mark.parametrize(
    ("error", "alert"),
    [
        (CertificateRejected("unknown_ca", "no trusted issuer"), AlertDescription.unknown_ca),
        (TimeoutError("verifier timed out"), AlertDescription.internal_error),
    ],
)
def test_item2_a_failed_verification_is_its_alert(
    certified: CertifiedKey,
    root: Issued,
    dev_certs: Any,
    tmp_path: Path,
    error: Exception,
    alert: AlertDescription,
) -> None:
    leaf = make_client(root, "ecdsa-p256")
    server, client, _, _ = _flight_until_verification(certified, root, dev_certs, tmp_path, leaf)
    server.fail_certificate_verification(error)
    (end,) = resolve_inline(server)
    assert isinstance(end, ConnectionTerminated) and (end.alert, end.sent) == (alert, True)
    client.bio_write(server.data_to_send())
    with pytest.raises(SSL.Error, match=alert.name.replace("_", " ")):
        client.recv(10)
    # A late answer after the end changes nothing.
    server.complete_certificate_verification(PeerIdentity("CN=late"))
    assert server.closed and resolve_inline(server) == []


def test_item2_crafted_chains_are_refused_before_the_path_builder(root: Issued) -> None:
    verifier = X509ClientVerifier(bundle_pem(root))
    inter = make_ca("ecdsa-p256", common_name="client intermediate", issuer=root)
    leaf = make_client(inter, "ecdsa-p256")

    def refused(chain: tuple[bytes, ...], check: X509ClientVerifier = verifier) -> tuple[str, str]:
        with pytest.raises(CertificateRejected) as caught:
            check.verify_chain(chain, time.time())
        return caught.value.alert, caught.value.check

    # What real clients send still verifies: the chain, the chain with the trusted root.
    verifier.verify_chain(leaf.chain_der(), time.time())
    verifier.verify_chain(leaf.chain_der(include_root=True), time.time())
    # The same intermediate twice.
    twice = (leaf.der, inter.der, inter.der)
    assert refused(twice) == ("bad_certificate", "duplicate_certificate")
    # A self-signed root nobody trusts, sent along (OpenSSL: self-signed cert in chain).
    stranger = make_ca("ecdsa-p256", common_name="stranger root")
    stranger_leaf = make_client(stranger, "ecdsa-p256")
    with_root = stranger_leaf.chain_der(include_root=True)
    assert refused(with_root) == ("unknown_ca", "self_issued_intermediate")
    # Six certificates, one over the default max_chain_depth of 5.
    deep = root
    for level in range(4):
        deep = make_ca("ecdsa-p256", common_name=f"level {level}", issuer=deep)
    deep_leaf = make_client(deep, "ecdsa-p256")
    assert len(deep_leaf.chain_der(include_root=True)) == 6
    assert refused(deep_leaf.chain_der(include_root=True)) == ("bad_certificate", "chain_too_long")
    verifier.verify_chain(deep_leaf.chain_der(), time.time())  # five: accepted
    shallow = X509ClientVerifier(bundle_pem(root), max_chain_depth=2)
    assert refused(leaf.chain_der(include_root=True), shallow)[1] == "chain_too_long"
    shallow.verify_chain(leaf.chain_der(), time.time())
    with pytest.raises(ValueError, match="max_chain_depth"):
        X509ClientVerifier(bundle_pem(root), max_chain_depth=0)


# --- item 2 on the listener: off the loop, and counted --------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class BlockingVerifier(CountingVerifier):
    """Verifies only once ``release`` is set (on the thread the verification runs on):
    stands for a chain that takes long to verify."""

    def __init__(self, inner: X509ClientVerifier) -> None:
        super().__init__(inner)
        self.entered = threading.Event()
        self.release = threading.Event()

    def verify_chain(self, chain: tuple[bytes, ...], now: float) -> PeerIdentity:
        self.entered.set()
        if not self.release.wait(WAIT):
            raise TimeoutError("never released")
        return super().verify_chain(chain, now)


def _ssl_client(dev_certs: Any, tmp_path: Path, issued: Issued | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(dev_certs.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if issued is not None:
        chain, key = issued.write_pem_files(tmp_path, f"ssl-{id(issued):x}")
        ctx.load_cert_chain(chain, key)
    return ctx


async def _round_trip(port: int, ctx: ssl.SSLContext, message: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    try:
        writer.write(message)
        return await reader.readexactly(len(message))
    finally:
        writer.close()


@pytest_asyncio.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await asyncio.wait_for(server.wait_closed(), WAIT)


async def _mtls_listener(
    certified: CertifiedKey,
    verifier: Any,
    upstream_port: int,
    offloader: Offloader | None,
    telemetry: Telemetry | None = None,
) -> TLSListener:
    settings = ListenerSettings(
        host="127.0.0.1",
        port=0,
        server_config=ServerConfig(
            certificates=(certified,), client_auth=ClientAuth.OPTIONAL, client_verifier=verifier
        ),
        provider=PROVIDER,
        upstream_host="127.0.0.1",
        upstream_port=upstream_port,
        offloader=offloader,
        telemetry=telemetry,
    )
    listener = TLSListener(settings)
    await listener.start()
    return listener


@pytest.mark.asyncio
async def test_item2_the_loop_serves_others_while_a_chain_is_verified(
    certified: CertifiedKey, root: Issued, dev_certs: Any, tmp_path: Path, echo_port: int
) -> None:
    verifier = BlockingVerifier(X509ClientVerifier(bundle_pem(root)))
    offloader = build_offloader(
        OffloadSettings(backend="openssl", mode=OffloadMode.THREAD, workers=2), PROVIDER
    )
    loop_thread = threading.get_ident()
    async with asyncio.timeout(WAIT * 2):
        await offloader.start()
        listener = await _mtls_listener(certified, verifier, echo_port, offloader)
        try:
            leaf = make_client(root, "ecdsa-p256", common_name="slow")
            slow = asyncio.ensure_future(
                _round_trip(listener.port, _ssl_client(dev_certs, tmp_path, leaf), b"slow")
            )
            entered = await asyncio.to_thread(verifier.entered.wait, WAIT)
            assert entered, "the chain verification never started"
            # While that verification holds a thread, another client's whole handshake and
            # round trip complete on the same loop.
            fast = await asyncio.wait_for(
                _round_trip(listener.port, _ssl_client(dev_certs, tmp_path), b"fast"), WAIT
            )
            assert fast == b"fast"
            assert not slow.done() and not verifier.release.is_set()
            verifier.release.set()
            assert await slow == b"slow"
        finally:
            verifier.release.set()
            await listener.close(grace=1.0)
            await offloader.close()
    assert len(verifier.chain_threads) == 1 and verifier.chain_threads[0] != loop_thread


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", list(OffloadMode), ids=[m.value for m in OffloadMode])
async def test_item2_every_offload_mode_runs_chain_verifications(
    root: Issued, mode: OffloadMode
) -> None:
    """Inline mode verifies on the loop (as configured); every other mode, process and batch
    included, on the offloader's x509 threads. A refused chain is the client's doing."""
    verifier = CountingVerifier(X509ClientVerifier(bundle_pem(root)))
    observer = RecordingObserver()
    offloader = build_offloader(
        OffloadSettings(backend="openssl", mode=mode, workers=1), PROVIDER, observer=observer
    )
    leaf = make_client(root, "ecdsa-p256", common_name="heidi")
    mesh, _ = _mesh_chain(4)
    async with asyncio.timeout(WAIT):
        await offloader.start()
        try:
            if offloader.inline:
                identity = offloader.run_inline_chain_verification(
                    verifier, leaf.chain_der(), time.time()
                )
                with pytest.raises(CertificateRejected):
                    offloader.run_inline_chain_verification(verifier, mesh, time.time())
            else:
                identity = await offloader.verify_chain(verifier, leaf.chain_der(), time.time())
                with pytest.raises(CertificateRejected):
                    await offloader.verify_chain(verifier, mesh, time.time())
        finally:
            await offloader.close()
    assert identity.subject == "CN=heidi,O=pqproxy tests"
    loop_thread = threading.get_ident()
    assert all((t == loop_thread) == offloader.inline for t in verifier.chain_threads)
    assert observer.count("chain_verification", Outcome.OK, "x509") == 1
    assert observer.count("chain_verification", Outcome.REJECTED, "x509") == 1
    assert not observer.switches


@pytest.mark.asyncio
async def test_item2_chain_refusals_are_counted_by_reason(
    certified: CertifiedKey, root: Issued, dev_certs: Any, tmp_path: Path, echo_port: int
) -> None:
    metrics = ProxyMetrics()
    offloader = build_offloader(OffloadSettings(backend="openssl"), PROVIDER)  # inline
    mesh, mesh_key = _mesh_chain(4)
    mesh_pem = tmp_path / "mesh.pem"
    mesh_pem.write_bytes(
        b"".join(x509.load_der_x509_certificate(d).public_bytes(Encoding.PEM) for d in mesh)
    )
    mesh_key_pem = tmp_path / "mesh.key"
    mesh_key_pem.write_bytes(
        mesh_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    mesh_ctx = _ssl_client(dev_certs, tmp_path)
    mesh_ctx.load_cert_chain(mesh_pem, mesh_key_pem)
    leaf = make_client(root, "ecdsa-p256")
    async with asyncio.timeout(WAIT):
        await offloader.start()
        verifier = X509ClientVerifier(bundle_pem(root))
        listener = await _mtls_listener(
            certified, verifier, echo_port, offloader, Telemetry(metrics)
        )
        try:
            assert (
                await _round_trip(listener.port, _ssl_client(dev_certs, tmp_path, leaf), b"hi")
                == b"hi"
            )
            with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):
                await _round_trip(listener.port, mesh_ctx, b"hi")
        finally:
            await listener.close(grace=1.0)
            await offloader.close()

    def count(result: str) -> float:
        found = metrics.registry.get_sample_value(
            "pqproxy_tls_client_certificates_total", {"result": result}
        )
        return 0.0 if found is None else found

    assert count("ok") == 1
    assert count("self_issued_intermediate") == 1
    assert sum(count(r) for r in CLIENT_CERTIFICATE_RESULTS) == 2
    verify_count = metrics.registry.get_sample_value(
        "pqproxy_tls_client_chain_verify_seconds_count"
    )
    assert verify_count == 2


def test_item2_config_keys_max_chain_depth_and_max_auth_age(
    tmp_path: Path, dev_certs: Any, root: Issued
) -> None:
    (tmp_path / "clients.pem").write_bytes(bundle_pem(root))

    def data(client_auth: dict[str, Any]) -> dict[str, Any]:
        tls = {
            "certificates": [{"cert": str(dev_certs.cert), "key": str(dev_certs.key)}],
            "client_auth": client_auth,
        }
        return {
            "admin": None,
            "listeners": [{"name": "main", "listen": "127.0.0.1:0", "upstream": "m", "tls": tls}],
            "upstreams": {"m": {"servers": ["http://127.0.0.1:8000"], "health_check": None}},
        }

    ca = str(tmp_path / "clients.pem")
    defaults = parse_config(data({"mode": "require", "ca": ca}), tmp_path)
    auth = defaults.listeners[0].tls.client_auth
    assert (auth.max_auth_age, auth.max_chain_depth) == (DAY, 5)
    chosen = data({"mode": "require", "ca": ca, "max_auth_age": "2h", "max_chain_depth": 3})
    (settings,) = build_runtime(parse_config(chosen, tmp_path), PROVIDER).listeners
    assert settings.server_config.max_auth_age == 2 * HOUR
    verifier = settings.server_config.client_verifier
    assert isinstance(verifier, X509ClientVerifier) and verifier.max_chain_depth == 3

    where = "listeners[0].tls.client_auth"
    for key, value, message in [
        ("max_auth_age", "169h", "at most 7 days"),
        ("max_auth_age", "1.5s", "whole number of seconds"),
        ("max_auth_age", 0, "more than 0"),
        ("max_chain_depth", 11, "too large (maximum 10)"),
        ("max_chain_depth", 0, "too small (minimum 1)"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_config(data({"mode": "require", "ca": ca, key: value}), tmp_path)
        assert any(p.startswith(f"{where}.{key}:") and message in p for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        parse_config(data({"mode": "none", "max_auth_age": "1h"}), tmp_path)
    assert info.value.problems == [
        f"{where}.max_auth_age: applies with mode optional or require only"
    ]


# --- item 10: KeyUpdate ----------------------------------------------------------------------


class _Secrets:
    def __init__(self) -> None:
        self.by_label: dict[str, bytes] = {}

    def __call__(self, label: str, _client_random: bytes, secret: bytes) -> None:
        self.by_label[label] = secret


def _key_update(requested: bool) -> bytes:
    return bytes((HandshakeType.KEY_UPDATE, 0, 0, 1, int(requested)))


def _open_all(protection: RecordProtection, data: bytes) -> list[tuple[int, bytes]]:
    reader = RecordReader()
    reader.feed(data)
    opened = []
    while (record := reader.next_record()) is not None:
        content_type, version, payload = record
        header = bytes((content_type,)) + version.to_bytes(2, "big")
        opened.append(protection.open(header + len(payload).to_bytes(2, "big"), payload))
    return opened


def test_item10_key_update_requests_coalesce_into_one_answer(
    certified: CertifiedKey, dev_certs: Any
) -> None:
    secrets = _Secrets()
    server = ServerConnection(
        ServerConfig(certificates=(certified,)), PROVIDER, os.urandom, key_log=secrets
    )
    client = memory_client(client_context(dev_certs.ca, groups="X25519MLKEM768"))
    assert any(isinstance(e, HandshakeComplete) for e in pump(client, server))
    assert server.data_to_send() == b""
    assert server.cipher_suite is not None
    params = SUITES[server.cipher_suite]
    client_secret = secrets.by_label["CLIENT_TRAFFIC_SECRET_0"]
    server_secret = secrets.by_label["SERVER_TRAFFIC_SECRET_0"]

    requests = 10_000
    largest_output = 0
    batch: list[bytes] = []
    for index in range(requests):
        # Each KeyUpdate ends its record (RFC 8446 §5.1) and changes the client's key.
        batch.append(RecordProtection(params, client_secret).seal(22, _key_update(True)))
        client_secret = next_traffic_secret(params, client_secret)
        if len(batch) == 500 or index == requests - 1:
            server.receive_data(b"".join(batch))
            batch.clear()
            largest_output = max(largest_output, len(server.data_to_send()))
    events = resolve_inline(server)
    updates = [e for e in events if isinstance(e, KeyUpdated)]
    assert len(updates) == requests and all(e.update_requested for e in updates)
    assert not any(isinstance(e, ConnectionTerminated) for e in events)
    # Nothing is sent for the requests themselves: the answer is owed, not queued.
    assert largest_output <= 200

    # RFC 8446 §4.6.3: one KeyUpdate(update_not_requested) before our next data, under the
    # old key; the data under the new one; and no second KeyUpdate after it.
    server.send_data(b"first")
    server.send_data(b"second")
    out = server.data_to_send()
    reader_old = RecordProtection(params, server_secret)
    opened = _open_all(reader_old, out[: 5 + 5 + 1 + params.tag_len])
    assert opened == [(ContentType.HANDSHAKE, _key_update(False))]
    reader_new = RecordProtection(params, next_traffic_secret(params, server_secret))
    assert _open_all(reader_new, out[5 + 5 + 1 + params.tag_len :]) == [
        (ContentType.APPLICATION_DATA, b"first"),
        (ContentType.APPLICATION_DATA, b"second"),
    ]

    # The client's data under its 10,000th key still opens.
    server.receive_data(
        RecordProtection(params, client_secret).seal(ContentType.APPLICATION_DATA, b"ping")
    )
    assert [getattr(e, "data", None) for e in resolve_inline(server)] == [b"ping"]
