"""UpstreamPool on real sockets: in-process h11 upstreams on 127.0.0.1 that count their
connections, so every test can also check that the pool closed what it opened."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import h11
import pytest
import pytest_asyncio

from pqproxy.io.upstream import (
    HealthCheckSettings,
    NoUpstreamAvailable,
    PoolSettings,
    UpstreamConnectError,
    UpstreamConnection,
    UpstreamPool,
    UpstreamServer,
)

# Upper bound for any single wait in these tests; far above what a healthy run needs.
WAIT = 10.0
LOGGER = "pqproxy.io.upstream"


class Upstream:
    """An HTTP/1.1 server that answers ``/`` with its name, ``/health`` with a settable status,
    and ``/slow`` only once ``gate`` is set. It counts the connections it accepted and holds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server: asyncio.Server | None = None
        self.health_status = 200
        # Never answer /health while set: read the request, then wait for the client to give up.
        self.health_hangs = False
        # Close the connection after the next response although it was keep-alive, as an
        # upstream does when its own idle timer fires.
        self.close_after_response = False
        # Bytes written after the next response once ``garbage_gate`` is set (so that they
        # arrive apart from it): an unsolicited answer to nobody.
        self.trailing_garbage = b""
        self.garbage_gate = asyncio.Event()
        self.gate = asyncio.Event()
        self.accepted = 0
        self.requests: list[str] = []
        self.writers: set[asyncio.StreamWriter] = set()
        self.changed = asyncio.Condition()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    @property
    def open_connections(self) -> int:
        return len(self.writers)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), WAIT)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.add(writer)
        await self._notify()
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await _next_event(conn, reader)
                if not isinstance(event, h11.Request):
                    break
                while not isinstance(await _next_event(conn, reader), h11.EndOfMessage):
                    pass
                target = event.target.decode()
                self.requests.append(target)
                await self._notify()
                await self._respond(conn, reader, writer, target)
                if conn.our_state is h11.MUST_CLOSE or self.close_after_response:
                    self.close_after_response = False
                    break
                conn.start_next_cycle()
        except (ConnectionError, TimeoutError, h11.ProtocolError):
            pass
        finally:
            writer.close()
            self.writers.discard(writer)
            await self._notify()

    async def _respond(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        target: str,
    ) -> None:
        if target == "/health":
            if self.health_hangs:
                while await asyncio.wait_for(reader.read(65536), WAIT):
                    pass
                raise ConnectionResetError("client gave up")
            status, body = self.health_status, b"health"
        elif target == "/slow":
            await asyncio.wait_for(self.gate.wait(), WAIT)
            status, body = 200, self.name.encode()
        else:
            status, body = 200, self.name.encode()
        headers = [("Content-Length", str(len(body))), ("Content-Type", "text/plain")]
        out = [
            conn.send(h11.Response(status_code=status, headers=headers)),
            conn.send(h11.Data(data=body)),
            conn.send(h11.EndOfMessage()),
        ]
        writer.write(b"".join(d for d in out if d is not None))
        await asyncio.wait_for(writer.drain(), WAIT)
        if self.trailing_garbage:
            await asyncio.wait_for(self.garbage_gate.wait(), WAIT)
            writer.write(self.trailing_garbage)
            self.trailing_garbage = b""
            await asyncio.wait_for(writer.drain(), WAIT)

    async def close(self) -> None:
        assert self.server is not None
        self.gate.set()
        self.garbage_gate.set()
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await asyncio.wait_for(self.server.wait_closed(), WAIT)


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await asyncio.wait_for(reader.read(65536), WAIT))


