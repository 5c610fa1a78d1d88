"""Issue 12 item 10 over real sockets: a client that floods KeyUpdate requests and never reads
cannot make the proxy buffer without bound, and reading from it pauses while its write
buffer is over the high-water mark (tcp and http modes).

The client is pyOpenSSL (cryptography's OpenSSL) for the handshake; after it, the KeyUpdate
records are sealed here under the client traffic secrets OpenSSL's key log hands out, and
written to the socket directly, and nothing is ever read again.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from OpenSSL import SSL

from pqproxy.devcert import DevCertPaths
from pqproxy.io.http_proxy import HttpSettings
from pqproxy.io.tls_server import ConnectionSnapshot, TLSListener
from pqproxy.io.upstream import PoolSettings, UpstreamPool
from pqproxy.tls.enums import ContentType, HandshakeType
from pqproxy.tls.key_schedule import SUITES, next_traffic_secret
from pqproxy.tls.record import RecordProtection
from tests.inprocess import local_listener_settings
from tests.peers import client_context

WAIT = 20.0
HIGH_WATER = 64 * 1024
# What the upstream offers: far more than any socket buffer on the way holds.
FLOOD = 64 * 1024 * 1024
# Before the fix: each request got its own KeyUpdate, 100,000 of them = 2.7 MB queued.
REQUESTS = 100_000
# Above the high-water mark the proxy may still hold what one read of the upstream and one
# read of the client produced before reading paused (a read is at most 256 KiB).
BOUND = HIGH_WATER + 512 * 1024
KEY_UPDATE_REQUEST = bytes((HandshakeType.KEY_UPDATE, 0, 0, 1, 1))


async def _flood(writer: asyncio.StreamWriter, head: bytes = b"") -> None:
    chunk = b"u" * 65536
    try:
        writer.write(head)
        for _ in range(FLOOD // len(chunk)):
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), WAIT * 3)
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()


async def _tcp_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _flood(writer)


async def _http_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        writer.close()
        return
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {FLOOD}\r\n\r\n".encode()
    await _flood(writer, head)


@pytest_asyncio.fixture
async def upstreams() -> AsyncIterator[dict[str, int]]:
    tcp = await asyncio.start_server(_tcp_upstream, "127.0.0.1", 0)
    http = await asyncio.start_server(_http_upstream, "127.0.0.1", 0)
    yield {"tcp": tcp.sockets[0].getsockname()[1], "http": http.sockets[0].getsockname()[1]}
    for server in (tcp, http):
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)


class _FloodingClient:
    """Handshake with pyOpenSSL over a blocking socket, then KeyUpdate requests sealed here,
    written until they are all out or the socket has accepted nothing for a while (the proxy
    stopped reading). Runs on a thread; never reads after the handshake."""

    def __init__(self, port: int, certs: DevCertPaths, request: bytes | None) -> None:
        self.port = port
        self.certs = certs
        self.request = request
        self.secrets: dict[str, bytes] = {}
        self.sent_updates = 0
        self.stalled = False
        self.sock: socket.socket | None = None
        # Set once the upstream's data fills everything between the proxy and us: from then
        # on anything the proxy writes stays in its own buffer, where the test can see it.
        self.go = threading.Event()

    def _keylog(self, _conn: SSL.Connection, line: bytes) -> None:
        label, _random, secret = line.decode().split()
        self.secrets[label] = bytes.fromhex(secret)

    def run(self) -> None:
        ctx = client_context(
            self.certs.ca, groups="X25519MLKEM768", ciphersuites="TLS_AES_128_GCM_SHA256"
        )
        ctx.set_keylog_callback(self._keylog)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock = sock
        # Small kernel buffers on our side, so the proxy's own buffering is what is measured.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.settimeout(WAIT)
        sock.connect(("127.0.0.1", self.port))
        conn = SSL.Connection(ctx, sock)
        conn.set_tlsext_host_name(b"localhost")
        conn.set_connect_state()
        deadline = time.monotonic() + WAIT
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                # A socket with a timeout is non-blocking to OpenSSL: wait, with a deadline.
                remaining = deadline - time.monotonic()
                if not select.select([sock], [], [], max(0.0, remaining))[0]:
                    raise TimeoutError("no handshake answer from pqproxy") from None
        params = SUITES[0x1301]
        secret = self.secrets["CLIENT_TRAFFIC_SECRET_0"]
        protection = RecordProtection(params, secret)
        if self.request is not None:
            sock.sendall(protection.seal(ContentType.APPLICATION_DATA, self.request))
        if not self.go.wait(WAIT):
            raise TimeoutError("flooding client: never told to start")
        sock.setblocking(False)
        pending = b""
        while self.sent_updates < REQUESTS or pending:
            if not pending:
                batch = []
                for _ in range(min(1000, REQUESTS - self.sent_updates)):
                    batch.append(protection.seal(ContentType.HANDSHAKE, KEY_UPDATE_REQUEST))
                    secret = next_traffic_secret(params, secret)
                    protection = RecordProtection(params, secret)
                    self.sent_updates += 1
                pending = b"".join(batch)
            _, writable, _ = select.select([], [sock], [], 2.0)
            if not writable:
                self.stalled = True  # nothing taken for 2 s: the proxy is not reading
                return
            try:
                pending = pending[sock.send(pending) :]
            except BlockingIOError:
                continue
            if time.monotonic() > deadline:
                raise TimeoutError("flooding client: deadline")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


async def _until(
    listener: TLSListener, condition: Callable[[ConnectionSnapshot], bool]
) -> ConnectionSnapshot:
    deadline = time.monotonic() + WAIT
    while True:
        snapshots = listener.snapshot()
        if snapshots and condition(snapshots[0]):
            return snapshots[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached: {snapshots}")
        await asyncio.sleep(0.01)  # polling a condition with a deadline, not a fixed wait


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["tcp", "http"])
async def test_item10_key_update_flood_from_a_client_that_never_reads(
    dev_certs: DevCertPaths, upstreams: dict[str, int], mode: str
) -> None:
    pool: UpstreamPool | None = None
    extra: dict[str, Any] = {}
    if mode == "http":
        pool = UpstreamPool(
            PoolSettings(
                name="flood", servers=(("127.0.0.1", upstreams["http"]),), health_check=None
            )
        )
        await pool.start()
        extra = {"http": HttpSettings(), "pool": pool}
    settings = local_listener_settings(
        dev_certs,
        upstreams[mode],
        write_high_water=HIGH_WATER,
        mode=mode,
        **extra,
    )
    listener = TLSListener(settings)
    await listener.start()
    request = b"GET /flood HTTP/1.1\r\nHost: localhost\r\n\r\n" if mode == "http" else None
    client = _FloodingClient(listener.port, dev_certs, request)
    try:
        async with asyncio.timeout(WAIT * 2):
            flooding = asyncio.ensure_future(asyncio.to_thread(client.run))
            full = await _until(listener, lambda s: s.buffered_to_client >= HIGH_WATER)
            client.go.set()
            largest = full.buffered_to_client
            while not flooding.done():
                for snapshot in listener.snapshot():
                    largest = max(largest, snapshot.buffered_to_client)
                await asyncio.sleep(0.01)
            await flooding
            paused = await _until(listener, lambda s: not s.reading_client)
            largest = max(largest, paused.buffered_to_client)
    finally:
        client.close()
        await listener.close(grace=1.0)
        if pool is not None:
            await pool.close()
    assert paused.handshake_complete
    assert largest <= BOUND, f"{largest} bytes buffered for a client that does not read"
    # The proxy stopped reading: the client could not get all its requests out.
    assert client.stalled and client.sent_updates < REQUESTS
