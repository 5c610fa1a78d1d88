"""The HTTP/1.1 proxy session (``pqproxy/io/http_proxy.py``) end to end in one process.

A real ``TLSListener`` in http mode on 127.0.0.1:0 with a real ``UpstreamPool``; clients are the
stdlib ``ssl`` over ``asyncio.open_connection`` (classical x25519), writing raw request bytes so
each test says exactly what goes on the wire. Upstreams are h11 servers written here, driven by
a handler per test, so each test controls what the upstream answers and when, and sees what it
received.

No sleeps stand in for synchronisation: the test and its upstream hand off through
``asyncio.Event`` and queues, and every wait is bounded by ``WAIT``. The clock matters only where
it is the subject: the timeouts the tests provoke (0.3 s deadlines, awaited with a bound), the
ejection window, and the one timing assertion (token events are not coalesced), which keeps a
wide margin.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import h11
import pytest
import pytest_asyncio

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.provider import CertifiedKey
from pqproxy.demo_upstream import serve_demo_upstream
from pqproxy.devcert import DevCertPaths
from pqproxy.io.http_proxy import HttpSettings
from pqproxy.io.tls_server import ConnectionClosed, ListenerSettings, TLSListener
from pqproxy.io.upstream import HealthCheckSettings, PoolSettings, UpstreamPool
from pqproxy.tls.enums import NamedGroup
from pqproxy.tls.events import HandshakeComplete
from pqproxy.tls.server import ServerConfig

pytestmark = pytest.mark.asyncio

# Upper bound for any single wait; far above what a healthy run needs.
WAIT = 10.0
PROVIDER = OpenSSLProvider()
Headers = list[tuple[bytes, bytes]]


async def within(awaitable: Awaitable[Any], timeout: float = WAIT) -> Any:
    return await asyncio.wait_for(awaitable, timeout)


# -- the upstream ------------------------------------------------------------------------------


@dataclass
class Received:
    """One request as the upstream saw it."""

    conn_id: int
    method: bytes
    target: bytes
    headers: Headers
    body: bytes = b""

    def values(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [value for field_name, value in self.headers if field_name == key]

    def value(self, name: str) -> bytes:
        (value,) = self.values(name)
        return value


class Exchange:
    """One request on an upstream connection, handed to the test's handler."""

    def __init__(
        self,
        upstream: ScriptedUpstream,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        received: Received,
    ) -> None:
        self.upstream = upstream
        self.conn = conn
        self.reader = reader
        self.writer = writer
        self.received = received

    async def next_body_event(self) -> h11.Data | h11.EndOfMessage:
        event = await self.upstream.next_event(self.conn, self.reader)
        if isinstance(event, h11.Data):
            self.received.body += bytes(event.data)
            return event
        assert isinstance(event, h11.EndOfMessage), event
        return event

    async def read_body(self) -> bytes:
        while self.conn.their_state is h11.SEND_BODY:
            await self.next_body_event()
        return self.received.body

    async def send(self, *events: h11.Event) -> None:
        for event in events:
            data = self.conn.send(event)
            if data:
                self.writer.write(data)
        await within(self.writer.drain())

    async def respond(
        self, status: int = 200, body: bytes = b"", headers: Headers | None = None
    ) -> None:
        await self.read_body()
        fields = list(headers or [(b"content-type", b"application/json")])
        fields.append((b"content-length", str(len(body)).encode()))
        await self.send(
            h11.Response(status_code=status, headers=fields),
            h11.Data(data=body),
            h11.EndOfMessage(),
        )


Handler = Callable[[Exchange], Awaitable[None]]


async def answer_who(ex: Exchange) -> None:
    """Default handler: 200 with a JSON body naming the request and its upstream connection."""
    body = await ex.read_body()
    payload = {
        "port": ex.upstream.port,
        "conn": ex.received.conn_id,
        "target": ex.received.target.decode(),
        "body": body.decode("latin-1"),
    }
    await ex.respond(200, json.dumps(payload).encode())


