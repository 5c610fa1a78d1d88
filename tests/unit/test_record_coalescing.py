"""Issue 12 item 12: what the HTTP layer writes in one loop iteration leaves in as few TLS
records as the 2^14-byte limit allows.

A real listener in http mode on 127.0.0.1, a real upstream, and a raw TLS client: pyOpenSSL
on memory BIOs over an asyncio socket, so the test sees every record on the wire and opens
them one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import h11
import pytest
import pytest_asyncio
from OpenSSL import SSL

from pqproxy.devcert import DevCertPaths
from pqproxy.io.http_proxy import HttpSettings
from pqproxy.io.tls_server import TLSListener
from pqproxy.io.upstream import PoolSettings, UpstreamPool
from tests.inprocess import local_listener_settings
from tests.peers import client_context, drain_bio, memory_client

WAIT = 10.0
MAX_PLAINTEXT = 1 << 14
APPLICATION_DATA = 23

pytestmark = pytest.mark.asyncio


@dataclass
class Record:
    content_type: int
    body: bytes
    plaintext: bytes = b""
    closed: bool = False  # the record was close_notify


@dataclass
class RawTLSClient:
    """A TLS 1.3 client whose records the test sees before they are opened."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    tls: SSL.Connection
    pending: bytearray = field(default_factory=bytearray)

    async def _send_output(self) -> None:
        out = drain_bio(self.tls)
        if out:
            self.writer.write(out)
            await self.writer.drain()

    async def handshake(self) -> None:
        for _ in range(50):
            try:
                self.tls.do_handshake()
                await self._send_output()
                return
            except SSL.WantReadError:
                await self._send_output()
            data = await asyncio.wait_for(self.reader.read(65536), WAIT)
            assert data, "server closed during the handshake"
            self.tls.bio_write(data)
        raise AssertionError("handshake did not finish")

    async def send(self, data: bytes) -> None:
        self.tls.sendall(data)
        await self._send_output()

    async def record(self) -> Record | None:
        """The next record from the wire, opened; None at EOF."""
        while True:
            if len(self.pending) >= 5:
                length = int.from_bytes(self.pending[3:5], "big")
                if len(self.pending) >= 5 + length:
                    raw = bytes(self.pending[: 5 + length])
                    del self.pending[: 5 + length]
                    return self._open(raw)
            data = await asyncio.wait_for(self.reader.read(65536), WAIT)
            if not data:
                return None
            self.pending += data

    def _open(self, raw: bytes) -> Record:
        record = Record(raw[0], raw[5:])
        self.tls.bio_write(raw)
        chunks = []
        try:
            while True:
                chunks.append(self.tls.recv(65536))
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            record.closed = True
        record.plaintext = b"".join(chunks)
        return record

    async def answer(self, method: bytes = b"GET") -> tuple[list[Record], bytes]:
        """Records up to the end of one HTTP response: those carrying its bytes."""
        parser = h11.Connection(h11.CLIENT)
        # The parser must believe it sent a request to read a response.
        parser.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        parser.send(h11.EndOfMessage())
        records: list[Record] = []
        body = b""
        while True:
            record = await self.record()
            assert record is not None, "EOF before the response ended"
            if record.closed and not record.plaintext:
                raise AssertionError("close_notify before the response ended")
            records.append(record)
            parser.receive_data(record.plaintext)
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    break
                if isinstance(event, h11.Data):
                    body += event.data
                if isinstance(event, h11.EndOfMessage):
                    return records, body


class OneWriteUpstream:
    """An HTTP/1.1 server that answers every request with one ``write`` of a fixed response,
    so that the proxy reads head and body together."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
                if not head:
                    break
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                    + b"content-length: %d\r\n\r\n" % len(self.body)
                    + self.body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
            self.writers.discard(writer)


Connect = Callable[[], Awaitable[RawTLSClient]]


@pytest_asyncio.fixture
async def proxy(dev_certs: DevCertPaths) -> AsyncIterator[Callable[[bytes], Awaitable[Connect]]]:
    cleanups: list[Callable[[], Awaitable[None]]] = []
    clients: list[RawTLSClient] = []

    async def start(body: bytes) -> Connect:
        upstream = OneWriteUpstream(body)
        upstream.server = await asyncio.start_server(upstream._handle, "127.0.0.1", 0)
        pool = UpstreamPool(
            PoolSettings(name="one", servers=(("127.0.0.1", upstream.port),), health_check=None)
        )
        await pool.start()
        settings = local_listener_settings(
            dev_certs,
            upstream.port,
            mode="http",
            http=HttpSettings(),
            pool=pool,
        )
        listener = TLSListener(settings)
        await listener.start()

        async def stop() -> None:
            for client in clients:
                client.writer.close()
                with contextlib.suppress(ConnectionError):
                    await asyncio.wait_for(client.writer.wait_closed(), WAIT)
            await listener.close(grace=1.0)
            await pool.close()
            assert upstream.server is not None
            upstream.server.close()
            for writer in list(upstream.writers):
                writer.close()
            await asyncio.wait_for(upstream.server.wait_closed(), WAIT)

        cleanups.append(stop)

        async def connect() -> RawTLSClient:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            client = RawTLSClient(
                reader, writer, memory_client(client_context(ca=dev_certs.ca, alpn=[b"http/1.1"]))
            )
            clients.append(client)
            await client.handshake()
            return client

        return connect

    yield start
    for stop in cleanups:
        await stop()


async def test_item12_error_answer_is_one_record(
    proxy: Callable[[bytes], Awaitable[Connect]],
) -> None:
    connect = await proxy(b"unused")
    client = await connect()
    await client.send(b"NOT A REQUEST\r\n\r\n")
    records, body = await client.answer()
    assert [r.content_type for r in records] == [APPLICATION_DATA]
    assert records[0].plaintext.startswith(b"HTTP/1.1 400 ")
    assert body  # head and body of the error answer, together
    # The connection then closes with close_notify: what was queued went out first.
    end = await client.record()
    assert end is not None and end.closed


async def test_item12_small_response_is_one_record(
    proxy: Callable[[bytes], Awaitable[Connect]],
) -> None:
    connect = await proxy(b"hello, records")
    client = await connect()
    for _ in range(3):  # every answer on a keep-alive connection, not just the first
        await client.send(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        records, body = await client.answer()
        assert body == b"hello, records"
        assert len(records) == 1, [len(r.plaintext) for r in records]
        assert records[0].plaintext.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_item12_large_response_fills_records_to_the_limit(
    proxy: Callable[[bytes], Awaitable[Connect]],
) -> None:
    payload = bytes(range(256)) * 160  # 40 KiB: three records at least
    connect = await proxy(payload)
    client = await connect()
    await client.send(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
    records, body = await client.answer()
    assert body == payload
    sizes = [len(r.plaintext) for r in records]
    assert max(sizes) <= MAX_PLAINTEXT
    # The head rides with the first body bytes, and records are full except where a read
    # from the upstream ended: never one record per write.
    assert records[0].plaintext.startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(records[0].plaintext) > 1000
    total = sum(sizes)
    assert len(records) <= -(-total // MAX_PLAINTEXT) + 2, sizes
