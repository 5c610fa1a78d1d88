"""The engine against pyOpenSSL (OpenSSL 4.0) through memory BIOs: every
group, suite and policy path, without sockets."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from OpenSSL import SSL

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.provider import BackendError
from pqproxy.tls.enums import AlertDescription, NamedGroup
from pqproxy.tls.events import (
    ApplicationData,
    ConnectionTerminated,
    Event,
    HandshakeComplete,
    KeyExchangeNeeded,
    KeyUpdated,
    PeerClosed,
    SignatureNeeded,
)
from pqproxy.tls.key_schedule import SUITES, next_traffic_secret
from pqproxy.tls.record import RecordProtection
from pqproxy.tls.server import PqPolicy, ServerConfig, ServerConnection, resolve_inline
from tests.peers import (
    OPENSSL_GROUP_NAMES,
    OPENSSL_REPORTED_NAMES,
    SUITE_NAMES,
    client_context,
    drain_bio,
    memory_client,
    pump,
)

PROVIDER = OpenSSLProvider()
ServerFactory = Callable[..., ServerConnection]


@pytest.fixture(scope="module")
def certs(dev_certs_factory: Callable[[str], object]) -> object:
    return dev_certs_factory("ecdsa-p256")


@pytest.fixture
def make_server(certs: object) -> ServerFactory:
    certified = load_certified_key(certs.cert, certs.key)  # type: ignore[attr-defined]

    def factory(**kwargs: object) -> ServerConnection:
        config = ServerConfig(certificates=(certified,), **kwargs)  # type: ignore[arg-type]
        return ServerConnection(config, PROVIDER, os.urandom)

    return factory


def _complete(events: list[Event]) -> HandshakeComplete:
    done = [e for e in events if isinstance(e, HandshakeComplete)]
    assert len(done) == 1, events
    return done[0]


def _terminated(events: list[Event]) -> ConnectionTerminated:
    ends = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert len(ends) == 1, events
    return ends[0]


@pytest.mark.parametrize("group", list(OPENSSL_GROUP_NAMES), ids=OPENSSL_REPORTED_NAMES.get)
def test_each_group_negotiates(make_server: ServerFactory, certs: object, group: int) -> None:
    server = make_server()
    client = memory_client(client_context(certs.ca, groups=OPENSSL_GROUP_NAMES[group]))  # type: ignore[attr-defined]
    done = _complete(pump(client, server))
    assert done.group == group
    assert done.hello_retry is False
    assert client.get_group_name() == OPENSSL_REPORTED_NAMES[group]


@pytest.mark.parametrize("suite", list(SUITE_NAMES), ids=SUITE_NAMES.get)
def test_each_cipher_suite_carries_data(
    make_server: ServerFactory, certs: object, suite: int
) -> None:
    server = make_server()
    ctx = client_context(certs.ca, ciphersuites=SUITE_NAMES[suite])  # type: ignore[attr-defined]
    client = memory_client(ctx)
    done = _complete(pump(client, server))
    assert done.cipher_suite == suite
    assert client.get_cipher_name() == SUITE_NAMES[suite]
    client.sendall(b"ping " * 5000)
    server.receive_data(drain_bio(client))
    received = b"".join(e.data for e in resolve_inline(server) if isinstance(e, ApplicationData))
    assert received == b"ping " * 5000
    server.send_data(b"pong" * 10000)
    client.bio_write(server.data_to_send())
    got = b""
    while len(got) < 40000:
        got += client.recv(65536)
    assert got == b"pong" * 10000


def test_prefer_sends_hrr_for_missing_hybrid_share(
    make_server: ServerFactory, certs: object
) -> None:
    server = make_server(pq_policy=PqPolicy.PREFER)
    client = memory_client(client_context(certs.ca, groups="X25519MLKEM768:*X25519"))  # type: ignore[attr-defined]
    done = _complete(pump(client, server))
    assert done.hello_retry is True
    assert done.group == NamedGroup.X25519MLKEM768
    assert client.get_group_name() == "X25519MLKEM768"


def test_prefer_uses_classical_share_when_classical_ranks_first(
    make_server: ServerFactory, certs: object
) -> None:
    server = make_server(groups=(NamedGroup.x25519, NamedGroup.X25519MLKEM768))
    client = memory_client(client_context(certs.ca, groups="X25519MLKEM768:*X25519"))  # type: ignore[attr-defined]
    done = _complete(pump(client, server))
    assert (done.group, done.hello_retry) == (NamedGroup.x25519, False)


def test_require_sends_hrr_then_completes_with_hybrid(
    make_server: ServerFactory, certs: object
) -> None:
    server = make_server(
        groups=(NamedGroup.x25519, NamedGroup.X25519MLKEM768), pq_policy=PqPolicy.REQUIRE
    )
    client = memory_client(client_context(certs.ca, groups="*X25519:X25519MLKEM768"))  # type: ignore[attr-defined]
    done = _complete(pump(client, server))
    assert (done.group, done.hello_retry) == (NamedGroup.X25519MLKEM768, True)


def test_require_refuses_classical_only_client(make_server: ServerFactory, certs: object) -> None:
    server = make_server(pq_policy=PqPolicy.REQUIRE)
    client = memory_client(client_context(certs.ca, groups="X25519:P-256"))  # type: ignore[attr-defined]
    errors: list[SSL.Error] = []
    end = _terminated(pump(client, server, errors))
    assert (end.alert, end.sent) == (AlertDescription.handshake_failure, True)
    assert len(errors) == 1 and "handshake failure" in str(errors[0])


def test_off_never_negotiates_a_hybrid(make_server: ServerFactory, certs: object) -> None:
    server = make_server(pq_policy=PqPolicy.OFF)
    client = memory_client(client_context(certs.ca, groups="X25519MLKEM768:X25519"))  # type: ignore[attr-defined]
    done = _complete(pump(client, server))
    assert done.group == NamedGroup.x25519


def test_alpn_is_chosen_by_server_preference(make_server: ServerFactory, certs: object) -> None:
    server = make_server(alpn_protocols=("h2", "http/1.1"))
    ctx = client_context(certs.ca, alpn=[b"http/1.1", b"h2"])  # type: ignore[attr-defined]
    client = memory_client(ctx)
    done = _complete(pump(client, server))
    assert done.alpn_protocol == "h2"
    assert client.get_alpn_proto_negotiated() == b"h2"


def test_alpn_mismatch_is_no_application_protocol(
    make_server: ServerFactory, certs: object
) -> None:
    server = make_server(alpn_protocols=("h2",))
    client = memory_client(client_context(certs.ca, alpn=[b"http/1.1"]))  # type: ignore[attr-defined]
    errors: list[SSL.Error] = []
    end = _terminated(pump(client, server, errors))
    assert end.alert == AlertDescription.no_application_protocol
    assert len(errors) == 1 and "no application protocol" in str(errors[0])


def test_key_update_both_directions(make_server: ServerFactory, certs: object) -> None:
    server = make_server()
    client = memory_client(client_context(certs.ca))  # type: ignore[attr-defined]
    _complete(pump(client, server))
    # The server asks the client to update too: OpenSSL answers with its own
    # KeyUpdate, so both directions rotate and data still flows.
    server.update_keys(request_peer_update=True)
    server.send_data(b"after server update")
    client.bio_write(server.data_to_send())
    assert client.recv(100) == b"after server update"
    client.send(b"after client update")
    server.receive_data(drain_bio(client))
    events = resolve_inline(server)
    assert KeyUpdated(update_requested=False, we_updated=False) in events
    assert ApplicationData(b"after client update") in events


def test_close_notify_is_a_half_close(make_server: ServerFactory, certs: object) -> None:
    server = make_server()
    client = memory_client(client_context(certs.ca))  # type: ignore[attr-defined]
    _complete(pump(client, server))
    client.shutdown()
    server.receive_data(drain_bio(client))
    assert resolve_inline(server) == [PeerClosed()]
    server.send_data(b"still talking")
    server.close()
    client.bio_write(server.data_to_send())
    assert client.recv(100) == b"still talking"
    assert server.closed
    with pytest.raises(SSL.ZeroReturnError):
        client.recv(100)


def test_server_name_selects_certificate(
    certs: object, dev_certs_factory: Callable[[str], object], tmp_path: Path
) -> None:
    from pqproxy.devcert import generate_dev_certs

    other = generate_dev_certs(tmp_path, key_type="ed25519", sans=["api.example.test"])
    default = load_certified_key(certs.cert, certs.key)  # type: ignore[attr-defined]
    named = load_certified_key(other.cert, other.key)
    config = ServerConfig(certificates=(default, named))
    server = ServerConnection(config, PROVIDER, os.urandom)
    client = memory_client(client_context(other.ca), server_name=b"api.example.test")
    done = _complete(pump(client, server))
    assert done.server_name == "api.example.test"
    assert done.signature_scheme == 0x0807
    assert client.get_peer_certificate() is not None


def test_crypto_resolved_later_with_input_in_between(
    make_server: ServerFactory, certs: object
) -> None:
    """The engine waits for the key exchange and the signature as events; bytes
    that arrive meanwhile stay buffered until the result is handed back."""
    server = make_server()
    client = memory_client(client_context(certs.ca, groups="X25519MLKEM768"))  # type: ignore[attr-defined]
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    hello = drain_bio(client)
    server.receive_data(hello[:100])
    assert server.next_event() is None
    server.receive_data(hello[100:])
    exchange = server.next_event()
    assert isinstance(exchange, KeyExchangeNeeded) and server.next_event() is None
    # A compatibility CCS arrives while the key exchange is still running.
    server.receive_data(b"\x14\x03\x03\x00\x01\x01")
    assert server.data_to_send() == b"" and server.next_event() is None
    server.complete_key_exchange(*exchange.exchange.server_exchange(exchange.client_share))
    signature = server.next_event()
    assert isinstance(signature, SignatureNeeded)
    server_hello = server.data_to_send()
    assert server_hello.startswith(b"\x16\x03\x03")
    server.complete_signature(signature.signer.sign(signature.scheme, signature.message))
    client.bio_write(server_hello + server.data_to_send())
    client.do_handshake()
    # The CCS above stood in for the one OpenSSL sends before its Finished: a client sends
    # one (RFC 8446 Appendix D.4), and a second one is unexpected_message.
    flight = drain_bio(client)
    assert flight.startswith(b"\x14\x03\x03\x00\x01\x01")
    server.receive_data(flight[6:])
    assert isinstance(server.next_event(), HandshakeComplete)


def test_failed_signature_is_internal_error(make_server: ServerFactory, certs: object) -> None:
    server = make_server()
    client = memory_client(client_context(certs.ca))  # type: ignore[attr-defined]
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    server.receive_data(drain_bio(client))
    exchange = server.next_event()
    assert isinstance(exchange, KeyExchangeNeeded)
    server.complete_key_exchange(*exchange.exchange.server_exchange(exchange.client_share))
    assert isinstance(server.next_event(), SignatureNeeded)
    server.fail_signature(BackendError("token removed"))
    end = server.next_event()
    assert isinstance(end, ConnectionTerminated)
    assert end.alert == AlertDescription.internal_error and "token removed" in end.reason
    client.bio_write(server.data_to_send())
    with pytest.raises(SSL.Error, match="internal error"):
        client.do_handshake()


def test_key_update_requested_by_client_is_answered(
    make_server: ServerFactory, certs: object
) -> None:
    """A KeyUpdate(update_requested) under the client's key makes the engine
    rotate its read key and answer with its own KeyUpdate before rotating its
    write key: the real client must then read data sent under the new key."""
    secrets: dict[str, bytes] = {}
    ctx = client_context(certs.ca)  # type: ignore[attr-defined]
    ctx.set_keylog_callback(
        lambda _conn, line: secrets.__setitem__(
            line.split()[0].decode(), bytes.fromhex(line.split()[2].decode())
        )
    )
    server = make_server()
    client = memory_client(ctx)
    done = _complete(pump(client, server))
    params = SUITES[done.cipher_suite]
    # Seal as the client would; the client's own state does not matter for the
    # direction under test (server -> client).
    sealer = RecordProtection(params, secrets["CLIENT_TRAFFIC_SECRET_0"])
    server.receive_data(sealer.seal(22, b"\x18\x00\x00\x01\x01"))
    assert resolve_inline(server) == [KeyUpdated(update_requested=True, we_updated=True)]
    server.send_data(b"under the new key")
    client.bio_write(server.data_to_send())
    assert client.recv(100) == b"under the new key"
    # And the engine now reads with the client's next secret.
    next_secret = next_traffic_secret(params, secrets["CLIENT_TRAFFIC_SECRET_0"])
    server.receive_data(RecordProtection(params, next_secret).seal(23, b"hello"))
    assert resolve_inline(server) == [ApplicationData(b"hello")]
