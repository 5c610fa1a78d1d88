"""Issue 12, the engine's receive path: SNI validation and escaped logs (item 3), rejected
0-RTT (4), message size limits (6), legacy_version (7), change_cipher_spec rules (8) and the
second ClientHello after an HRR (9). Real bytes through ``ServerConnection``; pyOpenSSL where
a real peer shows the case; a real listener on a real socket for the log lines."""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from OpenSSL import SSL

from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.provider import CertifiedKey
from pqproxy.crypto.tickets import RotatingTicketKeys
from pqproxy.io.tls_server import ConnectionClosed, ListenerSettings, TLSListener
from pqproxy.logtext import printable
from pqproxy.tls import alerts
from pqproxy.tls.codec import vec16
from pqproxy.tls.enums import AlertDescription as A
from pqproxy.tls.enums import ExtensionType as X
from pqproxy.tls.enums import NamedGroup
from pqproxy.tls.events import ApplicationData, HandshakeComplete
from pqproxy.tls.hello_checks import MAX_CLIENT_HELLO, MAX_HANDSHAKE_MESSAGE
from pqproxy.tls.messages import HELLO_RETRY_REQUEST_RANDOM, pull_client_hello
from pqproxy.tls.record import MAX_PLAINTEXT, RecordProtection
from pqproxy.tls.server import (
    MAX_SKIPPED_EARLY_DATA,
    ServerConfig,
    ServerConnection,
)
from tests.early_data_peer import (
    early_data_client_context,
    ticket_from_other_server,
    write_early_data,
)
from tests.engine_harness import (
    AES128,
    CCS,
    P256_SHARE,
    PROVIDER,
    SIGALGS,
    X25519_SHARE,
    Extension,
    Run,
    alpn,
    assert_alert,
    assert_going_on,
    early_data,
    groups,
    hello,
    key_share,
    minimal,
    padding,
    pre_shared_key,
    psk_modes,
    records,
    server_hello_random,
    sigalgs,
    sni,
    versions,
)
from tests.inprocess import LoopThread
from tests.peers import client_context, drain_bio, memory_client, pump


@pytest.fixture(scope="module")
def certified(dev_certs_factory: Callable[[str], Any]) -> CertifiedKey:
    certs = dev_certs_factory("ecdsa-p256")
    return load_certified_key(certs.cert, certs.key)


@pytest.fixture(scope="module")
def config(certified: CertifiedKey) -> ServerConfig:
    return ServerConfig(certificates=(certified,))


# --- item 3: SNI --------------------------------------------------------------------------


BAD_HOST_NAMES = [
    b"localhost\r\nINFO handshake ok peer=forged",
    b"local host",
    b"a\x00b",
    b"caf\xc3\xa9.example",  # not ASCII: an IDN travels as its A-label (xn--)
    b"example.com.",  # RFC 6066 §3: no trailing dot
    b".example.com",
    b"a..example",
    b"-a.example",
    b"a-.example",
    b"a" * 64 + b".example",  # a label of at most 63 octets
    b".".join([b"a" * 63] * 4),  # 255 octets: a name is at most 253
    b"1.2.3.4",  # RFC 6066 §3: no IP literals
    b"127.1",
    b"example.123",
    b"::1",
    b"[::1]",
    b"fe80::1%eth0",
    b"a/b.example",
    b"a@b.example",
    b"*.example",
]
GOOD_HOST_NAMES = [
    b"localhost",
    b"Api.Example.TEST",
    b"_acme-challenge.example.com",  # as rustls (pki-types) does: underscores are real names
    b"xn--caf-dma.example",
    b"1a.example",
    b"123.example.com",
    b"a" * 63 + b".b",
    b".".join([b"a" * 63] * 3 + [b"a" * 61]),  # 253 octets
    b"a",
]


@pytest.mark.parametrize("name", BAD_HOST_NAMES, ids=lambda n: printable(n)[:40])
def test_item3_sni_that_is_not_a_dns_host_name_is_illegal_parameter(
    config: ServerConfig, name: bytes
) -> None:
    run = Run(config)
    run.feed(records(hello(minimal(name))))
    end = assert_alert(run, A.illegal_parameter)
    # The reason is for a log line: the name in it is escaped.
    assert "\r" not in end.reason and "\n" not in end.reason and "\x00" not in end.reason


