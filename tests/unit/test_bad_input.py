"""Bad input: each case gets the alert RFC 8446 names and a closed
connection, never an exception out of the engine or a hang."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.tls.enums import AlertDescription as A
from pqproxy.tls.enums import NamedGroup
from pqproxy.tls.events import ConnectionTerminated, Event, HandshakeComplete
from pqproxy.tls.key_schedule import SUITES
from pqproxy.tls.record import RecordProtection
from pqproxy.tls.server import ServerConfig, ServerConnection, resolve_inline
from tests.hello_builder import HelloSpec, client_hello_body, client_hello_record, handshake, record
from tests.peers import client_context, drain_bio, memory_client

PROVIDER = OpenSSLProvider()


@pytest.fixture(scope="module")
def config(dev_certs_factory: Callable[[str], object]) -> ServerConfig:
    certs = dev_certs_factory("ecdsa-p256")
    return ServerConfig(certificates=(load_certified_key(certs.cert, certs.key),))  # type: ignore[attr-defined]


def feed(config: ServerConfig, *chunks: bytes) -> tuple[ServerConnection, list[Event], bytes]:
    server = ServerConnection(config, PROVIDER, os.urandom)
    events: list[Event] = []
    out = b""
    for chunk in chunks:
        server.receive_data(chunk)
        events += resolve_inline(server)
        out += server.data_to_send()
    return server, events, out


def assert_alert(config: ServerConfig, alert: A, *chunks: bytes) -> ConnectionTerminated:
    server, events, out = feed(config, *chunks)
    ends = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert len(ends) == 1, events
    assert ends[0].sent and ends[0].alert == alert, ends[0]
    assert server.closed
    # The alert is the last thing on the wire; before keys it is a plaintext
    # record whose description we can read directly.
    if out.startswith(b"\x15"):
        assert out == b"\x15\x03\x03\x00\x02\x02" + bytes((alert,))
    else:
        # Under handshake keys: a protected record of 2 alert bytes + type + tag.
        assert out[-24:-19] == b"\x17\x03\x03\x00\x13"
    # Nothing further is accepted after the alert.
    server.receive_data(client_hello_record())
    assert server.next_event() is None and server.data_to_send() == b""
    return ends[0]


def test_garbage_bytes(config: ServerConfig) -> None:
    assert_alert(config, A.unexpected_message, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def test_oversized_record_is_refused_from_its_header(config: ServerConfig) -> None:
    # 2^14 + 256 + 1 declared: refused before the body arrives.
    assert_alert(config, A.record_overflow, b"\x16\x03\x01\x41\x01")


def test_truncated_client_hello_is_decode_error(config: ServerConfig) -> None:
    # The handshake header matches the bytes sent; the extensions block inside
    # claims more than is there.
    body = client_hello_body(HelloSpec())[:-7]
    assert_alert(config, A.decode_error, record(22, handshake(1, body)))


def test_truncated_record_then_eof_closes_without_hang(config: ServerConfig) -> None:
    server, events, out = feed(config, client_hello_record()[:40], b"")
    assert events == [ConnectionTerminated(None, sent=False, reason="eof before close_notify")]
    assert server.closed and out == b""


def test_finished_before_client_hello(config: ServerConfig) -> None:
    assert_alert(config, A.unexpected_message, record(22, handshake(20, bytes(32))))


def test_application_data_before_handshake(config: ServerConfig) -> None:
    assert_alert(config, A.unexpected_message, record(23, b"\x00" * 40))


def test_tls12_only_client(config: ServerConfig) -> None:
    assert_alert(config, A.protocol_version, client_hello_record(HelloSpec(versions=None)))


def test_no_signature_algorithms(config: ServerConfig) -> None:
    assert_alert(config, A.missing_extension, client_hello_record(HelloSpec(sigalgs=None)))


def test_bad_compression(config: ServerConfig) -> None:
    assert_alert(config, A.illegal_parameter, client_hello_record(HelloSpec(compression=b"\x01")))


def test_key_share_of_wrong_length(config: ServerConfig) -> None:
    spec = HelloSpec(shares=((0x001D, bytes(31)),))
    assert_alert(config, A.illegal_parameter, client_hello_record(spec))


def test_hybrid_key_share_of_wrong_length(config: ServerConfig) -> None:
    spec = HelloSpec(groups=(0x11EC,), shares=((0x11EC, bytes(1184 + 31)),))
    assert_alert(config, A.illegal_parameter, client_hello_record(spec))


def test_invalid_mlkem_encapsulation_key(config: ServerConfig) -> None:
    # FIPS 203 §7.2: coefficients >= q fail the modulus check.
    share = b"\xff" * 1184 + b"\x09" + bytes(31)
    spec = HelloSpec(groups=(0x11EC,), shares=((0x11EC, share),))
    end = assert_alert(config, A.illegal_parameter, client_hello_record(spec))
    assert "invalid key share" in end.reason


def test_all_zero_x25519_share(config: ServerConfig) -> None:
    # RFC 8446 §7.4.2: an all-zero shared secret must abort.
    spec = HelloSpec(shares=((0x001D, bytes(32)),))
    assert_alert(config, A.illegal_parameter, client_hello_record(spec))


def test_only_unknown_but_valid_group(config: ServerConfig) -> None:
    spec = HelloSpec(groups=(NamedGroup.ffdhe2048,), shares=((NamedGroup.ffdhe2048, bytes(256)),))
    assert_alert(config, A.handshake_failure, client_hello_record(spec))


def test_share_for_group_not_offered(config: ServerConfig) -> None:
    spec = HelloSpec(groups=(0x0017,), shares=((0x001D, b"\x09" + bytes(31)),))
    assert_alert(config, A.illegal_parameter, client_hello_record(spec))


def test_duplicate_extension(config: ServerConfig) -> None:
    spec = HelloSpec(extra=[(0x0015, b""), (0x0015, b"")])
    assert_alert(config, A.illegal_parameter, client_hello_record(spec))


def test_grease_values_are_ignored(config: ServerConfig) -> None:
    spec = HelloSpec(
        groups=(0x0A0A, 0x001D),
        shares=((0x0A0A, b"\x00"), (0x001D, b"\x09" + bytes(31))),
        suites=(0x2A2A, 0x1301),
        sigalgs=(0x1A1A, 0x0403),
        extra=[(0x3A3A, b"grease")],
    )
    server, events, out = feed(config, client_hello_record(spec))
    assert not server.closed and events == [] and out.startswith(b"\x16\x03\x03")


def test_ccs_before_client_hello(config: ServerConfig) -> None:
    assert_alert(config, A.unexpected_message, b"\x14\x03\x03\x00\x01\x01")


def test_two_messages_across_key_change(config: ServerConfig) -> None:
    # RFC 8446 §5.1: the ClientHello must end its record when keys change after it.
    payload = handshake(1, client_hello_body(HelloSpec())) + handshake(20, bytes(32))
    assert_alert(config, A.unexpected_message, record(22, payload))


def test_wrong_finished_is_decrypt_error(
    config: ServerConfig, dev_certs_factory: Callable[[str], object]
) -> None:
    """A well-formed, correctly encrypted client Finished with wrong verify_data."""
    certs = dev_certs_factory("ecdsa-p256")
    secrets: dict[str, bytes] = {}
    ctx = client_context(certs.ca)  # type: ignore[attr-defined]
    ctx.set_keylog_callback(
        lambda _conn, line: secrets.__setitem__(
            line.split()[0].decode(), bytes.fromhex(line.split()[2].decode())
        )
    )
    client = memory_client(ctx)
    server = ServerConnection(config, PROVIDER, os.urandom)
    with pytest.raises(Exception):  # noqa: B017 - WantReadError: waiting for the server
        client.do_handshake()
    server.receive_data(drain_bio(client))
    assert resolve_inline(server) == []
    client.bio_write(server.data_to_send())
    client.do_handshake()
    flight = drain_bio(client)
    # Skip the compatibility CCS, keep the encrypted Finished record.
    offset = 0
    while flight[offset] != 0x17:
        offset += 5 + int.from_bytes(flight[offset + 3 : offset + 5], "big")
    encrypted = flight[offset:]
    params = SUITES[server.cipher_suite or 0]
    opener = RecordProtection(params, secrets["CLIENT_HANDSHAKE_TRAFFIC_SECRET"])
    inner_type, finished = opener.open(encrypted[:5], encrypted[5:])
    assert inner_type == 22 and finished[0] == 20
    forged = finished[:-1] + bytes((finished[-1] ^ 1,))
    sealer = RecordProtection(params, secrets["CLIENT_HANDSHAKE_TRAFFIC_SECRET"])
    server.receive_data(sealer.seal(22, forged))
    events = resolve_inline(server)
    assert not any(isinstance(e, HandshakeComplete) for e in events)
    end = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert end and end[0].alert == A.decrypt_error and end[0].sent
    assert server.closed


def test_tampered_finished_record_is_bad_record_mac(
    config: ServerConfig, dev_certs_factory: Callable[[str], object]
) -> None:
    certs = dev_certs_factory("ecdsa-p256")
    client = memory_client(client_context(certs.ca))  # type: ignore[attr-defined]
    server = ServerConnection(config, PROVIDER, os.urandom)
    with pytest.raises(Exception):  # noqa: B017 - WantReadError
        client.do_handshake()
    server.receive_data(drain_bio(client))
    resolve_inline(server)
    client.bio_write(server.data_to_send())
    client.do_handshake()
    flight = bytearray(drain_bio(client))
    flight[-1] ^= 0x80
    server.receive_data(bytes(flight))
    end = [e for e in resolve_inline(server) if isinstance(e, ConnectionTerminated)]
    assert end and end[0].alert == A.bad_record_mac