async def http_get(conn: UpstreamConnection, path: str = "/") -> tuple[int, bytes, bool]:
    """One request on a pooled connection: (status, body, reusable)."""
    client = h11.Connection(h11.CLIENT)
    for event in (
        h11.Request(method="GET", target=path, headers=[("Host", conn.server.label)]),
        h11.EndOfMessage(),
    ):
        data = client.send(event)
        assert data is not None
        conn.writer.write(data)
    await asyncio.wait_for(conn.writer.drain(), WAIT)
    response = await _next_event(client, conn.reader)
    assert isinstance(response, h11.Response)
    body = b""
    while True:
        event = await _next_event(client, conn.reader)
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            raise AssertionError(f"unexpected {event!r}")
    reusable = client.our_state is h11.DONE and client.their_state is h11.DONE
    return response.status_code, body, reusable


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


UpstreamFactory = Callable[[str], Awaitable[Upstream]]


@pytest_asyncio.fixture
async def make_upstream() -> AsyncIterator[UpstreamFactory]:
    upstreams: list[Upstream] = []

    async def make(name: str) -> Upstream:
        upstream = Upstream(name)
        await upstream.start()
        upstreams.append(upstream)
        return upstream

    yield make
    for upstream in upstreams:
        await upstream.close()


PoolFactory = Callable[..., Awaitable[UpstreamPool]]


@pytest_asyncio.fixture
async def make_pool(loop_errors: list[dict[str, Any]]) -> AsyncIterator[PoolFactory]:
    pools: list[UpstreamPool] = []

    async def make(servers: list[tuple[str, int]], **overrides: Any) -> UpstreamPool:
        overrides.setdefault("health_check", None)
        pool = UpstreamPool(PoolSettings(name="test", servers=tuple(servers), **overrides))
        await pool.start()
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port where connects are refused: bound (so nobody else takes it) but not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    yield port
    sock.close()


def pool_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


def addr(upstream: Upstream) -> tuple[str, int]:
    return ("127.0.0.1", upstream.port)


async def request_via_pool(pool: UpstreamPool, path: str = "/") -> bytes:
    """pick → connect → GET → release, as the relay does it; returns the body."""
    server = pool.pick()
    with pool.outstanding(server):
        conn = await pool.connect(server)
        status, body, reusable = await http_get(conn, path)
        pool.release(conn, reusable)
    assert status == 200
    pool.report_success(server)
    return body


# --- balancing ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_round_robin_alternates(
    make_upstream: UpstreamFactory, make_pool: PoolFactory
) -> None:
    a, b = await make_upstream("a"), await make_upstream("b")
    pool = await make_pool([addr(a), addr(b)], balance="round_robin")
    bodies = [await request_via_pool(pool) for _ in range(4)]
    assert bodies == [b"a", b"b", b"a", b"b"]
    # Round robin ignores outstanding requests: it keeps alternating.
    first = pool.pick()
    pool.begin(first)
    assert [pool.pick().label for _ in range(3)] == [
        pool.servers[1].label,
        pool.servers[0].label,
        pool.servers[1].label,
    ]
    pool.end(first)


@pytest.mark.asyncio
async def test_least_outstanding_prefers_idle_server(
    make_upstream: UpstreamFactory, make_pool: PoolFactory
) -> None:
    a, b = await make_upstream("a"), await make_upstream("b")
    pool = await make_pool([addr(a), addr(b)], balance="least_outstanding")
    server_a, server_b = pool.servers

    # Two idle servers: ties are broken round-robin, so both get traffic.
    assert await request_via_pool(pool) == b"a"
    assert await request_via_pool(pool) == b"b"

    slow_server = pool.pick()
    assert slow_server is server_a
    with pool.outstanding(slow_server):
        conn = await pool.connect(slow_server)
        slow = asyncio.create_task(http_get(conn, "/slow"))
        await a.wait_until(lambda: "/slow" in a.requests)
        # a holds an outstanding request: every pick goes to b.
        assert [pool.pick() for _ in range(3)] == [server_b] * 3
        assert await request_via_pool(pool) == b"b"
        a.gate.set()
        status, body, reusable = await asyncio.wait_for(slow, WAIT)
        assert (status, body) == (200, b"a")
        pool.release(conn, reusable)
    assert server_a.outstanding == 0
    assert {pool.pick(), pool.pick()} == {server_a, server_b}


