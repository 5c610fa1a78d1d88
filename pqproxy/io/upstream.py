"""Upstream pools: keep-alive HTTP/1.1 connections to model servers, load balancing, active
health checks, passive ejection, and the pieces a caller needs to retry on another server.

Rules this module keeps:

- A server is *eligible* when it is healthy (active checks), not ejected (passive failures)
  and not already tried by the request. ``pick`` only ever returns an eligible server.
- Servers start healthy. A pool without health checks must route at all, and a proxy
  restarted under load must not answer 502 while its first checks are in flight; a server
  that is really down is caught by the first refused connects (passive ejection) or by
  ``unhealthy_threshold`` failed checks, whichever comes first.
- Passive ejection: ``max_fails`` consecutive failures (connect errors, and 5xx responses the
  caller reports) eject a server for ``ejection_time``. It returns by itself — a timer, backed
  by a lazy check in ``pick`` — on probation: one more failure ejects it again, one success
  clears the record. ``healthy_threshold`` consecutive passed health checks since the ejection
  also end it early: the active check has then seen the server answer again.
- Health checks use a fresh connection each (``Connection: close``), never a pooled one: a
  check must see what a new client would see, and must not steal a connection from traffic.
- Idle connections are reused newest first (LIFO), so under light load the older ones age out
  and the upstream sees few sockets; an idle connection is dropped when it is older than
  ``idle_timeout``, when the upstream has closed it or sent bytes nobody asked for, and when
  its server goes unhealthy or is ejected. The sweep task and every acquire enforce this.
- Every socket this module opens is closed on every path; ``close()`` closes the idle ones and
  any connection released afterwards. Connections checked out to a caller stay the caller's
  to release.
- Every wait has a deadline: connect (``connect_timeout``), a whole health check (``timeout``),
  the close of the pool (``CLOSE_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypedDict

import h11

logger = logging.getLogger(__name__)

BALANCE_POLICIES = ("least_outstanding", "round_robin")
# A health check reads only the status line and headers; anything bigger is not a health
# endpoint we understand, and must not make us buffer without bound.
MAX_HEALTH_RESPONSE_HEAD = 16 * 1024
HEALTH_READ_CHUNK = 4096
HEALTH_USER_AGENT = "pqproxy-health-check"
# ``close()`` gives the sockets and tasks it ends this long to finish; a peer that never
# acknowledges must not hold up shutdown.
CLOSE_TIMEOUT = 5.0
# The idle sweep runs at half the idle timeout (a connection lives at most 1.5x idle_timeout
# unused), but never so rarely that dead sockets linger in CLOSE_WAIT for long.
MAX_SWEEP_INTERVAL = 30.0
# The message of NoUpstreamAvailable names at most this many servers.
MAX_SERVERS_IN_MESSAGE = 5


@dataclass(frozen=True)
class HealthCheckSettings:
    path: str = "/health"
    interval: float = 5.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"health_check.path must start with '/': {self.path!r}")
        _require_positive("health_check.interval", self.interval)
        _require_positive("health_check.timeout", self.timeout)
        _require_at_least("health_check.healthy_threshold", self.healthy_threshold, 1)
        _require_at_least("health_check.unhealthy_threshold", self.unhealthy_threshold, 1)


@dataclass(frozen=True)
class PoolSettings:
    name: str
    servers: tuple[tuple[str, int], ...]  # (host, port)
    balance: str = "least_outstanding"  # or "round_robin"
    connect_timeout: float = 5.0
    # 0 disables keep-alive: every released connection is closed.
    max_idle_per_server: int = 32
    idle_timeout: float = 60.0
    health_check: HealthCheckSettings | None = field(default_factory=HealthCheckSettings)
    # 0 disables passive ejection.
    max_fails: int = 3
    ejection_time: float = 10.0
    # How many *other* servers a request may try after a failure it can safely retry.
    retries: int = 2

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError(f"pool {self.name}: no servers")
        for host, port in self.servers:
            if not host:
                raise ValueError(f"pool {self.name}: empty host")
            if not 0 < port < 65536:
                raise ValueError(f"pool {self.name}: port {port} out of range")
        if len(set(self.servers)) != len(self.servers):
            raise ValueError(f"pool {self.name}: a server is listed twice")
        if self.balance not in BALANCE_POLICIES:
            raise ValueError(
                f"pool {self.name}: balance {self.balance!r} is not one of "
                + ", ".join(BALANCE_POLICIES)
            )
        _require_positive("connect_timeout", self.connect_timeout)
        _require_positive("idle_timeout", self.idle_timeout)
        _require_positive("ejection_time", self.ejection_time)
        _require_at_least("max_idle_per_server", self.max_idle_per_server, 0)
        _require_at_least("max_fails", self.max_fails, 0)
        _require_at_least("retries", self.retries, 0)


def _require_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _require_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def format_label(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets (also the ``Host`` header value)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class UpstreamServer:
    """One backend and its state. Compared and hashed by identity (one object per server)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.label = format_label(host, port)
        self.healthy = True
        # Monotonic deadline, None when not ejected.
        self.ejected_until: float | None = None
        self.outstanding = 0
        self.consecutive_fails = 0
        self._check_passes = 0
        self._check_fails = 0
        self._ejection_timer: asyncio.TimerHandle | None = None

    def is_ejected(self, now: float | None = None) -> bool:
        if self.ejected_until is None:
            return False
        return (time.monotonic() if now is None else now) < self.ejected_until

    def __repr__(self) -> str:
        return (
            f"UpstreamServer({self.label}, healthy={self.healthy}, "
            f"ejected_until={self.ejected_until}, outstanding={self.outstanding})"
        )


