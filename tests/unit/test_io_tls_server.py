"""TLSListener on real sockets: the stdlib ``ssl`` client (OpenSSL 3.0, classical x25519) through
the pqproxy engine to a real in-process upstream (an echo server, the demo upstream)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import pytest_asyncio

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.provider import CertifiedKey
from pqproxy.demo_upstream import serve_demo_upstream
from pqproxy.devcert import DevCertPaths
from pqproxy.io.tls_server import (
    CloseKind,
    ConnectionClosed,
    ListenerSettings,
    TLSListener,
    format_peer,
)
from pqproxy.tls.enums import AlertDescription, CipherSuite, NamedGroup
from pqproxy.tls.events import HandshakeComplete
from pqproxy.tls.server import ServerConfig

# Upper bound for any single wait in these tests; far above what a healthy run needs.
WAIT = 10.0
PROVIDER = OpenSSLProvider()


@pytest.fixture(scope="module")
def certified(dev_certs: DevCertPaths) -> CertifiedKey:
    return load_certified_key(dev_certs.cert, dev_certs.key)


@pytest.fixture
def client_ctx(dev_certs: DevCertPaths) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(dev_certs.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


@pytest_asyncio.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Everything that reaches the loop's exception handler: a traceback a connection let
    escape. Asserted empty after each test."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(previous)
    assert errors == [], f"exceptions reached the event loop: {errors}"


class Upstream:
    """An in-process TCP echo server that records what it saw."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.eof_seen: asyncio.Event = asyncio.Event()
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                data = await asyncio.wait_for(reader.read(65536), WAIT)
                if not data:
                    self.eof_seen.set()
                    break
                writer.write(data)
                await asyncio.wait_for(writer.drain(), WAIT)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
            self.writers.discard(writer)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await asyncio.wait_for(self.server.wait_closed(), WAIT)


@pytest_asyncio.fixture
async def echo_upstream() -> AsyncIterator[Upstream]:
    upstream = Upstream()
    await upstream.start()
    yield upstream
    await upstream.close()


@pytest_asyncio.fixture
async def demo_upstream() -> AsyncIterator[int]:
    server = await serve_demo_upstream("127.0.0.1", 0, tokens=5, token_interval=0.0)
    port: int = server.sockets[0].getsockname()[1]
    yield port
    server.close()
    await asyncio.wait_for(server.wait_closed(), WAIT)


@dataclass
class Proxy:
    listener: TLSListener
    handshakes: list[tuple[HandshakeComplete, str]] = field(default_factory=list)
    closed: asyncio.Queue[ConnectionClosed] = field(default_factory=asyncio.Queue)

    async def next_closed(self) -> ConnectionClosed:
        return await asyncio.wait_for(self.closed.get(), WAIT)


@pytest_asyncio.fixture
async def make_proxy(
    certified: CertifiedKey, loop_errors: list[dict[str, Any]]
) -> AsyncIterator[Any]:
    proxies: list[Proxy] = []

    async def make(upstream_port: int, **overrides: Any) -> Proxy:
        settings = ListenerSettings(
            host="127.0.0.1",
            port=0,
            server_config=ServerConfig(certificates=(certified,)),
            provider=PROVIDER,
            upstream_host="127.0.0.1",
            upstream_port=upstream_port,
            **overrides,
        )
        proxy = Proxy(TLSListener(settings))
        proxy.listener.on_handshake = lambda event, peer: proxy.handshakes.append((event, peer))
        proxy.listener.on_terminated = proxy.closed.put_nowait
        await proxy.listener.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.listener.close()


