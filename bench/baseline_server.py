"""The OpenSSL-native baseline: a TLS 1.3 server whose handshake is OpenSSL's (cryptography's
bundled OpenSSL 4.0, through pyOpenSSL), with the same certificate, groups and settings as
pqproxy, so that the benchmark compares pqproxy's handshake with OpenSSL's and nothing else.

    .venv/bin/python bench/baseline_server.py --listen 127.0.0.1:9443 \\
        --cert server.pem --key server.key [--workers N]

It is built not to be a strawman:

- OpenSSL does the socket I/O itself (``SSL_set_fd``): no byte of the handshake passes through
  Python, which only reacts to readiness (epoll through ``selectors``, level-triggered, a few
  hundred accepts per wake-up).
- One process per core (``--workers N``), each with its own SO_REUSEPORT listening socket on
  the same port, like pqproxy's workers: the kernel spreads the connections.
- SSL_MODE_RELEASE_BUFFERS as nginx sets it: an idle connection keeps no 16 KiB buffers.

Same settings as pqproxy (``pqproxy serve`` defaults): TLS 1.3 only; groups in the same strict
preference order (``/`` between OpenSSL's group tuples: a client that supports the first group
but sent no share for it gets an HRR, as with pqproxy's ``pq_policy: prefer``); the three TLS
1.3 cipher suites in pqproxy's order, the server's order deciding; no resumption. One
difference cannot be removed through pyOpenSSL: OpenSSL sends two NewSessionTickets after
every handshake (``SSL_CTX_set_num_tickets`` is not bound). With SSL_OP_NO_TICKET and the
session cache off they are small stateful tickets that nothing can use; the baseline pays
their cost (a few microseconds per handshake), pqproxy does not.

It answers every HTTP/1.1 request itself (keep-alive), it is not a proxy:
``GET /bytes/N`` -> N bytes; anything else -> 200 with a short JSON body.

Prints ``baseline listening on https://HOST:PORT (...)`` on stderr when every worker is ready;
SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import sys
from collections.abc import Callable

from OpenSSL import SSL
from OpenSSL._util import lib as _lib

# pqproxy's defaults (pqproxy/tls/server.py DEFAULT_GROUPS, DEFAULT_CIPHER_SUITES), in
# OpenSSL's names; "/" makes each group its own preference tuple (strict server order).
GROUPS = "X25519MLKEM768/X25519/SecP256r1MLKEM768/P-256/SecP384r1MLKEM1024/P-384"
CIPHER_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
BACKLOG = 4096
# Accepts per readiness event: enough to empty a burst, not enough to starve the others.
ACCEPT_BATCH = 256
READ_SIZE = 65536
# Largest plaintext per SSL_write: four full TLS records.
WRITE_CHUNK = 65536
MAX_HEAD = 16 * 1024
MAX_BULK = 1 << 30
OK_BODY = b'{"status":"ok"}\n'


def server_context(cert: str, key: str, groups: str) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate_chain_file(cert)
    ctx.use_privatekey_file(key)
    ctx.check_privatekey()
    if _lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) != 1:
        raise SystemExit(f"OpenSSL rejected the group list {groups!r}")
    ctx.set_tls13_ciphersuites(CIPHER_SUITES.encode())
    ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_mode(
        _lib.SSL_MODE_RELEASE_BUFFERS
        | _lib.SSL_MODE_ENABLE_PARTIAL_WRITE
        | _lib.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
    )
    return ctx


class _Conn:
    __slots__ = ("sock", "tls", "handshaken", "inbuf", "out", "events", "closing")

    def __init__(self, sock: socket.socket, tls: SSL.Connection) -> None:
        self.sock = sock
        self.tls = tls
        self.handshaken = False
        self.inbuf = bytearray()
        self.out: list[memoryview] = []
        self.events = selectors.EVENT_READ
        self.closing = False


class Worker:
    """One event loop: a listening socket and its connections."""

    def __init__(self, listener: socket.socket, ctx: SSL.Context) -> None:
        self.listener = listener
        self.ctx = ctx
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.running = True
        self._zeros = memoryview(b"")

    def run(self) -> None:
        select = self.selector.select
        while self.running:
            try:
                ready = select(1.0)
            except InterruptedError:
                continue
            for key, mask in ready:
                conn = key.data
                if conn is None:
                    self._accept()
                else:
                    self._service(conn, mask)
        for key in list(self.selector.get_map().values()):
            if key.data is not None:
                self._close(key.data)
        self.selector.close()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and friends: the next wake-up tries again
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = SSL.Connection(self.ctx, sock)
            tls.set_accept_state()
            conn = _Conn(sock, tls)
            self.selector.register(sock, selectors.EVENT_READ, conn)
            self._handshake(conn)

    def _service(self, conn: _Conn, mask: int) -> None:
        if not conn.handshaken:
            self._handshake(conn)
            return
        if conn.out:
            self._write(conn)
        if not conn.closing and mask & selectors.EVENT_READ and not conn.out:
            self._read(conn)

    def _want(self, conn: _Conn, events: int) -> None:
        if conn.events != events:
            conn.events = events
            self.selector.modify(conn.sock, events, conn)

    def _handshake(self, conn: _Conn) -> None:
        try:
            conn.tls.do_handshake()
        except SSL.WantReadError:
            self._want(conn, selectors.EVENT_READ)
            return
        except SSL.WantWriteError:
            self._want(conn, selectors.EVENT_WRITE)
            return
        except (SSL.Error, OSError):
            self._close(conn)
            return
        conn.handshaken = True
        self._want(conn, selectors.EVENT_READ)
        self._read(conn)

    def _read(self, conn: _Conn) -> None:
        while True:
            try:
                data = conn.tls.recv(READ_SIZE)
            except SSL.WantReadError:
                break
            except SSL.WantWriteError:
                self._want(conn, selectors.EVENT_WRITE)
                break
            except SSL.ZeroReturnError:
                # close_notify: answer it and close.
                with contextlib.suppress(SSL.Error, OSError):
                    conn.tls.shutdown()
                self._close(conn)
                return
            except (SSL.Error, OSError):
                self._close(conn)
                return
            if not data:
                self._close(conn)
                return
            conn.inbuf += data
            if len(conn.inbuf) > MAX_HEAD + MAX_HEAD:
                self._close(conn)
                return
        self._answer(conn)

    def _answer(self, conn: _Conn) -> None:
        while not conn.closing:
            end = conn.inbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.inbuf) > MAX_HEAD:
                    self._close(conn)
                    return
                break
            head = bytes(conn.inbuf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if len(conn.inbuf) < end + 4 + length:
                break  # the body is still coming
            del conn.inbuf[: end + 4 + length]
            parts = lines[0].split(" ")
            target = parts[1] if len(parts) > 1 else "/"
            close = headers.get("connection", "").lower() == "close"
            self._respond(conn, target, close)
        if conn.out:
            self._write(conn)

    def _respond(self, conn: _Conn, target: str, close: bool) -> None:
        body: memoryview
        if target.startswith("/bytes/") and target[7:].isdigit() and int(target[7:]) <= MAX_BULK:
            size = int(target[7:])
            if len(self._zeros) < size:
                self._zeros = memoryview(bytes(size))
            body = self._zeros[:size]
            kind = "application/octet-stream"
        else:
            body = memoryview(OK_BODY)
            kind = "application/json"
        head = (
            f"HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {len(body)}\r\n"
            + ("connection: close\r\n" if close else "")
            + "\r\n"
        ).encode()
        conn.out.append(memoryview(head))
        if body:
            conn.out.append(body)
        if close:
            conn.out.append(memoryview(b""))  # marks: close once everything is written
            conn.closing = True

    def _write(self, conn: _Conn) -> None:
        while conn.out:
            chunk = conn.out[0]
            if not chunk:
                with contextlib.suppress(SSL.Error, OSError):
                    conn.tls.shutdown()
                self._close(conn)
                return
            try:
                sent = conn.tls.send(chunk[:WRITE_CHUNK])
            except SSL.WantWriteError:
                self._want(conn, selectors.EVENT_WRITE)
                return
            except SSL.WantReadError:
                self._want(conn, selectors.EVENT_READ)
                return
            except (SSL.Error, OSError):
                self._close(conn)
                return
            if sent >= len(chunk):
                conn.out.pop(0)
            else:
                conn.out[0] = chunk[sent:]
        self._want(conn, selectors.EVENT_READ)

    def _close(self, conn: _Conn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.out.clear()
        conn.sock.close()


def _listener(host: str, port: int, *, listen: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(BACKLOG)
        sock.setblocking(False)
    return sock


def _serve(host: str, port: int, ctx: SSL.Context, on_ready: Callable[[], None]) -> None:
    worker = Worker(_listener(host, port, listen=True), ctx)

    def stop(_signum: int, _frame: object) -> None:
        worker.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    on_ready()
    worker.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--workers", type=int, default=1, metavar="N")
    parser.add_argument("--groups", default=GROUPS, help=f"OpenSSL group list (default {GROUPS})")
    args = parser.parse_args(argv)
    host, _, port_text = args.listen.rpartition(":")
    host = host.strip("[]")
    ctx = server_context(args.cert, args.key, args.groups)
    # The port is reserved by a bound, never listening socket: with port 0 the workers learn
    # the real port from it, and the kernel sends connections only to listening sockets.
    reserve = _listener(host, int(port_text), listen=False)
    port = reserve.getsockname()[1]
    openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    line = (
        f"baseline listening on https://{host}:{port} (groups: {args.groups}, "
        f"workers: {args.workers}, {openssl})"
    )
    if args.workers <= 1:
        _serve(host, port, ctx, lambda: print(line, file=sys.stderr, flush=True))
        return 0
    ready_r, ready_w = os.pipe()
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            reserve.close()

            def ready() -> None:
                os.write(ready_w, b".")

            try:
                _serve(host, port, ctx, ready)
            finally:
                os._exit(0)
        children.append(pid)
    os.close(ready_w)
    got = 0
    while got < args.workers:
        chunk = os.read(ready_r, args.workers)
        if not chunk:
            print("baseline: a worker died during start-up", file=sys.stderr)
            break
        got += len(chunk)
    else:
        print(line, file=sys.stderr, flush=True)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        while True:
            try:
                _, code = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        status = status or os.waitstatus_to_exitcode(code)
    return 1 if got < args.workers else status


if __name__ == "__main__":
    sys.exit(main())