@pytest.mark.asyncio
async def test_outstanding_counts(make_upstream: UpstreamFactory, make_pool: PoolFactory) -> None:
    a = await make_upstream("a")
    pool = await make_pool([addr(a)])
    (server,) = pool.servers
    with pool.outstanding(server):
        pool.begin(server)
        assert server.outstanding == 2
        assert pool.snapshot()[0]["outstanding"] == 2
        pool.end(server)
    assert server.outstanding == 0
    pool.end(server)  # unbalanced: logged, never negative
    assert server.outstanding == 0


# --- keep-alive -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_keep_alive_reuses_one_connection(
    make_upstream: UpstreamFactory, make_pool: PoolFactory
) -> None:
    a = await make_upstream("a")
    pool = await make_pool([addr(a)])
    (server,) = pool.servers
    conn = await pool.connect(server)
    assert not conn.reused
    assert (await http_get(conn))[2]
    pool.release(conn, True)
    assert pool.idle_count(server) == 1

    again = await pool.connect(server)
    assert again is conn and again.reused
    assert await http_get(again) == (200, b"a", True)
    pool.release(again, True)
    assert a.accepted == 1 and a.requests == ["/", "/"]
    assert conn.requests_served == 2


@pytest.mark.asyncio
async def test_no_reuse_of_connection_upstream_closed(
    make_upstream: UpstreamFactory, make_pool: PoolFactory
) -> None:
    a = await make_upstream("a")
    pool = await make_pool([addr(a)])
    (server,) = pool.servers
    a.close_after_response = True
    conn = await pool.connect(server)
    status, _, reusable = await http_get(conn)
    assert status == 200 and reusable  # nothing on the wire said the connection would close
    pool.release(conn, reusable)
    await a.wait_until(lambda: a.open_connections == 0)
    # Our side has seen the FIN once a read returns EOF (this consumes nothing).
    assert await asyncio.wait_for(conn.reader.read(1), WAIT) == b""

    fresh = await pool.connect(server)
    assert fresh is not conn and not fresh.reused
    assert conn.writer.is_closing()
    assert await http_get(fresh) == (200, b"a", True)
    pool.release(fresh, False)
    assert a.accepted == 2
    await a.wait_until(lambda: a.open_connections == 0)


@pytest.mark.asyncio
async def test_no_reuse_of_connection_with_unsolicited_bytes(
    make_upstream: UpstreamFactory, make_pool: PoolFactory
) -> None:
    a = await make_upstream("a")
    pool = await make_pool([addr(a)])
    (server,) = pool.servers
    garbage = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n"
    a.trailing_garbage = garbage
    conn = await pool.connect(server)
    status, _, reusable = await http_get(conn)
    assert status == 200 and reusable
    a.garbage_gate.set()
    # Wait until the stray response has reached us, then put it back unread: what matters is
    # that bytes are pending in the reader when the connection comes back to the pool.
    assert await asyncio.wait_for(conn.reader.readexactly(len(garbage)), WAIT) == garbage
    conn.reader.feed_data(garbage)
    assert not conn.reader.at_eof()
    pool.release(conn, reusable)
    assert pool.idle_count(server) == 0 and conn.writer.is_closing()
    await a.wait_until(lambda: a.open_connections == 0)


@pytest.mark.asyncio
async def test_idle_cap_and_idle_timeout(
    make_upstream: UpstreamFactory, make_pool: PoolFactory
) -> None:
    a = await make_upstream("a")
    pool = await make_pool([addr(a)], max_idle_per_server=1, idle_timeout=0.1)
    (server,) = pool.servers
    first, second = await pool.connect(server), await pool.connect(server)
    await a.wait_until(lambda: a.open_connections == 2)
    pool.release(first, True)
    pool.release(second, True)
    # The cap keeps the newest; the older one is closed at once.
    assert pool.idle_count(server) == 1
    assert first.writer.is_closing() and not second.writer.is_closing()
    # The periodic sweep closes the survivor once it has been idle for idle_timeout.
    await a.wait_until(lambda: a.open_connections == 0)
    assert pool.idle_count(server) == 0


