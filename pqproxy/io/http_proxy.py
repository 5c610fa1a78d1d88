"""The HTTP/1.1 proxy over one established TLS connection.

One ``HttpProxySession`` per client connection, running as a task. It parses
requests with h11, forwards each to a server from the listener's upstream pool
over a keep-alive connection, and streams both bodies chunk by chunk: a token
that the model server writes reaches the client in the same moment, never
buffered to the end of the response.

The rules of HTTP (framing checks, hop-by-hop headers, forwarding headers,
error bodies) live in ``pqproxy.relay`` (``request``, ``forwarding``,
``response``, ``errors``); this module only moves bytes and
keeps time:

- header read: ``header_read_timeout`` for a request head once its first byte
  arrived (and for the first request of a connection) -> 408;
- keep-alive idle: ``idle_timeout`` between requests -> quiet close;
- upstream connect: the pool's connect timeout -> 504 (refused -> 502), retried
  on another server while the request has not reached any upstream;
- upstream read: ``upstream_read_timeout`` between bytes from the upstream ->
  504 before the response head, an aborted stream after it.

Pipelined requests are answered in order: h11 holds a pipelined request until
the current response is complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import h11

from ..logtext import printable
from ..relay.body import ChunkedBodyGuard, body_too_large
from ..relay.errors import CLOSING_STATUSES, HttpError, classify_h11_error
from ..relay.forwarding import (
    ClientTLSInfo,
    ForwardingOptions,
    UnderscoreHeaderRefused,
    forwarded_request_fields,
    request_host,
    upstream_request_headers,
)
from ..relay.identity import identity_label
from ..relay.request import (
    DEFAULT_MAX_HEADER_COUNT,
    HeaderLimits,
    RequestHeadReader,
    check_request,
    effective_http_version,
    is_idempotent,
    request_summary,
    valid_authority,
)
from ..relay.response import UpstreamResponseParser, downstream_response_headers
from .telemetry import Telemetry
from .upstream import (
    NoUpstreamAvailable,
    UpstreamConnectError,
    UpstreamConnection,
    UpstreamPool,
    UpstreamServer,
)

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("pqproxy.access")

# Bytes held from the client before we stop reading its socket: one large
# TLS record's worth plus slack; h11 buffers what it has not parsed yet.
CLIENT_BUFFER_HIGH_WATER = 256 * 1024
# A response head from the model server larger than this is a broken upstream (-> 502),
# however many reads it arrived in.
MAX_UPSTREAM_HEAD = 64 * 1024
# Interim (1xx) responses relayed for one request; the next one is a flood (-> 502). RFC 9110
# §15.2 sets no limit, and 103 Early Hints may repeat, but a real server sends a few.
MAX_INTERIM_RESPONSES = 16
UPSTREAM_READ_CHUNK = 64 * 1024
# A client that sent "Expect: 100-continue" waits for the 100 before its body; when the
# upstream sends none within this, the proxy sends it (nginx does at once, curl gives up
# waiting after 1 s): an upstream that ignores Expect must not cost each upload a stall.
EXPECT_CONTINUE_WAIT = 1.0
# What a client refused by the allow list reads; which names it was refused under goes to the
# log only.
FORBIDDEN_MESSAGE = "The client certificate does not grant access to this service."


@dataclass(frozen=True)
class HttpSettings:
    header_read_timeout: float = 30.0
    idle_timeout: float = 75.0
    upstream_read_timeout: float = 600.0
    max_header_bytes: int = 32 * 1024
    max_body_bytes: int = 100 * 2**20
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT
    # Request bytes read before the first byte goes upstream (0: stream at once).
    request_buffering: int = 0
    # How long the upstream has to send 100 Continue before the proxy sends it.
    expect_continue_wait: float = EXPECT_CONTINUE_WAIT
    forwarding: ForwardingOptions = field(default_factory=ForwardingOptions)
    retries: int = 2


class Downstream(Protocol):
    """What the session needs from the TLS client connection."""

    def send(self, data: bytes) -> None:
        """Encrypt and write application data to the client."""
        ...

    async def drain(self) -> None:
        """Wait while the client's write buffer is above its high-water mark."""
        ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


@dataclass
class RequestRecord:
    """What the access log says about one request."""

    method: str = "-"
    path: str = "-"  # "METHOD /path" (relay.request.request_summary: no query string)
    status: int = 0
    upstream: str = "-"
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = field(default_factory=time.monotonic)
    # The first byte of the response body from the upstream (the end of the response when it
    # has no body): for a token stream, the first token, not the headers that precede it.
    first_byte: float | None = None
    error: str = ""