async def tls_connect(
    port: int, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), WAIT
    )


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), WAIT)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), WAIT)
    except (ConnectionError, ssl.SSLError):
        pass  # the proxy may already have closed its side


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """A real ClientHello from the stdlib, produced through memory BIOs."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    data = outgoing.read()
    assert data[0] == 0x16 and len(data) > 100
    return data


class BioClient:
    """The stdlib TLS client over memory BIOs on a raw socket, for what asyncio's SSL streams
    cannot express: sending close_notify while still reading (a TLS half-close)."""

    def __init__(
        self, ctx: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext) -> BioClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
        client = cls(ctx, reader, writer)
        while True:
            try:
                client.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await client._flush()
                await client._fill()
        await client._flush()
        return client

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), WAIT)

    async def _fill(self) -> bool:
        data = await asyncio.wait_for(self.reader.read(65536), WAIT)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        return bool(data)

    async def send(self, data: bytes) -> None:
        self.obj.write(data)
        await self._flush()

    async def send_close_notify(self) -> None:
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # our close_notify is out; the peer's has not arrived yet
        await self._flush()

    async def read_until_close_notify(self) -> bytes:
        """Everything until the server's close_notify; fails on a bare EOF."""
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLWantReadError:
                if not await self._fill():
                    raise AssertionError("EOF without close_notify") from None
                continue
            except ssl.SSLZeroReturnError:
                # close_notify after we sent ours.
                return b"".join(chunks)
            if not chunk:
                # close_notify while our side is still open: the stdlib returns b"".
                return b"".join(chunks)
            chunks.append(chunk)

    def close(self) -> None:
        self.writer.close()


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_round_trip_through_echo_upstream(
    make_proxy: Any,
    echo_upstream: Upstream,
    client_ctx: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pqproxy.io.tls_server")
    proxy = await make_proxy(echo_upstream.port)
    reader, writer = await tls_connect(proxy.listener.port, client_ctx)
    for message in (b"hello", b"x" * 40_000, bytes(range(256))):
        writer.write(message)
        assert await asyncio.wait_for(reader.readexactly(len(message)), WAIT) == message

    assert len(proxy.handshakes) == 1
    event, peer = proxy.handshakes[0]
    # OpenSSL 3.0 knows no hybrid group: the classical x25519 is what it offers first.
    assert event.group == NamedGroup.x25519
    assert event.cipher_suite in set(CipherSuite)
    assert peer == format_peer(writer.get_extra_info("sockname"))
    assert event.server_name == "localhost"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("handshake ok")]
    assert len(lines) == 1
    assert f"peer={peer} sni=localhost group=x25519 cipher=TLS_" in lines[0]
    assert " hrr=no " in lines[0]

    await close_writer(writer)
    closed = await proxy.next_closed()
    assert closed.handshake_complete
    assert closed.bytes_from_client == 5 + 40_000 + 256
    assert proxy.listener.active_connections == 0


@pytest.mark.asyncio
async def test_bulk_transfer_with_backpressure(
    make_proxy: Any, echo_upstream: Upstream, client_ctx: ssl.SSLContext
) -> None:
    # A high-water mark far below the payload forces many pause/resume cycles on both sides.
    proxy = await make_proxy(echo_upstream.port, write_high_water=16 * 1024)
    reader, writer = await tls_connect(proxy.listener.port, client_ctx)
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB

    async def send() -> None:
        writer.write(payload)
        await asyncio.wait_for(writer.drain(), WAIT)

    _, echoed = await asyncio.gather(
        send(), asyncio.wait_for(reader.readexactly(len(payload)), WAIT)
    )
    assert echoed == payload
    await close_writer(writer)
    closed = await proxy.next_closed()
    assert closed.bytes_from_client == len(payload)