@pytest.mark.asyncio
async def test_release_not_reusable_closes(
    make_upstream: UpstreamFactory, make_pool: PoolFactory
) -> None:
    a = await make_upstream("a")
    pool = await make_pool([addr(a)])
    (server,) = pool.servers
    conn = await pool.connect(server)
    await a.wait_until(lambda: a.open_connections == 1)
    pool.release(conn, False)
    assert pool.idle_count(server) == 0
    await a.wait_until(lambda: a.open_connections == 0)


# --- passive ejection -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_connect_refused_then_ejected(
    make_upstream: UpstreamFactory,
    make_pool: PoolFactory,
    refused_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = await make_upstream("a")
    pool = await make_pool(
        [("127.0.0.1", refused_port), addr(a)],
        balance="round_robin",
        max_fails=2,
        ejection_time=60.0,
    )
    dead, alive = pool.servers
    caplog.set_level(logging.INFO, logger=LOGGER)

    with pytest.raises(UpstreamConnectError) as info:
        await pool.connect(dead)
    assert info.value.server is dead and not info.value.timed_out
    assert info.value.reason == "refused"
    assert dead.consecutive_fails == 1 and not dead.is_ejected()

    version = pool.state_version
    with pytest.raises(UpstreamConnectError):
        await pool.connect(dead)
    assert dead.is_ejected() and pool.state_version == version + 1
    assert [pool.pick() for _ in range(3)] == [alive] * 3
    snapshot = {s["label"]: s for s in pool.snapshot()}
    assert snapshot[dead.label]["ejected"] and snapshot[dead.label]["ejected_for"] > 50
    assert not snapshot[alive.label]["ejected"]

    # Failures reported while ejected do not log again or extend the ejection.
    until = dead.ejected_until
    pool.report_failure(dead, "status 502")
    assert dead.ejected_until == until
    warnings = pool_warnings(caplog)
    assert len(warnings) == 1
    assert "ejected for 60s after 2 consecutive failures (last: refused)" in warnings[0]


@pytest.mark.asyncio
async def test_ejection_expires(make_pool: PoolFactory, refused_port: int) -> None:
    pool = await make_pool([("127.0.0.1", refused_port)], max_fails=1, ejection_time=0.2)
    (server,) = pool.servers
    changes: list[UpstreamServer] = []
    pool.add_state_listener(changes.append)
    with pytest.raises(UpstreamConnectError):
        await pool.connect(server)
    assert server.is_ejected()
    with pytest.raises(NoUpstreamAvailable):
        pool.pick()

    await pool.wait_for_state(lambda: server.ejected_until is None, WAIT)
    assert changes == [server, server]  # ejected, back
    assert pool.pick() is server
    # On probation: the next failure ejects it again at once.
    pool.report_failure(server, "status 500")
    assert server.is_ejected()


@pytest.mark.asyncio
async def test_report_success_resets_fails(
    make_upstream: UpstreamFactory, make_pool: PoolFactory
) -> None:
    a = await make_upstream("a")
    pool = await make_pool([addr(a)], max_fails=3)
    (server,) = pool.servers
    pool.report_failure(server, "status 503")
    pool.report_failure(server, "status 503")
    pool.report_success(server)
    pool.report_failure(server, "status 503")
    pool.report_failure(server, "status 503")
    assert not server.is_ejected()
    pool.report_failure(server, "status 503")
    assert server.is_ejected()


