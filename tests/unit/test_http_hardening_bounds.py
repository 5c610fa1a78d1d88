"""Issue 13, bounds: every wait has a deadline, every buffer a cap, every socket error a
classified end.

- Item 4: ``timeouts.send``: a client that stops reading is aborted, client and upstream
  side, once no byte of its write buffer moved for that long (http and tcp mode).
- Item 5: the 64 KiB cap on an upstream response head holds however the head arrives.
- Item 6: at most 16 interim (1xx) responses per request.
- Item 7: a chunk is judged by its declared size: over ``max_body_bytes`` -> 413 at once; a
  chunk-size line over 16 hex digits -> 400.
- Item 8: a reset on either side is a classified end: a status when one can still be sent, an
  access-log line, a metric, never a traceback (tests/conftest.py fails any test whose log
  holds one).
- Item 17: after a 502 whose request was read whole, the connection stays and the pipelined
  request behind it is answered.

Clients are real TLS clients on real sockets; upstreams are raw origins that record what
they received (tests/unit/test_http_proxy.py) or write exactly the bytes a test gives them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from typing import Any

import h11
import pytest

from pqproxy.io.http_proxy import HttpSettings
from pqproxy.io.tls_server import CloseKind
from tests.unit import test_http_hardening_trust as trust
from tests.unit import test_http_proxy as base
from tests.unit.test_http_hardening_trust import ProxyFactory
from tests.unit.test_http_proxy import (
    LAST_CHUNK,
    Client,
    Connect,
    Exchange,
    UpstreamFactory,
    answer_who,
    assert_json_error,
    chunk,
    http_request,
    within,
)

pytestmark = pytest.mark.asyncio

# Fixtures used by name (see the modules they come from).
certified = base.certified
client_ctx = base.client_ctx
connect = base.connect
loop_errors = base.loop_errors
make_upstream = base.make_upstream
start_proxy = trust.start_proxy

SEND_TIMEOUT = 0.5
# The documented cap on interim responses per request (pqproxy.io.http_proxy).
MAX_INTERIM = 16


async def stalled_client(port: int, ctx: ssl.SSLContext) -> Client:
    """A TLS client whose socket takes almost nothing: a 4 KiB receive buffer, and a reader
    that the test never reads (asyncio stops reading the socket once 128 KiB are held)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await within(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)))
    reader, writer = await within(
        asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="localhost")
    )
    return Client(reader, writer)


def reset(client: Client) -> None:
    """Close with a TCP RST (SO_LINGER 0): a crashed client, not an orderly close."""
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()


# -- item 8: a reset is a classified end -------------------------------------------------------


