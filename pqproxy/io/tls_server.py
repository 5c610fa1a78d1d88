"""The TLS listener: TCP in, the sans-IO engine in the middle, a raw TCP relay to the upstream.

Rules this module keeps:

- One ``_ClientConnection`` (an ``asyncio.Protocol``) per accepted socket owns the engine, the
  upstream transport and every timer of that connection. Protocol callbacks rather than
  streams: the engine wants ``bytes`` and the transport already hands us ``bytes``, so the
  hot path makes no extra copies and no task switches.
- After every ``receive_data`` / ``complete_*`` the engine's events are drained until ``None``
  and ``data_to_send()`` is written, in that order, in one place (``_pump``).
- Every wait has a deadline: handshake, idle, upstream connect, and the linger after a close
  (a peer that never reads must not keep a closing socket alive).
- Backpressure: each side's transport has ``write_high_water`` as its high-water mark; when a
  side's write buffer goes above it, reading from the other side stops until it drains, and
  so does reading from the client whose own buffer it is (what a client sends can make us
  write: a KeyUpdate answer, an alert, an error response).
- An exception in one connection is logged as one line and closes that connection; it never
  reaches the loop's default handler as a traceback.
- Exactly one summary (``ConnectionClosed``) per accepted socket reaches ``on_terminated``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, cast

from ..crypto.offload import Offloader
from ..crypto.provider import CertificateRejected, CryptoProvider
from ..logtext import printable
from ..relay.forwarding import PSK_SIGNATURE, ClientTLSInfo
from ..relay.identity import describe_identity, identity_allowed, identity_label
from ..tls.enums import AlertDescription, CipherSuite, NamedGroup, SignatureScheme
from ..tls.events import (
    ApplicationData,
    CertificateVerificationNeeded,
    ConnectionTerminated,
    Event,
    HandshakeComplete,
    KeyExchangeNeeded,
    KeyUpdated,
    PeerClosed,
    SignatureNeeded,
)
from ..tls.server import ServerConfig, ServerConnection
from .http_proxy import ConnectionInfo, HttpProxySession, HttpSettings
from .loop import ShutdownSignals
from .telemetry import Telemetry
from .upstream import NoUpstreamAvailable, UpstreamPool, UpstreamServer

logger = logging.getLogger(__name__)

# A closing socket whose peer stops reading would otherwise hold its write buffer forever.
CLOSE_LINGER = 5.0
# Refusals under overload are logged at most this often, so a flood cannot flood the log too.
REFUSAL_LOG_INTERVAL = 1.0
# Queued plaintext is sealed at once from this size on: four full records (RFC 8446 §5.1,
# 2^14 bytes each), nothing more to gain by waiting for the end of the loop iteration.
COALESCE_LIMIT = 4 * (1 << 14)
# How long ``TLSListener.close`` waits for connections to finish their close_notify.
SHUTDOWN_GRACE = 5.0


@dataclass
class ListenerSettings:
    host: str
    port: int
    server_config: ServerConfig
    provider: CryptoProvider
    upstream_host: str
    upstream_port: int
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    # Write progress toward the client: once its write buffer is above write_high_water, the
    # client must take some of it within this many seconds, or both sides are aborted
    # (nginx's send_timeout). Without it a client that stops reading holds the connection,
    # the upstream connection and the upstream's work for as long as it likes.
    send_timeout: float = 60.0
    upstream_connect_timeout: float = 5.0
    max_connections: int = 10000
    # listen(2) backlog of every listening socket: the kernel's accept queue (capped by
    # net.core.somaxconn).
    backlog: int = 4096
    # Transports choose their own read size; this caps the bytes held for an upstream that is
    # still connecting (the client is paused beyond it).
    read_chunk: int = 65536
    write_high_water: int = 1 << 20
    # "http": requests go through HttpProxySession; "tcp": the decrypted stream is relayed as is.
    mode: str = "tcp"
    http: HttpSettings | None = None
    # When set, each connection (tcp) or request (http) picks its server from the pool;
    # otherwise upstream_host:upstream_port is the one server.
    pool: UpstreamPool | None = None
    # Metrics of this process; None: nothing is counted (no admin endpoint to read them).
    telemetry: Telemetry | None = None
    # The engine's NSS key-log hook (pqproxy.io.keylog); None: off, and free.
    key_log: Callable[[str, bytes, bytes], None] | None = None
    # Where KeyExchangeNeeded / SignatureNeeded / CertificateVerificationNeeded are run
    # (pqproxy.crypto.offload); shared by every listener of the process. None: inline on the
    # loop, without accounting.
    offloader: Offloader | None = None
    # Client identities (URI SAN, DNS SAN or subject) let through after the handshake; anyone
    # else gets 403 (http) or a closed connection (tcp) and the upstream never hears of them.
    # None: every client the handshake admitted.
    allowed_identities: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not self.send_timeout > 0:
            raise ValueError(f"send_timeout must be more than 0, not {self.send_timeout}")
        if self.mode not in ("http", "tcp"):
            raise ValueError(f"mode must be http or tcp, not {self.mode!r}")
        if self.mode == "http" and (self.http is None or self.pool is None):
            raise ValueError("http mode needs http settings and an upstream pool")


# At most this many connections accepted per wake-up of the loop (see TLSListener.start).
ACCEPT_BATCH = 64


@dataclass(frozen=True)
class ListenQueue:
    """One listening socket's accept queue: connections waiting for accept(), and the most
    the kernel keeps (the effective backlog, after net.core.somaxconn)."""

    length: int
    limit: int


# struct tcp_info (linux/tcp.h): eight u8 fields, then u32s; on a listening socket
# tcpi_unacked is the accept queue's length and tcpi_sacked its limit (what `ss -l`
# shows as Recv-Q / Send-Q).
_TCP_INFO_SIZE = 104
_TCPI_STATE_LISTEN = 10
_TCPI_UNACKED_OFFSET = 24


def listen_queue(fd: int) -> ListenQueue | None:
    """The accept queue of the listening TCP socket ``fd``; None where TCP_INFO does not
    say (not Linux, not a listening socket)."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return None
    try:
        with socket.socket(fileno=os.dup(fd)) as dup:
            info = dup.getsockopt(socket.IPPROTO_TCP, tcp_info, _TCP_INFO_SIZE)
    except OSError:
        return None
    if len(info) < _TCPI_UNACKED_OFFSET + 8 or info[0] != _TCPI_STATE_LISTEN:
        return None
    length, limit = struct.unpack_from("=II", info, _TCPI_UNACKED_OFFSET)
    return ListenQueue(length, limit)