@dataclass(eq=False)
class UpstreamConnection:
    """One TCP connection to ``server``, checked out of (or back in) its pool."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server: UpstreamServer
    created: float
    last_used: float
    requests_served: int = 0

    @property
    def reused(self) -> bool:
        """True when the connection carried a request before: a failure before any response
        byte may then be the upstream closing it while idle, which is safe to retry."""
        return self.requests_served > 0

    def close(self) -> None:
        self.writer.close()


class NoUpstreamAvailable(Exception):
    """No eligible server (every one unhealthy, ejected or already tried): answer 502."""


class UpstreamConnectError(Exception):
    """A connect to ``server`` failed. Retry on another server if allowed; otherwise answer
    504 when ``timed_out``, 502 when refused or unreachable."""

    def __init__(self, server: UpstreamServer, timed_out: bool, reason: str) -> None:
        super().__init__(f"upstream {server.label}: {reason}")
        self.server = server
        self.timed_out = timed_out
        self.reason = reason


class ServerSnapshot(TypedDict):
    label: str
    healthy: bool
    ejected: bool
    ejected_for: float  # seconds left, 0.0 when not ejected
    outstanding: int
    idle_connections: int
    consecutive_fails: int


StateListener = Callable[[UpstreamServer], None]


class UpstreamPool:
    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.servers: tuple[UpstreamServer, ...] = tuple(
            UpstreamServer(host, port) for host, port in settings.servers
        )
        self._idle: dict[UpstreamServer, deque[UpstreamConnection]] = {
            server: deque() for server in self.servers
        }
        # Where the next round-robin scan starts, over the full server list so that
        # excluding or ejecting one server does not reshuffle the order of the others.
        self._cursor = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False
        # Bumped on every health/ejection change; ``wait_for_state`` and listeners follow it.
        self.state_version = 0
        self._state_waiters: set[asyncio.Future[None]] = set()
        self._listeners: list[StateListener] = []

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the health-check task (its first round runs now, without delaying start-up)
        and the idle sweep."""
        if self._started:
            raise RuntimeError(f"pool {self.name}: already started")
        self._started = True
        if self.settings.health_check is not None:
            self._tasks.append(
                asyncio.create_task(
                    self._health_loop(self.settings.health_check),
                    name=f"pqproxy-health-{self.name}",
                )
            )
        if self.settings.max_idle_per_server > 0:
            self._tasks.append(
                asyncio.create_task(self._sweep_loop(), name=f"pqproxy-idle-sweep-{self.name}")
            )

    async def close(self) -> None:
        """Stop the tasks and close every idle connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for server in self.servers:
            if server._ejection_timer is not None:
                server._ejection_timer.cancel()
                server._ejection_timer = None
        closing: list[asyncio.StreamWriter] = []
        for server in self.servers:
            idle = self._idle[server]
            while idle:
                conn = idle.pop()
                conn.close()
                closing.append(conn.writer)
        pending: set[asyncio.Future[Any]] = set(self._tasks)
        pending.update(asyncio.ensure_future(_wait_closed(w)) for w in closing)
        self._tasks.clear()
        if pending:
            _done, not_done = await asyncio.wait(pending, timeout=CLOSE_TIMEOUT)
            if not_done:
                logger.warning(
                    "pool %s: %d tasks/sockets still closing after %.1fs",
                    self.name,
                    len(not_done),
                    CLOSE_TIMEOUT,
                )

    @property
    def closed(self) -> bool:
        return self._closed

    # --- choosing a server --------------------------------------------------------------

    def pick(self, exclude: frozenset[UpstreamServer] = frozenset()) -> UpstreamServer:
        """The next server by the balance policy among the eligible ones not in ``exclude``."""
        if self._closed:
            raise NoUpstreamAvailable(f"pool {self.name}: closed")
        now = time.monotonic()
        for server in self.servers:
            # Lazily, in case the loop has not yet run the ejection timer.
            if server.ejected_until is not None and now >= server.ejected_until:
                self._end_ejection(server, probation=True)
        eligible = [
            s for s in self.servers if s.healthy and not s.is_ejected(now) and s not in exclude
        ]
        if not eligible:
            raise NoUpstreamAvailable(self._unavailable_message(exclude, now))
        if self.settings.balance == "least_outstanding":
            fewest = min(s.outstanding for s in eligible)
            candidates = {s for s in eligible if s.outstanding == fewest}
        else:
            candidates = set(eligible)
        count = len(self.servers)
        for step in range(count):
            index = (self._cursor + step) % count
            server = self.servers[index]
            if server in candidates:
                self._cursor = (index + 1) % count
                return server
        raise AssertionError("unreachable: a candidate is always among the servers")

    def _unavailable_message(self, exclude: frozenset[UpstreamServer], now: float) -> str:
        reasons: list[str] = []
        for server in self.servers:
            if server in exclude:
                why = "already tried"
            elif not server.healthy:
                why = "unhealthy"
            else:
                assert server.ejected_until is not None
                why = f"ejected for {server.ejected_until - now:.1f}s"
            reasons.append(f"{server.label} {why}")
        if len(reasons) > MAX_SERVERS_IN_MESSAGE:
            more = len(reasons) - MAX_SERVERS_IN_MESSAGE
            reasons = reasons[:MAX_SERVERS_IN_MESSAGE] + [f"{more} more"]
        count = len(self.servers)
        if exclude & set(self.servers):
            head = f"pool {self.name}: no server left to try among {count}"
        else:
            head = f"pool {self.name}: all {count} servers unhealthy or ejected"
        return f"{head} ({', '.join(reasons)})"

    def begin(self, server: UpstreamServer) -> None:
        """Count a request outstanding on ``server`` (from pick to the end of its response)."""
        server.outstanding += 1

    def end(self, server: UpstreamServer) -> None:
        if server.outstanding <= 0:
            # An unbalanced end would skew least_outstanding for the life of the process.
            logger.error("pool %s: end() without begin() for %s", self.name, server.label)
            return
        server.outstanding -= 1

    @contextlib.contextmanager
    def outstanding(self, server: UpstreamServer) -> Iterator[UpstreamServer]:
        self.begin(server)
        try:
            yield server
        finally:
            self.end(server)

    # --- connections --------------------------------------------------------------------

    async def connect(self, server: UpstreamServer) -> UpstreamConnection:
        """An idle keep-alive connection to ``server`` if a usable one exists, else a new one
        opened within ``connect_timeout``. A failed connect counts against the server."""
        if self._closed:
            raise NoUpstreamAvailable(f"pool {self.name}: closed")
        idle = self._idle[server]
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if self._is_reusable(conn, now):
                return conn
            conn.close()
        timeout = self.settings.connect_timeout
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(server.host, server.port), timeout
            )
        except TimeoutError:
            reason = f"connect timed out after {timeout:g}s"
            self.report_failure(server, reason)
            raise UpstreamConnectError(server, True, reason) from None
        except OSError as exc:
            reason = _connect_error_reason(exc)
            self.report_failure(server, reason)
            raise UpstreamConnectError(server, False, reason) from None
        if self._closed:
            writer.close()
            raise NoUpstreamAvailable(f"pool {self.name}: closed")
        now = time.monotonic()
        return UpstreamConnection(reader, writer, server, created=now, last_used=now)

    async def acquire(self, tried: set[UpstreamServer]) -> UpstreamConnection:
        """Pick, count the request outstanding, and connect; on a connect error try another
        server, up to ``retries`` more. Every server tried is added to ``tried``.

        The returned connection's server has been ``begin()``-ed: the caller must
        ``end(conn.server)`` when the response is over. Raises the last
        ``UpstreamConnectError`` when the attempts run out after a failure (so a final
        timeout becomes 504), ``NoUpstreamAvailable`` when no server was eligible at all.
        """
        last_error: UpstreamConnectError | None = None
        for _attempt in range(1 + self.settings.retries):
            try:
                server = self.pick(frozenset(tried))
            except NoUpstreamAvailable:
                if last_error is not None:
                    raise last_error from None
                raise
            tried.add(server)
            self.begin(server)
            try:
                return await self.connect(server)
            except UpstreamConnectError as exc:
                last_error = exc
                self.end(server)
            except BaseException:
                self.end(server)
                raise
        assert last_error is not None
        raise last_error

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Back to the idle list (newest first, the oldest dropped beyond the cap) or closed.
        ``reusable`` means the exchange ended cleanly and neither side asked to close."""
        conn.requests_served += 1
        conn.last_used = time.monotonic()
        server = conn.server
        if (
            not reusable
            or self._closed
            or self.settings.max_idle_per_server <= 0
            or not server.healthy
            or server.is_ejected(conn.last_used)
            or not self._is_reusable(conn, conn.last_used)
        ):
            conn.close()
            return
        idle = self._idle[server]
        idle.append(conn)
        while len(idle) > self.settings.max_idle_per_server:
            idle.popleft().close()

    def idle_count(self, server: UpstreamServer) -> int:
        return len(self._idle[server])

    def _is_reusable(self, conn: UpstreamConnection, now: float) -> bool:
        if now - conn.last_used >= self.settings.idle_timeout:
            return False
        reader, writer = conn.reader, conn.writer
        if writer.is_closing() or reader.at_eof() or reader.exception() is not None:
            return False
        # Unread bytes on an idle connection are a response to nobody (often an upstream's
        # 408 before it closes); the next request would read them as its own. at_eof() stays
        # False while such bytes are buffered, so look at the buffer itself.
        if len(getattr(reader, "_buffer", b"")) > 0:
            return False
        # Request bytes still queued means the last exchange did not finish writing.
        return writer.transport.get_write_buffer_size() == 0

    def _drop_idle(self, server: UpstreamServer) -> None:
        idle = self._idle[server]
        while idle:
            idle.pop().close()

    def sweep_idle(self) -> int:
        """Close idle connections that expired or died; returns how many were closed."""
        now = time.monotonic()
        dropped = 0
        for server in self.servers:
            idle = self._idle[server]
            keep = [c for c in idle if self._is_reusable(c, now)]
            if len(keep) != len(idle):
                for conn in idle:
                    if conn not in keep:
                        conn.close()
                        dropped += 1
                idle.clear()
                idle.extend(keep)
        return dropped

    async def _sweep_loop(self) -> None:
        interval = min(self.settings.idle_timeout / 2, MAX_SWEEP_INTERVAL)
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep_idle()
            except Exception as exc:
                logger.error("pool %s: idle sweep failed: %r", self.name, exc)

    # --- passive failure tracking -------------------------------------------------------

    def report_failure(self, server: UpstreamServer, reason: str) -> None:
        """A connect error or a 5xx response from ``server``; ejects it after ``max_fails``
        in a row."""
        max_fails = self.settings.max_fails
        if server.is_ejected():
            # In-flight requests of an ejected server may still fail; the ejection stands as
            # it is (logged once, not extended).
            return
        server.consecutive_fails += 1
        logger.debug(
            "pool %s: %s failure %d: %s", self.name, server.label, server.consecutive_fails, reason
        )
        if max_fails <= 0 or server.consecutive_fails < max_fails:
            return
        ejection_time = self.settings.ejection_time
        server.ejected_until = time.monotonic() + ejection_time
        server._check_passes = 0
        logger.warning(
            "pool %s: %s ejected for %gs after %d consecutive failures (last: %s)",
            self.name,
            server.label,
            ejection_time,
            server.consecutive_fails,
            reason,
        )
        if server._ejection_timer is not None:
            server._ejection_timer.cancel()
        server._ejection_timer = None
        if not self._closed:
            with contextlib.suppress(RuntimeError):  # no running loop: pick() checks lazily
                loop = asyncio.get_running_loop()
                server._ejection_timer = loop.call_later(
                    ejection_time, self._ejection_timer_fired, server
                )
        self._drop_idle(server)
        self._notify(server)

    def report_success(self, server: UpstreamServer) -> None:
        server.consecutive_fails = 0

    def _ejection_timer_fired(self, server: UpstreamServer) -> None:
        server._ejection_timer = None
        # The timer is the authority that the time has passed: uvloop's clock may run a
        # hair behind time.monotonic(), so do not second-guess it with a comparison.
        if server.ejected_until is not None:
            self._end_ejection(server, probation=True)

    def _end_ejection(self, server: UpstreamServer, probation: bool) -> None:
        server.ejected_until = None
        if server._ejection_timer is not None:
            server._ejection_timer.cancel()
            server._ejection_timer = None
        if probation:
            # Back on probation: one more failure ejects it again.
            server.consecutive_fails = max(self.settings.max_fails - 1, 0)
            logger.info("pool %s: %s back from ejection (on probation)", self.name, server.label)
        else:
            server.consecutive_fails = 0
            logger.info("pool %s: %s ejection cleared by health checks", self.name, server.label)
        self._notify(server)

    # --- state changes ------------------------------------------------------------------

    def add_state_listener(self, listener: StateListener) -> Callable[[], None]:
        """Call ``listener(server)`` on every health/ejection change; returns the remover."""
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    async def wait_for_state(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Return once ``predicate()`` holds, re-checked after each state change; raises
        TimeoutError after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while not predicate():
                waiter: asyncio.Future[None] = loop.create_future()
                self._state_waiters.add(waiter)
                try:
                    await waiter
                finally:
                    self._state_waiters.discard(waiter)

    def _notify(self, server: UpstreamServer) -> None:
        self.state_version += 1
        for waiter in self._state_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._state_waiters.clear()
        for listener in list(self._listeners):
            try:
                listener(server)
            except Exception as exc:
                logger.error("pool %s: state listener failed: %r", self.name, exc)

    def snapshot(self) -> list[ServerSnapshot]:
        now = time.monotonic()
        return [
            ServerSnapshot(
                label=s.label,
                healthy=s.healthy,
                ejected=s.is_ejected(now),
                ejected_for=max(s.ejected_until - now, 0.0) if s.ejected_until is not None else 0.0,
                outstanding=s.outstanding,
                idle_connections=len(self._idle[s]),
                consecutive_fails=s.consecutive_fails,
            )
            for s in self.servers
        ]

    # --- active health checks -----------------------------------------------------------

    async def _health_loop(self, hc: HealthCheckSettings) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                results = await asyncio.gather(
                    *(self.check(s, hc) for s in self.servers), return_exceptions=True
                )
                for server, result in zip(self.servers, results, strict=True):
                    if isinstance(result, BaseException):
                        if not isinstance(result, Exception):
                            raise result
                        # A bug in the check itself: the server is not to blame, but say so.
                        logger.error(
                            "pool %s: health check of %s failed: %r",
                            self.name,
                            server.label,
                            result,
                        )
                        continue
                    self._record_check(server, *result, hc)
            except Exception as exc:
                logger.error("pool %s: health-check round failed: %r", self.name, exc)
            # Start to start: a slow round does not push every later one back.
            await asyncio.sleep(max(hc.interval - (loop.time() - started), 0.0))

    async def check(self, server: UpstreamServer, hc: HealthCheckSettings) -> tuple[bool, str]:
        """One health check of ``server`` on a fresh connection: ``(passed, reason)``."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(hc.timeout):
                reader, writer = await asyncio.open_connection(server.host, server.port)
                status = await _read_health_status(reader, writer, server, hc.path)
        except TimeoutError:
            return False, f"timeout after {hc.timeout:g}s"
        except OSError as exc:
            return False, _connect_error_reason(exc)
        except h11.ProtocolError as exc:
            return False, f"bad response: {exc}"
        finally:
            if writer is not None:
                writer.close()
        if status is None:
            return False, "closed before a response"
        if 200 <= status < 400:
            return True, f"status {status}"
        return False, f"status {status}"

    def _record_check(
        self, server: UpstreamServer, ok: bool, reason: str, hc: HealthCheckSettings
    ) -> None:
        if ok:
            server._check_fails = 0
            # Capped: only "at least the threshold" matters, and the count then stays small.
            server._check_passes = min(server._check_passes + 1, hc.healthy_threshold)
            if server._check_passes < hc.healthy_threshold:
                return
            if not server.healthy:
                server.healthy = True
                server.consecutive_fails = 0
                logger.info(
                    "pool %s: %s healthy again after %d passed health checks",
                    self.name,
                    server.label,
                    server._check_passes,
                )
                self._notify(server)
            if server.ejected_until is not None:
                self._end_ejection(server, probation=False)
        else:
            server._check_passes = 0
            server._check_fails = min(server._check_fails + 1, hc.unhealthy_threshold)
            if server.healthy and server._check_fails >= hc.unhealthy_threshold:
                server.healthy = False
                logger.warning(
                    "pool %s: %s unhealthy after %d failed health checks (last: %s)",
                    self.name,
                    server.label,
                    server._check_fails,
                    reason,
                )
                self._drop_idle(server)
                self._notify(server)


async def _read_health_status(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: UpstreamServer, path: str
) -> int | None:
    """Send the check request and read up to the end of the response head; the status, or
    None when the upstream closed first. The caller bounds the time and closes the socket."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEALTH_RESPONSE_HEAD)
    request = h11.Request(
        method="GET",
        target=path,
        headers=[
            ("Host", server.label),
            ("User-Agent", HEALTH_USER_AGENT),
            ("Connection", "close"),
        ],
    )
    for outgoing in (request, h11.EndOfMessage()):
        data = conn.send(outgoing)
        assert data is not None  # None only for ConnectionClosed
        writer.write(data)
    await writer.drain()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(HEALTH_READ_CHUNK))
        elif isinstance(event, h11.Response):
            return event.status_code
        elif isinstance(event, h11.ConnectionClosed):
            return None
        elif isinstance(event, h11.InformationalResponse):
            continue
        else:
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")


def _connect_error_reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    return f"connect failed: {exc.strerror or exc}"


async def _wait_closed(writer: asyncio.StreamWriter) -> None:
    # The socket is already closed; a reset reported while flushing is no news.
    with contextlib.suppress(OSError):
        await writer.wait_closed()
