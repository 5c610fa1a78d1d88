"""A real OpenSSL 0-RTT client against a real pqproxy listener (issue 12, item 4).

The client holds a ticket with max_early_data from another OpenSSL server for the same name
(the server pqproxy replaced, or a neighbour behind the same load balancer). It sends its
request as early data; pqproxy cannot open the ticket, rejects the early data (RFC 8446
§4.2.10: it skips those records by trial decryption) and completes a 1-RTT handshake; the
client sends the request again and gets its answer."""

from __future__ import annotations

import select
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from pqproxy.tls.enums import NamedGroup
from tests.early_data_peer import (
    early_data_client_context,
    ticket_from_other_server,
    write_early_data,
)
from tests.interop.conftest import ProxyFactory

pytestmark = pytest.mark.interop

T = TypeVar("T")
REQUEST = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
DEADLINE = 20.0


def _retry(sock: socket.socket, call: Callable[[], T]) -> T:
    """pyOpenSSL on a socket with a timeout is non-blocking: wait for readability with a
    deadline instead of spinning."""
    while True:
        try:
            return call()
        except SSL.WantReadError:
            ready, _, _ = select.select([sock], [], [], DEADLINE)
            if not ready:
                raise TimeoutError(f"no data from pqproxy within {DEADLINE:g} s") from None


@pytest.mark.parametrize("groups", ["X25519MLKEM768", "X25519:P-256"], ids=["1rtt", "hrr"])
def test_openssl_early_data_client_gets_a_1rtt_answer(
    proxy_factory: ProxyFactory, dev_certs: Any, groups: str
) -> None:
    # "hrr": a listener that speaks P-256 only answers a client whose share is X25519 with
    # an HRR, after the early data: the 0-RTT records come before the second ClientHello.
    hrr = groups == "X25519:P-256"
    proxy = proxy_factory(groups=(NamedGroup.secp256r1,)) if hrr else proxy_factory()
    ctx = early_data_client_context(dev_certs.ca, groups=groups)
    session = ticket_from_other_server(ctx, dev_certs.cert, dev_certs.key)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE) as sock:
        conn = SSL.Connection(ctx, sock)
        conn.set_tlsext_host_name(b"localhost")
        conn.set_connect_state()
        conn.set_session(session)
        assert write_early_data(conn, REQUEST) == len(REQUEST)
        _retry(sock, conn.do_handshake)
        # A full handshake (the other server's ticket does not open here), and rejected early
        # data is not resent by OpenSSL on its own: the application sends it again.
        assert _lib.SSL_session_reused(conn._ssl) == 0
        conn.sendall(REQUEST)
        response = b""
        while True:
            try:
                chunk = _retry(sock, lambda: conn.recv(65536))
            except SSL.ZeroReturnError:
                break
            if not chunk:
                break
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"pqproxy-demo" in body
    # One request reached the upstream: the early copy was dropped, not delivered.
    assert response.count(b"HTTP/1.1 ") == 1
    done = proxy.next_handshake()
    assert done.resumed is False
    assert done.hello_retry is hrr