@pytest.mark.asyncio
async def test_ejection_drops_idle_connections(
    make_upstream: UpstreamFactory, make_pool: PoolFactory
) -> None:
    a = await make_upstream("a")
    pool = await make_pool([addr(a)], max_fails=1)
    (server,) = pool.servers
    conn = await pool.connect(server)
    pool.release(conn, True)
    assert pool.idle_count(server) == 1
    pool.report_failure(server, "status 500")
    assert pool.idle_count(server) == 0
    await a.wait_until(lambda: a.open_connections == 0)


@pytest.mark.asyncio
async def test_all_servers_down(make_pool: PoolFactory) -> None:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        ports = [sock.getsockname()[1] for sock in socks]
        pool = await make_pool([("127.0.0.1", p) for p in ports], max_fails=1)
        first = pool.pick()
        with pytest.raises(NoUpstreamAvailable, match=r"no server left to try among 2"):
            pool.pick(frozenset(pool.servers))
        for server in pool.servers:
            with pytest.raises(UpstreamConnectError):
                await pool.connect(server)
        with pytest.raises(NoUpstreamAvailable) as info:
            pool.pick()
        message = str(info.value)
        assert message.startswith("pool test: all 2 servers unhealthy or ejected (")
        assert f"{first.label} ejected for" in message
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.asyncio
async def test_acquire_retries_on_another_server(
    make_upstream: UpstreamFactory, make_pool: PoolFactory, refused_port: int
) -> None:
    a = await make_upstream("a")
    pool = await make_pool([("127.0.0.1", refused_port), addr(a)], balance="round_robin")
    dead, alive = pool.servers
    tried: set[UpstreamServer] = set()
    conn = await pool.acquire(tried)
    assert conn.server is alive and tried == {dead, alive}
    assert (dead.outstanding, alive.outstanding) == (0, 1)
    assert await http_get(conn) == (200, b"a", True)
    pool.release(conn, True)
    pool.end(conn.server)

    # No retries left: the connect error itself comes back (the caller maps it to 502/504).
    strict = await make_pool([("127.0.0.1", refused_port), addr(a)], retries=0)
    with pytest.raises(UpstreamConnectError):
        await strict.acquire(set())
    assert strict.servers[0].outstanding == 0


# --- timeouts -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_connect_timeout(make_pool: PoolFactory) -> None:
    """A listening socket that never accepts, with a full accept queue: the kernel drops
    further SYNs, so a connect hangs until our timeout (Linux keeps backlog+1 = 1 queued)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[asyncio.StreamWriter] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(8):
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
            except TimeoutError:
                break
            fillers.append(writer)
        else:
            pytest.skip("the accept queue never filled: cannot produce a connect timeout")

        pool = await make_pool([("127.0.0.1", port)], connect_timeout=0.2, max_fails=1)
        (server,) = pool.servers
        with pytest.raises(UpstreamConnectError) as info:
            await pool.connect(server)
        assert info.value.timed_out and "timed out after 0.2s" in str(info.value)
        assert server.is_ejected()
    finally:
        for writer in fillers:
            writer.close()
        listener.close()


# --- active health checks -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_health_check_marks_unhealthy_and_recovers(
    make_upstream: UpstreamFactory, make_pool: PoolFactory, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await make_upstream("a"), await make_upstream("b")
    hc = HealthCheckSettings(interval=0.05, timeout=1.0, healthy_threshold=2, unhealthy_threshold=2)
    caplog.set_level(logging.INFO, logger=LOGGER)
    pool = await make_pool([addr(a), addr(b)], health_check=hc)
    server_a, server_b = pool.servers
    await a.wait_until(lambda: "/health" in a.requests)  # the first round runs at once
    assert server_a.healthy

    a.health_status = 503
    await pool.wait_for_state(lambda: not server_a.healthy, WAIT)
    assert server_b.healthy
    assert [pool.pick() for _ in range(3)] == [server_b] * 3
    warnings = pool_warnings(caplog)
    assert len(warnings) == 1 and "status 503" in warnings[0]

    a.health_status = 200
    await pool.wait_for_state(lambda: server_a.healthy, WAIT)
    assert {pool.pick(), pool.pick()} == {server_a, server_b}
    assert any("healthy again" in r.getMessage() for r in caplog.records if r.name == LOGGER)


@pytest.mark.asyncio
async def test_health_check_timeout(
    make_upstream: UpstreamFactory, make_pool: PoolFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that accepts but never answers fails its checks by timeout."""
    a = await make_upstream("a")
    a.health_hangs = True
    hc = HealthCheckSettings(interval=0.05, timeout=0.1, unhealthy_threshold=2)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    pool = await make_pool([addr(a)], health_check=hc)
    (server,) = pool.servers
    await pool.wait_for_state(lambda: not server.healthy, WAIT)
    assert "timeout after 0.1s" in pool_warnings(caplog)[0]
    with pytest.raises(NoUpstreamAvailable, match="unhealthy"):
        pool.pick()
    # Each timed-out check closed its socket.
    await pool.close()
    await a.wait_until(lambda: a.open_connections == 0)