@pytest.mark.parametrize("name", GOOD_HOST_NAMES, ids=lambda n: n[:40].decode())
def test_item3_dns_host_names_are_accepted(config: ServerConfig, name: bytes) -> None:
    run = Run(config)
    sent = run.feed(records(hello(minimal(name))))
    assert_going_on(run)
    assert server_hello_random(sent) != HELLO_RETRY_REQUEST_RANDOM
    assert run.server.server_name == name.decode("ascii").lower()


def test_item3_printable_escapes_every_control_character() -> None:
    assert printable(b"a\r\nb\x00\x1b[31m") == "a\\x0d\\x0ab\\x00\\x1b[31m"
    assert printable(printable(b"a\r\n b")) == printable(b"a\r\n b")  # idempotent
    assert printable("caf\u00e9 \u2028") == "caf\\xc3\\xa9\\x20\\xe2\\x80\\xa8"
    assert printable("a b\tc", spaces=True) == "a b\\x09c"
    assert all(0x20 <= ord(c) < 0x7F for c in printable(bytes(range(256))))


def _raw_hello_to_listener(port: int, message: bytes) -> bytes:
    """Send one ClientHello over a real socket; return what the listener answered until it
    closed (bounded by the socket timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(records(message))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _blocking_handshake(conn: SSL.Connection, sock: socket.socket) -> None:
    """pyOpenSSL on a socket with a timeout is non-blocking: wait for each answer with a
    deadline instead of spinning."""
    while True:
        try:
            conn.do_handshake()
            return
        except SSL.WantReadError:
            ready, _, _ = select.select([sock], [], [], 20)
            if not ready:
                raise TimeoutError("no answer from pqproxy within 20 s") from None


@pytest.fixture
def listener(config: ServerConfig) -> Iterator[tuple[int, queue.Queue[ConnectionClosed]]]:
    loop_thread = LoopThread()
    closed: queue.Queue[ConnectionClosed] = queue.Queue()
    settings = ListenerSettings(
        host="127.0.0.1",
        port=0,
        server_config=config,
        provider=PROVIDER,
        upstream_host="127.0.0.1",
        upstream_port=9,  # never reached: no handshake here completes
        handshake_timeout=5.0,
    )
    server = TLSListener(settings, on_terminated=closed.put)

    async def start() -> int:
        await server.start()
        return server.port

    try:
        yield loop_thread.run(start()), closed
    finally:
        loop_thread.run(server.close(grace=1.0))
        loop_thread.stop()


def test_item3_crlf_in_sni_never_starts_a_new_log_line(
    listener: tuple[int, queue.Queue[ConnectionClosed]],
    caplog: pytest.LogCaptureFixture,
    dev_certs: Any,
) -> None:
    port, closed = listener
    caplog.set_level(logging.DEBUG, logger="pqproxy")
    forged = b"localhost\r\nINFO pqproxy.io.tls_server: handshake ok peer=10.0.0.1"
    # A real OpenSSL client with that name (OpenSSL sends whatever bytes it is given).
    ctx = client_context(dev_certs.ca)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        conn = SSL.Connection(ctx, sock)
        conn.set_tlsext_host_name(forged)
        conn.set_connect_state()
        with pytest.raises(SSL.Error, match="illegal parameter"):
            _blocking_handshake(conn, sock)
    summary = closed.get(timeout=20)
    assert summary.alert == A.illegal_parameter and summary.alert_sent
    # The same by hand: the alert comes back in plaintext.
    answer = _raw_hello_to_listener(port, hello(minimal(forged)))
    assert answer == b"\x15\x03\x03\x00\x02\x02" + bytes((A.illegal_parameter,))
    assert closed.get(timeout=20).alert == A.illegal_parameter
    messages = [record.getMessage() for record in caplog.records]
    assert any("connection end" in m and "illegal_parameter" in m for m in messages), messages
    for message in messages:
        assert "\r" not in message and "\n" not in message, message
    assert any("localhost\\x0d\\x0aINFO" in m for m in messages), messages


# --- item 4: rejected 0-RTT ---------------------------------------------------------------


def test_item4_rejected_early_data_then_finished_completes(
    config: ServerConfig, dev_certs: Any
) -> None:
    """OpenSSL holding a 0-RTT ticket from another server sends ClientHello (early_data,
    pre_shared_key), CCS and 0-RTT records; more 0-RTT records under a random key follow.
    pqproxy skips them all by trial decryption, and the client's Finished still opens."""
    ctx = early_data_client_context(dev_certs.ca)
    session = ticket_from_other_server(ctx, dev_certs.cert, dev_certs.key)
    client = memory_client(ctx)
    client.set_session(session)
    early = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"
    assert write_early_data(client, early) == len(early)
    first_flight = drain_bio(client)
    hello_message = first_flight[5 : 5 + int.from_bytes(first_flight[3:5], "big")]
    offered = pull_client_hello(hello_message[4:])
    assert offered.early_data and offered.pre_shared_key is not None
    stranger = RecordProtection(AES128, os.urandom(32))
    more_early = b"".join(stranger.seal(23, os.urandom(n)) for n in (1, 500, MAX_PLAINTEXT))

    tickets = ServerConfig(
        certificates=config.certificates, tickets=RotatingTicketKeys(os.urandom(32))
    )
    run = Run(tickets, clock=lambda: 1.0e9)
    run.feed(first_flight + more_early)
    assert_going_on(run)
    client.bio_write(run.out)
    client.do_handshake()
    run.feed(drain_bio(client))
    done = [e for e in run.events if isinstance(e, HandshakeComplete)]
    assert len(done) == 1 and done[0].resumed is False, run.events
    # The early data was dropped, never delivered; 1-RTT data is.
    client.sendall(b"after")
    run.feed(drain_bio(client))
    data = b"".join(e.data for e in run.events if isinstance(e, ApplicationData))
    assert data == b"after"