def _listen(fd: int, backlog: int) -> None:
    """listen(2) again on an already listening socket: the kernel takes the new backlog."""
    with socket.socket(fileno=os.dup(fd)) as dup:
        dup.listen(backlog)


class CloseKind(StrEnum):
    """Why a connection ended: a small fixed set, fit for a metrics label."""

    CLOSED = "closed"
    TLS_ALERT = "tls_alert"
    PEER_EOF = "peer_eof"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    # The client took no bytes for send_timeout while its write buffer was full.
    SEND_TIMEOUT = "send_timeout"
    UPSTREAM_FAILED = "upstream_failed"
    UPSTREAM_LOST = "upstream_lost"
    OVER_CAPACITY = "over_capacity"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"
    # A tcp listener's client whose certificate identity is not on the allow list.
    FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class ConnectionClosed:
    """Summary of one connection, handed to ``on_terminated`` exactly once."""

    peer: str
    kind: CloseKind
    reason: str
    alert: AlertDescription | None
    alert_sent: bool
    handshake_complete: bool
    duration: float
    bytes_from_client: int
    bytes_to_client: int


@dataclass(frozen=True)
class ConnectionSnapshot:
    """Where one live connection stands, for metrics and tests: how much it holds in memory
    and whether backpressure has stopped reading from the client."""

    peer: str
    handshake_complete: bool
    reading_client: bool
    upstream_connected: bool
    reading_upstream: bool
    buffered_to_client: int
    buffered_to_upstream: int


HandshakeHook = Callable[[HandshakeComplete, str], None]
# What the engine asks the I/O layer to compute (pqproxy.crypto.offload runs it).
_CryptoRequest = KeyExchangeNeeded | SignatureNeeded | CertificateVerificationNeeded
TerminatedHook = Callable[[ConnectionClosed], None]

_FAILURE_REASONS = {
    CloseKind.PEER_EOF: "client_closed",
    CloseKind.HANDSHAKE_TIMEOUT: "timeout",
    CloseKind.SHUTDOWN: "shutdown",
    CloseKind.INTERNAL_ERROR: "internal_error",
}


def handshake_failure_reason(summary: ConnectionClosed) -> str:
    """The ``reason`` label of a handshake that did not complete: the alert pqproxy sent, or
    one of a few fixed words (pqproxy.metrics.FAILURE_REASONS); never free text."""
    if summary.kind is CloseKind.TLS_ALERT and summary.alert is not None:
        return summary.alert.name if summary.alert_sent else "client_alert"
    return _FAILURE_REASONS.get(summary.kind, "other")


def enum_name(enum_cls: type[IntEnum], value: int | None) -> str:
    """Enum member name for logs, a hex code point for values the enum lacks."""
    if value is None:
        return "-"
    try:
        return enum_cls(value).name
    except ValueError:
        return f"0x{value:04x}"


def format_peer(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername) if peername else "?"