@dataclass(frozen=True)
class ConnectionInfo:
    """What the access log says about the connection a request came on."""

    client: str  # address:port
    tls: ClientTLSInfo
    handshake_ms: float


class _ClientGone(Exception):
    """The client closed or the connection is going away. ``socket_error``: a reset or a
    broken pipe, not an orderly close."""

    def __init__(self, reason: str, *, socket_error: bool = False) -> None:
        super().__init__(reason)
        self.socket_error = socket_error


class _UpstreamFailed(Exception):
    def __init__(self, status: int, reason: str, *, response_started: bool) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.response_started = response_started


class HttpProxySession:
    def __init__(
        self,
        downstream: Downstream,
        settings: HttpSettings,
        pool: Callable[[], UpstreamPool],
        tls_info: ClientTLSInfo,
        client_ip: str,
        peer: str,
        on_request: Callable[[RequestRecord], None] | None = None,
        *,
        info: ConnectionInfo | None = None,
        telemetry: Telemetry | None = None,
        denied: str | None = None,
    ) -> None:
        self._downstream = downstream
        self._settings = settings
        # Read per request: after a reload, a kept-alive connection must use the
        # listener's new pool, not the one it started with (which gets closed).
        self._current_pool = pool
        self._pool = pool()
        self._tls_info = tls_info
        self._client_ip = client_ip
        self._peer = peer
        self._on_request = on_request
        self._info = info
        self._telemetry = telemetry
        # Why this client may not use the upstream (its certificate is not on the listener's
        # allow list): every request is answered 403 here and the connection closed.
        self._denied = denied
        self._limits = HeaderLimits(
            max_header_bytes=settings.max_header_bytes, max_header_count=settings.max_header_count
        )
        # A request head is held here until complete, and only then given to h11.
        self._head_reader = RequestHeadReader(self._limits)
        # Body events read before the request went upstream (request_buffering), for the pump.
        self._prefetched: deque[h11.Data | h11.EndOfMessage] = deque()
        self._buffer = bytearray()
        self._eof = False
        self._data_ready = asyncio.Event()
        self._paused = False
        self._draining = False
        self._loop = asyncio.get_running_loop()
        # Why the connection is being torn down under us (a send timeout), for the access
        # log line of the request it cancels.
        self._abort_reason: str | None = None
        # The chunk-size reader of the request body being read, when it is chunked.
        self._chunk_guard: ChunkedBodyGuard | None = None

    # --- fed by the TLS connection ---------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._buffer += data
        self._data_ready.set()
        if not self._paused and len(self._buffer) > CLIENT_BUFFER_HIGH_WATER:
            self._paused = True
            self._downstream.pause_reading()

    def feed_eof(self) -> None:
        self._eof = True
        self._data_ready.set()

    def begin_drain(self) -> None:
        """Finish the request in flight, then close instead of waiting for another."""
        self._draining = True
        self._data_ready.set()

    def abort(self, reason: str) -> None:
        """The connection is being aborted (its task is cancelled next): ``reason`` goes in
        the access log line of the request in flight."""
        self._abort_reason = reason

    async def _read_client(self, timeout: float) -> bytes:
        """Up to everything buffered; b"" at EOF; TimeoutError after ``timeout``."""
        if not self._buffer and not self._eof:
            self._data_ready.clear()
            await asyncio.wait_for(self._data_ready.wait(), timeout)
            if not self._buffer and not self._eof:
                raise _Woken
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._paused:
            self._paused = False
            self._downstream.resume_reading()
        return data

    # --- the request loop ------------------------------------------------------------------

    async def run(self) -> str:
        """Serve requests until the connection should close; returns why."""
        client = self._limits.server_connection()
        first = True
        while True:
            try:
                request = await self._receive_head(client, first)
            except HttpError as error:
                record = RequestRecord()
                self._send_error(client, error, record)
                self._log_request(record)
                return f"{error.status}: {error.reason}"
            if request is None:
                return "client closed" if first else "keep-alive ended"
            first = False
            record = RequestRecord(method=request.method.decode("ascii", "replace"))
            record.path = request_summary(request)
            try:
                keep_open = await self._serve_request(client, request, record)
            except asyncio.CancelledError:
                # The connection went away under the request (the client vanished, a send
                # timeout, shutdown): the request still gets its access-log line.
                record.error = record.error or self._abort_reason or "connection closed"
                self._log_request(record)
                raise
            self._log_request(record)
            if not keep_open:
                return record.error or "connection: close"
            if self._draining:
                return "draining"
            if client.our_state is h11.DONE and client.their_state is h11.DONE:
                client = self._next_cycle(client)
            else:
                return "request not finished"

    async def _receive_head(self, client: h11.Connection, first: bool) -> h11.Request | None:
        settings = self._settings
        reader = self._head_reader
        now = self._loop.time()
        # A fresh connection gets header_read to send its first request; an idle
        # keep-alive connection gets idle_timeout before its next one starts.
        idle_deadline = now + (settings.header_read_timeout if first else settings.idle_timeout)
        head_deadline: float | None = None
        while True:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError as exc:
                raise classify_h11_error(exc) from None
            if isinstance(event, h11.Request):
                return event
            if isinstance(event, h11.ConnectionClosed):
                return None
            if event is not h11.NEED_DATA:
                raise HttpError(400, f"unexpected {type(event).__name__} before a request")
            # h11 gets a head only once it is whole (RequestHeadReader: its Transfer-Encoding
            # made readable, 414 for a long request line); the bytes after it go back to the
            # session buffer, for the body pump or the next request.
            complete = reader.next_head()
            if complete is not None:
                head, rest = complete
                self._buffer[:0] = rest
                client.receive_data(head)
                continue
            partial = len(reader) > 0
            if self._draining and not partial:
                return None
            if partial and head_deadline is None:
                head_deadline = self._loop.time() + settings.header_read_timeout
            deadline = head_deadline if head_deadline is not None else idle_deadline
            try:
                data = await self._read_client(max(0.0, deadline - self._loop.time()))
            except _Woken:
                continue
            except TimeoutError:
                if partial or first:
                    raise HttpError(408, "request head not received in time") from None
                return None
            if not data:
                if partial:
                    raise HttpError(400, "connection closed inside a request head")
                client.receive_data(b"")
                continue
            reader.receive(data)

    def _next_cycle(self, client: h11.Connection) -> h11.Connection:
        """A fresh h11 connection for the next request on this one. What h11 already holds
        past the request it finished (read with the body, pipelined) goes back to the session
        buffer, so that the next head, too, goes through the head reader first."""
        leftover, _closed = client.trailing_data
        self._buffer[:0] = leftover
        # Closed or not, self._eof already says so: _read_client returns b"" once drained.
        return self._limits.server_connection()

    async def _serve_request(
        self, client: h11.Connection, request: h11.Request, record: RequestRecord
    ) -> bool:
        try:
            if self._denied is not None:
                raise HttpError(403, self._denied, message=FORBIDDEN_MESSAGE)
            # Sizes first (431, 414): the other checks read the fields and the target.
            self._limits.check_head(request)
            target = check_request(request)
            if body_too_large(request.headers, self._settings.max_body_bytes):
                raise HttpError(413, "declared body larger than max_body_bytes")
            buffering = self._settings.request_buffering > 0 and _has_body(request)
            headers = upstream_request_headers(
                # With request_buffering the proxy answers Expect itself.
                forwarded_request_fields(request, expect_answered=buffering),
                client_ip=self._client_ip,
                host=request_host(request) or None,
                tls=self._tls_info,
                options=self._settings.forwarding,
                http_version=effective_http_version(request.http_version),
                upstream_host=target.authority or self._default_host(request),
                on_dropped=self._underscore_dropped,
            )
            self._chunk_guard = None
            if any(name == b"transfer-encoding" for name, _ in request.headers):
                # check_request let through only a single chunked: read its size lines,
                # those already received at once (before the upstream hears of it).
                self._chunk_guard = ChunkedBodyGuard(self._settings.max_body_bytes)
                self._chunk_guard.feed(client.trailing_data[0])
                self._chunk_guard.peek(bytes(self._buffer))
        except HttpError as error:
            if isinstance(error, UnderscoreHeaderRefused) and self._telemetry is not None:
                self._telemetry.underscore_headers("rejected")
            self._send_error(client, error, record)
            return False
        outbound = h11.Request(method=request.method, target=target.target, headers=headers)
        if not _has_body(request):
            # h11 reports the end of a bodiless request as its own event; take it now
            # so the client side reaches DONE and the connection can be kept alive.
            end = client.next_event()
            if not isinstance(end, h11.EndOfMessage):
                self._send_error(client, HttpError(400, "body on a bodiless request"), record)
                return False
        try:
            if buffering:
                await self._buffer_request_body(client, record)
            return await self._forward(client, outbound, record)
        except HttpError as error:
            self._send_error(client, error, record)
            return False
        except _ClientGone as gone:
            record.error = str(gone)
            if gone.socket_error and self._telemetry is not None:
                self._telemetry.connection_error("client")
            return False
        except _UpstreamFailed as failure:
            record.error = failure.reason
            if failure.response_started:
                # Too late for a status line: the only honest signal is to cut
                # the stream, so the client sees an incomplete response.
                record.status = record.status or failure.status
                logger.warning(
                    "peer=%s %s aborted mid-response: %s", self._peer, record.path, failure.reason
                )
                return False
            # The request was read to its end: after our 502/504 the next request on this
            # connection starts at a known byte, so the connection stays (as nginx does).
            keep = client.their_state is h11.DONE and failure.status not in CLOSING_STATUSES
            self._send_error(
                client, HttpError(failure.status, failure.reason), record, close=not keep
            )
            return keep and client.our_state is h11.DONE
        except OSError as exc:
            # A socket error that no narrower handler classified (ConnectionResetError,
            # BrokenPipeError, ...): client-side ones arrive as _ClientGone, so this one is
            # the upstream's. A classified end either way: a status if none was sent yet, an
            # access-log line and a metric; never a traceback.
            reason = f"upstream connection lost: {type(exc).__name__}"
            if self._telemetry is not None:
                self._telemetry.connection_error("upstream")
            if record.status:
                record.error = reason
            else:
                self._send_error(client, HttpError(502, reason), record)
            return False

    def _default_host(self, request: h11.Request) -> bytes | None:
        """The Host for an HTTP/1.0 request that has none (RFC 9112 §3.2 requires it in 1.1
        only): the SNI the client connected with, the authority it asked for; without one,
        the upstream server's address. None when the request has a Host."""
        if any(name == b"host" and value for name, value in request.headers):
            return None
        sni = (self._tls_info.sni or "").encode("ascii", "replace")
        if sni and valid_authority(sni):
            return sni
        return self._pool.servers[0].label.encode("ascii")

    async def _buffer_request_body(self, client: h11.Connection, record: RequestRecord) -> None:
        """request_buffering: read up to that many body bytes before the upstream hears of
        the request, so a body that is malformed (or over max_body_bytes) within them is
        refused with no upstream involved. A larger body streams on from there: the pump
        sends what was read here first."""
        budget = self._settings.request_buffering
        prefetched = self._prefetched
        prefetched.clear()
        if client.they_are_waiting_for_100_continue:
            # The proxy is the one that waits for the body now (Expect is not forwarded).
            self._send_continue(client, record)
        buffered = 0
        while buffered <= budget:
            event = await self._next_body_event(client, record)
            if isinstance(event, h11.Data):
                buffered += len(event.data)
                if buffered > self._settings.max_body_bytes:
                    raise HttpError(413, "request body larger than max_body_bytes")
                prefetched.append(event)
            elif isinstance(event, h11.EndOfMessage):
                prefetched.append(event)
                return
            else:
                return

    async def _forward(
        self, client: h11.Connection, outbound: h11.Request, record: RequestRecord
    ) -> bool:
        pool = self._pool = self._current_pool()
        tried: set[UpstreamServer] = set()
        has_body = _has_body(outbound)
        attempts_left = self._settings.retries
        while True:
            try:
                conn = await pool.acquire(tried)
            except NoUpstreamAvailable as exc:
                raise _UpstreamFailed(502, str(exc), response_started=False) from None
            except UpstreamConnectError as exc:
                status = 504 if exc.timed_out else 502
                raise _UpstreamFailed(
                    status, f"upstream {exc.server.label}: {exc.reason}", response_started=False
                ) from None
            record.upstream = conn.server.label
            try:
                return await self._exchange(client, outbound, conn, record, has_body)
            except _StaleConnection as stale:
                # A reused keep-alive socket the upstream had already closed, before any
                # byte of a response to an idempotent request (or before the request left):
                # it may go again, even to the same server.
                conn.close()
                tried.discard(conn.server)
                if attempts_left <= 0:
                    raise _UpstreamFailed(502, stale.reason, response_started=False) from None
                attempts_left -= 1
                if self._telemetry is not None:
                    self._telemetry.upstream_retry("retried")
            finally:
                pool.end(conn.server)

    async def _exchange(
        self,
        client: h11.Connection,
        outbound: h11.Request,
        conn: UpstreamConnection,
        record: RequestRecord,
        has_body: bool,
    ) -> bool:
        pool, settings = self._pool, self._settings
        upstream = UpstreamResponseParser(MAX_UPSTREAM_HEAD)
        meter = _ResponseMeter()
        reused = conn.reused
        try:
            conn.writer.write(upstream.send(outbound))
        except (ConnectionError, RuntimeError) as exc:
            raise self._write_failure(conn, reused, has_body, exc) from None
        body_task: asyncio.Task[None] | None = None
        body_errors: list[BaseException] = []
        if has_body:
            body_task = asyncio.create_task(self._pump_request_body(client, upstream, conn, record))

            def body_finished(task: asyncio.Task[None]) -> None:
                if not task.cancelled() and task.exception() is not None:
                    # Stop waiting for an answer to a request that cannot complete.
                    body_errors.append(task.exception())  # type: ignore[arg-type]
                    conn.close()

            body_task.add_done_callback(body_finished)
        else:
            _write_upstream(conn, upstream.send(h11.EndOfMessage()))
        response_started = False
        got_any = False
        try:
            while True:
                event = await self._next_upstream_event(
                    upstream,
                    conn,
                    settings.upstream_read_timeout,
                    response_started,
                    body_task,
                    meter,
                )
                if event is None:
                    # EOF before any byte of a response on a reused socket: the upstream
                    # closed it as the request went out (its keep-alive timer fired), or
                    # read the request and died. Only an idempotent request may go again
                    # (RFC 9112 §9.3.1); a body already streamed cannot be sent again.
                    if reused and not got_any and not body_errors:
                        if not has_body and is_idempotent(outbound.method):
                            raise _StaleConnection(
                                f"upstream {conn.server.label} closed idle socket"
                            )
                        if self._telemetry is not None:
                            self._telemetry.upstream_retry("not_retried")
                        method = outbound.method.decode("ascii", "replace")
                        raise _UpstreamFailed(
                            502,
                            f"upstream {conn.server.label} closed a reused connection without "
                            f"answering; {method} not retried "
                            f"({'request body sent' if has_body else 'not idempotent'})",
                            response_started=False,
                        )
                    if not body_errors:
                        # Otherwise we closed it ourselves, over the client's bad body.
                        pool.report_failure(conn.server, "closed before responding")
                    raise _UpstreamFailed(
                        502,
                        f"upstream {conn.server.label} closed the connection before responding",
                        response_started=response_started,
                    )
                got_any = True
                if isinstance(event, h11.InformationalResponse | h11.Response):
                    self._check_response_head(upstream, conn, meter, event)
                if isinstance(event, h11.InformationalResponse):
                    if _relay_interim(client, event):
                        self._send_client(client.send(event), record)
                    continue
                if isinstance(event, h11.Response):
                    response_started = True
                    record.status = event.status_code
                    if event.status_code >= 500:
                        pool.report_failure(conn.server, f"status {event.status_code}")
                    else:
                        pool.report_success(conn.server)
                    response = h11.Response(
                        status_code=event.status_code,
                        headers=downstream_response_headers(
                            event.headers, http_version=outbound.http_version
                        ),
                        reason=event.reason,
                    )
                    self._send_client(client.send(response), record)
                elif isinstance(event, h11.Data):
                    if record.first_byte is None:
                        record.first_byte = time.monotonic()
                    self._send_client(client.send(h11.Data(data=event.data)), record)
                    await self._drain_client()
                elif isinstance(event, h11.EndOfMessage):
                    if record.first_byte is None:
                        record.first_byte = time.monotonic()
                    self._send_client(client.send(h11.EndOfMessage()), record)
                    break
        except (_UpstreamFailed, _StaleConnection) as failure:
            conn.close()
            if body_errors:
                # The client side broke first (oversized or malformed body, or gone).
                raise body_errors[0] from None
            if body_task is not None:
                body_task.cancel()
            raise failure
        except h11.RemoteProtocolError as exc:
            conn.close()
            if body_errors:
                # We cut the response short by closing over the client's bad body.
                raise body_errors[0] from None
            # h11 hints 431 when an incomplete head outgrew MAX_UPSTREAM_HEAD.
            too_large = getattr(exc, "error_status_hint", 400) == 431
            self._invalid_response(conn, "head_too_large" if too_large else "malformed")
            raise _UpstreamFailed(
                502,
                f"upstream {conn.server.label} sent "
                + (
                    f"a response head over {MAX_UPSTREAM_HEAD} bytes"
                    if too_large
                    else f"a malformed response: {type(exc).__name__}"
                ),
                response_started=response_started,
            ) from None
        except BaseException:
            conn.close()
            if body_task is not None:
                body_task.cancel()
            raise
        if body_task is not None and not body_task.done() and client.their_state is h11.DONE:
            # The whole body was read from the client; the pump is only finishing its
            # last write to the upstream. Let it, rather than mistake it for an
            # upstream that answered early (which would close a healthy keep-alive).
            await asyncio.wait({body_task}, timeout=settings.upstream_read_timeout)
        body_done = body_task is None or body_task.done()
        if body_task is not None:
            if body_task.done():
                error = body_task.exception()
                if error is not None:
                    conn.close()
                    record.error = f"request body: {error}"
                    return False
            else:
                # The upstream answered before reading the whole body: the rest of
                # it cannot be skipped reliably, so this connection ends here.
                body_task.cancel()
        reusable_upstream = (
            body_done
            and upstream.our_state is h11.DONE
            and upstream.their_state is h11.DONE
            and not upstream.trailing_data[0]
        )
        pool.release(conn, reusable_upstream)
        return body_done and client.our_state is h11.DONE and client.their_state is h11.DONE

    def _check_response_head(
        self,
        upstream: h11.Connection,
        conn: UpstreamConnection,
        meter: _ResponseMeter,
        event: h11.InformationalResponse | h11.Response,
    ) -> None:
        """Caps on what the upstream sends before the response body, checked on each head:
        its size in bytes, exactly as received (h11 checks only a head still incomplete, so
        one that arrived whole in a read or two was never measured), and the number of
        interim responses."""
        consumed = meter.fed - len(upstream.trailing_data[0])
        size, meter.consumed = consumed - meter.consumed, consumed
        label = conn.server.label
        if size > MAX_UPSTREAM_HEAD:
            self._invalid_response(conn, "head_too_large")
            raise _UpstreamFailed(
                502,
                f"upstream {label} sent a response head of {size} bytes > {MAX_UPSTREAM_HEAD}",
                response_started=False,
            )
        if isinstance(event, h11.InformationalResponse):
            meter.interim += 1
            if meter.interim > MAX_INTERIM_RESPONSES:
                self._invalid_response(conn, "too_many_interim")
                raise _UpstreamFailed(
                    502,
                    f"upstream {label} sent more than {MAX_INTERIM_RESPONSES} interim responses",
                    response_started=False,
                )

    def _invalid_response(self, conn: UpstreamConnection, reason: str) -> None:
        self._pool.report_failure(conn.server, reason.replace("_", " "))
        if self._telemetry is not None:
            self._telemetry.invalid_upstream_response(reason)

    def _write_failure(
        self, conn: UpstreamConnection, reused: bool, has_body: bool, exc: BaseException
    ) -> Exception:
        conn.close()
        if reused and not has_body:
            return _StaleConnection(f"upstream {conn.server.label}: {type(exc).__name__}")
        self._pool.report_failure(conn.server, f"write failed: {type(exc).__name__}")
        return _UpstreamFailed(
            502, f"upstream {conn.server.label}: write failed", response_started=False
        )

    async def _next_upstream_event(
        self,
        upstream: h11.Connection,
        conn: UpstreamConnection,
        timeout: float,
        response_started: bool,
        body_task: asyncio.Task[None] | None = None,
        meter: _ResponseMeter | None = None,
    ) -> h11.Event | None:
        while True:
            event = upstream.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await self._read_upstream(conn, timeout, body_task)
                except TimeoutError:
                    self._pool.report_failure(conn.server, "read timeout")
                    raise _UpstreamFailed(
                        504,
                        f"upstream {conn.server.label} sent nothing for {timeout:g}s",
                        response_started=response_started,
                    ) from None
                except ConnectionError as exc:
                    if not response_started and not data_seen(upstream):
                        return None
                    raise _UpstreamFailed(
                        502,
                        f"upstream {conn.server.label} connection lost: {type(exc).__name__}",
                        response_started=response_started,
                    ) from None
                if not data and not response_started and not data_seen(upstream):
                    return None
                upstream.receive_data(data)
                if meter is not None:
                    meter.fed += len(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                if response_started:
                    raise _UpstreamFailed(
                        502,
                        f"upstream {conn.server.label} closed mid-response",
                        response_started=True,
                    )
                return None
            if isinstance(event, h11.Event):
                return event
            # PAUSED only follows a finished response, which the caller never reads past.
            return None

    @staticmethod
    async def _read_upstream(
        conn: UpstreamConnection, timeout: float, body_task: asyncio.Task[None] | None
    ) -> bytes:
        """The read timeout counts silence from the upstream once it has the whole
        request: a long upload is not an upstream that stopped answering (the upload
        has its own stall limits in the body pump)."""
        read = asyncio.ensure_future(conn.reader.read(UPSTREAM_READ_CHUNK))
        try:
            if body_task is not None and not body_task.done():
                await asyncio.wait({read, body_task}, return_when=asyncio.FIRST_COMPLETED)
            return await asyncio.wait_for(read, timeout)
        finally:
            if not read.done():
                read.cancel()

    async def _pump_request_body(
        self,
        client: h11.Connection,
        upstream: h11.Connection,
        conn: UpstreamConnection,
        record: RequestRecord,
    ) -> None:
        limit = self._settings.max_body_bytes
        prefetched = self._prefetched
        while True:
            # What request_buffering read before the request went upstream goes first.
            event = (
                prefetched.popleft() if prefetched else await self._next_body_event(client, record)
            )
            if isinstance(event, h11.Data):
                record.bytes_in += len(event.data)
                if record.bytes_in > limit:
                    raise HttpError(413, "request body larger than max_body_bytes")
                _write_upstream(conn, upstream.send(event))
                await self._drain_upstream(conn)
            elif isinstance(event, h11.EndOfMessage):
                _write_upstream(conn, upstream.send(h11.EndOfMessage()))
                await self._drain_upstream(conn)
                return
            else:
                return

    async def _next_body_event(
        self, client: h11.Connection, record: RequestRecord
    ) -> h11.Event | type[h11.PAUSED]:
        """The next event of the request body, reading the client as needed.

        A client that sent ``Expect: 100-continue`` waits for the 100 before its body. When
        none has gone to it (the upstream's, relayed, or ours) within expect_continue_wait,
        the proxy sends it, as nginx does: an upstream that ignores Expect would otherwise
        hold every upload for the client's own timeout (RFC 9110 §10.1.1 lets a client send
        the body anyway after an unspecified wait).
        """
        while True:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError as exc:
                raise classify_h11_error(exc) from None
            if isinstance(event, h11.Event) or event is h11.PAUSED:
                return event  # PAUSED comes only after EndOfMessage: callers stop on it
            waiting = client.they_are_waiting_for_100_continue
            timeout = self._settings.header_read_timeout
            if waiting:
                timeout = min(timeout, self._settings.expect_continue_wait)
            try:
                data = await self._read_client(timeout)
            except _Woken:
                continue
            except TimeoutError:
                if not waiting:
                    raise HttpError(408, "request body stalled") from None
                if client.they_are_waiting_for_100_continue:
                    self._send_continue(client, record)
                continue
            if not data:
                raise _ClientGone("client closed inside a request body")
            self._receive_body(client, data)

    def _send_continue(self, client: h11.Connection, record: RequestRecord) -> None:
        if client.our_state is h11.SEND_RESPONSE:
            continue_ = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            self._send_client(client.send(continue_), record)

    def _receive_body(self, client: h11.Connection, data: bytes) -> None:
        """Client bytes of a request body into h11, through the chunk-size reader first
        (every body byte h11 gets after the head must pass here, in order)."""
        guard = self._chunk_guard
        if guard is not None and not guard.done:
            guard.feed(data)
        client.receive_data(data)

    async def _drain_upstream(self, conn: UpstreamConnection) -> None:
        timeout = self._settings.upstream_read_timeout
        try:
            await asyncio.wait_for(conn.writer.drain(), timeout)
        except TimeoutError:
            self._pool.report_failure(conn.server, "stopped reading the request body")
            raise _UpstreamFailed(
                504,
                f"upstream {conn.server.label} took no request bytes for {timeout:g}s",
                response_started=False,
            ) from None

    # --- output ----------------------------------------------------------------------------

    def _send_client(self, data: bytes | None, record: RequestRecord) -> None:
        if data:
            record.bytes_out += len(data)
            try:
                self._downstream.send(data)
            except OSError as exc:  # ConnectionResetError: the client connection is gone
                raise _ClientGone(
                    f"client connection lost: {type(exc).__name__}", socket_error=True
                ) from None

    async def _drain_client(self) -> None:
        try:
            await self._downstream.drain()
        except OSError as exc:
            raise _ClientGone(
                f"client connection lost: {type(exc).__name__}", socket_error=True
            ) from None

    def _underscore_dropped(self, count: int) -> None:
        # Once per request, with the count only: the names are client text.
        logger.info(
            "peer=%s dropped %d request header(s) with an underscore in the name", self._peer, count
        )
        if self._telemetry is not None:
            self._telemetry.underscore_headers("dropped", count)

    def _send_error(
        self,
        client: h11.Connection,
        error: HttpError,
        record: RequestRecord,
        *,
        close: bool = True,
    ) -> None:
        """Log ``error`` and answer it when the client can still get a status. ``close``:
        say Connection: close (always for `CLOSING_STATUSES`)."""
        record.status = error.status
        record.error = error.reason
        level = logging.WARNING if error.status >= 500 else logging.INFO
        logger.log(
            level,
            "peer=%s %s -> %d: %s",
            self._peer,
            record.path,
            error.status,
            printable(error.reason, spaces=True),
            extra={"pqproxy_fields": {"status": error.status, "reason": error.reason}},
        )
        if client.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        response, body = error.response(
            close=close or error.status in CLOSING_STATUSES, head_request=record.method == "HEAD"
        )
        try:
            self._send_client(client.send(response), record)
            if body:
                self._send_client(client.send(h11.Data(data=body)), record)
            self._send_client(client.send(h11.EndOfMessage()), record)
        except h11.LocalProtocolError as exc:
            logger.info("peer=%s could not send %d: %s", self._peer, error.status, exc)
        except _ClientGone as gone:
            # Nobody left to tell: the access log says why.
            record.error = f"{error.reason}; {gone}"

    def _log_request(self, record: RequestRecord) -> None:
        now = time.monotonic()
        seconds = now - record.started
        first_byte = record.first_byte - record.started if record.first_byte is not None else None
        upstream = record.upstream if record.upstream != "-" else None
        if self._telemetry is not None:
            self._telemetry.request(upstream or "none", record.status, seconds, first_byte)
        if access_logger.isEnabledFor(logging.INFO):
            self._write_access_log(record, upstream, seconds, first_byte)
        if self._on_request is not None:
            self._on_request(record)

    def _write_access_log(
        self,
        record: RequestRecord,
        upstream: str | None,
        seconds: float,
        first_byte: float | None,
    ) -> None:
        """One line per request: plain text, and the same as fields for the JSON formatter
        (``pqproxy.io.supervisor.JsonFormatter``). The path has no query string, and no
        header value is logged: prompts and API keys travel there."""
        info = self._info
        tls = info.tls if info is not None else None
        _method, _, path = record.path.partition(" ")
        fields: dict[str, object] = {
            "client": info.client if info is not None else self._peer,
            "sni": tls.sni if tls is not None else None,
            "alpn": tls.alpn if tls is not None else None,
            "tls_group": tls.group if tls is not None else None,
            "tls_cipher": tls.cipher if tls is not None else None,
            "tls_signature": tls.signature if tls is not None else None,
            "tls_resumed": tls.resumed if tls is not None else None,
            # The client certificate's first URI (or DNS name, or subject), made printable.
            "client_identity": (
                identity_label(tls.identity) if tls is not None and tls.identity else None
            ),
            "handshake_ms": round(info.handshake_ms, 3) if info is not None else None,
            "method": record.method,
            "path": path or record.path,
            "status": record.status,
            "bytes_in": record.bytes_in,
            "bytes_out": record.bytes_out,
            "upstream": upstream,
            "first_byte_ms": round(first_byte * 1000.0, 3) if first_byte is not None else None,
            "duration_ms": round(seconds * 1000.0, 3),
        }
        if record.error:
            fields["error"] = record.error
        access_logger.info(
            'peer=%s request="%s %s" status=%d upstream=%s in=%d out=%d first_byte_ms=%s '
            "ms=%.1f sni=%s alpn=%s group=%s cipher=%s handshake_ms=%s",
            fields["client"],
            record.method,
            fields["path"],
            record.status,
            upstream or "-",
            record.bytes_in,
            record.bytes_out,
            _ms(first_byte),
            seconds * 1000.0,
            printable(str(fields["sni"] or "-")),
            printable(str(fields["alpn"] or "-")),
            fields["tls_group"] or "-",
            fields["tls_cipher"] or "-",
            _ms(info.handshake_ms / 1000.0 if info is not None else None),
            extra={
                "pqproxy_fields": fields,
                "pqproxy_summary": f"{record.method} {fields['path']} {record.status}",
            },
        )


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1000.0:.1f}" if seconds is not None else "-"


