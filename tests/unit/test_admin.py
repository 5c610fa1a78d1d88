"""The admin endpoint (pqproxy/io/admin.py): what each path answers, both servers on real
sockets (the event-loop one of a single process, the select-loop one of a supervisor), and
one process's readiness following its listeners, backend and a real upstream pool."""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pqproxy.io.admin import (
    AdminExchange,
    AdminRoutes,
    AdminServer,
    Readiness,
    ReadinessState,
    SelectAdminServer,
    bind_admin_socket,
    select_with_admin,
)
from pqproxy.io.telemetry import Telemetry
from pqproxy.io.upstream import PoolSettings, UpstreamPool
from pqproxy.metrics import CONTENT_TYPE, ProxyMetrics

WAIT = 10.0


class Checks:
    """A readiness that a test flips."""

    def __init__(self) -> None:
        self.state = Readiness(True, "all good")

    def __call__(self) -> Readiness:
        return self.state


@pytest.fixture
def checks() -> Checks:
    return Checks()


@pytest.fixture
def routes(checks: Checks) -> AdminRoutes:
    metrics = ProxyMetrics()
    metrics.connections.labels("closed").inc()
    return AdminRoutes(metrics.render, checks)


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def test_metrics(routes: AdminRoutes) -> None:
    status, headers, body = split(routes.respond(b"GET", b"/metrics"))
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE
    assert int(headers["content-length"]) == len(body)
    assert b'pqproxy_connections_total{result="closed"} 1.0' in body


def test_healthz_and_readyz(routes: AdminRoutes, checks: Checks) -> None:
    assert split(routes.respond(b"GET", b"/healthz"))[::2] == (200, b"ok\n")
    assert split(routes.respond(b"GET", b"/readyz"))[::2] == (200, b"ready: all good\n")
    checks.state = Readiness(False, "no healthy upstream in pool model")
    assert split(routes.respond(b"GET", b"/readyz?verbose=1"))[::2] == (
        503,
        b"not ready: no healthy upstream in pool model\n",
    )
    # Liveness does not follow readiness.
    assert split(routes.respond(b"GET", b"/healthz"))[0] == 200


def test_head_has_headers_but_no_body(routes: AdminRoutes) -> None:
    status, headers, body = split(routes.respond(b"HEAD", b"/readyz"))
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) == len(b"ready: all good\n")


def test_other_methods_and_paths(routes: AdminRoutes) -> None:
    status, headers, _ = split(routes.respond(b"POST", b"/metrics"))
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    assert split(routes.respond(b"GET", b"/nope"))[0] == 404
    assert split(routes.respond(b"GET", b"/"))[::2] == (
        200,
        b"pqproxy admin: /metrics /healthz /readyz\n",
    )


def test_a_failing_endpoint_is_a_500(checks: Checks) -> None:
    def broken() -> bytes:
        raise RuntimeError("collector failed")

    routes = AdminRoutes(broken, checks)
    assert split(routes.respond(b"GET", b"/metrics"))[::2] == (500, b"internal error\n")


def test_exchange_waits_for_the_whole_head(routes: AdminRoutes) -> None:
    exchange = AdminExchange(routes)
    assert exchange.receive(b"GET /healthz HTTP/1.1\r\nHo") is None
    response = exchange.receive(b"st: x\r\n\r\n")
    assert response is not None and split(response)[::2] == (200, b"ok\n")