class TLSListener:
    """Accepts TCP connections, terminates TLS 1.3 with the pqproxy engine, relays to the
    upstream. ``start()`` binds, ``port`` is the bound port, ``close()`` stops accepting and
    closes every connection (close_notify where a handshake completed)."""

    def __init__(
        self,
        settings: ListenerSettings,
        *,
        on_handshake: HandshakeHook | None = None,
        on_terminated: TerminatedHook | None = None,
    ) -> None:
        self.settings = settings
        self.on_handshake = on_handshake
        self.on_terminated = on_terminated
        self._server: asyncio.Server | None = None
        self._active: set[_ClientConnection] = set()
        self._drained: asyncio.Event | None = None
        self._refused_unlogged = 0
        self._last_refusal_log = float("-inf")

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind and listen; ``sock`` is an already bound socket (workers share a port
        through SO_REUSEPORT, each with its own socket).

        Every listening socket gets ``settings.backlog`` as its kernel accept queue. The
        loop is given ACCEPT_BATCH instead, and listen(2) is called again with the real
        backlog: asyncio's selector loop accepts at most its ``backlog`` connections per
        wake-up, so a burst is taken in batches between which the connections already
        accepted get their turn, rather than thousands at once."""
        if self._server is not None:
            raise RuntimeError("listener already started")
        loop = asyncio.get_running_loop()
        batch = min(ACCEPT_BATCH, self.settings.backlog)
        if sock is not None:
            self._server = await loop.create_server(
                lambda: _ClientConnection(self, loop), sock=sock, backlog=batch
            )
        else:
            self._server = await loop.create_server(
                lambda: _ClientConnection(self, loop),
                self.settings.host,
                self.settings.port,
                reuse_address=True,
                backlog=batch,
            )
        for listening in self._server.sockets:
            _listen(listening.fileno(), self.settings.backlog)

    def listen_queues(self) -> list[ListenQueue]:
        """The accept queue of each listening socket now (Linux; empty elsewhere)."""
        server = self._server
        if server is None:
            return []
        queues = []
        for listening in server.sockets:
            queue = listen_queue(listening.fileno())
            if queue is not None:
                queues.append(queue)
        return queues

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("listener not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def active_connections(self) -> int:
        return len(self._active)

    def snapshot(self) -> list[ConnectionSnapshot]:
        return [conn.snapshot() for conn in self._active]

    async def drain(self, timeout: float) -> None:
        """Graceful stop: accept nothing new, let in-flight requests and streams finish
        (idle keep-alive connections close at once), then close what is left."""
        server = self._server
        if server is None:
            return
        server.close()
        if self._active:
            self._drained = asyncio.Event()
            for conn in list(self._active):
                conn.begin_drain()
            if self._active:
                try:
                    await asyncio.wait_for(self._drained.wait(), timeout)
                except TimeoutError:
                    logger.warning(
                        "drain: %d connections still busy after %gs, closing them",
                        len(self._active),
                        timeout,
                    )
        await self.close()

    async def close(self, grace: float = SHUTDOWN_GRACE) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._active:
            self._drained = asyncio.Event()
            for conn in list(self._active):
                conn.shutdown()
            try:
                await asyncio.wait_for(self._drained.wait(), grace)
            except TimeoutError:
                logger.warning(
                    "shutdown: %d connections still open after %.1fs, aborting",
                    len(self._active),
                    grace,
                )
                for conn in list(self._active):
                    conn.abort()
        try:
            await asyncio.wait_for(server.wait_closed(), grace)
        except TimeoutError:
            logger.warning("shutdown: listening socket not closed after %.1fs", grace)

    # -- called by connections ---------------------------------------------------------------

    def _admit(self, conn: _ClientConnection) -> bool:
        if len(self._active) >= self.settings.max_connections or self._server is None:
            return False
        self._active.add(conn)
        return True

    def _log_refusal(self, loop: asyncio.AbstractEventLoop, peer: str) -> None:
        now = loop.time()
        self._refused_unlogged += 1
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            logger.warning(
                "refused peer=%s: %d connections open (max_connections=%d); %d refused since "
                "last report",
                peer,
                len(self._active),
                self.settings.max_connections,
                self._refused_unlogged,
            )
            self._refused_unlogged = 0
            self._last_refusal_log = now

    def _release(self, conn: _ClientConnection, summary: ConnectionClosed) -> None:
        self._active.discard(conn)
        if self._drained is not None and not self._active:
            self._drained.set()
        hook = self.on_terminated
        if hook is not None:
            try:
                hook(summary)
            except Exception as exc:
                logger.error("on_terminated hook failed: %s: %s", type(exc).__name__, exc)


class _ClientConnection(asyncio.Protocol):
    """One client socket, its engine and its upstream."""

    def __init__(self, listener: TLSListener, loop: asyncio.AbstractEventLoop) -> None:
        self._listener = listener
        self._settings = listener.settings
        self._loop = loop
        # Created once the connection is admitted, so a refused flood costs no engine state.
        self._tls: ServerConnection
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        # Durations from the monotonic clock: uvloop's loop.time() only has millisecond steps.
        self._started = time.monotonic()
        self._last_activity = loop.time()
        self._admitted = False
        self._handshake_done = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_buffered = 0
        # The write-progress deadline, armed while the client's write buffer is full.
        self._send_timer: asyncio.TimerHandle | None = None
        self._send_mark = 0
        self._upstream: asyncio.Transport | None = None
        self._upstream_task: asyncio.Task[None] | None = None
        self._upstream_server: UpstreamServer | None = None
        self._http: HttpProxySession | None = None
        self._http_task: asyncio.Task[str] | None = None
        self._client_writable = asyncio.Event()
        self._client_writable.set()
        self._pending: list[bytes] = []
        self._pending_size = 0
        # Plaintext the HTTP session wrote in this loop iteration, sealed together at its end
        # (``_flush_written``) so that one answer leaves in as few records as 2^14 allows.
        self._written: list[bytes] = []
        self._written_size = 0
        self._written_flush: asyncio.Handle | None = None
        self._client_eof = False
        self._upstream_eof_sent = False
        self._client_write_paused = False
        self._pause_reasons: set[str] = set()
        self._closing = False
        self._kind = CloseKind.PEER_EOF
        self._reason = "client closed"
        self._alert: AlertDescription | None = None
        self._alert_sent = False
        self._bytes_from_client = 0
        self._bytes_to_client = 0
        self._telemetry = self._settings.telemetry
        # The handshake's clock starts with the first ClientHello byte, not the accept: a
        # client that connects and waits is not a slow handshake.
        self._first_byte_at: float | None = None
        self._handshake_seconds = 0.0
        # The key-exchange group's backend, once the engine asked for the exchange.
        self._kx_backend: str | None = None

    def snapshot(self) -> ConnectionSnapshot:
        client, upstream = self._transport, self._upstream
        return ConnectionSnapshot(
            peer=self._peer,
            handshake_complete=self._handshake_done,
            reading_client=client is not None and client.is_reading(),
            upstream_connected=upstream is not None and not upstream.is_closing(),
            reading_upstream=upstream is not None and upstream.is_reading(),
            buffered_to_client=(
                client.get_write_buffer_size() + self._written_size
                if client is not None
                else self._written_size
            ),
            buffered_to_upstream=(
                upstream.get_write_buffer_size() + self._pending_size
                if upstream is not None
                else self._pending_size
            ),
        )

    # -- asyncio.Protocol: client side ------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without subclassing it.
        transport = cast(asyncio.Transport, base)
        self._transport = transport
        try:
            self._peer = format_peer(transport.get_extra_info("peername"))
            if not self._listener._admit(self):
                self._closing = True
                self._kind = CloseKind.OVER_CAPACITY
                self._reason = "over capacity"
                self._listener._log_refusal(self._loop, self._peer)
                transport.close()
                return
            self._admitted = True
            if self._telemetry is not None:
                self._telemetry.connections_active.inc()
            self._tls = ServerConnection(
                self._settings.server_config,
                self._settings.provider,
                os.urandom,
                # Ticket lifetimes and client certificate validity are judged by wall time.
                clock=time.time,
                key_log=self._settings.key_log,
            )
            transport.set_write_buffer_limits(high=self._settings.write_high_water)
            self._handshake_timer = self._loop.call_later(
                self._settings.handshake_timeout, self._on_handshake_timeout
            )
        except Exception as exc:
            self._internal_error("connection_made", exc)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            if self._first_byte_at is None:
                self._first_byte_at = time.monotonic()
            if self._telemetry is not None:
                self._telemetry.received_bytes.inc(len(data))
            self._last_activity = self._loop.time()
            self._tls.receive_data(data)
            self._pump()
        except Exception as exc:
            self._internal_error("data_received", exc)

    def eof_received(self) -> bool:
        if self._closing:
            return True
        try:
            if self._client_eof:
                # close_notify already half-closed TLS; the FIN adds nothing, and the
                # socket must stay open for the rest of the upstream's answer.
                return True
            self._tls.receive_data(b"")
            self._pump()
            if not self._closing:
                self._client_done_sending()
        except Exception as exc:
            self._internal_error("eof_received", exc)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            if not self._closing:
                self._closing = True
                self._kind = CloseKind.PEER_EOF
                self._reason = f"client connection lost: {exc}" if exc else "client closed"
                self._log_end(logging.INFO)
            self._cancel_timers()
            if self._linger_timer is not None:
                self._linger_timer.cancel()
                self._linger_timer = None
            if self._upstream_task is not None and not self._upstream_task.done():
                self._upstream_task.cancel()
            if self._http_task is not None and not self._http_task.done():
                self._http_task.cancel()
            if self._upstream is not None:
                self._upstream.abort()
            self._release_upstream_server()
        except Exception as exc2:
            logger.error("peer=%s cleanup failed: %s: %s", self._peer, type(exc2).__name__, exc2)
        finally:
            summary = ConnectionClosed(
                peer=self._peer,
                kind=self._kind,
                reason=self._reason,
                alert=self._alert,
                alert_sent=self._alert_sent,
                handshake_complete=self._handshake_done,
                duration=time.monotonic() - self._started,
                bytes_from_client=self._bytes_from_client,
                bytes_to_client=self._bytes_to_client,
            )
            if self._telemetry is not None:
                self._count_end(self._telemetry, summary)
            if self._admitted:
                self._listener._release(self, summary)
            else:
                hook = self._listener.on_terminated
                if hook is not None:
                    try:
                        hook(summary)
                    except Exception as exc3:
                        logger.error("on_terminated hook failed: %s", exc3)

    def _count_end(self, telemetry: Telemetry, summary: ConnectionClosed) -> None:
        try:
            telemetry.connection_closed(summary.kind.value)
            if summary.alert is not None and summary.alert_sent:
                telemetry.alert_sent(summary.alert)
            if not self._admitted:
                return
            telemetry.connections_active.dec()
            if not summary.handshake_complete and self._first_byte_at is not None:
                tls = self._tls
                telemetry.handshake(
                    group=tls.group,
                    cipher_suite=tls.cipher_suite,
                    backend=self._kx_backend or self._settings.provider.name,
                    hrr=tls.hello_retry,
                    ok=False,
                    offered_groups=tls.offered_groups,
                    failure_reason=handshake_failure_reason(summary),
                )
        except Exception as exc:
            logger.error("peer=%s metrics failed: %s: %s", self._peer, type(exc).__name__, exc)

    def pause_writing(self) -> None:
        # The client is not keeping up: stop taking bytes from the upstream, and from the
        # client itself. What a client sends can make us write (a KeyUpdate answer, an alert,
        # an HTTP error): one that never reads must not make our buffer grow with what it
        # sends. In every mode, and during the handshake too.
        self._client_write_paused = True
        self._client_writable.clear()
        self._pause_client("client-buffer")
        if self._upstream is not None and not self._upstream.is_closing():
            self._upstream.pause_reading()
        if self._send_timer is None and not self._closing:
            self._send_mark = self._bytes_taken()
            self._send_timer = self._loop.call_later(
                self._settings.send_timeout, self._on_send_check
            )

    def resume_writing(self) -> None:
        self._client_write_paused = False
        self._client_writable.set()
        self._resume_client("client-buffer")
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._upstream is not None and not self._upstream.is_closing():
            self._upstream.resume_reading()

    def _bytes_taken(self) -> int:
        """Bytes the kernel has taken from our write buffer toward the client, so far."""
        transport = self._transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return self._bytes_to_client - buffered

    def _on_send_check(self) -> None:
        """The write-progress deadline: while the buffer stays full, the client must have
        taken at least one byte since the last check; a client reading slowly but steadily
        is left alone (as nginx's send_timeout, between two successive writes)."""
        self._send_timer = None
        if self._closing or not self._client_write_paused:
            return
        try:
            taken = self._bytes_taken()
            if taken > self._send_mark:
                self._send_mark = taken
                self._send_timer = self._loop.call_later(
                    self._settings.send_timeout, self._on_send_check
                )
                return
            timeout = self._settings.send_timeout
            if self._telemetry is not None:
                self._telemetry.send_timeout(self._settings.mode)
            if self._http is not None:
                self._http.abort(f"client took no bytes for {timeout:g}s")
            # No close_notify: it would only join the bytes the client is not reading. Abort
            # both sockets at once; the upstream learns that its request is gone.
            self._finish(
                CloseKind.SEND_TIMEOUT,
                f"client took no bytes for {timeout:g}s",
                level=logging.WARNING,
                close_notify=False,
            )
            self.abort()
        except Exception as exc:
            self._internal_error("send timeout", exc)

    # -- Downstream, for the HTTP session ----------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue ``data`` for the client. It is sealed with everything else written in the
        same loop iteration (a response head with its first body bytes, an error answer's
        head, body and end) at the iteration's end, before a close, on ``drain`` above the
        high-water mark, or at once when a few full records' worth is waiting."""
        if self._closing:
            raise ConnectionResetError("client connection closed")
        if not data:
            return
        self._last_activity = self._loop.time()
        self._written.append(data)
        self._written_size += len(data)
        if self._written_size >= COALESCE_LIMIT:
            self._flush()
        elif self._written_flush is None:
            self._written_flush = self._loop.call_soon(self._flush_written)

    def _flush_written(self) -> None:
        self._written_flush = None
        if self._closing:
            return  # _finish has sealed and written what was queued, or the client is gone
        try:
            self._flush()
        except Exception as exc:
            self._internal_error("flush", exc)

    def _seal_written(self) -> None:
        """Hand the queued plaintext to the engine in one call: full records, one short."""
        if not self._written:
            return
        data = self._written[0] if len(self._written) == 1 else b"".join(self._written)
        self._written.clear()
        self._written_size = 0
        if self._written_flush is not None:
            self._written_flush.cancel()
            self._written_flush = None
        # An engine that has closed (an alert from either side) takes no more data; the
        # session learns of the close from _finish.
        if not self._tls.closed:
            self._tls.send_data(data)

    async def drain(self) -> None:
        if self._closing:
            raise ConnectionResetError("client connection closed")
        if self._written and self._written_size + self._buffered_to_client() > (
            self._settings.write_high_water
        ):
            # The transport must see the queued bytes to say it is full (pause_writing).
            self._flush()
        if not self._client_writable.is_set():
            await self._client_writable.wait()
            if self._closing:
                raise ConnectionResetError("client connection closed")

    def pause_reading(self) -> None:
        self._pause_client("http-buffer")

    def resume_reading(self) -> None:
        self._resume_client("http-buffer")

    def begin_drain(self) -> None:
        """Listener drain: an HTTP connection finishes its current request and closes;
        one still handshaking or a raw relay runs until it ends or the deadline."""
        if self._http is not None:
            self._http.begin_drain()

    # -- the engine --------------------------------------------------------------------------

    def _pump(self) -> None:
        tls = self._tls
        while not self._closing:
            event = tls.next_event()
            if event is None:
                break
            self._handle(event)
        self._flush()

    def _handle(self, event: Event) -> None:
        if isinstance(event, ApplicationData):
            self._bytes_from_client += len(event.data)
            if self._http is not None:
                self._http.feed(event.data)
            else:
                self._to_upstream(event.data)
        elif isinstance(event, KeyExchangeNeeded | SignatureNeeded | CertificateVerificationNeeded):
            self._resolve_crypto(event)
        elif isinstance(event, HandshakeComplete):
            self._on_handshake_complete(event)
        elif isinstance(event, PeerClosed):
            self._client_done_sending()
        elif isinstance(event, ConnectionTerminated):
            self._on_engine_terminated(event)
        elif isinstance(event, KeyUpdated):
            logger.debug("peer=%s key update (we_updated=%s)", self._peer, event.we_updated)

    def _resolve_crypto(self, event: _CryptoRequest) -> None:
        """Run the engine's crypto request and hand the result back: here, on the loop thread
        (no offloader, or an inline one: no task, no hop), or on the offloader's pool, whose
        answer comes back later on the loop (``_crypto_answer``); the engine buffers what the
        client sends meanwhile, and the handshake timer still bounds the whole handshake.
        A client chain verification goes the same way (the offloader's x509 threads): path
        building is never run on the loop unless the offload mode is inline.

        Timing: ``requested`` is taken when the engine asks and ``_crypto_done`` runs just
        before the result goes back, so with an offloader the phase histograms include the
        time queued."""
        requested = time.perf_counter()
        if isinstance(event, KeyExchangeNeeded):
            self._kx_backend = event.exchange.backend
        offloader = self._settings.offloader
        if offloader is not None and not offloader.inline:
            answer = functools.partial(self._crypto_answer, event, requested)
            if isinstance(event, KeyExchangeNeeded):
                offloader.submit_key_exchange(
                    event.group, event.exchange, event.client_share, answer
                )
            elif isinstance(event, SignatureNeeded):
                offloader.submit_signature(event.signer, event.scheme, event.message, answer)
            else:
                offloader.submit_chain_verification(event.verifier, event.chain, event.now, answer)
            return
        result: Any
        try:
            if isinstance(event, KeyExchangeNeeded):
                if offloader is None:
                    result = event.exchange.server_exchange(event.client_share)
                else:
                    result = offloader.run_inline_key_exchange(
                        event.group, event.exchange, event.client_share
                    )
            elif isinstance(event, SignatureNeeded):
                if offloader is None:
                    result = event.signer.sign(event.scheme, event.message)
                else:
                    result = offloader.run_inline_signature(
                        event.signer, event.scheme, event.message
                    )
            elif offloader is None:
                result = event.verifier.verify_chain(event.chain, event.now)
            else:
                result = offloader.run_inline_chain_verification(
                    event.verifier, event.chain, event.now
                )
        except Exception as exc:
            result = exc
        self._crypto_done(event, requested, result)
        self._to_engine(event, result)

    def _crypto_answer(self, event: _CryptoRequest, requested: float, result: Any) -> None:
        """An offloaded request's answer (the result, or the exception for ``fail_*``), on
        the loop. The connection may have ended meanwhile (the client left, the handshake
        timed out): the answer is then dropped."""
        if self._closing:
            return
        try:
            self._crypto_done(event, requested, result)
            self._to_engine(event, result)
            self._pump()
        except Exception as exc:
            self._internal_error("crypto answer", exc)

    def _to_engine(self, event: _CryptoRequest, result: Any) -> None:
        tls = self._tls
        if isinstance(event, KeyExchangeNeeded):
            if isinstance(result, BaseException):
                tls.fail_key_exchange(result)
            else:
                server_share, secret = result
                tls.complete_key_exchange(server_share, secret)
        elif isinstance(event, SignatureNeeded):
            if isinstance(result, BaseException):
                tls.fail_signature(result)
            else:
                tls.complete_signature(result)
        elif isinstance(result, BaseException):
            tls.fail_certificate_verification(result)
        else:
            tls.complete_certificate_verification(result)

    def _crypto_done(self, event: _CryptoRequest, requested: float, result: Any) -> None:
        telemetry = self._telemetry
        if telemetry is None:
            return
        seconds = time.perf_counter() - requested
        if isinstance(event, KeyExchangeNeeded):
            telemetry.key_exchange(event.group, event.exchange.backend, seconds)
        elif isinstance(event, SignatureNeeded):
            telemetry.signed(event.scheme, event.signer.backend, seconds)
        else:
            # ok, or the rule that refused the chain (CertificateRejected.check: a fixed
            # set); any other failure is ours.
            if isinstance(result, CertificateRejected):
                outcome = result.check
            elif isinstance(result, BaseException):
                outcome = "error"
            else:
                outcome = "ok"
            telemetry.client_chain_verified(outcome, seconds)

    def _buffered_to_client(self) -> int:
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def _flush(self) -> None:
        """Seal what the session queued, then write everything the engine has: the one
        place engine output reaches the socket."""
        self._seal_written()
        data = self._tls.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
            self._bytes_to_client += len(data)
            if self._telemetry is not None:
                self._telemetry.sent_bytes.inc(len(data))

    def _on_handshake_complete(self, event: HandshakeComplete) -> None:
        self._handshake_done = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        now = time.monotonic()
        self._handshake_seconds = now - (self._first_byte_at or self._started)
        elapsed_ms = self._handshake_seconds * 1000.0
        if self._telemetry is not None:
            self._telemetry.handshake(
                group=event.group,
                cipher_suite=event.cipher_suite,
                backend=self._kx_backend or self._settings.provider.name,
                hrr=event.hello_retry,
                ok=True,
                offered_groups=event.offered_groups,
                seconds=self._handshake_seconds,
                signature=None if event.resumed else event.signature_scheme,
                resumed=event.resumed,
            )
        logger.info(
            "handshake ok peer=%s sni=%s group=%s cipher=%s sig=%s alpn=%s hrr=%s resumed=%s "
            "client=%s ms=%.1f",
            self._peer,
            printable(event.server_name or "-"),
            enum_name(NamedGroup, event.group),
            enum_name(CipherSuite, event.cipher_suite),
            PSK_SIGNATURE if event.resumed else enum_name(SignatureScheme, event.signature_scheme),
            printable(event.alpn_protocol or "-"),
            "yes" if event.hello_retry else "no",
            "yes" if event.resumed else "no",
            identity_label(event.peer_identity),
            elapsed_ms,
        )
        hook = self._listener.on_handshake
        if hook is not None:
            try:
                hook(event, self._peer)
            except Exception as exc:
                logger.error("on_handshake hook failed: %s: %s", type(exc).__name__, exc)
        self._last_activity = self._loop.time()
        settings = self._settings
        denied: str | None = None
        allowed = settings.allowed_identities
        if allowed is not None and not identity_allowed(event.peer_identity, allowed):
            denied = f"client not on the allow list ({describe_identity(event.peer_identity)})"
            logger.warning("peer=%s refused: %s", self._peer, denied)
        if settings.mode == "http":
            # The session keeps its own clocks: keep-alive idle, header read, upstream read.
            assert settings.http is not None and settings.pool is not None
            transport = self._transport
            peername = transport.get_extra_info("peername") if transport is not None else None
            client_ip = str(peername[0]) if isinstance(peername, tuple) else "unknown"
            listener, first_pool = self._listener, settings.pool
            tls_info = ClientTLSInfo.from_handshake(event)
            self._http = HttpProxySession(
                self,
                settings.http,
                lambda: listener.settings.pool or first_pool,
                tls_info,
                client_ip,
                self._peer,
                info=ConnectionInfo(self._peer, tls_info, elapsed_ms),
                telemetry=self._telemetry,
                denied=denied,
            )
            self._http_task = self._loop.create_task(self._http.run())
            self._http_task.add_done_callback(self._http_done)
            return
        if denied is not None:
            # A raw relay has no way to say 403: close before the upstream is dialled.
            self._finish(CloseKind.FORBIDDEN, denied)
            return
        self._idle_timer = self._loop.call_later(settings.idle_timeout, self._on_idle_check)
        self._upstream_task = self._loop.create_task(self._connect_upstream())

    def _http_done(self, task: asyncio.Task[str]) -> None:
        if self._closing:
            # Retrieve the outcome even so: a session that failed while the connection was
            # closing must not surface later as "Task exception was never retrieved".
            if not task.cancelled() and task.exception() is not None:
                logger.info(
                    "peer=%s http session ended after close: %s",
                    self._peer,
                    type(task.exception()).__name__,
                )
            return
        try:
            if task.cancelled():
                return
            error = task.exception()
            if error is not None:
                self._internal_error("http session", cast(Exception, error))
                return
            self._finish(CloseKind.CLOSED, task.result())
        except Exception as exc:
            self._internal_error("http session end", exc)

    def _on_engine_terminated(self, event: ConnectionTerminated) -> None:
        self._alert = event.alert
        self._alert_sent = event.sent
        if event.alert is None:
            kind = CloseKind.PEER_EOF
        elif event.alert == AlertDescription.close_notify:
            # close_notify mid-handshake is a client giving up, not a finished exchange.
            kind = CloseKind.CLOSED if self._handshake_done else CloseKind.PEER_EOF
        else:
            kind = CloseKind.TLS_ALERT
        level = logging.INFO
        if event.sent and event.alert == AlertDescription.internal_error:
            level = logging.WARNING
        # The alert (if any) is still in the engine's output: _finish flushes it first.
        self._finish(kind, event.reason, level=level, close_notify=False)

    # -- relay ---------------------------------------------------------------------------------

    def _to_upstream(self, data: bytes) -> None:
        upstream = self._upstream
        if upstream is not None:
            upstream.write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > self._settings.read_chunk:
            self._pause_client("upstream-connecting")

    def _client_done_sending(self) -> None:
        if self._client_eof:
            return
        self._client_eof = True
        if not self._handshake_done:
            self._finish(CloseKind.PEER_EOF, "client closed during handshake")
            return
        if self._http is not None:
            self._http.feed_eof()
            return
        self._send_upstream_eof()

    def _send_upstream_eof(self) -> None:
        upstream = self._upstream
        if upstream is None or self._upstream_eof_sent or upstream.is_closing():
            return
        if upstream.can_write_eof():
            upstream.write_eof()
            self._upstream_eof_sent = True

    async def _connect_upstream(self) -> None:
        host, port = self._settings.upstream_host, self._settings.upstream_port
        pool = self._settings.pool
        if pool is not None:
            try:
                server = pool.pick()
            except NoUpstreamAvailable as exc:
                self._finish(CloseKind.UPSTREAM_FAILED, str(exc), level=logging.WARNING)
                return
            pool.begin(server)
            self._upstream_server = server
            host, port = server.host, server.port
        timeout = self._settings.upstream_connect_timeout
        try:
            await asyncio.wait_for(
                self._loop.create_connection(lambda: _UpstreamProtocol(self), host, port),
                timeout,
            )
        except TimeoutError:
            self._report_upstream_failure("connect timed out")
            self._finish(
                CloseKind.UPSTREAM_FAILED,
                f"upstream {host}:{port} connect timed out after {timeout:g}s",
                level=logging.WARNING,
            )
        except OSError as exc:
            self._report_upstream_failure(f"connect failed: {exc.strerror or exc}")
            self._finish(
                CloseKind.UPSTREAM_FAILED,
                f"upstream {host}:{port} connect failed: {exc.strerror or exc}",
                level=logging.WARNING,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._internal_error("upstream connect", exc)

    def _report_upstream_failure(self, reason: str) -> None:
        pool, server = self._settings.pool, self._upstream_server
        if pool is not None and server is not None:
            pool.report_failure(server, reason)

    def _release_upstream_server(self) -> None:
        pool, server = self._settings.pool, self._upstream_server
        self._upstream_server = None
        if pool is not None and server is not None:
            pool.end(server)

    def _upstream_made(self, protocol: _UpstreamProtocol, transport: asyncio.Transport) -> None:
        if self._closing:
            # The client went away (or we gave up) while the connect was in flight.
            transport.abort()
            return
        self._upstream = transport
        transport.set_write_buffer_limits(high=self._settings.write_high_water)
        if self._client_write_paused:
            transport.pause_reading()
        pending, self._pending, self._pending_size = self._pending, [], 0
        if pending:
            transport.write(b"".join(pending))
        self._resume_client("upstream-connecting")
        if self._client_eof:
            self._send_upstream_eof()

    def _upstream_data(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_activity = self._loop.time()
        self._tls.send_data(data)
        self._flush()

    def _upstream_eof(self) -> None:
        if self._closing:
            return
        self._finish(CloseKind.CLOSED, "upstream closed")

    def _upstream_lost(self, exc: Exception | None) -> None:
        if self._closing:
            return
        if exc is None:
            self._finish(CloseKind.CLOSED, "upstream closed")
        else:
            self._finish(
                CloseKind.UPSTREAM_LOST,
                f"upstream connection lost: {exc}",
                level=logging.WARNING,
            )

    def _pause_client(self, reason: str) -> None:
        if not self._pause_reasons and self._transport is not None:
            if not self._transport.is_closing():
                self._transport.pause_reading()
        self._pause_reasons.add(reason)

    def _resume_client(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self._transport is not None:
            if not self._transport.is_closing():
                self._transport.resume_reading()

    # -- timers ----------------------------------------------------------------------------------

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if self._closing or self._handshake_done:
            return
        try:
            self._finish(
                CloseKind.HANDSHAKE_TIMEOUT,
                f"handshake timeout after {self._settings.handshake_timeout:g}s",
            )
        except Exception as exc:
            self._internal_error("handshake timeout", exc)

    def _on_idle_check(self) -> None:
        self._idle_timer = None
        if self._closing:
            return
        idle = self._loop.time() - self._last_activity
        remaining = self._settings.idle_timeout - idle
        if remaining > 0:
            # Re-arming on expiry instead of on every byte keeps the hot path free of timers.
            self._idle_timer = self._loop.call_later(remaining, self._on_idle_check)
            return
        try:
            self._finish(CloseKind.IDLE_TIMEOUT, f"idle for {self._settings.idle_timeout:g}s")
        except Exception as exc:
            self._internal_error("idle timeout", exc)

    def _cancel_timers(self) -> None:
        for timer in (self._handshake_timer, self._idle_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._handshake_timer = self._idle_timer = self._send_timer = None

    # -- closing ---------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Listener shutdown: close_notify where established, then close."""
        try:
            self._finish(CloseKind.SHUTDOWN, "server shutting down")
        except Exception as exc:
            self._internal_error("shutdown", exc)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        if self._upstream is not None:
            self._upstream.abort()

    def _finish(
        self, kind: CloseKind, reason: str, *, level: int = logging.INFO, close_notify: bool = True
    ) -> None:
        """Close both sides once: flush what the engine has (an alert, the close_notify), then
        close the sockets with a bounded linger."""
        if self._closing:
            return
        self._closing = True
        self._kind = kind
        self._reason = reason
        self._cancel_timers()
        if self._upstream_task is not None and not self._upstream_task.done():
            self._upstream_task.cancel()
        if self._http_task is not None and not self._http_task.done():
            self._http_task.cancel()
        self._client_writable.set()
        # What the session queued goes out before the close_notify.
        self._seal_written()
        if close_notify and self._handshake_done and not self._tls.closed:
            self._tls.close()
            if self._alert is None:
                self._alert = AlertDescription.close_notify
                self._alert_sent = True
        self._flush()
        self._log_end(level)
        if self._transport is not None:
            self._transport.close()
        if self._upstream is not None:
            self._upstream.close()
        self._linger_buffered = self._buffered()
        self._linger_timer = self._loop.call_later(CLOSE_LINGER, self._linger_check)

    def _buffered(self) -> int:
        size = 0
        for transport in (self._transport, self._upstream):
            if transport is not None:
                size += transport.get_write_buffer_size()
        return size

    def _linger_check(self) -> None:
        """A closing socket may still be draining a large answer to a slow client: keep it
        while the buffer shrinks, abort once an interval passes without progress."""
        self._linger_timer = None
        try:
            size = self._buffered()
            if 0 < size < self._linger_buffered:
                self._linger_buffered = size
                self._linger_timer = self._loop.call_later(CLOSE_LINGER, self._linger_check)
                return
            logger.info("peer=%s close did not drain in %gs, aborting", self._peer, CLOSE_LINGER)
            self.abort()
        except Exception as exc:
            self._internal_error("linger", exc)

    def _internal_error(self, where: str, exc: Exception) -> None:
        logger.error(
            "peer=%s internal error in %s: %s: %s", self._peer, where, type(exc).__name__, exc
        )
        logger.debug("traceback for peer=%s", self._peer, exc_info=exc)
        if not self._closing:
            self._closing = True
            self._kind = CloseKind.INTERNAL_ERROR
            self._reason = f"{where}: {type(exc).__name__}: {exc}"
            self._cancel_timers()
        self.abort()

    def _log_end(self, level: int) -> None:
        alert = "-"
        fields: dict[str, object] = {"kind": self._kind.value, "reason": self._reason}
        if self._alert is not None:
            alert = f"{self._alert.name}({'sent' if self._alert_sent else 'received'})"
            fields["alert"] = self._alert.name
            fields["alert_sent"] = self._alert_sent
        logger.log(
            level,
            "connection end peer=%s kind=%s alert=%s reason=%s in=%d out=%d ms=%.1f",
            self._peer,
            self._kind,
            alert,
            # Reasons may quote what the client sent; the engine escapes what it quotes, this
            # catches any other layer's (printable is idempotent).
            printable(self._reason, spaces=True),
            self._bytes_from_client,
            self._bytes_to_client,
            (time.monotonic() - self._started) * 1000.0,
            extra={"pqproxy_fields": fields},
        )


class _UpstreamProtocol(asyncio.Protocol):
    """The upstream side of one connection: forwards everything to its owner."""

    def __init__(self, owner: _ClientConnection) -> None:
        self._owner = owner

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)
        try:
            self._owner._upstream_made(self, transport)
        except Exception as exc:
            transport.abort()
            self._owner._internal_error("upstream connection_made", exc)

    def data_received(self, data: bytes) -> None:
        try:
            self._owner._upstream_data(data)
        except Exception as exc:
            self._owner._internal_error("upstream data", exc)

    def eof_received(self) -> bool:
        try:
            self._owner._upstream_eof()
        except Exception as exc:
            self._owner._internal_error("upstream eof", exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._owner._upstream_lost(exc)
        except Exception as exc2:
            self._owner._internal_error("upstream connection_lost", exc2)

    def pause_writing(self) -> None:
        # The upstream is not keeping up: stop decrypting more from the client.
        self._owner._pause_client("upstream-buffer")

    def resume_writing(self) -> None:
        self._owner._resume_client("upstream-buffer")


async def serve(
    settings: ListenerSettings,
    *,
    on_listening: Callable[[TLSListener], None] | None = None,
    on_handshake: HandshakeHook | None = None,
    on_terminated: TerminatedHook | None = None,
) -> None:
    """Listen until SIGTERM/SIGINT, then stop accepting and close every connection."""
    listener = TLSListener(settings, on_handshake=on_handshake, on_terminated=on_terminated)
    with ShutdownSignals() as signals:
        await listener.start()
        try:
            if on_listening is not None:
                on_listening(listener)
            sig = await signals.wait()
            logger.info(
                "received %s: closing %d connections", sig.name, listener.active_connections
            )
        finally:
            await listener.close()
