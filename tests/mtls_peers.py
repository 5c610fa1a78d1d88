"""Peers for the mutual-TLS, dual-certificate and resumption tests over real sockets.

``RecordingUpstream`` is the model server: a threaded HTTP/1.1 server (stdlib) on 127.0.0.1
that records every connection it accepts and every request head it reads, so a test can say
what the upstream saw, and that it saw nothing at all from a refused client.

``exchange`` is one request from a pyOpenSSL client (cryptography's OpenSSL 4.0) on a
blocking socket with a deadline: the handshake, optionally resuming a session, the request,
the response read to the end, and a clean shutdown (OpenSSL marks a session unresumable
when its connection is freed without one).
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from tests.certs_factory import Issued
from tests.peers import client_context

WAIT = 20.0
T = TypeVar("T")


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def value(self, name: str) -> str | None:
        found = self.values(name)
        assert len(found) <= 1, f"{name} sent {len(found)} times: {found}"
        return found[0] if found else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _RecordingServer

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._answer()

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._answer()

    def _answer(self) -> None:
        self.server.owner._record(
            Recorded(self.command, self.path, tuple((n, v) for n, v in self.headers.items()))
        )
        body = json.dumps({"ok": True, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test reads the records, not a log


class _RecordingServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: RecordingUpstream

    def process_request(self, request: Any, client_address: Any) -> None:
        self.owner._connected()
        super().process_request(request, client_address)


class RecordingUpstream:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._requests: list[Recorded] = []
        self._connections = 0
        self._server = _RecordingServer(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    def _record(self, request: Recorded) -> None:
        with self._changed:
            self._requests.append(request)
            self._changed.notify_all()

    def _connected(self) -> None:
        with self._changed:
            self._connections += 1
            self._changed.notify_all()

    def counts(self) -> tuple[int, int]:
        """(connections accepted, requests read) so far."""
        with self._changed:
            return self._connections, len(self._requests)

    def requests(self) -> list[Recorded]:
        with self._changed:
            return list(self._requests)

    def last(self) -> Recorded:
        with self._changed:
            assert self._requests, "the upstream received no request"
            return self._requests[-1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(WAIT)


def tls_context(
    ca: Path | list[Path],
    directory: Path,
    client: Issued | None = None,
    *,
    sigalgs: str | None = None,
    groups: str = "X25519MLKEM768",
) -> SSL.Context:
    """A TLS 1.3 client context that trusts ``ca`` only, with ``client``'s certificate and
    key when given, and a client-side session cache so a session can be resumed."""
    cas = [ca] if isinstance(ca, Path) else ca
    ctx = client_context(cas[0], groups=groups, sigalgs=sigalgs)
    for extra in cas[1:]:
        ctx.load_verify_locations(str(extra))
    if client is not None:
        stem = f"client-{id(client):x}"
        chain, key = client.write_pem_files(directory, stem)
        ctx.use_certificate_chain_file(str(chain))
        ctx.use_privatekey_file(str(key))
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    return ctx


@dataclass
class Exchange:
    """What one connection did, from the client's side."""

    response: bytes
    group: str | None
    reused: bool
    peer_key: CertificatePublicKeyTypes | None
    session: SSL.Session | None
    local_port: int
    # The OpenSSL error the client met (an alert from the server, say), or None.
    error: str | None = None

    @property
    def status(self) -> int:
        line = self.response.split(b"\r\n", 1)[0]
        return int(line.split(b" ")[1]) if line.startswith(b"HTTP/1.1 ") else 0

    @property
    def body(self) -> bytes:
        return self.response.partition(b"\r\n\r\n")[2]


def _retry(sock: socket.socket, deadline: float, call: Callable[[], T]) -> T:
    """pyOpenSSL on a socket with a timeout is non-blocking: wait for readability with a
    deadline instead of spinning."""
    while True:
        try:
            return call()
        except SSL.WantReadError:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([sock], [], [], max(0.0, remaining))
            if not ready:
                raise TimeoutError("no data from pqproxy in time") from None


def request_bytes(path: str = "/v1/models", headers: tuple[str, ...] = ()) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: localhost", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def exchange(
    port: int,
    ctx: SSL.Context,
    request: bytes | None = None,
    *,
    session: SSL.Session | None = None,
    server_name: bytes = b"localhost",
) -> Exchange:
    """Handshake (resuming ``session`` when given), send ``request``, read the response until
    the server closes, shut down cleanly. An SSL error ends the exchange and is reported."""
    deadline = time.monotonic() + WAIT
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(server_name)
    conn.set_connect_state()
    if session is not None:
        conn.set_session(session)
    response = b""
    error: str | None = None
    try:
        _retry(sock, deadline, conn.do_handshake)
        conn.sendall(request if request is not None else request_bytes())
        while True:
            try:
                chunk = _retry(sock, deadline, lambda: conn.recv(65536))
            except SSL.ZeroReturnError:
                break
            if not chunk:
                break
            response += chunk
    except SSL.Error as exc:
        error = str(exc)
    peer = conn.get_peer_certificate(as_cryptography=True)
    result = Exchange(
        response=response,
        group=conn.get_group_name(),
        reused=bool(_lib.SSL_session_reused(conn._ssl)),
        peer_key=peer.public_key() if peer is not None else None,
        session=conn.get_session(),
        local_port=sock.getsockname()[1],
        error=error,
    )
    try:
        conn.shutdown()
    except SSL.Error:
        pass  # the server may be gone already; the close_notify flag is what counts
    sock.close()
    return result


def leaf_public_key(path: Path) -> CertificatePublicKeyTypes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_key()