class StalledUpstream(asyncio.Protocol):
    """An upstream that reads nothing until ``release()``, then counts what arrives."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.transport: asyncio.Transport | None = None
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.all_received: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        self.connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= self.expected and not self.all_received.done():
            self.all_received.set_result(None)

    def release(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()


async def wait_until(condition: Any, what: str) -> None:
    """Poll ``condition()`` on every loop turn (10 ms apart) until true, failing after WAIT."""
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_slow_upstream_stops_reading_from_client(
    make_proxy: Any, client_ctx: ssl.SSLContext
) -> None:
    high_water = 64 * 1024
    payload = b"\xab" * (16 << 20)
    loop = asyncio.get_running_loop()
    upstream = StalledUpstream(len(payload))
    server = await loop.create_server(lambda: upstream, "127.0.0.1", 0)
    try:
        proxy = await make_proxy(server.sockets[0].getsockname()[1], write_high_water=high_water)
        reader, writer = await tls_connect(proxy.listener.port, client_ctx)
        writer.write(payload)
        await asyncio.wait_for(upstream.connected, WAIT)

        def paused() -> bool:
            snap = proxy.listener.snapshot()
            return len(snap) == 1 and not snap[0].reading_client

        await wait_until(paused, "the proxy to stop reading from the client")
        (snap,) = proxy.listener.snapshot()
        # Held in memory: the high-water mark plus at most one transport read (256 KiB) and
        # its record overhead, nowhere near the 16 MiB the client has queued.
        assert snap.buffered_to_upstream <= high_water + 512 * 1024

        upstream.release()
        await asyncio.wait_for(upstream.all_received, WAIT)
        assert upstream.received == len(payload)
        assert proxy.listener.snapshot()[0].reading_client
        await close_writer(writer)
    finally:
        server.close()
        if upstream.transport is not None:
            upstream.transport.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)


@pytest.mark.asyncio
async def test_slow_client_stops_reading_from_upstream(
    make_proxy: Any, client_ctx: ssl.SSLContext
) -> None:
    high_water = 64 * 1024
    payload = b"\xcd" * (16 << 20)

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        try:
            await asyncio.wait_for(writer.drain(), WAIT)
        finally:
            writer.close()

    server = await asyncio.start_server(flood, "127.0.0.1", 0)
    try:
        proxy = await make_proxy(server.sockets[0].getsockname()[1], write_high_water=high_water)
        # The client completes the handshake, then reads nothing until the proxy has stopped.
        client = await BioClient.connect(proxy.listener.port, client_ctx)
        try:

            def paused() -> bool:
                snap = proxy.listener.snapshot()
                return (
                    len(snap) == 1 and snap[0].upstream_connected and not snap[0].reading_upstream
                )

            await wait_until(paused, "the proxy to stop reading from the upstream")
            (snap,) = proxy.listener.snapshot()
            assert snap.buffered_to_client <= high_water + 512 * 1024

            received = await client.read_until_close_notify()
            assert len(received) == len(payload) and received == payload
        finally:
            client.close()
        closed = await proxy.next_closed()
        assert closed.kind is CloseKind.CLOSED
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)


@pytest.mark.asyncio
async def test_client_close_notify_half_closes_upstream(
    make_proxy: Any, echo_upstream: Upstream, client_ctx: ssl.SSLContext
) -> None:
    proxy = await make_proxy(echo_upstream.port)
    client = await BioClient.connect(proxy.listener.port, client_ctx)
    try:
        await client.send(b"last words")
        await client.send_close_notify()
        # The upstream sees EOF (write_eof) yet its answer still reaches the client, followed
        # by the proxy's own close_notify once the upstream closes.
        await asyncio.wait_for(echo_upstream.eof_seen.wait(), WAIT)
        assert await client.read_until_close_notify() == b"last words"
    finally:
        client.close()
    closed = await proxy.next_closed()
    assert closed.kind is CloseKind.CLOSED
    assert closed.alert is AlertDescription.close_notify and closed.alert_sent


@pytest.mark.asyncio
async def test_demo_upstream_through_proxy(
    make_proxy: Any, demo_upstream: int, client_ctx: ssl.SSLContext
) -> None:
    proxy = await make_proxy(demo_upstream)
    reader, writer = await tls_connect(proxy.listener.port, client_ctx)
    # Two requests on one connection: keep-alive works through the relay.
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(
        next(
            line.split(b":", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    models = json.loads(await asyncio.wait_for(reader.readexactly(length), WAIT))
    assert [m["id"] for m in models["data"]] == ["pqproxy-demo"]

    body = b'{"model": "pqproxy-demo", "stream": true, "messages": []}'
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    response = await read_to_eof(reader)
    assert response.startswith(b"HTTP/1.1 200 ")
    assert b"content-type: text/event-stream" in response.lower()
    events = [line for line in response.split(b"\n") if line.startswith(b"data: ")]
    assert len(events) == 5 + 1 and events[-1] == b"data: [DONE]"
    await close_writer(writer)


@pytest.mark.asyncio
async def test_demo_upstream_errors_through_proxy(
    make_proxy: Any, demo_upstream: int, client_ctx: ssl.SSLContext
) -> None:
    proxy = await make_proxy(demo_upstream)
    reader, writer = await tls_connect(proxy.listener.port, client_ctx)
    writer.write(b"GET /nowhere HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 404 ")
    await close_writer(writer)

    reader, writer = await tls_connect(proxy.listener.port, client_ctx)
    # Announced too large: answered 413 before any of the body is sent, then closed.
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Length: %d\r\n\r\n" % ((1 << 20) + 1)
    )
    response = await read_to_eof(reader)
    assert response.startswith(b"HTTP/1.1 413 ")
    await close_writer(writer)


@pytest.mark.asyncio
async def test_stalled_client_hello_times_out(
    make_proxy: Any, echo_upstream: Upstream, client_ctx: ssl.SSLContext
) -> None:
    proxy = await make_proxy(echo_upstream.port, handshake_timeout=0.5)
    hello = client_hello(client_ctx)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.listener.port)
    started = time.monotonic()
    writer.write(hello[: len(hello) // 2])
    assert await read_to_eof(reader) == b""
    elapsed = time.monotonic() - started
    closed = await proxy.next_closed()
    assert closed.kind is CloseKind.HANDSHAKE_TIMEOUT
    assert "timeout" in closed.reason
    assert not closed.handshake_complete
    # Closed by the timer, not by something else: not early (uvloop's clock has 1 ms steps).
    assert 0.45 <= elapsed < WAIT
    writer.close()


@pytest.mark.asyncio
async def test_idle_connection_is_closed_with_close_notify(
    make_proxy: Any, echo_upstream: Upstream, client_ctx: ssl.SSLContext
) -> None:
    proxy = await make_proxy(echo_upstream.port, idle_timeout=0.3)
    reader, writer = await tls_connect(proxy.listener.port, client_ctx)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"ping"
    # The stdlib reports the proxy's close_notify as a clean EOF.
    assert await read_to_eof(reader) == b""
    closed = await proxy.next_closed()
    assert closed.kind is CloseKind.IDLE_TIMEOUT
    assert closed.alert is AlertDescription.close_notify and closed.alert_sent
    await close_writer(writer)


@pytest.mark.asyncio
async def test_upstream_refused_closes_client_cleanly(
    make_proxy: Any, client_ctx: ssl.SSLContext
) -> None:
    # A bound socket that never listens refuses every connection for as long as it is open.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        proxy = await make_proxy(blocker.getsockname()[1])
        reader, writer = await tls_connect(proxy.listener.port, client_ctx)
        assert await read_to_eof(reader) == b""
        closed = await proxy.next_closed()
    assert closed.kind is CloseKind.UPSTREAM_FAILED
    assert "connect failed" in closed.reason
    assert closed.handshake_complete
    assert closed.alert is AlertDescription.close_notify and closed.alert_sent
    await close_writer(writer)


@pytest.mark.asyncio
async def test_garbage_gets_an_alert_and_eof(make_proxy: Any, echo_upstream: Upstream) -> None:
    proxy = await make_proxy(echo_upstream.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.listener.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    data = await read_to_eof(reader)
    assert data[:1] == b"\x15"  # a TLS alert record, then EOF
    assert len(data) == 7 and data[5] == 2  # one plaintext fatal alert
    closed = await proxy.next_closed()
    assert closed.kind is CloseKind.TLS_ALERT
    assert closed.alert_sent and closed.alert is not None
    assert data[6] == closed.alert
    assert proxy.handshakes == []
    writer.close()


@pytest.mark.asyncio
async def test_connections_beyond_the_cap_are_refused(
    make_proxy: Any, echo_upstream: Upstream, client_ctx: ssl.SSLContext
) -> None:
    proxy = await make_proxy(echo_upstream.port, max_connections=1)
    reader, writer = await tls_connect(proxy.listener.port, client_ctx)
    writer.write(b"first")
    assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"first"

    reader2, writer2 = await asyncio.open_connection("127.0.0.1", proxy.listener.port)
    assert await read_to_eof(reader2) == b""
    refused = await proxy.next_closed()
    assert refused.kind is CloseKind.OVER_CAPACITY
    writer2.close()

    # The admitted connection is unaffected.
    writer.write(b"still here")
    assert await asyncio.wait_for(reader.readexactly(10), WAIT) == b"still here"
    assert proxy.listener.active_connections == 1
    await close_writer(writer)


@pytest.mark.asyncio
async def test_listener_close_sends_close_notify(
    make_proxy: Any, echo_upstream: Upstream, client_ctx: ssl.SSLContext
) -> None:
    proxy = await make_proxy(echo_upstream.port)
    port = proxy.listener.port
    reader, writer = await tls_connect(port, client_ctx)
    writer.write(b"hi")
    assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"hi"
    await asyncio.wait_for(proxy.listener.close(), WAIT)
    assert await read_to_eof(reader) == b""
    closed = await proxy.next_closed()
    assert closed.kind is CloseKind.SHUTDOWN
    assert closed.alert is AlertDescription.close_notify
    assert proxy.listener.active_connections == 0
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    await close_writer(writer)


def test_relay_on_uvloop(certified: CertifiedKey, client_ctx: ssl.SSLContext) -> None:
    """pqproxy serves on uvloop, whose transports differ from asyncio's (they are not
    asyncio.Transport subclasses, their clock has 1 ms steps): the relay, backpressure, a
    half-close and a bad client, on uvloop itself."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
        upstream = Upstream()
        await upstream.start()
        closed: asyncio.Queue[ConnectionClosed] = asyncio.Queue()
        listener = TLSListener(
            ListenerSettings(
                host="127.0.0.1",
                port=0,
                server_config=ServerConfig(certificates=(certified,)),
                provider=PROVIDER,
                upstream_host="127.0.0.1",
                upstream_port=upstream.port,
                write_high_water=16 * 1024,
            ),
            on_terminated=closed.put_nowait,
        )
        await listener.start()
        try:
            reader, writer = await tls_connect(listener.port, client_ctx)
            payload = bytes(range(256)) * 4096  # 1 MiB
            writer.write(payload)
            echoed = await asyncio.wait_for(reader.readexactly(len(payload)), WAIT)
            assert echoed == payload
            await close_writer(writer)
            assert (await asyncio.wait_for(closed.get(), WAIT)).handshake_complete

            client = await BioClient.connect(listener.port, client_ctx)
            await client.send(b"bye")
            await client.send_close_notify()
            assert await client.read_until_close_notify() == b"bye"
            client.close()
            assert (await asyncio.wait_for(closed.get(), WAIT)).kind is CloseKind.CLOSED

            raw_reader, raw_writer = await asyncio.open_connection("127.0.0.1", listener.port)
            raw_writer.write(b"\x16\x03\x01\x00\x05hello")
            assert (await read_to_eof(raw_reader))[:1] == b"\x15"
            raw_writer.close()
            assert (await asyncio.wait_for(closed.get(), WAIT)).kind is CloseKind.TLS_ALERT
        finally:
            await listener.close()
            await upstream.close()
        assert errors == []

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