def test_item4_failed_open_leaves_the_sequence_number(config: ServerConfig) -> None:
    secret = os.urandom(32)
    sender, receiver = RecordProtection(AES128, secret), RecordProtection(AES128, secret)
    forged = RecordProtection(AES128, os.urandom(32)).seal(23, b"0-rtt")
    with pytest.raises(alerts.BadRecordMac):
        receiver.open(forged[:5], forged[5:])
    assert receiver.seq == 0
    record = sender.seal(22, b"\x14\x00\x00\x00")
    assert receiver.open(record[:5], record[5:]) == (22, b"\x14\x00\x00\x00")
    assert receiver.seq == 1


def test_item4_skipped_early_data_is_bounded(config: ServerConfig) -> None:
    stranger = RecordProtection(AES128, os.urandom(32))
    run = Run(config)
    extensions = [*minimal(), psk_modes(), early_data(), pre_shared_key([b"unknown ticket"])]
    run.feed(records(hello(extensions)))
    assert_going_on(run)
    record = stranger.seal(23, bytes(MAX_PLAINTEXT))
    for _ in range(MAX_SKIPPED_EARLY_DATA // len(record)):
        run.feed(record)
    assert_going_on(run)
    run.feed(record)
    assert_alert(run, A.unexpected_message)


def test_item4_records_that_do_not_open_without_early_data_are_bad_record_mac(
    config: ServerConfig,
) -> None:
    run = Run(config)
    run.feed(records(hello(minimal())))
    run.feed(RecordProtection(AES128, os.urandom(32)).seal(23, b"x"))
    assert_alert(run, A.bad_record_mac)


# --- item 6: message sizes ----------------------------------------------------------------


@pytest.mark.parametrize("size", ["maximal signature_algorithms", "exactly 2^17"])
def test_item6_maximal_signature_algorithms_client_hello_is_accepted(
    config: ServerConfig, size: str
) -> None:
    # The largest signature_algorithms list: whatever the other extensions leave of the
    # 2^16 - 1 bytes of the extensions block. Unknown values are ignored (RFC 8446 §4.2.3).
    others = [sni(b"localhost"), versions(), groups(0x001D), key_share((0x001D, X25519_SHARE))]
    room = 0xFFFF - sum(4 + len(data) for _, data in others) - 4 - 2
    schemes = SIGALGS + tuple(0x0A0A + i for i in range(room // 2 - len(SIGALGS)))
    extensions = [*others[:3], sigalgs(*schemes), others[3]]
    message = hello(extensions, session_id=bytes(32))
    assert 1 << 16 < len(message) <= MAX_CLIENT_HELLO
    if size == "exactly 2^17":
        # Unknown cipher suites fill the body up to the cap (the session id fixes parity).
        missing = MAX_CLIENT_HELLO - (len(message) - 4)
        session_id = bytes(32 - missing % 2)
        suites = (0x1301, *range(0x5A00, 0x5A00 + (missing + missing % 2) // 2))
        message = hello(extensions, session_id=session_id, suites=suites)
        assert len(message) - 4 == MAX_CLIENT_HELLO
    for fragment in (MAX_PLAINTEXT, 1000):
        run = Run(config)
        wire = records(message, fragment)
        # In one transport read and in small pieces: the caps allow both.
        if fragment == MAX_PLAINTEXT:
            sent = run.feed(wire)
        else:
            sent = run.feed(*(wire[i : i + 4096] for i in range(0, len(wire), 4096)))
        assert_going_on(run)
        assert server_hello_random(sent) != HELLO_RETRY_REQUEST_RANDOM


@pytest.mark.parametrize(
    ("msg_type", "length"),
    [
        (1, MAX_CLIENT_HELLO + 1),  # ClientHello over its cap
        (1, (1 << 24) - 1),
        (20, MAX_HANDSHAKE_MESSAGE + 1),  # other messages keep theirs
        (11, MAX_HANDSHAKE_MESSAGE + 1),
    ],
)
def test_item6_over_long_handshake_message_is_decode_error(
    config: ServerConfig, msg_type: int, length: int
) -> None:
    run = Run(config)
    # RFC 8446 §6.2: a message whose length is wrong is a decode_error, refused from its
    # header before its body is awaited.
    run.feed(records(bytes((msg_type,)) + length.to_bytes(3, "big") + bytes(100)))
    assert_alert(run, A.decode_error)


# --- item 7: legacy_version ---------------------------------------------------------------


@pytest.mark.parametrize("legacy_version", [0x0300, 0x0200, 0x0002, 0x0000])
def test_item7_legacy_version_ssl3_or_lower_is_protocol_version(
    config: ServerConfig, legacy_version: int
) -> None:
    run = Run(config)
    run.feed(records(hello(minimal(), legacy_version=legacy_version)))
    assert_alert(run, A.protocol_version)


@pytest.mark.parametrize("legacy_version", [0x0301, 0x0302, 0x0303, 0x0304, 0x7F7F])
def test_item7_legacy_version_above_ssl3_is_ignored(
    config: ServerConfig, legacy_version: int
) -> None:
    # RFC 8446 §4.2.1: with supported_versions present the server ignores legacy_version.
    run = Run(config)
    run.feed(records(hello(minimal(), legacy_version=legacy_version)))
    assert_going_on(run)


# --- item 8: change_cipher_spec -----------------------------------------------------------


def test_item8_second_change_cipher_spec_is_unexpected_message(config: ServerConfig) -> None:
    run = Run(config)
    run.feed(records(hello(minimal(), session_id=bytes(32))), CCS)
    assert_going_on(run)
    run.feed(CCS)
    assert_alert(run, A.unexpected_message)


def _hrr_config(certified: CertifiedKey, **kwargs: Any) -> ServerConfig:
    # The server wants P-256; the client's first share is X25519: an HRR for secp256r1.
    return ServerConfig(
        certificates=(certified,),
        groups=(NamedGroup.secp256r1, NamedGroup.x25519),
        **kwargs,
    )


def test_item8_change_cipher_spec_inside_a_fragmented_message_is_unexpected(
    certified: CertifiedKey,
) -> None:
    run = Run(_hrr_config(certified))
    first = [*minimal()[:2], groups(0x001D, 0x0017), sigalgs(), key_share((0x001D, X25519_SHARE))]
    sent = run.feed(records(hello(first, session_id=bytes(32))))
    assert server_hello_random(sent) == HELLO_RETRY_REQUEST_RANDOM
    second = hello([*first[:4], key_share((0x0017, P256_SHARE))], session_id=bytes(32))
    # §5.1: a CCS between two fragments of one handshake message.
    run.feed(records(second[:100]) + CCS + records(second[100:]))
    assert_alert(run, A.unexpected_message)


@pytest.mark.parametrize(
    "case", ["before ClientHello", "payload 0x02", "two bytes", "after the handshake"]
)
def test_item8_change_cipher_spec_rules(config: ServerConfig, dev_certs: Any, case: str) -> None:
    run = Run(config)
    if case == "before ClientHello":
        run.feed(CCS)
    elif case == "payload 0x02":
        run.feed(records(hello(minimal())), b"\x14\x03\x03\x00\x01\x02")
    elif case == "two bytes":
        run.feed(records(hello(minimal())), b"\x14\x03\x03\x00\x02\x01\x01")
    else:
        client = memory_client(client_context(dev_certs.ca))
        assert any(isinstance(e, HandshakeComplete) for e in pump(client, run.server))
        run.feed(CCS)
    assert_alert(run, A.unexpected_message)


def test_item8_openssl_compat_ccs_around_hrr_still_completes(
    certified: CertifiedKey, dev_certs: Any
) -> None:
    """OpenSSL in middlebox compatibility mode sends its one CCS before the second
    ClientHello; that one is dropped."""
    server = ServerConnection(_hrr_config(certified), PROVIDER, os.urandom)
    client = memory_client(client_context(dev_certs.ca, groups="X25519:P-256"))
    done = [e for e in pump(client, server) if isinstance(e, HandshakeComplete)]
    assert len(done) == 1 and done[0].hello_retry and done[0].group == NamedGroup.secp256r1


# --- item 9: the second ClientHello -------------------------------------------------------


def _first(name: bytes = b"localhost") -> list[Extension]:
    return [
        sni(name),
        versions(),
        groups(0x001D, 0x0017),
        sigalgs(),
        alpn(b"h2", b"http/1.1"),
        psk_modes(),
        key_share((0x001D, X25519_SHARE)),
        early_data(),
        padding(40),
        pre_shared_key([b"ticket one", b"ticket two"]),
    ]


def _retry(extensions: list[Extension]) -> list[Extension]:
    """What RFC 8446 §4.1.2 asks of CH2: the requested share, no early_data."""
    out = [e for e in extensions if e[0] != X.EARLY_DATA]
    return [key_share((0x0017, P256_SHARE)) if e[0] == X.KEY_SHARE else e for e in out]


def _run_hrr(certified: CertifiedKey, ch1: bytes, ch2: bytes) -> Run:
    run = Run(_hrr_config(certified, alpn_protocols=("h2", "http/1.1")))
    sent = run.feed(records(ch1))
    assert_going_on(run)
    assert server_hello_random(sent) == HELLO_RETRY_REQUEST_RANDOM
    run.feed(records(ch2))
    return run


def _swap(extensions: list[Extension], a: int, b: int) -> list[Extension]:
    out = list(extensions)
    out[a], out[b] = out[b], out[a]
    return out


def _replace(extensions: list[Extension], new: Extension) -> list[Extension]:
    return [new if e[0] == new[0] else e for e in extensions]


CH2_CHANGES: dict[str, Callable[[list[Extension]], tuple[list[Extension], dict[str, Any]]]] = {
    # The reproduction: CH1 localhost/h2, CH2 attacker.invalid/http/1.1.
    "sni and alpn": lambda e: (
        _replace(_replace(e, sni(b"attacker.invalid")), alpn(b"http/1.1")),
        {},
    ),
    "sni": lambda e: (_replace(e, sni(b"other.localhost")), {}),
    "random": lambda e: (e, {"random": bytes(32)}),
    "session_id": lambda e: (e, {"session_id": b"\x01" * 32}),
    "cipher_suites": lambda e: (e, {"suites": (0x1301, 0x1302)}),
    "legacy_version": lambda e: (e, {"legacy_version": 0x0301}),
    "reordered extensions": lambda e: (_swap(e, 2, 3), {}),
    "supported_groups": lambda e: (_replace(e, groups(0x0017)), {}),
    "signature_algorithms": lambda e: (_replace(e, sigalgs(0x0403)), {}),
    "dropped alpn": lambda e: ([x for x in e if x[0] != X.ALPN], {}),
    "dropped psk_key_exchange_modes and psk": lambda e: (
        [x for x in e if x[0] not in (X.PSK_KEY_EXCHANGE_MODES, X.PRE_SHARED_KEY)],
        {},
    ),
    "added extension": lambda e: ([*e[:-1], (0x7A7A, b"new"), e[-1]], {}),
    "added cookie we never sent": lambda e: ([*e[:-1], (X.COOKIE, vec16(b"c")), e[-1]], {}),
    "kept early_data": lambda e: ([*e[:-1], early_data(), e[-1]], {}),
    "psk identity not in CH1": lambda e: (
        _replace(e, pre_shared_key([b"ticket one", b"ticket three"])),
        {},
    ),
    "psk identities reordered": lambda e: (
        _replace(e, pre_shared_key([b"ticket two", b"ticket one"])),
        {},
    ),
    "two key shares": lambda e: (
        _replace(e, key_share((0x0017, P256_SHARE), (0x001D, X25519_SHARE))),
        {},
    ),
}


@pytest.mark.parametrize("change", list(CH2_CHANGES))
def test_item9_second_client_hello_must_repeat_the_first(
    certified: CertifiedKey, change: str
) -> None:
    first = _first()
    ch1 = hello(first)
    extensions, fields = CH2_CHANGES[change](_retry(first))
    run = _run_hrr(certified, ch1, hello(extensions, **fields))
    assert_alert(run, A.illegal_parameter)


@pytest.mark.parametrize(
    "change",
    ["none", "padding longer", "padding removed", "padding added", "psk subset", "psk removed"],
)
def test_item9_allowed_changes_still_succeed(certified: CertifiedKey, change: str) -> None:
    first = _first()
    if change == "padding added":
        first = [e for e in first if e[0] != X.PADDING]
    second = _retry(first)
    if change == "padding longer":
        second = _replace(second, padding(300))
    elif change == "padding removed":
        second = [e for e in second if e[0] != X.PADDING]
    elif change == "padding added":
        second = [*second[:-1], padding(7), second[-1]]
    elif change == "psk subset":
        # §4.1.2: ages and binders recomputed, an incompatible PSK may be dropped.
        second = _replace(second, pre_shared_key([b"ticket two"], age=99, binder=b"\x66"))
    elif change == "psk removed":
        second = [e for e in second if e[0] != X.PRE_SHARED_KEY]
    run = _run_hrr(certified, hello(first), hello(second))
    assert_going_on(run)
    assert run.server.hello_retry and run.server.group == NamedGroup.secp256r1
    assert run.server.alpn_protocol == "h2" and run.server.server_name == "localhost"


def test_item9_openssl_resumption_through_hrr_still_resumes(
    certified: CertifiedKey, dev_certs: Any
) -> None:
    """A real CH2 with a pre_shared_key whose binder is recomputed over the HRR."""
    config = _hrr_config(certified, tickets=RotatingTicketKeys(os.urandom(32)))
    # X25519 first: OpenSSL sends its share, pqproxy wants P-256, both handshakes retry.
    ctx = client_context(dev_certs.ca, groups="X25519:P-256")
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)

    def clock() -> float:
        return 1.0e9

    first = ServerConnection(config, PROVIDER, os.urandom, clock=clock)
    client = memory_client(ctx)
    assert any(isinstance(e, HandshakeComplete) for e in pump(client, first))
    first.send_data(b"x")
    client.bio_write(first.data_to_send())
    assert client.recv(10) == b"x"
    session = client.get_session()
    assert session is not None
    client.shutdown()
    second = ServerConnection(config, PROVIDER, os.urandom, clock=clock)
    client = memory_client(ctx)
    client.set_session(session)
    done = [e for e in pump(client, second) if isinstance(e, HandshakeComplete)]
    assert len(done) == 1 and done[0].hello_retry and done[0].resumed
