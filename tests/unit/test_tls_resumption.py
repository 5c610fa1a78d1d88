"""Session resumption against pyOpenSSL: tickets, psk_dhe_ke only (the hybrid key
exchange still runs on a resumed session), binders, and what happens to bad ones."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.tickets import RotatingTicketKeys
from pqproxy.tls.enums import AlertDescription, NamedGroup
from pqproxy.tls.events import ConnectionTerminated, Event, HandshakeComplete
from pqproxy.tls.server import ServerConfig, ServerConnection, resolve_inline
from tests.peers import client_context, drain_bio, memory_client, pump

PROVIDER = OpenSSLProvider()


def session_reused(client: SSL.Connection) -> bool:
    return bool(_lib.SSL_session_reused(client._ssl))


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(dev_certs: Any) -> tuple[ServerConfig, Clock, SSL.Context]:
    config = ServerConfig(
        certificates=(load_certified_key(dev_certs.cert, dev_certs.key),),
        tickets=RotatingTicketKeys(os.urandom(32)),
        tickets_per_handshake=2,
        ticket_lifetime=600,
    )
    ctx = client_context(dev_certs.ca, groups="X25519MLKEM768")
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    return config, Clock(), ctx


def _done(events: list[Event]) -> HandshakeComplete:
    (done,) = [e for e in events if isinstance(e, HandshakeComplete)]
    return done


def _first_session(
    config: ServerConfig, clock: Clock, ctx: SSL.Context
) -> tuple[SSL.Session, HandshakeComplete]:
    server = ServerConnection(config, PROVIDER, os.urandom, clock=clock)
    client = memory_client(ctx)
    done = _done(pump(client, server))
    # The tickets follow the handshake; the client takes them in when it reads.
    server.send_data(b"hello")
    client.bio_write(server.data_to_send())
    assert client.recv(100) == b"hello"
    session = client.get_session()
    assert session is not None
    # OpenSSL marks a session unresumable when its connection is freed without a
    # clean shutdown; close like a well-behaved client.
    client.shutdown()
    return session, done


def _resume(
    config: ServerConfig,
    clock: Clock,
    ctx: SSL.Context,
    session: SSL.Session,
    server_name: bytes = b"localhost",
    tamper: Callable[[bytes], bytes] | None = None,
) -> tuple[SSL.Connection, list[Event], list[SSL.Error]]:
    server = ServerConnection(config, PROVIDER, os.urandom, clock=clock)
    client = memory_client(ctx, server_name=server_name)
    client.set_session(session)
    errors: list[SSL.Error] = []
    if tamper is None:
        return client, pump(client, server, errors), errors
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    server.receive_data(tamper(drain_bio(client)))
    events = resolve_inline(server)
    client.bio_write(server.data_to_send())
    try:
        client.do_handshake()
    except SSL.Error as error:
        errors.append(error)
    return client, events, errors


def test_ticket_resumes_with_a_fresh_hybrid_key_exchange(setup: Any) -> None:
    config, clock, ctx = setup
    session, first = _first_session(config, clock, ctx)
    assert first.resumed is False
    client, events, errors = _resume(config, clock, ctx, session)
    assert not errors
    done = _done(events)
    assert done.resumed is True
    assert session_reused(client)
    # psk_dhe_ke: the hybrid group is negotiated on the resumed session too.
    assert done.group == NamedGroup.X25519MLKEM768
    assert client.get_group_name() == "X25519MLKEM768"


def test_expired_ticket_falls_back_to_a_full_handshake(setup: Any) -> None:
    config, clock, ctx = setup
    session, _ = _first_session(config, clock, ctx)
    clock.now += config.ticket_lifetime + 1
    client, events, errors = _resume(config, clock, ctx, session)
    assert not errors
    assert _done(events).resumed is False
    assert not session_reused(client)


def test_ticket_from_another_key_falls_back(setup: Any, dev_certs: Any) -> None:
    config, clock, ctx = setup
    session, _ = _first_session(config, clock, ctx)
    other = ServerConfig(
        certificates=config.certificates, tickets=RotatingTicketKeys(os.urandom(32))
    )
    client, events, errors = _resume(other, clock, ctx, session)
    assert not errors and _done(events).resumed is False
    assert not session_reused(client)


def test_ticket_is_bound_to_its_server_name(setup: Any) -> None:
    config, clock, ctx = setup
    session, _ = _first_session(config, clock, ctx)
    client, events, errors = _resume(config, clock, ctx, session, server_name=b"other.localhost")
    # OpenSSL may decline to offer the session for another name; either way, no resumption.
    assert not errors and _done(events).resumed is False
    assert not session_reused(client)


def _flip_last_binder_byte(data: bytes) -> bytes:
    # pre_shared_key is the last extension of the ClientHello, and its binders
    # list is the very end of the message: the last byte belongs to a binder.
    return data[:-1] + bytes((data[-1] ^ 0x01,))


def test_wrong_binder_is_decrypt_error(setup: Any) -> None:
    config, clock, ctx = setup
    session, _ = _first_session(config, clock, ctx)
    _client, events, errors = _resume(config, clock, ctx, session, tamper=_flip_last_binder_byte)
    ends = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert ends and ends[0].alert == AlertDescription.decrypt_error and ends[0].sent
    assert errors and "decrypt error" in str(errors[0])


def _server_hello_extensions(records: bytes) -> list[int]:
    body = records[5 + 4 :]
    offset = 2 + 32
    offset += 1 + body[offset]  # legacy_session_id_echo
    offset += 2 + 1  # cipher_suite, legacy_compression_method
    end = offset + 2 + int.from_bytes(body[offset : offset + 2], "big")
    offset += 2
    types = []
    while offset < end:
        types.append(int.from_bytes(body[offset : offset + 2], "big"))
        offset += 4 + int.from_bytes(body[offset + 2 : offset + 4], "big")
    return types


def test_ticket_that_does_not_open_gets_a_full_handshake(setup: Any) -> None:
    """A ticket damaged in flight no longer opens: the server ignores the PSK and
    answers with a full handshake (no pre_shared_key in its ServerHello). The
    client, whose transcript has the undamaged ClientHello, then fails to agree
    keys, as it must."""
    config, clock, ctx = setup
    session, _ = _first_session(config, clock, ctx)
    server = ServerConnection(config, PROVIDER, os.urandom, clock=clock)
    client = memory_client(ctx)
    client.set_session(session)
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    hello = drain_bio(client)
    # The ticket sits just before the binders (2-byte list length, 1 + 32 per
    # binder) and the 4-byte obfuscated age: flip a byte inside it.
    position = len(hello) - (2 + 33) - 4 - 8
    damaged = hello[:position] + bytes((hello[position] ^ 0x01,)) + hello[position + 1 :]
    server.receive_data(damaged)
    events = resolve_inline(server)
    assert not any(isinstance(e, ConnectionTerminated) for e in events)
    flight = server.data_to_send()
    assert flight[:1] == b"\x16"
    extensions = _server_hello_extensions(flight)
    assert 0x0029 not in extensions and 0x0033 in extensions


def test_same_ticket_keys_in_two_workers(setup: Any, dev_certs: Any) -> None:
    """Two protectors from one master secret stand for two worker processes: a
    ticket issued by one resumes on the other."""
    config, clock, ctx = setup
    master = os.urandom(32)
    worker_a = ServerConfig(certificates=config.certificates, tickets=RotatingTicketKeys(master))
    worker_b = ServerConfig(certificates=config.certificates, tickets=RotatingTicketKeys(master))
    session, _ = _first_session(worker_a, clock, ctx)
    client, events, errors = _resume(worker_b, clock, ctx, session)
    assert not errors and _done(events).resumed is True
    assert session_reused(client)
