"""The admin endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` over plain HTTP/1.1.

Who serves it:

- one process (``workers: 1``): the process itself, on its event loop (``AdminServer``);
- several workers: the supervisor, which does no proxying, in its ``select`` loop
  (``SelectAdminServer``). Never a thread: the supervisor forks workers for as long as it
  runs, and a fork while another thread holds a lock (logging's, an allocator's) leaves that
  lock held forever in the child. The workers write their metrics to files
  (``pqproxy.metrics.enable_multiprocess``) that the supervisor merges for each scrape.

Readiness (``/readyz``) means a new connection will be served: listeners bound, the crypto
backend's self-test passed, and every listener's upstream pool has a healthy server (passing
its health checks, not ejected). Each process keeps its own checks in a ``ReadinessState``
and publishes them to the ``pqproxy_ready{check}`` gauge. With workers, the supervisor is
ready when at least one worker is serving and every check passes in every worker that
published them (the gauge's ``livemin``): the kernel only hands connections to workers that
listen, so each of those must be able to serve. A worker still starting has published
nothing and does not hold the others back; a worker that died is forgotten with its files.

Rules this module keeps: one request per connection (``Connection: close``); every read has a
deadline (``ADMIN_TIMEOUT``), the request head a size cap, the number of connections a cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import h11

from ..metrics import CONTENT_TYPE
from .telemetry import Telemetry
from .upstream import UpstreamPool, UpstreamServer

logger = logging.getLogger(__name__)

# A scraper sends a few hundred bytes of request head.
MAX_REQUEST_HEAD = 8 * 1024
# A client that has not sent its request (or taken its answer) by then is dropped.
ADMIN_TIMEOUT = 10.0
# Scrapers and probes open a handful of connections; beyond this, new ones are closed at once.
MAX_ADMIN_CONNECTIONS = 64
READ_SIZE = 4096

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS[500] = "Internal Server Error"
_REASONS[503] = "Service Unavailable"
_TEXT = "text/plain; charset=utf-8"
_INDEX = b"pqproxy admin: /metrics /healthz /readyz\n"


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str


class AdminRoutes:
    """What each path answers: ``metrics()`` renders the Prometheus text, ``readiness()``
    says whether new connections will be served and, if not, why."""

    def __init__(self, metrics: Callable[[], bytes], readiness: Callable[[], Readiness]) -> None:
        self._metrics = metrics
        self._readiness = readiness

    def respond(self, method: bytes, target: bytes) -> bytes:
        """The complete response to one request."""
        head_only = method == b"HEAD"
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET and HEAD\n", _TEXT, head_only, b"Allow: GET, HEAD\r\n")
        path = target.split(b"?", 1)[0]
        try:
            if path == b"/metrics":
                return _response(200, self._metrics(), CONTENT_TYPE, head_only)
            if path == b"/healthz":
                return _response(200, b"ok\n", _TEXT, head_only)
            if path == b"/readyz":
                state = self._readiness()
                if state.ready:
                    return _response(200, f"ready: {state.reason}\n".encode(), _TEXT, head_only)
                body = f"not ready: {state.reason}\n".encode()
                return _response(503, body, _TEXT, head_only)
        except Exception as exc:
            logger.error(
                "admin %s failed: %s: %s", path.decode("ascii", "replace"), type(exc).__name__, exc
            )
            return _response(500, b"internal error\n", _TEXT, head_only)
        if path == b"/":
            return _response(200, _INDEX, _TEXT, head_only)
        return _response(404, _INDEX, _TEXT, head_only)


def _response(
    status: int, body: bytes, content_type: str, head_only: bool, extra: bytes = b""
) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n"
    ).encode("ascii")
    return head + extra + b"\r\n" + (b"" if head_only else body)


class AdminExchange:
    """One admin connection, sans-IO: bytes in, the response out once the head is read."""

    def __init__(self, routes: AdminRoutes) -> None:
        self._routes = routes
        self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)

    def receive(self, data: bytes) -> bytes | None:
        """Feed what was read (``b""`` at EOF). Returns the response to send (``b""``: close
        without one), or None while the request head is incomplete."""
        self._parser.receive_data(data)
        try:
            event = self._parser.next_event()
        except h11.RemoteProtocolError:
            return _response(400, b"bad request\n", _TEXT, False)
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.Request):
            return self._routes.respond(event.method, event.target)
        return b""


# --- one process: served on its event loop ----------------------------------------------------


class AdminServer:
    """The admin endpoint on the running event loop."""

    def __init__(self, routes: AdminRoutes, host: str, port: int) -> None:
        self._routes = routes
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, reuse_address=True
        )

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("admin server not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        try:
            if len(self._handlers) >= MAX_ADMIN_CONNECTIONS:
                return
            if task is not None:
                self._handlers.add(task)
            exchange = AdminExchange(self._routes)
            async with asyncio.timeout(ADMIN_TIMEOUT):
                response = None
                while response is None:
                    response = exchange.receive(await reader.read(READ_SIZE))
                if response:
                    writer.write(response)
                    await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._handlers):
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), ADMIN_TIMEOUT)


# --- the supervisor: served from its select() loop -------------------------------------------


class _Client:
    __slots__ = ("sock", "exchange", "out", "deadline")

    def __init__(self, sock: socket.socket, exchange: AdminExchange, deadline: float) -> None:
        self.sock = sock
        self.exchange = exchange
        self.out = b""
        self.deadline = deadline


def bind_admin_socket(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` (OSError if it cannot be had)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _type, _proto, _name, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(MAX_ADMIN_CONNECTIONS)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class SelectAdminServer:
    """The admin endpoint driven by a synchronous ``select`` loop: the caller adds
    ``read_fds()`` and ``write_fds()`` to its select and hands the results to ``handle``."""

    def __init__(self, routes: AdminRoutes, sock: socket.socket) -> None:
        self._routes = routes
        self._listen = sock
        self._clients: dict[int, _Client] = {}

    @property
    def port(self) -> int:
        port: int = self._listen.getsockname()[1]
        return port

    def read_fds(self) -> list[int]:
        return [self._listen.fileno()] + [fd for fd, c in self._clients.items() if not c.out]

    def write_fds(self) -> list[int]:
        return [fd for fd, c in self._clients.items() if c.out]

    def handle(self, readable: Iterable[int], writable: Iterable[int]) -> None:
        ready = set(readable)
        now = time.monotonic()
        if self._listen.fileno() in ready:
            self._accept(now)
        for fd in set(writable):
            client = self._clients.get(fd)
            if client is not None:
                self._send(client)
        for fd in ready:
            client = self._clients.get(fd)
            if client is not None and not client.out:
                self._receive(client)
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            self._drop(client)

    def _accept(self, now: float) -> None:
        while True:
            try:
                sock, _address = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: try again on the next round rather than spin.
                logger.warning("admin: accept failed: %s", exc.strerror or exc)
                return
            if len(self._clients) >= MAX_ADMIN_CONNECTIONS:
                sock.close()
                continue
            sock.setblocking(False)
            self._clients[sock.fileno()] = _Client(
                sock, AdminExchange(self._routes), now + ADMIN_TIMEOUT
            )

    def _receive(self, client: _Client) -> None:
        try:
            data = client.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        response = client.exchange.receive(data)
        if response is None:
            return
        if not response:
            self._drop(client)
            return
        client.out = response
        self._send(client)

    def _send(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.out = client.out[sent:]
        if not client.out:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        client.sock.close()

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        self._listen.close()

    def close_in_child(self) -> None:
        """In a forked worker: release the inherited descriptors, touch nothing else."""
        self.close()


def select_with_admin(
    admin: SelectAdminServer | None, fds: Sequence[int], timeout: float
) -> list[int]:
    """``select`` over ``fds`` and the admin server's sockets; serves the admin side and
    returns the ready ones among ``fds``."""
    if admin is None:
        readable, _, _ = select.select(fds, [], [], max(timeout, 0.0))
        return readable
    readable, writable, _ = select.select(
        [*fds, *admin.read_fds()], admin.write_fds(), [], max(timeout, 0.0)
    )
    admin.handle(readable, writable)
    wanted = set(fds)
    return [fd for fd in readable if fd in wanted]


# --- one process's readiness -----------------------------------------------------------------


def _eligible(server: UpstreamServer) -> bool:
    return server.healthy and not server.is_ejected()


class ReadinessState:
    """This process's readiness checks, kept current from the listeners, the backend
    self-test and the pools' state changes, and published to ``pqproxy_ready{check}`` and
    ``pqproxy_upstream_healthy{upstream}`` when ``telemetry`` is given.

    Nothing is published before ``start_publishing``: a worker that is still starting must
    not hold back the supervisor's readiness (see the module docstring)."""

    def __init__(self, telemetry: Telemetry | None) -> None:
        self._telemetry = telemetry
        self._publishing = False
        self._listeners: str | None = "listeners not bound yet"
        self._backend: str | None = "backend self-test not run yet"
        self._pools: dict[str, UpstreamPool] = {}
        self._unwatch: list[Callable[[], None]] = []

    # --- inputs ------------------------------------------------------------------------------

    def listeners(self, bound: bool, reason: str = "") -> None:
        self._listeners = None if bound else reason or "listeners not bound"
        self._publish("listeners", bound)

    def backend(self, passed: bool, reason: str = "") -> None:
        self._backend = None if passed else reason or "backend self-test not passed"
        self._publish("backend", passed)

    def watch(self, pools: dict[str, UpstreamPool]) -> None:
        """The pools the listeners use now (again after a reload)."""
        for remove in self._unwatch:
            remove()
        self._unwatch = [pool.add_state_listener(self._pool_changed) for pool in pools.values()]
        self._pools = dict(pools)
        if self._telemetry is not None:
            for pool in pools.values():
                for server in pool.servers:
                    self._telemetry.upstream_healthy(server.label, _eligible(server))
        self._publish("upstream", self._upstream_problem() is None)

    def start_publishing(self) -> None:
        self._publishing = True
        self._publish("listeners", self._listeners is None)
        self._publish("backend", self._backend is None)
        self._publish("upstream", self._upstream_problem() is None)

    def close(self) -> None:
        for remove in self._unwatch:
            remove()
        self._unwatch = []

    # --- output ------------------------------------------------------------------------------

    def readiness(self) -> Readiness:
        for problem in (self._listeners, self._backend, self._upstream_problem()):
            if problem is not None:
                return Readiness(False, problem)
        return Readiness(True, "listeners bound, backend self-test passed, upstreams healthy")

    def _upstream_problem(self) -> str | None:
        for name, pool in self._pools.items():
            if not any(_eligible(server) for server in pool.servers):
                states = ", ".join(
                    f"{s.label} {'ejected' if s.healthy else 'unhealthy'}" for s in pool.servers
                )
                return f"no healthy upstream in pool {name} ({states})"
        return None

    def _pool_changed(self, server: UpstreamServer) -> None:
        if self._telemetry is not None:
            self._telemetry.upstream_healthy(server.label, _eligible(server))
        self._publish("upstream", self._upstream_problem() is None)

    def _publish(self, check: str, passed: bool) -> None:
        if self._publishing and self._telemetry is not None:
            self._telemetry.ready(check, passed)


__all__ = [
    "AdminExchange",
    "AdminRoutes",
    "AdminServer",
    "Readiness",
    "ReadinessState",
    "SelectAdminServer",
    "bind_admin_socket",
    "select_with_admin",
]