async def test_item8_client_reset_as_the_answer_arrives_is_a_classified_end(
    start_proxy: ProxyFactory,
    make_upstream: UpstreamFactory,
    client_ctx: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client resets its connection the moment the upstream's answer reaches the proxy,
    many times over: whichever the proxy sees first, each request ends with an access-log
    line and the connection with a reason, and nothing escapes as a traceback."""
    caplog.set_level(logging.INFO, logger="pqproxy")
    clients: dict[bytes, Client] = {}

    async def handler(ex: Exchange) -> None:
        await ex.read_body()
        ex.writer.write(
            ex.conn.send(
                h11.Response(
                    status_code=200,
                    headers=[(b"content-type", b"text/event-stream"), (b"content-length", b"9")],
                )
            )
            + ex.conn.send(h11.Data(data=b"data: 1\n\n"))
        )
        reset(clients[ex.received.target])
        await within(ex.writer.drain())

    upstream = await make_upstream(handler)
    proxy = await start_proxy(upstream.port)
    rounds = 30
    for n in range(rounds):
        target = f"/r{n}".encode()
        clients[target] = client = await Client.connect(proxy.port, client_ctx)
        await client.send(http_request("GET", target.decode()))
        closed = await within(proxy.closed.get())
        assert closed.kind is not CloseKind.INTERNAL_ERROR, closed
    access = [r for r in caplog.records if r.name == "pqproxy.access"]
    assert len(access) == rounds, [r.getMessage() for r in access]
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]


async def test_item8_upstream_reset_while_the_body_streams_is_a_502_not_a_traceback(
    start_proxy: ProxyFactory,
    make_upstream: UpstreamFactory,
    connect: Connect,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The model server resets the connection while the proxy is still sending it the
    request body: the client gets a 502 (nothing of the response was sent), the access log
    a line, and the metrics a count."""
    caplog.set_level(logging.INFO, logger="pqproxy")
    got_head = asyncio.Event()

    async def handler(ex: Exchange) -> None:
        got_head.set()
        sock = ex.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ex.writer.transport.abort()

    upstream = await make_upstream(handler)
    proxy = await start_proxy(upstream.port)
    client = await connect(proxy.port)
    body = b"x" * (4 << 20)
    head = http_request("POST", "/v1/completions", ("Content-Length", str(len(body))))
    await client.send(head + body[: 64 << 10])
    await within(got_head.wait())
    # The rest of the body arrives after the upstream is gone.
    client.writer.write(body[64 << 10 :])
    response = await client.response()
    assert_json_error(response, 502)
    closed = await within(proxy.closed.get())
    assert closed.kind is not CloseKind.INTERNAL_ERROR, closed
    access = [r for r in caplog.records if r.name == "pqproxy.access"]
    assert len(access) == 1 and "status=502" in access[0].getMessage()


# -- item 4: a write deadline ------------------------------------------------------------------


def endless_stream(upstream_gone: asyncio.Event) -> Any:
    """An upstream that streams tokens for as long as the proxy takes them, and notes when
    the proxy closes its connection."""

    async def handler(ex: Exchange) -> None:
        await ex.read_body()
        await ex.send(
            h11.Response(
                status_code=200,
                headers=[
                    (b"content-type", b"text/event-stream"),
                    (b"transfer-encoding", b"chunked"),
                ],
            )
        )
        event = b"data: " + b"x" * 16384 + b"\n\n"
        try:
            while True:
                ex.writer.write(ex.conn.send(h11.Data(data=event)))
                # No deadline of our own: the proxy's send timeout is what must end this.
                await ex.writer.drain()
        except ConnectionError:
            upstream_gone.set()

    return handler


async def test_item4_http_client_that_stops_reading_is_aborted_on_both_sides(
    start_proxy: ProxyFactory,
    make_upstream: UpstreamFactory,
    client_ctx: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pqproxy")
    upstream_gone = asyncio.Event()
    upstream = await make_upstream(endless_stream(upstream_gone))
    proxy = await start_proxy(upstream.port, send_timeout=SEND_TIMEOUT, write_high_water=64 * 1024)
    client = await stalled_client(proxy.port, client_ctx)
    await client.send(http_request("POST", "/v1/chat/completions", body=b"{}"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await within(upstream_gone.wait())
    closed = await within(proxy.closed.get())
    assert closed.kind is CloseKind.SEND_TIMEOUT, closed
    assert loop.time() - started >= SEND_TIMEOUT
    assert proxy.count("pqproxy_send_timeouts_total", mode="http") == 1
    assert proxy.count("pqproxy_connections_total", result="send_timeout") == 1
    (line,) = [r.getMessage() for r in caplog.records if r.name == "pqproxy.access"]
    assert "status=200" in line
    server = proxy.pool.servers[0]
    assert server.outstanding == 0 and proxy.pool.idle_count(server) == 0
    client.writer.transport.abort()


async def test_item4_a_slow_but_steady_reader_is_not_aborted(
    start_proxy: ProxyFactory,
    make_upstream: UpstreamFactory,
    client_ctx: ssl.SSLContext,
) -> None:
    """The deadline is on progress, not on the whole transfer: a client that keeps taking
    bytes, however slowly, gets the whole response."""
    size = 1 << 20

    async def handler(ex: Exchange) -> None:
        await ex.respond(200, b"y" * size)

    upstream = await make_upstream(handler)
    proxy = await start_proxy(upstream.port, send_timeout=SEND_TIMEOUT, write_high_water=64 * 1024)
    client = await stalled_client(proxy.port, client_ctx)
    await client.send(http_request("GET", "/big"))
    received = b""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not received.endswith(b"y" * 64) or len(received) < size:
        data = await within(client.reader.read(16384))
        assert data, "the proxy closed the connection"
        received += data
        # Pacing, not synchronisation: this client reads ~160 KiB/s, so the transfer takes
        # several send timeouts while each one sees progress.
        await asyncio.sleep(0.1)
    assert loop.time() - started > 2 * SEND_TIMEOUT
    assert proxy.count("pqproxy_send_timeouts_total", mode="http") == 0
    await client.close()


async def test_item4_tcp_client_that_stops_reading_is_aborted_on_both_sides(
    start_proxy: ProxyFactory, client_ctx: ssl.SSLContext
) -> None:
    upstream_gone = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        try:
            while True:
                writer.write(b"z" * 65536)
                await writer.drain()
        except ConnectionError:
            upstream_gone.set()
        finally:
            writer.close()

    server = await asyncio.start_server(stream, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        proxy = await start_proxy(
            port, mode="tcp", http=None, send_timeout=SEND_TIMEOUT, write_high_water=64 * 1024
        )
        client = await stalled_client(proxy.port, client_ctx)
        await client.send(b"g")
        await within(upstream_gone.wait())
        closed = await within(proxy.closed.get())
        assert closed.kind is CloseKind.SEND_TIMEOUT, closed
        assert proxy.count("pqproxy_send_timeouts_total", mode="tcp") == 1
        client.writer.transport.abort()
    finally:
        server.close()
        await within(server.wait_closed())


# -- items 5 and 6: what an upstream may send before the body ----------------------------------


def raw_answer(*parts: bytes) -> Any:
    """An upstream that answers with exactly ``parts``, each its own write."""

    async def handler(ex: Exchange) -> None:
        await ex.read_body()
        for part in parts:
            ex.writer.write(part)
            await within(ex.writer.drain())
        ex.writer.close()

    return handler


@pytest.mark.parametrize(
    "split", [None, 65000, 100], ids=["one-write", "cap-straddled", "small-first-write"]
)
async def test_item5_response_head_over_64KiB_is_502_however_it_arrives(
    start_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect, split: int | None
) -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\nContent-Length: 2\r\n\r\nok"
    parts = (head,) if split is None else (head[:split], head[split:])
    upstream = await make_upstream(raw_answer(*parts))
    proxy = await start_proxy(upstream.port)
    client = await connect(proxy.port)
    response = await client.request(http_request("GET", "/"))
    assert_json_error(response, 502)
    assert not response.values("x-big")
    assert (
        proxy.count("pqproxy_http_upstream_invalid_responses_total", reason="head_too_large") == 1
    )


async def test_item5_a_head_of_exactly_64KiB_is_relayed(
    start_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    lines = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Big: "
    head = lines + b"a" * (64 * 1024 - len(lines) - 4) + b"\r\n\r\n"
    assert len(head) == 64 * 1024
    upstream = await make_upstream(raw_answer(head[:40000], head[40000:] + b"ok"))
    proxy = await start_proxy(upstream.port)
    client = await connect(proxy.port)
    # Read raw: the test's own h11 client would refuse a head this large.
    await client.send(http_request("GET", "/", ("Connection", "close")))
    raw = await client.read_until_closed()
    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"\r\n\r\nok")


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def interim_then_final(client: Client) -> tuple[int, int]:
    """(interim responses relayed, final status)."""
    interim = 0
    while True:
        event = await client.next_event()
        if isinstance(event, h11.InformationalResponse):
            interim += 1
            continue
        assert isinstance(event, h11.Response), event
        final = event.status_code
        while not isinstance(await client.next_event(), h11.EndOfMessage):
            pass
        return interim, final


@pytest.mark.parametrize(
    ("count", "expected"), [(MAX_INTERIM, 200), (MAX_INTERIM + 1, 502), (20000, 502)]
)
async def test_item6_interim_responses_are_capped_per_request(
    start_proxy: ProxyFactory,
    make_upstream: UpstreamFactory,
    connect: Connect,
    count: int,
    expected: int,
) -> None:
    upstream = await make_upstream(raw_answer(EARLY_HINTS * count + FINAL))
    proxy = await start_proxy(upstream.port)
    client = await connect(proxy.port)
    await client.send(http_request("GET", "/"))
    interim, final = await interim_then_final(client)
    assert final == expected
    assert interim == min(count, MAX_INTERIM)
    flooded = proxy.count(
        "pqproxy_http_upstream_invalid_responses_total", reason="too_many_interim"
    )
    assert flooded == (1 if expected == 502 else 0)


# -- item 7: chunk sizes -----------------------------------------------------------------------


def chunked_head(target: str = "/upload") -> bytes:
    return http_request("POST", target, ("Transfer-Encoding", "chunked"))


async def test_item7_declared_chunk_over_max_body_is_413_at_once(
    start_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    """10^16 bytes declared in one chunk: refused when the size line arrives, without
    waiting for (or forwarding) any of its data; in the same read as the head, the upstream
    never hears of the request."""
    upstream = await make_upstream()
    proxy = await start_proxy(upstream.port)
    client = await connect(proxy.port)
    size_line = f"{10**16:x}\r\n".encode()
    response = await client.request(chunked_head() + size_line + b"abc")
    assert_json_error(response, 413)
    assert upstream.requests == []
    assert await client.read_until_closed() == b""


async def test_item7_a_later_chunk_over_the_limit_is_413_before_its_data_is_forwarded(
    start_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    upstream = await make_upstream()
    proxy = await start_proxy(upstream.port, http=HttpSettings(max_body_bytes=1000))
    client = await connect(proxy.port)
    await client.send(chunked_head() + chunk(b"a" * 600))
    seen = await within(upstream.request_seen.get())
    # 600 + 401 > 1000: the second chunk is refused on its size line.
    await client.send(b"191\r\n" + b"b" * 100)
    response = await client.response()
    assert_json_error(response, 413)
    assert b"b" not in seen.body


@pytest.mark.parametrize(
    ("size_line", "status"),
    [
        (b"00000000000000001", 400),  # 17 digits, value 1
        (b"000000000000000000001", 400),  # 21: h11 refuses this one itself
        (b"0000000000000001", 200),  # 16 digits: the longest allowed
        (b"1;name=value", 200),  # an extension after the size
    ],
)
async def test_item7_chunk_size_line_over_16_hex_digits_is_400(
    start_proxy: ProxyFactory,
    make_upstream: UpstreamFactory,
    connect: Connect,
    size_line: bytes,
    status: int,
) -> None:
    upstream = await make_upstream()
    proxy = await start_proxy(upstream.port)
    client = await connect(proxy.port)
    # The size line split over two writes: the reader must join them.
    await client.send(chunked_head() + size_line[:5])
    await client.send(size_line[5:] + b"\r\nQ\r\n" + LAST_CHUNK)
    response = await client.response()
    assert response.status == status, response.body
    received = b"".join(r.body for r in upstream.requests)
    assert received == (b"Q" if status == 200 else b"")


# -- item 17: the connection survives a 502 ---------------------------------------------------


async def test_item17_pipelined_request_after_a_502_is_answered(
    start_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    async def handler(ex: Exchange) -> None:
        if ex.received.target == b"/broken":
            await ex.read_body()
            ex.writer.close()  # a fresh connection closed without an answer: 502
            return
        await answer_who(ex)

    upstream = await make_upstream(handler)
    proxy = await start_proxy(upstream.port)
    client = await connect(proxy.port)
    await client.send(
        http_request("POST", "/broken", body=b'{"a":1}') + http_request("GET", "/after")
    )
    first = await client.response()
    assert_json_error(first, 502)
    assert first.values("connection") == []
    second = await client.response()
    assert second.status == 200 and second.json()["target"] == "/after"
    assert not client.eof
    assert (await client.request(http_request("GET", "/third"))).status == 200


async def test_item17_a_502_before_the_body_was_read_still_closes(
    start_proxy: ProxyFactory, connect: Connect
) -> None:
    """No upstream at all, and the body never read: the bytes after the head cannot be
    trusted to start a request, so the 502 closes."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    try:
        proxy = await start_proxy(dead.getsockname()[1])
        client = await connect(proxy.port)
        await client.send(http_request("POST", "/", ("Content-Length", "100")))
        response = await client.response()
        assert_json_error(response, 502)
        assert response.values("connection") == [b"close"]
        assert await client.read_until_closed() == b""
    finally:
        dead.close()