class _Woken(Exception):
    """The wait for client data was interrupted by a drain."""


@dataclass
class _ResponseMeter:
    """What one exchange has received from the upstream, for the caps on response heads."""

    fed: int = 0  # bytes handed to h11
    consumed: int = 0  # bytes h11 had parsed when the last head ended
    interim: int = 0  # 1xx responses so far


class _StaleConnection(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def data_seen(upstream: h11.Connection) -> bool:
    """Whether the upstream has sent anything for this exchange."""
    return upstream.their_state is not h11.SEND_RESPONSE or bool(upstream.trailing_data[0])


def _write_upstream(conn: UpstreamConnection, data: bytes) -> None:
    """A write to the upstream socket; uvloop raises RuntimeError on a closed transport where
    asyncio drops the bytes, and either way the upstream connection is lost."""
    try:
        conn.writer.write(data)
    except RuntimeError:
        raise ConnectionResetError("upstream connection closed") from None


def _relay_interim(client: h11.Connection, event: h11.InformationalResponse) -> bool:
    """Whether an upstream 1xx goes on to the client: never to an HTTP/1.0 client (RFC 9110
    §15.2: a server MUST NOT send one), never a 101 (Upgrade is hop-by-hop and never
    forwarded), and a 100 only while the client still waits for it (not a second time, not
    after the proxy sent its own)."""
    version = client.their_http_version
    if version is None or version < b"1.1" or event.status_code == 101:
        return False
    return event.status_code != 100 or client.they_are_waiting_for_100_continue


def _has_body(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() != b"0"
    return False