class ScriptedUpstream:
    """An h11 server whose every request is answered by ``handler``; it counts accepted
    connections and received bytes and records every request head and body."""

    def __init__(self, handler: Handler = answer_who) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.connections = 0
        self.bytes_received = 0
        self.requests: list[Received] = []
        self.request_seen: asyncio.Queue[Received] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._port = 0

    @property
    def port(self) -> int:
        return self._port

    def served(self, exclude_health: bool = True) -> list[Received]:
        return [r for r in self.requests if not (exclude_health and r.target == b"/health")]

    async def start(self, port: int = 0) -> None:
        # A plain callback that starts a task of ours: asyncio reports a cancelled task of its
        # own (a coroutine callback) to the loop's exception handler, and close() cancels.
        self.server = await asyncio.start_server(self._spawn, "127.0.0.1", port, reuse_address=True)
        self._port = self.server.sockets[0].getsockname()[1]

    async def next_event(self, conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event), event
                return event
            data = await within(reader.read(65536))
            self.bytes_received += len(data)
            conn.receive_data(data)

    def _spawn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.create_task(self._accept(self.connections, reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(
        self, conn_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await self._serve(conn_id, reader, writer)
        except (ConnectionError, TimeoutError, h11.ProtocolError):
            pass  # the proxy went away, or the test's handler said so
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _serve(
        self, conn_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = await self.next_event(conn, reader)
            if not isinstance(event, h11.Request):
                return
            received = Received(conn_id, event.method, event.target, list(event.headers))
            self.requests.append(received)
            self.request_seen.put_nowait(received)
            await self.handler(Exchange(self, conn, reader, writer, received))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def close(self) -> None:
        """Stop listening and end every connection (the proxy sees them closed)."""
        if self.server is not None:
            self.server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=WAIT)
        if self.server is not None:
            await within(self.server.wait_closed())
            self.server = None


UpstreamFactory = Callable[..., Awaitable[ScriptedUpstream]]


@pytest_asyncio.fixture
async def make_upstream() -> AsyncIterator[UpstreamFactory]:
    started: list[ScriptedUpstream] = []

    async def make(handler: Handler = answer_who, port: int = 0) -> ScriptedUpstream:
        upstream = ScriptedUpstream(handler)
        await upstream.start(port)
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        await upstream.close()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port bound but not listening: a connect to it is refused, and nothing else can take it
    while the test runs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose connects hang: a listening socket with a backlog of 0 that never accepts,
    its one queue slot already taken, so the kernel drops every further SYN."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        filler.settimeout(WAIT)
        filler.connect(sock.getsockname())
        yield sock.getsockname()[1]
    finally:
        filler.close()
        sock.close()


# -- the proxy ---------------------------------------------------------------------------------


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
    """Everything that reaches the loop's exception handler; asserted empty after each test."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(previous)
    assert errors == [], f"exceptions reached the event loop: {errors}"


@dataclass
class Proxy:
    listener: TLSListener
    pool: UpstreamPool
    handshakes: list[HandshakeComplete] = field(default_factory=list)
    closed: asyncio.Queue[ConnectionClosed] = field(default_factory=asyncio.Queue)

    @property
    def port(self) -> int:
        return self.listener.port


class ProxyFactory(Protocol):
    async def __call__(
        self,
        *ports: int,
        http: HttpSettings | None = None,
        write_high_water: int = 1 << 20,
        **pool: Any,
    ) -> Proxy: ...


@pytest_asyncio.fixture
async def make_proxy(
    certified: CertifiedKey, loop_errors: list[dict[str, Any]]
) -> AsyncIterator[ProxyFactory]:
    proxies: list[Proxy] = []

    async def make(
        *ports: int,
        http: HttpSettings | None = None,
        write_high_water: int = 1 << 20,
        **pool_options: Any,
    ) -> Proxy:
        pool_options.setdefault("health_check", None)
        pool_options.setdefault("connect_timeout", WAIT / 2)
        pool = UpstreamPool(
            PoolSettings(
                name="test", servers=tuple(("127.0.0.1", p) for p in ports), **pool_options
            )
        )
        settings = ListenerSettings(
            host="127.0.0.1",
            port=0,
            server_config=ServerConfig(certificates=(certified,)),
            provider=PROVIDER,
            upstream_host="127.0.0.1",
            upstream_port=ports[0],
            mode="http",
            http=http or HttpSettings(),
            pool=pool,
            write_high_water=write_high_water,
        )
        proxy = Proxy(TLSListener(settings), pool)
        proxy.listener.on_handshake = lambda event, _peer: proxy.handshakes.append(event)
        proxy.listener.on_terminated = proxy.closed.put_nowait
        await pool.start()
        await proxy.listener.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.listener.close(grace=WAIT)
        await proxy.pool.close()


# -- the client --------------------------------------------------------------------------------


def http_request(
    method: str = "GET",
    target: str = "/",
    *headers: tuple[str, str],
    body: bytes = b"",
    host: str | None = "api.test",
) -> bytes:
    """Raw request bytes, exactly as given. Adds Host (unless None) and, when there is a body
    and no framing header among ``headers``, Content-Length."""
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    framed = any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers)
    if body and not framed:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"


@dataclass
class Response:
    status: int
    headers: Headers
    body: bytes

    def values(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [value for field_name, value in self.headers if field_name == key]

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A TLS client writing raw bytes and parsing responses with h11, one fresh h11 client per
    response (h11 cannot pipeline), carrying any bytes past a response to the next."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._parser: h11.Connection | None = None
        self._leftover = b""
        self._eof = False

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext) -> Client:
        reader, writer = await within(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        )
        return cls(reader, writer)

    @property
    def cipher(self) -> str:
        ssl_object = self.writer.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        cipher = ssl_object.cipher()
        assert cipher is not None
        return cipher[0]

    @property
    def eof(self) -> bool:
        """Whether the proxy has closed the connection (as far as this client has read)."""
        return self._eof

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await within(self.writer.drain())

    async def next_event(self) -> h11.Event:
        if self._parser is None:
            parser = h11.Connection(h11.CLIENT)
            # Put the parser in the state of a client that sent a GET, so it takes a response.
            parser.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            parser.send(h11.EndOfMessage())
            if self._leftover or self._eof:
                parser.receive_data(self._leftover)
                if self._eof:
                    parser.receive_data(b"")
            self._leftover = b""
            self._parser = parser
        parser = self._parser
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                data = await within(self.reader.read(65536))
                self._eof = not data
                parser.receive_data(data)
                continue
            assert isinstance(event, h11.Event), event
            if isinstance(event, h11.EndOfMessage):
                self._leftover, _closed = parser.trailing_data
                self._parser = None
            return event

    async def response(self) -> Response:
        head = await self.next_event()
        while isinstance(head, h11.InformationalResponse):
            head = await self.next_event()
        assert isinstance(head, h11.Response), head
        body = bytearray()
        while True:
            event = await self.next_event()
            if isinstance(event, h11.EndOfMessage):
                return Response(head.status_code, list(head.headers), bytes(body))
            assert isinstance(event, h11.Data), event
            body += event.data

    async def request(self, data: bytes) -> Response:
        await self.send(data)
        return await self.response()

    async def read_until_closed(self) -> bytes:
        """Whatever arrives until the proxy closes the connection (bounded)."""
        rest = self._leftover
        self._leftover = b""
        while not self._eof:
            data = await within(self.reader.read(65536))
            self._eof = not data
            rest += data
        return rest

    async def close(self) -> None:
        self.writer.close()
        try:
            await within(self.writer.wait_closed())
        except (ConnectionError, ssl.SSLError):
            pass  # the proxy may already have closed its side


@pytest_asyncio.fixture
async def connect(client_ctx: ssl.SSLContext) -> AsyncIterator[Callable[[int], Awaitable[Client]]]:
    clients: list[Client] = []

    async def make(port: int) -> Client:
        client = await Client.connect(port, client_ctx)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


Connect = Callable[[int], Awaitable[Client]]


def assert_json_error(response: Response, status: int) -> dict[str, Any]:
    assert response.status == status, (response.status, response.body)
    assert response.values("content-type") == [b"application/json"]
    payload = response.json()
    assert set(payload) == {"error"}
    error = payload["error"]
    assert isinstance(error, dict)
    assert error["status"] == status
    assert isinstance(error["message"], str) and error["message"]
    return error


# -- forwarding --------------------------------------------------------------------------------


async def test_forwarding_headers_added_and_hop_by_hop_removed(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    async def handler(ex: Exchange) -> None:
        await ex.respond(
            200,
            b"{}",
            headers=[
                (b"content-type", b"application/json"),
                (b"connection", b"x-upstream-secret"),
                (b"x-upstream-secret", b"1"),
                (b"keep-alive", b"timeout=3"),
                (b"x-kept", b"yes"),
            ],
        )

    upstream = await make_upstream(handler)
    proxy = await make_proxy(upstream.port)
    client = await connect(proxy.port)
    response = await client.request(
        http_request(
            "GET",
            "/v1/models?key=1",
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "http"),
            ("X-Forwarded-Host", "evil.test"),
            ("Via", "1.0 cdn"),
            ("X-PQ-TLS-Group", "forged"),
            ("x-pq-tls-cipher", "forged"),
            ("Connection", "keep-alive, X-Custom"),
            ("X-Custom", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("Authorization", "Bearer end-to-end"),
        )
    )
    assert response.status == 200

    (seen,) = upstream.requests
    assert seen.method == b"GET" and seen.target == b"/v1/models?key=1"
    assert seen.value("host") == b"api.test"
    assert seen.value("x-forwarded-for") == b"203.0.113.7, 127.0.0.1"
    assert seen.value("x-forwarded-proto") == b"https"
    assert seen.value("x-forwarded-host") == b"api.test"
    assert seen.value("via") == b"1.0 cdn, 1.1 pqproxy"
    # The stdlib's OpenSSL 3.0 offers no hybrid: classical x25519 is what it negotiated.
    assert proxy.handshakes[0].group == NamedGroup.x25519
    assert seen.values("x-pq-tls-group") == [b"x25519"]
    assert seen.values("x-pq-tls-cipher") == [client.cipher.encode()]
    assert seen.value("x-pq-tls-resumed") == b"0"
    assert seen.value("authorization") == b"Bearer end-to-end"
    names = {name for name, _ in seen.headers}
    for hop in (
        b"connection",
        b"x-custom",
        b"keep-alive",
        b"te",
        b"upgrade",
        b"proxy-authorization",
    ):
        assert hop not in names, hop
    assert b"secret" not in b"".join(value for _, value in seen.headers)

    # The response side: the upstream's hop-by-hop fields stop here too, Via is added.
    response_names = {name for name, _ in response.headers}
    assert b"x-upstream-secret" not in response_names
    assert b"keep-alive" not in response_names
    assert response.values("x-kept") == [b"yes"]
    assert response.values("via") == [b"1.1 pqproxy"]


async def test_connection_upgrade_is_not_forwarded(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    upstream = await make_upstream()
    proxy = await make_proxy(upstream.port)
    client = await connect(proxy.port)
    response = await client.request(
        http_request("GET", "/ws", ("Connection", "Upgrade"), ("Upgrade", "websocket"))
    )
    assert response.status == 200
    names = {name for name, _ in upstream.requests[0].headers}
    assert b"upgrade" not in names and b"connection" not in names
    # The refused upgrade leaves an ordinary keep-alive connection.
    assert (await client.request(http_request("GET", "/after"))).status == 200
    assert [r.target for r in upstream.requests] == [b"/ws", b"/after"]


# -- keep-alive and pipelining -----------------------------------------------------------------


async def test_keep_alive_reuses_one_upstream_connection(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    upstream = await make_upstream()
    proxy = await make_proxy(upstream.port)
    client = await connect(proxy.port)
    first = await client.request(http_request("GET", "/one"))
    second = await client.request(http_request("POST", "/two", body=b'{"x":1}'))
    assert (first.status, second.status) == (200, 200)
    assert first.json()["target"] == "/one"
    assert second.json()["target"] == "/two" and second.json()["body"] == '{"x":1}'
    assert upstream.connections == 1
    assert [r.conn_id for r in upstream.requests] == [1, 1]
    assert len(proxy.handshakes) == 1
    assert proxy.pool.idle_count(proxy.pool.servers[0]) == 1


async def test_pipelined_requests_are_answered_in_order(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    release_first = asyncio.Event()

    async def handler(ex: Exchange) -> None:
        if ex.received.target == b"/1":
            await within(release_first.wait())
        await answer_who(ex)

    upstream = await make_upstream(handler)
    proxy = await make_proxy(upstream.port)
    client = await connect(proxy.port)
    await client.send(
        http_request("GET", "/1")
        + http_request("POST", "/2", body=b"two")
        + http_request("GET", "/3")
    )
    first_seen = await within(upstream.request_seen.get())
    assert first_seen.target == b"/1"
    # The first answer is held back; requests 2 and 3 are already at the proxy, and an
    # upstream that would answer them at once is waiting for them.
    assert upstream.request_seen.empty()
    release_first.set()
    responses = [await client.response() for _ in range(3)]
    assert [r.status for r in responses] == [200, 200, 200]
    assert [r.json()["target"] for r in responses] == ["/1", "/2", "/3"]
    assert responses[1].json()["body"] == "two"
    assert [r.target for r in upstream.requests] == [b"/1", b"/2", b"/3"]
    assert upstream.connections == 1


# -- streaming ---------------------------------------------------------------------------------


def streaming_handler(content_type: bytes, parts: list[bytes], release: asyncio.Event) -> Handler:
    """Sends ``parts[0]``, waits for ``release``, then the rest, chunked."""

    async def handler(ex: Exchange) -> None:
        await ex.read_body()
        await ex.send(
            h11.Response(
                status_code=200,
                headers=[(b"content-type", content_type), (b"transfer-encoding", b"chunked")],
            ),
            h11.Data(data=parts[0]),
        )
        await within(release.wait())
        for part in parts[1:]:
            await ex.send(h11.Data(data=part))
        await ex.send(h11.EndOfMessage())

    return handler


@pytest.mark.parametrize(
    ("content_type", "parts"),
    [
        (b"text/event-stream", [b"data: event-1\n\n", b"data: event-2\n\n", b"data: [DONE]\n\n"]),
        (b"application/x-ndjson", [b'{"token":1}\n', b'{"token":2}\n', b'{"done":true}\n']),
    ],
    ids=["sse", "chunked"],
)
async def test_response_streams_without_buffering(
    make_proxy: ProxyFactory,
    make_upstream: UpstreamFactory,
    connect: Connect,
    content_type: bytes,
    parts: list[bytes],
) -> None:
    release = asyncio.Event()
    upstream = await make_upstream(streaming_handler(content_type, parts, release))
    proxy = await make_proxy(upstream.port)
    client = await connect(proxy.port)
    await client.send(http_request("POST", "/v1/chat/completions", body=b'{"stream":true}'))
    head = await client.next_event()
    assert isinstance(head, h11.Response) and head.status_code == 200
    assert dict(head.headers)[b"content-type"] == content_type
    # Re-framed for the client as chunked: no length is known while the stream runs.
    assert dict(head.headers)[b"transfer-encoding"] == b"chunked"

    # The first part must come through while the upstream is still holding the rest: a proxy
    # that buffered to the end of the response would never deliver it, and this wait fails.
    body = b""
    while len(body) < len(parts[0]):
        event = await client.next_event()
        assert isinstance(event, h11.Data), event
        body += bytes(event.data)
    assert body == parts[0]
    assert not release.is_set()

    release.set()
    while True:
        event = await client.next_event()
        if isinstance(event, h11.EndOfMessage):
            break
        assert isinstance(event, h11.Data), event
        body += bytes(event.data)
    assert body == b"".join(parts)
    # The connection is still good for another request.
    upstream.handler = answer_who
    assert (await client.request(http_request("GET", "/next"))).status == 200


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_request_body_streams_to_upstream(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect, framing: str
) -> None:
    first, second = b"first-part;", b"second-part"
    chunks: asyncio.Queue[bytes] = asyncio.Queue()

    async def handler(ex: Exchange) -> None:
        while True:
            event = await ex.next_body_event()
            if isinstance(event, h11.EndOfMessage):
                break
            chunks.put_nowait(bytes(event.data))
        await ex.respond(200, ex.received.body)

    upstream = await make_upstream(handler)
    proxy = await make_proxy(upstream.port)
    client = await connect(proxy.port)
    if framing == "chunked":
        head = http_request("POST", "/upload", ("Transfer-Encoding", "chunked"))
        await client.send(head + chunk(first))
    else:
        length = str(len(first) + len(second))
        await client.send(http_request("POST", "/upload", ("Content-Length", length)) + first)

    # The upstream has the first part before the client has sent the second.
    got = b""
    while len(got) < len(first):
        got += await within(chunks.get())
    assert got == first

    await client.send(chunk(second) + LAST_CHUNK if framing == "chunked" else second)
    response = await client.response()
    assert response.status == 200
    assert response.body == first + second
    (seen,) = upstream.requests
    if framing == "chunked":
        assert seen.values("transfer-encoding") == [b"chunked"]
        assert seen.values("content-length") == []
    else:
        assert seen.values("content-length") == [str(len(first) + len(second)).encode()]


async def test_slow_upload_is_not_an_upstream_read_timeout(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    """The upstream read timeout counts the upstream's silence once it has the
    whole request; an upload slower than that timeout is not a dead upstream."""
    first, second = b"first-part;", b"second-part"
    chunks: asyncio.Queue[bytes] = asyncio.Queue()

    async def handler(ex: Exchange) -> None:
        while True:
            event = await ex.next_body_event()
            if isinstance(event, h11.EndOfMessage):
                break
            chunks.put_nowait(bytes(event.data))
        await ex.respond(200, ex.received.body)

    read_timeout = 0.2
    upstream = await make_upstream(handler)
    proxy = await make_proxy(upstream.port, http=HttpSettings(upstream_read_timeout=read_timeout))
    client = await connect(proxy.port)
    await client.send(
        http_request("POST", "/upload", ("Transfer-Encoding", "chunked")) + chunk(first)
    )
    assert await within(chunks.get()) == first
    # The slowness under test: the client pauses for longer than the upstream
    # read timeout before sending the rest of its body.
    await asyncio.sleep(read_timeout * 2.5)
    await client.send(chunk(second) + LAST_CHUNK)
    response = await client.response()
    assert response.status == 200
    assert response.body == first + second


async def test_slow_client_stops_the_proxy_reading_the_upstream(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    """A client that does not read: the proxy holds at most about its high-water mark and
    leaves the rest in the upstream's socket, instead of buffering the whole response."""
    high_water, piece, total = 64 * 1024, 64 * 1024, 16 << 20
    upstream_blocked = asyncio.Event()

    async def handler(ex: Exchange) -> None:
        await ex.read_body()
        await ex.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]))
        for _ in range(total // piece):
            data = ex.conn.send(h11.Data(data=b"x" * piece))
            assert data is not None
            ex.writer.write(data)
            if ex.writer.transport.get_write_buffer_size() > 0:
                # The kernel took no more: everything between here and the client is full.
                upstream_blocked.set()
            await within(ex.writer.drain())
        await ex.send(h11.EndOfMessage())

    upstream = await make_upstream(handler)
    proxy = await make_proxy(upstream.port, write_high_water=high_water)
    client = await connect(proxy.port)
    await client.send(http_request("GET", "/big"))
    # Without backpressure the proxy would drain the upstream socket as fast as it fills, into
    # its own memory, and this would never happen.
    await within(upstream_blocked.wait())
    (snap,) = proxy.listener.snapshot()
    # The high-water mark plus what one upstream read and its TLS records can add.
    assert snap.buffered_to_client <= high_water + 4 * piece, snap
    response = await client.response()
    assert response.status == 200
    assert len(response.body) == total and set(response.body) == {ord("x")}


async def test_demo_token_stream_is_not_coalesced(
    make_proxy: ProxyFactory, connect: Connect
) -> None:
    # 0.1 s: a loaded machine (measured: three busy processes on two cores) delays a read by
    # up to ~30 ms, which 0.05 s with a 0.025 s floor did not absorb.
    interval, tokens = 0.1, 6
    demo = await serve_demo_upstream("127.0.0.1", 0, tokens=tokens, token_interval=interval)
    try:
        proxy = await make_proxy(demo.sockets[0].getsockname()[1])
        client = await connect(proxy.port)
        loop = asyncio.get_running_loop()
        await client.send(
            http_request(
                "POST",
                "/v1/chat/completions",
                ("Content-Type", "application/json"),
                body=b'{"model":"pqproxy-demo","stream":true,"messages":[]}',
            )
        )
        head = await client.next_event()
        assert isinstance(head, h11.Response) and head.status_code == 200
        pending = b""
        events: list[tuple[float, bytes]] = []
        while True:
            event = await client.next_event()
            if isinstance(event, h11.EndOfMessage):
                break
            assert isinstance(event, h11.Data), event
            now = loop.time()
            pending += bytes(event.data)
            while b"\n\n" in pending:
                sse, pending = pending.split(b"\n\n", 1)
                events.append((now, sse))
        assert pending == b""
        assert len(events) == tokens + 1
        assert events[-1][1] == b"data: [DONE]"
        text = "".join(
            json.loads(sse.removeprefix(b"data: "))["choices"][0]["delta"]["content"]
            for _, sse in events[:-1]
        )
        assert text == "post quantum hello from the pqproxy"
        # Each token left the upstream `interval` after the one before; through the proxy
        # they must still arrive apart (half the interval is a generous margin for jitter).
        # A proxy that held the stream, or pairs of events, would show gaps near zero.
        gaps = [b[0] - a[0] for a, b in zip(events[:tokens], events[1:tokens], strict=False)]
        assert len(gaps) == tokens - 1
        assert min(gaps) >= interval / 2, gaps
    finally:
        demo.close()
        await within(demo.wait_closed())


async def test_expect_100_continue_is_relayed(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    async def handler(ex: Exchange) -> None:
        assert ex.received.values("expect") == [b"100-continue"]
        await ex.send(h11.InformationalResponse(status_code=100, headers=[]))
        body = await ex.read_body()
        await ex.respond(200, b"got " + body)

    upstream = await make_upstream(handler)
    proxy = await make_proxy(upstream.port)
    client = await connect(proxy.port)
    body = b'{"prompt":"hello"}'
    await client.send(
        http_request("POST", "/upload", ("Expect", "100-continue"), ("Content-Length", "18"))
    )
    interim = await client.next_event()
    assert isinstance(interim, h11.InformationalResponse), interim
    assert interim.status_code == 100
    # Only now does the body go out.
    await client.send(body)
    response = await client.response()
    assert response.status == 200
    assert response.body == b"got " + body


# -- failures ----------------------------------------------------------------------------------


async def test_upstream_down_is_502(
    make_proxy: ProxyFactory, connect: Connect, dead_port: int
) -> None:
    proxy = await make_proxy(dead_port)
    client = await connect(proxy.port)
    response = await client.request(http_request("GET", "/v1/models"))
    error = assert_json_error(response, 502)
    assert error["type"] == "bad_gateway"
    # The upstream's address is for the log, not for the client.
    assert str(dead_port) not in response.body.decode()


async def test_upstream_connect_timeout_is_504(
    make_proxy: ProxyFactory, connect: Connect, unanswered_port: int
) -> None:
    proxy = await make_proxy(unanswered_port, connect_timeout=0.3)
    client = await connect(proxy.port)
    response = await client.request(http_request("GET", "/v1/models"))
    error = assert_json_error(response, 504)
    assert error["type"] == "gateway_timeout"
    assert proxy.pool.servers[0].consecutive_fails == 1


async def test_silent_upstream_is_504(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    never = asyncio.Event()

    async def handler(ex: Exchange) -> None:
        await ex.read_body()
        await within(never.wait())

    upstream = await make_upstream(handler)
    proxy = await make_proxy(upstream.port, http=HttpSettings(upstream_read_timeout=0.3))
    client = await connect(proxy.port)
    response = await client.request(http_request("GET", "/slow"))
    error = assert_json_error(response, 504)
    assert error["type"] == "gateway_timeout"
    assert len(upstream.requests) == 1
    # The request was read whole, so the client connection stays usable after the 504, as
    # nginx keeps it (issue 13, item 17); the silent upstream connection is the one closed.
    assert response.values("connection") == []
    assert not client.eof


async def test_oversized_header_is_431(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    upstream = await make_upstream()
    proxy = await make_proxy(upstream.port, http=HttpSettings(max_header_bytes=4096))
    client = await connect(proxy.port)
    response = await client.request(http_request("GET", "/", ("X-Big", "a" * 8192)))
    assert_json_error(response, 431)
    assert await client.read_until_closed() == b""
    assert upstream.connections == 0


async def test_declared_oversized_body_is_413_without_reading_it(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    upstream = await make_upstream()
    proxy = await make_proxy(upstream.port, http=HttpSettings(max_body_bytes=1024))
    client = await connect(proxy.port)
    # Only the head is sent: the answer must not wait for the 10 MiB it announces.
    response = await client.request(
        http_request("POST", "/v1/completions", ("Content-Length", str(10 << 20)))
    )
    error = assert_json_error(response, 413)
    assert error["type"] == "payload_too_large"
    assert response.values("connection") == [b"close"]
    assert await client.read_until_closed() == b""
    assert upstream.connections == 0


async def test_oversized_chunked_body_is_413(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    upstream = await make_upstream()
    proxy = await make_proxy(upstream.port, http=HttpSettings(max_body_bytes=1024))
    client = await connect(proxy.port)
    await client.send(http_request("POST", "/upload", ("Transfer-Encoding", "chunked")))
    # The upstream has the head before any of the body exists: a chunked body is counted as
    # it streams.
    await within(upstream.request_seen.get())
    await client.send(chunk(b"a" * 800) + chunk(b"b" * 800) + LAST_CHUNK)
    response = await client.response()
    assert_json_error(response, 413)
    assert await client.read_until_closed() == b""
    # The client's oversized body is not the upstream's failure.
    server = proxy.pool.servers[0]
    assert server.consecutive_fails == 0 and not server.is_ejected()


BAD_BODIES = {
    "oversized": chunk(b"a" * 800) + chunk(b"b" * 800) + LAST_CHUNK,
    "malformed-chunk": chunk(b"a" * 10) + b"zz\r\nnot a chunk size\r\n",
}


@pytest.mark.parametrize("fault", [*BAD_BODIES, "client-gone"])
@pytest.mark.parametrize("upstream_answers_early", [False, True], ids=["waiting", "answered"])
async def test_client_body_fault_does_not_count_against_upstream(
    make_proxy: ProxyFactory,
    make_upstream: UpstreamFactory,
    connect: Connect,
    client_ctx: ssl.SSLContext,
    fault: str,
    upstream_answers_early: bool,
) -> None:
    """A request body the proxy refuses (or a client that leaves mid-body) makes the proxy
    close its upstream connection; that is the client's doing, and with max_fails=1 a single
    wrongly counted failure would eject the only server and turn the next request into 502."""
    never = asyncio.Event()

    async def handler(ex: Exchange) -> None:
        if ex.received.target == b"/upload":
            if upstream_answers_early:
                # A model server may start its answer before the body is in (or stream it).
                await ex.send(
                    h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]),
                    h11.Data(data=b"early"),
                )
            await within(never.wait())
        await answer_who(ex)

    upstream = await make_upstream(handler)
    proxy = await make_proxy(
        upstream.port, http=HttpSettings(max_body_bytes=1024), max_fails=1, ejection_time=WAIT
    )
    server = proxy.pool.servers[0]
    client = await connect(proxy.port)
    await client.send(http_request("POST", "/upload", ("Transfer-Encoding", "chunked")))
    await within(upstream.request_seen.get())
    if upstream_answers_early:
        head = await client.next_event()
        assert isinstance(head, h11.Response) and head.status_code == 200
    if fault == "client-gone":
        await client.send(chunk(b"partial"))
        await client.close()
        closed = await within(proxy.closed.get())
        assert closed.handshake_complete
    else:
        await client.send(BAD_BODIES[fault])
        if not upstream_answers_early:
            assert_json_error(await client.response(), 413 if fault == "oversized" else 400)
        # Either way the connection ends (after an answered head, mid-response).
        await client.read_until_closed()
    assert server.consecutive_fails == 0 and not server.is_ejected()

    fresh = await connect(proxy.port)
    response = await fresh.request(http_request("GET", "/after"))
    assert response.status == 200 and response.json()["target"] == "/after"


async def test_stalled_request_head_is_408(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    upstream = await make_upstream()
    proxy = await make_proxy(upstream.port, http=HttpSettings(header_read_timeout=0.3))
    client = await connect(proxy.port)
    await client.send(b"GET /v1/models HTTP/1.1\r\nHost: api.test\r\n")
    response = await client.response()
    error = assert_json_error(response, 408)
    assert error["type"] == "request_timeout"
    assert await client.read_until_closed() == b""
    assert upstream.connections == 0


SMUGGLING = {
    "cl-and-te": http_request(
        "POST",
        "/",
        ("Content-Length", "6"),
        ("Transfer-Encoding", "chunked"),
        body=b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: api.test\r\n\r\n",
    ),
    "conflicting-cl": http_request(
        "POST", "/", ("Content-Length", "5"), ("Content-Length", "6"), body=b"hello!"
    ),
    "te-gzip": http_request("POST", "/", ("Transfer-Encoding", "gzip"), body=b"0\r\n\r\n"),
}


@pytest.mark.parametrize("wire", list(SMUGGLING.values()), ids=list(SMUGGLING))
async def test_ambiguous_framing_is_400_and_never_reaches_upstream(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect, wire: bytes
) -> None:
    upstream = await make_upstream()
    proxy = await make_proxy(upstream.port)
    client = await connect(proxy.port)
    response = await client.request(wire)
    error = assert_json_error(response, 400)
    assert error["type"] == "bad_request"
    assert response.values("connection") == [b"close"]
    # Nothing after the refused head is read as a request: the connection ends.
    assert await client.read_until_closed() == b""
    assert upstream.connections == 0
    assert upstream.bytes_received == 0


async def test_malformed_upstream_response_is_502(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    async def handler(ex: Exchange) -> None:
        await ex.read_body()
        ex.writer.write(b"this is not HTTP\r\n\r\n")
        await within(ex.writer.drain())
        ex.writer.close()

    upstream = await make_upstream(handler)
    proxy = await make_proxy(upstream.port)
    client = await connect(proxy.port)
    response = await client.request(http_request("GET", "/v1/models"))
    assert_json_error(response, 502)
    assert b"not HTTP" not in response.body
    assert proxy.pool.servers[0].consecutive_fails == 1


@pytest.mark.parametrize("how", ["upstream-closes", "upstream-stalls"])
async def test_stream_cut_upstream_side_reaches_client_as_incomplete(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect, how: str
) -> None:
    """After the response head is out, no status can say the upstream failed: the client must
    see the body end without its last chunk, never a clean (and silently short) end."""
    never = asyncio.Event()

    async def handler(ex: Exchange) -> None:
        await ex.read_body()
        await ex.send(
            h11.Response(
                status_code=200,
                headers=[
                    (b"content-type", b"text/event-stream"),
                    (b"transfer-encoding", b"chunked"),
                ],
            ),
            h11.Data(data=b"data: event-1\n\n"),
        )
        if how == "upstream-stalls":
            await within(never.wait())
        ex.writer.close()

    upstream = await make_upstream(handler)
    proxy = await make_proxy(upstream.port, http=HttpSettings(upstream_read_timeout=0.3))
    client = await connect(proxy.port)
    await client.send(http_request("POST", "/v1/chat/completions", body=b"{}"))
    head = await client.next_event()
    assert isinstance(head, h11.Response) and head.status_code == 200
    event = await client.next_event()
    assert isinstance(event, h11.Data) and bytes(event.data) == b"data: event-1\n\n"
    with pytest.raises(h11.RemoteProtocolError):
        await client.next_event()
    assert client.eof


async def test_client_leaving_mid_stream_closes_the_upstream_connection(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    """A client that goes away mid-stream must stop the generation it asked for: the proxy
    closes that upstream connection instead of reading the rest of the tokens for nobody."""
    upstream_saw_close = asyncio.Event()

    async def handler(ex: Exchange) -> None:
        await ex.read_body()
        await ex.send(
            h11.Response(status_code=200, headers=[(b"content-type", b"text/event-stream")]),
            h11.Data(data=b"data: event-1\n\n"),
        )
        # The model server would go on generating; it learns the request is gone from the
        # connection alone.
        assert await within(ex.reader.read(1)) == b""
        upstream_saw_close.set()

    upstream = await make_upstream(handler)
    proxy = await make_proxy(upstream.port)
    client = await connect(proxy.port)
    await client.send(http_request("POST", "/v1/chat/completions", body=b"{}"))
    assert isinstance(await client.next_event(), h11.Response)
    assert isinstance(await client.next_event(), h11.Data)
    # Gone without a close_notify: a crashed client, or a network path that died.
    client.writer.transport.abort()
    await within(upstream_saw_close.wait())
    server = proxy.pool.servers[0]
    closed = await within(proxy.closed.get())
    assert closed.handshake_complete
    assert server.outstanding == 0
    assert server.consecutive_fails == 0


async def test_upstream_closing_idle_keep_alive_is_retried_on_a_new_connection(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    """The upstream closes a pooled connection as the next request arrives (its keep-alive
    timer fired): the request never reached it, so the proxy sends it again, unseen."""

    async def handler(ex: Exchange) -> None:
        if ex.received.conn_id == 1 and ex.received.target == b"/second":
            ex.writer.close()
            return
        await answer_who(ex)

    upstream = await make_upstream(handler)
    proxy = await make_proxy(upstream.port, max_fails=1)
    client = await connect(proxy.port)
    assert (await client.request(http_request("GET", "/first"))).json()["conn"] == 1
    response = await client.request(http_request("GET", "/second"))
    assert response.status == 200 and response.json()["conn"] == 2
    assert [(r.conn_id, r.target) for r in upstream.requests] == [
        (1, b"/first"),
        (1, b"/second"),
        (2, b"/second"),
    ]
    assert proxy.pool.servers[0].consecutive_fails == 0


async def test_head_response_has_no_body(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    async def handler(ex: Exchange) -> None:
        if ex.received.method != b"HEAD":
            await answer_who(ex)
            return
        await ex.send(
            h11.Response(status_code=200, headers=[(b"content-length", b"1234")]),
            h11.EndOfMessage(),
        )

    upstream = await make_upstream(handler)
    proxy = await make_proxy(upstream.port)
    client = await connect(proxy.port)
    await client.send(http_request("HEAD", "/file"))
    # Parse by hand: the shared parser assumes GET and would wait for 1234 body bytes.
    head = b""
    while b"\r\n\r\n" not in head:
        data = await within(client.reader.read(65536))
        assert data, head
        head += data
    status_line, _, rest = head.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 200")
    assert b"content-length: 1234\r\n" in rest.lower()
    assert rest.endswith(b"\r\n\r\n")
    # Still in step: the next response starts right after the head.
    await client.send(http_request("GET", "/next"))
    response = await client.response()
    assert response.status == 200 and response.json()["target"] == "/next"


async def test_idle_keep_alive_connection_closes_quietly(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    upstream = await make_upstream()
    proxy = await make_proxy(upstream.port, http=HttpSettings(idle_timeout=0.3))
    client = await connect(proxy.port)
    assert (await client.request(http_request("GET", "/one"))).status == 200
    # No 408 for a client that merely stopped after a complete exchange: just the close.
    assert await client.read_until_closed() == b""
    closed = await within(proxy.closed.get())
    assert closed.reason == "keep-alive ended"


# -- retries, ejection, recovery ---------------------------------------------------------------


async def test_refused_connect_is_retried_on_the_next_server(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect, dead_port: int
) -> None:
    live = await make_upstream()
    proxy = await make_proxy(dead_port, live.port, balance="round_robin")
    dead_server, live_server = proxy.pool.servers
    client = await connect(proxy.port)
    response = await client.request(http_request("POST", "/v1/chat", body=b"{}"))
    assert response.status == 200
    assert response.json()["port"] == live.port and response.json()["body"] == "{}"
    # Round robin started at the dead server: its refusal was counted, the client saw none.
    assert dead_server.consecutive_fails == 1
    assert live_server.consecutive_fails == 0
    assert len(live.requests) == 1


async def send_and_record(client: Client, path: str) -> Response:
    response = await client.request(http_request("GET", path))
    assert response.status in (200, 503), response
    return response


async def test_failing_server_is_ejected_and_returns_on_probation(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    broken = True

    async def flaky(ex: Exchange) -> None:
        if broken:
            await ex.respond(503, b'{"error":"overloaded"}')
        else:
            await answer_who(ex)

    bad = await make_upstream(flaky)
    good = await make_upstream()
    proxy = await make_proxy(
        bad.port, good.port, balance="round_robin", max_fails=2, ejection_time=0.5
    )
    bad_server, _good_server = proxy.pool.servers
    client = await connect(proxy.port)

    # Round robin: bad, good, bad -> the second consecutive 503 ejects it.
    statuses = [(await send_and_record(client, f"/r{i}")).status for i in range(3)]
    assert statuses == [503, 200, 503]
    assert bad_server.is_ejected()
    assert len(bad.served()) == 2 and len(good.served()) == 1

    # Everything goes to the healthy one while the ejection lasts. (Checked right after the
    # ejection; the 0.5 s window is far longer than these four local requests.)
    for i in range(4):
        response = await send_and_record(client, f"/e{i}")
        assert response.status == 200 and response.json()["port"] == good.port
    assert len(bad.served()) == 2
    assert bad_server.is_ejected(), "the requests above outlasted the ejection window"

    broken = False
    await proxy.pool.wait_for_state(lambda: bad_server.ejected_until is None, timeout=WAIT)
    ports = {(await send_and_record(client, f"/b{i}")).json()["port"] for i in range(2)}
    assert ports == {bad.port, good.port}
    assert len(bad.served()) == 3
    # One success on probation clears the record.
    assert bad_server.consecutive_fails == 0


async def test_dead_server_leaves_by_health_check_and_comes_back(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    flaky = await make_upstream()
    good = await make_upstream()
    flaky_port = flaky.port
    proxy = await make_proxy(
        flaky.port,
        good.port,
        balance="round_robin",
        health_check=HealthCheckSettings(
            interval=0.05, timeout=1.0, healthy_threshold=1, unhealthy_threshold=1
        ),
        max_fails=2,
        ejection_time=0.3,
    )
    flaky_server, _ = proxy.pool.servers
    client = await connect(proxy.port)
    ports = {(await send_and_record(client, f"/a{i}")).json()["port"] for i in range(2)}
    assert ports == {flaky_port, good.port}

    await flaky.close()
    await proxy.pool.wait_for_state(lambda: not flaky_server.healthy, timeout=WAIT)
    for i in range(4):
        response = await send_and_record(client, f"/d{i}")
        assert response.status == 200 and response.json()["port"] == good.port

    revived = await make_upstream(port=flaky_port)
    await proxy.pool.wait_for_state(lambda: flaky_server.healthy, timeout=WAIT)
    ports = {(await send_and_record(client, f"/r{i}")).json()["port"] for i in range(2)}
    assert ports == {flaky_port, good.port}
    assert len(revived.served()) == 1


# -- drain -------------------------------------------------------------------------------------


async def test_drain_finishes_streams_closes_idle_and_refuses_new(
    make_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    release = asyncio.Event()
    parts = [b"data: event-1\n\n", b"data: event-2\n\n", b"data: [DONE]\n\n"]
    sse = streaming_handler(b"text/event-stream", parts, release)

    async def handler(ex: Exchange) -> None:
        if ex.received.target == b"/stream":
            await sse(ex)
        else:
            await answer_who(ex)

    upstream = await make_upstream(handler)
    proxy = await make_proxy(upstream.port)

    idle = await connect(proxy.port)
    assert (await idle.request(http_request("GET", "/idle"))).status == 200
    streaming = await connect(proxy.port)
    await streaming.send(http_request("POST", "/stream", body=b"{}"))
    head = await streaming.next_event()
    assert isinstance(head, h11.Response) and head.status_code == 200
    event = await streaming.next_event()
    assert isinstance(event, h11.Data) and bytes(event.data) == parts[0]

    port = proxy.port
    drain = asyncio.create_task(proxy.listener.drain(5.0))
    try:
        # The idle keep-alive connection closes at once, while the stream is still held.
        assert await idle.read_until_closed() == b""
        assert not release.is_set() and not drain.done()
        with pytest.raises(ConnectionRefusedError):
            await within(asyncio.open_connection("127.0.0.1", port))

        release.set()
        body = b""
        while True:
            event = await streaming.next_event()
            if isinstance(event, h11.EndOfMessage):
                break
            assert isinstance(event, h11.Data), event
            body += bytes(event.data)
        assert parts[0] + body == b"".join(parts)
        assert body.endswith(b"data: [DONE]\n\n")
        assert await streaming.read_until_closed() == b""
        await within(drain)
    finally:
        if not drain.done():
            drain.cancel()
    assert proxy.listener.active_connections == 0