@pytest.mark.asyncio
async def test_health_check_refused(make_pool: PoolFactory, refused_port: int) -> None:
    pool = await make_pool(
        [("127.0.0.1", refused_port)],
        health_check=HealthCheckSettings(interval=0.05, unhealthy_threshold=1),
    )
    (server,) = pool.servers
    ok, reason = await pool.check(server, HealthCheckSettings())
    assert (ok, reason) == (False, "refused")
    await pool.wait_for_state(lambda: not server.healthy, WAIT)


@pytest.mark.asyncio
async def test_passing_health_checks_clear_ejection(
    make_upstream: UpstreamFactory, make_pool: PoolFactory
) -> None:
    a = await make_upstream("a")
    hc = HealthCheckSettings(interval=0.05, healthy_threshold=2)
    pool = await make_pool([addr(a)], health_check=hc, max_fails=1, ejection_time=60.0)
    (server,) = pool.servers
    pool.report_failure(server, "status 500")
    assert server.is_ejected()
    await pool.wait_for_state(lambda: server.ejected_until is None, WAIT)
    assert server.consecutive_fails == 0
    assert pool.pick() is server


# --- shutdown -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_close_leaves_no_open_connections(
    make_upstream: UpstreamFactory, make_pool: PoolFactory
) -> None:
    a, b = await make_upstream("a"), await make_upstream("b")
    hc = HealthCheckSettings(interval=0.05)
    pool = await make_pool([addr(a), addr(b)], health_check=hc)
    conns = [await pool.connect(s) for s in pool.servers for _ in range(3)]
    for conn in conns[:-1]:
        assert (await http_get(conn))[2]
        pool.release(conn, True)
    await a.wait_until(lambda: "/health" in a.requests)
    last = conns[-1]

    await pool.close()
    assert all(pool.idle_count(s) == 0 for s in pool.servers)
    await a.wait_until(lambda: a.open_connections == 0)
    # The connection still checked out is closed when it comes back.
    await b.wait_until(lambda: b.open_connections == 1)
    pool.release(last, True)
    await b.wait_until(lambda: b.open_connections == 0)
    with pytest.raises(NoUpstreamAvailable, match="closed"):
        pool.pick()
    await pool.close()  # idempotent


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="no servers"):
        PoolSettings(name="p", servers=())
    with pytest.raises(ValueError, match="balance"):
        PoolSettings(name="p", servers=(("h", 1),), balance="random")
    with pytest.raises(ValueError, match="connect_timeout"):
        PoolSettings(name="p", servers=(("h", 1),), connect_timeout=0)
    with pytest.raises(ValueError, match="listed twice"):
        PoolSettings(name="p", servers=(("h", 1), ("h", 1)))
    with pytest.raises(ValueError, match="path"):
        HealthCheckSettings(path="health")
    assert UpstreamServer("::1", 8000).label == "[::1]:8000"
