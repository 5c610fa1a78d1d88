"""Real sockets, independent clients: pyOpenSSL on cryptography's OpenSSL 4.0
(every group, every suite, HRR) and the stdlib ssl module on the system's
OpenSSL 3.0 (classical only). The negotiated group is asserted on both sides."""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from OpenSSL import SSL

from pqproxy.tls.enums import AlertDescription, NamedGroup
from pqproxy.tls.server import PqPolicy
from tests.interop.conftest import ProxyFactory
from tests.peers import OPENSSL_GROUP_NAMES, OPENSSL_REPORTED_NAMES, SUITE_NAMES, client_context

pytestmark = pytest.mark.interop

T = TypeVar("T")

REQUEST = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def _retry(conn: SSL.Connection, sock: socket.socket, call: Callable[[], T]) -> T:
    """pyOpenSSL on a socket with a timeout is non-blocking: wait for readability
    with a deadline instead of spinning."""
    while True:
        try:
            return call()
        except SSL.WantReadError:
            ready, _, _ = select.select([sock], [], [], 20)
            if not ready:
                raise TimeoutError("no data from pqproxy within 20 s") from None


def _pyopenssl_get(port: int, ctx: SSL.Context) -> tuple[SSL.Connection, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
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


def _assert_models_response(response: bytes) -> None:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"pqproxy-demo" in body


@pytest.mark.parametrize("group", list(OPENSSL_GROUP_NAMES), ids=OPENSSL_REPORTED_NAMES.get)
def test_pyopenssl_each_group(proxy_factory: ProxyFactory, dev_certs: Any, group: int) -> None:
    proxy = proxy_factory()
    ctx = client_context(dev_certs.ca, groups=OPENSSL_GROUP_NAMES[group])
    conn, response = _pyopenssl_get(proxy.port, ctx)
    _assert_models_response(response)
    assert conn.get_group_name() == OPENSSL_REPORTED_NAMES[group]
    assert proxy.next_handshake().group == group


@pytest.mark.parametrize("suite", list(SUITE_NAMES), ids=SUITE_NAMES.get)
def test_pyopenssl_each_suite(proxy_factory: ProxyFactory, dev_certs: Any, suite: int) -> None:
    proxy = proxy_factory()
    ctx = client_context(dev_certs.ca, groups="X25519MLKEM768", ciphersuites=SUITE_NAMES[suite])
    conn, response = _pyopenssl_get(proxy.port, ctx)
    _assert_models_response(response)
    assert conn.get_cipher_name() == SUITE_NAMES[suite]
    done = proxy.next_handshake()
    assert (done.cipher_suite, done.group) == (suite, NamedGroup.X25519MLKEM768)


@pytest.mark.parametrize("policy", [PqPolicy.PREFER, PqPolicy.REQUIRE])
def test_hrr_to_hybrid(proxy_factory: ProxyFactory, dev_certs: Any, policy: PqPolicy) -> None:
    """Hybrid in supported_groups, but only an X25519 share: HRR, then the hybrid."""
    proxy = proxy_factory(pq_policy=policy)
    ctx = client_context(dev_certs.ca, groups="X25519MLKEM768:*X25519")
    conn, response = _pyopenssl_get(proxy.port, ctx)
    _assert_models_response(response)
    assert conn.get_group_name() == "X25519MLKEM768"
    done = proxy.next_handshake()
    assert (done.group, done.hello_retry) == (NamedGroup.X25519MLKEM768, True)


def _stdlib_context(ca: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def test_stdlib_ssl_classical_under_prefer(proxy_factory: ProxyFactory, dev_certs: Any) -> None:
    assert ssl.OPENSSL_VERSION_INFO < (3, 5), "the stdlib peer is meant to lack ML-KEM"
    proxy = proxy_factory(pq_policy=PqPolicy.PREFER)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as raw:
        with _stdlib_context(dev_certs.ca).wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(REQUEST)
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
            assert tls.version() == "TLSv1.3"
    _assert_models_response(response)
    # The stdlib does not expose the group; the server side names it.
    assert proxy.next_handshake().group == NamedGroup.x25519


def test_stdlib_ssl_refused_cleanly_under_require(
    proxy_factory: ProxyFactory, dev_certs: Any
) -> None:
    proxy = proxy_factory(pq_policy=PqPolicy.REQUIRE)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as raw:
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            _stdlib_context(dev_certs.ca).wrap_socket(raw, server_hostname="localhost")
    closed = proxy.next_close()
    assert closed.alert == AlertDescription.handshake_failure and closed.alert_sent
    assert not closed.handshake_complete
    assert "hybrid" in closed.reason


def test_response_body_is_json(proxy_factory: ProxyFactory, dev_certs: Any) -> None:
    proxy = proxy_factory()
    _conn, response = _pyopenssl_get(proxy.port, client_context(dev_certs.ca))
    body = response.partition(b"\r\n\r\n")[2]
    # Connection: close, so the body may be chunked or plain; find the JSON object.
    start, end = body.index(b"{"), body.rindex(b"}") + 1
    assert json.loads(body[start:end])["data"][0]["id"] == "pqproxy-demo"


def test_openssl_s_client_key_update_requested(proxy_factory: ProxyFactory, dev_certs: Any) -> None:
    """The system's `openssl s_client` (3.0) sends KeyUpdate(update_requested)
    with its interactive "K" command; the request after it must still be
    answered, which needs pqproxy to take the client's new key and answer
    with its own KeyUpdate."""
    proxy = proxy_factory()
    command = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{proxy.port}",
        "-servername",
        "localhost",
        "-CAfile",
        str(dev_certs.ca),
        "-tls1_3",
        "-crlf",
        "-verify_return_error",
    ]
    # s_client quits at stdin EOF, so stdin stays open until the answer is in;
    # and it acts on "K" only at the start of a read, so the request waits until
    # s_client has reported the key update.
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as client:
        assert client.stdin is not None and client.stdout is not None
        output = b""
        deadline = time.monotonic() + 20

        def read_until(marker: bytes) -> None:
            nonlocal output
            assert client.stdout is not None
            while marker not in output and time.monotonic() < deadline:
                ready, _, _ = select.select([client.stdout], [], [], deadline - time.monotonic())
                if not ready:
                    return
                chunk = os.read(client.stdout.fileno(), 65536)
                if not chunk:
                    return
                output += chunk

        read_until(b"Verify return code")
        client.stdin.write(b"K\n")
        client.stdin.flush()
        read_until(b"KEYUPDATE")
        client.stdin.write(b"GET /health HTTP/1.1\nHost: localhost\nConnection: close\n\n")
        client.stdin.flush()
        read_until(b'{"status":"ok"}')
        client.stdin.close()
        client.kill()
    assert b"KEYUPDATE" in output
    assert b"HTTP/1.1 200" in output, output[-2000:]
    assert b'{"status":"ok"}' in output
    assert proxy.next_handshake().group == NamedGroup.x25519