def test_exchange_refuses_garbage_and_closes_on_eof(routes: AdminRoutes) -> None:
    response = AdminExchange(routes).receive(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert response is not None and split(response)[0] == 400
    assert AdminExchange(routes).receive(b"") == b""
    oversized = AdminExchange(routes).receive(b"GET / HTTP/1.1\r\nX: " + b"a" * 9000)
    assert oversized is not None and split(oversized)[0] == 400


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.asyncio
async def test_admin_server_on_the_event_loop(routes: AdminRoutes, checks: Checks) -> None:
    server = AdminServer(routes, "127.0.0.1", 0)
    await server.start()
    port = server.port
    try:
        status, body = await asyncio.to_thread(get, port, "/metrics")
        assert status == 200 and b"pqproxy_connections_total" in body
        checks.state = Readiness(False, "listeners not bound yet")
        assert await asyncio.to_thread(get, port, "/readyz") == (
            503,
            b"not ready: listeners not bound yet\n",
        )
    finally:
        await server.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()


@pytest.fixture
def select_server(routes: AdminRoutes) -> Iterator[SelectAdminServer]:
    server = SelectAdminServer(routes, bind_admin_socket("127.0.0.1", 0))
    yield server
    server.close()


def test_select_server_serves_beside_the_callers_fds(select_server: SelectAdminServer) -> None:
    results: list[tuple[int, bytes]] = []

    def fetch(path: str) -> None:
        results.append(get(select_server.port, path))

    clients = [
        threading.Thread(target=fetch, args=(path,)) for path in ("/metrics", "/healthz", "/readyz")
    ]
    theirs_r, theirs_w = os.pipe()
    try:
        for client in clients:
            client.start()
        deadline = time.monotonic() + WAIT
        while any(c.is_alive() for c in clients):
            assert time.monotonic() < deadline, "admin clients not answered in time"
            # The caller's own fd is never ready: only the admin side has work.
            assert select_with_admin(select_server, [theirs_r], 0.05) == []
        os.write(theirs_w, b"x")
        assert select_with_admin(select_server, [theirs_r], WAIT) == [theirs_r]
    finally:
        os.close(theirs_r)
        os.close(theirs_w)
    assert sorted(status for status, _ in results) == [200, 200, 200]
    assert any(b"pqproxy_connections_total" in body for _, body in results)


def test_select_server_drops_a_client_that_never_finishes_its_head(
    select_server: SelectAdminServer,
) -> None:
    with socket.create_connection(("127.0.0.1", select_server.port), timeout=WAIT) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        select_with_admin(select_server, [], 0.2)
        assert select_server.write_fds() == []
        # Still held open while its deadline has not passed.
        assert len(select_server.read_fds()) == 2
    # The peer closed: the server reads EOF and lets it go.
    deadline = time.monotonic() + WAIT
    while len(select_server.read_fds()) > 1:
        assert time.monotonic() < deadline
        select_with_admin(select_server, [], 0.05)


# --- readiness of one process ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_readiness_follows_listeners_backend_and_pool() -> None:
    telemetry = Telemetry(ProxyMetrics())
    registry = telemetry.metrics.registry
    # A pool of one server and passive ejection after one failure; never started, so no
    # health checks run: the test drives the state.
    pool = UpstreamPool(
        PoolSettings(
            name="model",
            servers=(("127.0.0.1", 9),),
            health_check=None,
            max_fails=1,
            ejection_time=60.0,
        )
    )
    state = ReadinessState(telemetry)
    try:
        assert state.readiness() == Readiness(False, "listeners not bound yet")
        state.watch({"model": pool})
        state.backend(True)
        state.listeners(True)
        # Nothing published before the process serves.
        assert registry.get_sample_value("pqproxy_ready", {"check": "listeners"}) is None
        state.start_publishing()
        assert state.readiness().ready
        assert registry.get_sample_value("pqproxy_ready", {"check": "upstream"}) == 1
        upstream = {"upstream": "127.0.0.1:9"}
        assert registry.get_sample_value("pqproxy_upstream_healthy", upstream) == 1

        pool.report_failure(pool.servers[0], "refused")
        assert state.readiness() == Readiness(
            False, "no healthy upstream in pool model (127.0.0.1:9 ejected)"
        )
        assert registry.get_sample_value("pqproxy_ready", {"check": "upstream"}) == 0
        assert registry.get_sample_value("pqproxy_upstream_healthy", upstream) == 0

        state.listeners(False, "draining: not accepting new connections")
        assert state.readiness() == Readiness(False, "draining: not accepting new connections")
        assert registry.get_sample_value("pqproxy_ready", {"check": "listeners"}) == 0
    finally:
        state.close()
        await pool.close()
