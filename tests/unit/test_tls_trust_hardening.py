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

import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.client_auth import X509ClientVerifier
from pqproxy.crypto.provider import CertificateRejected, CertifiedKey
from pqproxy.crypto.tickets import RotatingTicketKeys
from pqproxy.tls.enums import AlertDescription, ContentType, HandshakeType
from pqproxy.tls.events import (
    ConnectionTerminated,
    Event,
    HandshakeComplete,
    KeyUpdated,
)
from pqproxy.tls.key_schedule import SUITES, next_traffic_secret
from pqproxy.tls.record import RecordProtection, RecordReader
from pqproxy.tls.server import ClientAuth, ServerConfig, ServerConnection, resolve_inline
from tests.certs_factory import Issued, bundle_pem, make_ca, make_client
from tests.peers import client_context, memory_client, pump

PROVIDER = OpenSSLProvider()
HOUR = 3600
DAY = 24 * HOUR
STEP = 90 * 60  # resume every 1.5 h


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


def _chain(
    config: ServerConfig, clock: Clock, ctx: SSL.Context, steps: int
) -> list[Connected]:
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


# --- item 2: chain verification ------------------------------------------------------------------


def _mesh_chain(copies: int) -> tuple[bytes, ...]:
    """A leaf issued by "Mesh CA", then ``copies`` self-issued "Mesh CA" certificates that all
    share one subject and one key: each verifies each, so a path builder that does not refuse
    them explores every ordering until its signature-check budget runs out."""
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
        .sign(key, hashes.SHA256())
    )
    return tuple(c.public_bytes(Encoding.DER) for c in (leaf, *cas))


def _cost(verifier: X509ClientVerifier, chain: tuple[bytes, ...], rounds: int) -> float:
    started = time.process_time()
    for _ in range(rounds):
        try:
            verifier.verify_chain(chain, time.time())
        except CertificateRejected:
            pass
    return time.process_time() - started


@pytest.mark.parametrize("copies", [4, 9])
def test_item2_mesh_chain_is_refused_cheaply(root: Issued, copies: int) -> None:
    mesh = _mesh_chain(copies)
    assert 1000 <= sum(map(len, mesh)) <= 4096
    inter = make_ca("ecdsa-p256", common_name="client intermediate", issuer=root)
    normal = make_client(inter, "ecdsa-p256").chain_der()
    verifier = X509ClientVerifier(bundle_pem(root))
    with pytest.raises(CertificateRejected) as caught:
        verifier.verify_chain(mesh, time.time())
    assert caught.value.alert in ("bad_certificate", "unknown_ca")
    # The work of a refusal, against the work of accepting a normal chain of two: a ratio of
    # CPU time over many rounds, with a wide margin (before: 25-70x).
    verifier.verify_chain(normal, time.time())
    rounds = 40
    assert _cost(verifier, mesh, rounds) < 2 * _cost(verifier, normal, rounds)


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
