"""``pqproxy bench handshake``: TLS 1.3 handshakes per second and their latency, against any
TLS 1.3 server (pqproxy, nginx, Envoy, a CDN edge), for several key-exchange groups compared
in the same run.

How one attempt goes (``_Attempt``):

1. TCP connect (``connect_ms``), TCP_NODELAY.
2. The client is pyOpenSSL on cryptography's bundled OpenSSL, driven through memory BIOs over
   the socket: every byte it sends and receives passes through here, which is how the first
   server message is seen (a ServerHello whose random is the HelloRetryRequest constant of
   RFC 8446 §4.1.3 counts as an HRR) and how ``--split-client-hello`` sends the ClientHello
   in several TCP segments, ``split_delay`` apart.
3. The handshake is complete when OpenSSL has verified the server's Finished and written its
   own (``latency_ms`` runs from the connect to this point). The client sends its Finished
   and close_notify, half-closes, and waits (``--linger`` at most) for the server to close:
   the server has then done all of its handshake work before the slot starts the next one.

The groups are interleaved connection by connection (``pool.interleave``: every group once
per cycle of ``len(groups)`` attempts, in a shuffled order), so a change of machine load
during the run hits all of them alike.

``--force-hrr`` offers the group in supported_groups but sends a key share for X25519 only
(OpenSSL's group list ``"G:*X25519"``); a server that prefers G answers with an HRR.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO, cast

from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from .. import __version__
from .pool import PoolResult, WorkerContext, interleave, run_pool, split_slots
from .report import Progress, cdf_points, summarize, timeline

# RFC 8446 §4.1.3: a HelloRetryRequest is a ServerHello with this random.
HRR_RANDOM = bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")
# Record header (5) + handshake header (4) + legacy_version (2) + random (32).
_SERVER_HELLO_PREFIX = 43
_HANDSHAKE_RECORD = 0x16
_SERVER_HELLO = 0x02

# The names OpenSSL's configuration takes (SSL_CTX_set1_groups_list) are the canonical ones
# here; the other spellings (IANA's, pqproxy's, SSL_get0_group_name's) map onto them.
_ALIASES = {
    "x25519mlkem768": "X25519MLKEM768",
    "secp256r1mlkem768": "SecP256r1MLKEM768",
    "secp384r1mlkem1024": "SecP384r1MLKEM1024",
    "x25519": "X25519",
    "x448": "X448",
    "p-256": "P-256",
    "secp256r1": "P-256",
    "prime256v1": "P-256",
    "p-384": "P-384",
    "secp384r1": "P-384",
    "p-521": "P-521",
    "secp521r1": "P-521",
    "mlkem512": "MLKEM512",
    "mlkem768": "MLKEM768",
    "mlkem1024": "MLKEM1024",
}
# Each hybrid is compared with the classical half it contains.
CLASSICAL_COUNTERPART = {
    "X25519MLKEM768": "X25519",
    "SecP256r1MLKEM768": "P-256",
    "SecP384r1MLKEM1024": "P-384",
}
POST_QUANTUM = frozenset({*CLASSICAL_COUNTERPART, "MLKEM512", "MLKEM768", "MLKEM1024"})
DEFAULT_GROUPS = ("X25519MLKEM768", "X25519")
# The group whose share --force-hrr sends instead of the one asked for.
HRR_SHARE_GROUP = "X25519"
# Buckets of the handshakes/s time line in the JSON and the plot.
TIMELINE_BUCKETS = 50


def canonical_group(name: str) -> str:
    return _ALIASES.get(name.strip().lower(), name.strip())


def offered_groups(group: str, force_hrr: bool) -> str:
    """The OpenSSL group list the client uses to ask for ``group``: only that group, or with
    ``force_hrr`` that group without a share plus an X25519 share (``*`` marks the groups that
    get one)."""
    if force_hrr and group != HRR_SHARE_GROUP:
        return f"{group}:*{HRR_SHARE_GROUP}"
    return group


@dataclass(frozen=True)
class HandshakeOptions:
    host: str
    port: int
    groups: tuple[str, ...] = DEFAULT_GROUPS
    concurrency: int = 8
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Exactly one of count and duration; neither means duration DEFAULT_DURATION.
    duration: float | None = None
    count: int | None = None
    sni: str | None = None
    force_hrr: bool = False
    split_client_hello: bool = False
    split_segments: int = 3
    split_delay: float = 0.005
    cafile: str | None = None
    insecure: bool = False
    timeout: float = 10.0
    linger: float = 2.0

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("at least one group")
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"a group is listed twice: {','.join(self.groups)}")
        if self.concurrency < 1 or self.processes < 1:
            raise ValueError("concurrency and processes must be at least 1")
        if self.count is not None and self.duration is not None:
            raise ValueError("give --count or --duration, not both")
        if self.count is not None and self.count < 1:
            raise ValueError("count must be at least 1")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("duration must be greater than 0")
        if self.split_segments < 2:
            raise ValueError("split_segments must be at least 2")
        if self.cafile is not None and self.insecure:
            raise ValueError("give --cafile or --insecure, not both")

    @property
    def server_name(self) -> str | None:
        """SNI: --sni, else the target host when it is a name (SNI never carries an IP)."""
        if self.sni is not None:
            return self.sni or None
        return None if _is_ip(self.host) else self.host


DEFAULT_DURATION = 10.0


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def client_context(
    offer: str, *, cafile: str | None, insecure: bool, alpn: list[bytes] | None = None
) -> SSL.Context:
    """A TLS 1.3-only pyOpenSSL client context offering the OpenSSL group list ``offer``."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    # pyOpenSSL has no call for the group list; OpenSSL's own takes the "*" share syntax.
    if _lib.SSL_CTX_set1_curves_list(ctx._context, offer.encode()) != 1:
        raise ValueError(f"this OpenSSL ({openssl_version()}) rejects the group list {offer!r}")
    if not insecure:
        if cafile is not None:
            ctx.load_verify_locations(cafile)
        else:
            ctx.set_default_verify_paths()
        ctx.set_verify(SSL.VERIFY_PEER, lambda _conn, _cert, _errno, _depth, ok: bool(ok))
    if alpn:
        ctx.set_alpn_protos(alpn)
    return ctx


def check_peer_name(conn: SSL.Connection, name: str) -> None:
    """Have OpenSSL check the certificate against ``name`` (a DNS name or an IP address), as
    a real client does: pyOpenSSL verifies only the chain unless told."""
    param = _lib.SSL_get0_param(conn._ssl)
    try:
        packed = ipaddress.ip_address(name).packed
    except ValueError:
        ok = _lib.X509_VERIFY_PARAM_set1_host(param, name.encode(), len(name.encode()))
    else:
        ok = _lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    if ok != 1:
        raise ValueError(f"OpenSSL rejected the peer name {name!r}")


def openssl_version() -> str:
    return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()


def tls_error_reason(exc: SSL.Error) -> str:
    """OpenSSL's reason string ("sslv3 alert handshake failure", "certificate verify
    failed"), for the errors-by-reason count."""
    if isinstance(exc, SSL.SysCallError):
        code = exc.args[0] if exc.args else None
        if code == -1:
            return "tls: unexpected eof"
        if isinstance(code, int) and code in errno.errorcode:
            return f"tls: {errno.errorcode[code]}"
        return f"tls: syscall error {exc.args!r}"
    if isinstance(exc, SSL.ZeroReturnError):
        return "tls: server closed (close_notify) during the handshake"
    entries = exc.args[0] if exc.args else None
    if isinstance(entries, list) and entries and isinstance(entries[0], tuple):
        return f"tls: {entries[0][-1]}"
    return f"tls: {type(exc).__name__}"


def drain(conn: SSL.Connection) -> bytes:
    """Everything OpenSSL wrote to its outgoing memory BIO."""
    chunks = []
    while True:
        try:
            chunk = conn.bio_read(65536)
        except SSL.WantReadError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


# --- one attempt ------------------------------------------------------------------------------


@dataclass
class _Outcome:
    ok: bool
    reason: str = ""
    hrr: bool = False
    negotiated: str = ""
    connect: float = 0.0
    latency: float = 0.0
    slot: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    linger_expired: bool = False


class _Attempt(asyncio.Protocol):
    """One TCP connection and one TLS handshake, as a state machine on transport callbacks
    (no task per read: a callback is the cheapest thing an event loop runs)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        ctx: SSL.Context,
        options: HandshakeOptions,
        started: float,
    ) -> None:
        self._loop = loop
        self._ctx = ctx
        self._options = options
        self._started = started
        self.result: asyncio.Future[_Outcome] = loop.create_future()
        self._outcome = _Outcome(ok=False)
        self._transport: asyncio.Transport | None = None
        self._tls: SSL.Connection | None = None
        self._phase = "connect"  # connect -> handshake -> closing -> done
        self._first = bytearray()
        self._hrr_checked = False
        self._timer: asyncio.TimerHandle | None = None

    # -- transport callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        now = time.perf_counter()
        self._outcome.connect = now - self._started
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # The ClientHello segments must leave one by one, not wait for an ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        remaining = self._options.timeout - (now - self._started)
        self._timer = self._loop.call_later(max(0.0, remaining), self._on_timeout)
        self._phase = "handshake"
        try:
            tls = SSL.Connection(self._ctx, None)
            tls.set_connect_state()
            name = self._options.server_name
            if name is not None:
                tls.set_tlsext_host_name(name.encode("idna"))
            if not self._options.insecure:
                check_peer_name(tls, self._options.sni or self._options.host)
        except (SSL.Error, ValueError) as exc:
            self._fail(f"client setup: {exc}")
            return
        self._tls = tls
        self._advance(first_flight=True)

    def data_received(self, data: bytes) -> None:
        self._outcome.bytes_received += len(data)
        if self._phase != "handshake":
            # After the handshake: NewSessionTickets and the server's close_notify. Read and
            # dropped; only the server's closing matters.
            return
        if not self._hrr_checked:
            self._look_for_hrr(data)
        assert self._tls is not None
        self._tls.bio_write(data)
        self._advance(first_flight=False)

    def eof_received(self) -> bool:
        if self._phase == "handshake":
            self._fail("eof: the server closed the connection during the handshake")
        elif self._phase == "closing":
            self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._phase == "closing":
            self._finish()
        elif self._phase == "handshake":
            what = f"{type(exc).__name__}" if exc is not None else "closed"
            if isinstance(exc, OSError) and exc.errno is not None and exc.errno in errno.errorcode:
                what = errno.errorcode[exc.errno]
            self._fail(f"connection lost during the handshake: {what}")
        if self._timer is not None:
            self._timer.cancel()

    # -- the handshake -----------------------------------------------------------------------

    def _look_for_hrr(self, data: bytes) -> None:
        self._first += data[: _SERVER_HELLO_PREFIX - len(self._first)]
        if len(self._first) < _SERVER_HELLO_PREFIX:
            return
        self._hrr_checked = True
        first = bytes(self._first)
        if first[0] == _HANDSHAKE_RECORD and first[5] == _SERVER_HELLO:
            self._outcome.hrr = first[11:43] == HRR_RANDOM

    def _advance(self, *, first_flight: bool) -> None:
        tls = self._tls
        assert tls is not None
        try:
            tls.do_handshake()
            complete = True
        except SSL.WantReadError:
            complete = False
        except SSL.Error as exc:
            self._send(drain(tls))  # the client's alert, as a real client sends it
            self._fail(tls_error_reason(exc))
            return
        out = drain(tls)
        if out:
            if first_flight and self._options.split_client_hello:
                self._send_split(out)
            else:
                self._send(out)
        if complete:
            self._complete()

    def _send(self, data: bytes) -> None:
        transport = self._transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            self._outcome.bytes_sent += len(data)

    def _send_split(self, data: bytes) -> None:
        segments = self._options.split_segments
        size = max(1, -(-len(data) // segments))
        parts = [data[i : i + size] for i in range(0, len(data), size)]
        self._send(parts[0])
        for number, part in enumerate(parts[1:], start=1):
            self._loop.call_later(self._options.split_delay * number, self._send_part, part)

    def _send_part(self, part: bytes) -> None:
        if self._phase == "handshake":
            self._send(part)

    def _complete(self) -> None:
        tls = self._tls
        assert tls is not None
        self._outcome.latency = time.perf_counter() - self._started
        self._outcome.negotiated = canonical_group(tls.get_group_name() or "?")
        self._outcome.ok = True
        self._phase = "closing"
        try:
            tls.shutdown()  # queues close_notify
        except SSL.Error:
            pass
        self._send(drain(tls))
        transport = self._transport
        assert transport is not None
        if transport.can_write_eof():
            transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self._options.linger, self._on_linger)

    # -- endings -----------------------------------------------------------------------------

    def _on_timeout(self) -> None:
        if self._phase == "handshake":
            self._fail(f"timeout: no handshake within {self._options.timeout:g}s")

    def _on_linger(self) -> None:
        if self._phase == "closing":
            self._outcome.linger_expired = True
            self._finish()

    def _finish(self) -> None:
        if self._phase == "done":
            return
        self._phase = "done"
        self._outcome.slot = time.perf_counter() - self._started
        self._close(abort=False)
        if not self.result.done():
            self.result.set_result(self._outcome)

    def _fail(self, reason: str) -> None:
        if self._phase == "done":
            return
        self._phase = "done"
        self._outcome.ok = False
        self._outcome.reason = reason
        self._outcome.slot = time.perf_counter() - self._started
        self._close(abort=True)
        if not self.result.done():
            self.result.set_result(self._outcome)

    def _close(self, *, abort: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if abort:
                transport.abort()
            else:
                transport.close()


# --- a worker process -------------------------------------------------------------------------


@dataclass
class _GroupRecord:
    """What one worker saw for one group; lists are merged across workers by the parent."""

    attempts: int = 0
    latencies: list[float] = field(default_factory=list)
    connects: list[float] = field(default_factory=list)
    slots: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    negotiated: Counter[str] = field(default_factory=Counter)
    hrr: int = 0
    linger_expired: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


def _resolve(host: str, port: int) -> tuple[int, str]:
    """Resolve once per worker, not once per connection."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, address = infos[0]
    return family, str(address[0])


def _worker(context: WorkerContext, options: HandshakeOptions) -> dict[str, Any]:
    contexts = [
        client_context(
            offered_groups(g, options.force_hrr), cafile=options.cafile, insecure=options.insecure
        )
        for g in options.groups
    ]
    family, address = _resolve(options.host, options.port)
    records = [_GroupRecord() for _ in options.groups]
    _run_loop(_worker_main(context, options, contexts, family, address, records))
    return {"groups": [_payload(r) for r in records]}


def _payload(record: Any) -> dict[str, Any]:
    """A record as plain data for the pipe to the parent (``asdict`` would rebuild each
    Counter from its items, counting (key, value) pairs)."""
    return {
        name: dict(value) if isinstance(value, Counter) else value
        for name, value in vars(record).items()
    }


def _run_loop(main: Any) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        # uvloop's callbacks cost about half of asyncio's: more handshakes per client core.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)


async def _worker_main(
    context: WorkerContext,
    options: HandshakeOptions,
    contexts: list[SSL.Context],
    family: int,
    address: str,
    records: list[_GroupRecord],
) -> None:
    loop = asyncio.get_running_loop()
    start = context.wait_start()
    count = len(options.groups)

    async def attempt(index: int) -> None:
        group = interleave(index, count)
        record = records[group]
        record.attempts += 1
        started = time.perf_counter()
        protocol = _Attempt(loop, contexts[group], options, started)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: protocol, address, options.port, family=family),
                options.timeout,
            )
        except TimeoutError:
            outcome = _Outcome(ok=False, reason=f"timeout: TCP connect ({options.timeout:g}s)")
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc))
            outcome = _Outcome(ok=False, reason=f"connect: {name}")
        else:
            outcome = await protocol.result
        if outcome.ok:
            record.latencies.append(outcome.latency)
            record.connects.append(outcome.connect)
            record.slots.append(outcome.slot)
            record.ends.append(time.monotonic() - start)
            record.negotiated[outcome.negotiated] += 1
            record.linger_expired += outcome.linger_expired
        else:
            record.errors[outcome.reason] += 1
        record.hrr += outcome.hrr
        record.bytes_sent += outcome.bytes_sent
        record.bytes_received += outcome.bytes_received
        context.record(outcome.ok)

    async def slot() -> None:
        while (index := context.claim()) is not None:
            await attempt(index)

    await asyncio.gather(*(slot() for _ in range(context.slots)))


# --- the parent -------------------------------------------------------------------------------


def run_handshake_bench(
    options: HandshakeOptions, *, progress_stream: TextIO | None = None
) -> dict[str, Any]:
    """Run the benchmark and return its report (the ``--json`` document, see
    ``report.HANDSHAKE_FIELDS``). A progress bar goes to ``progress_stream`` when given."""
    # Fail here, on bad group names or a missing CA file, not in every worker.
    for group in options.groups:
        client_context(
            offered_groups(group, options.force_hrr),
            cafile=options.cafile,
            insecure=options.insecure,
        )
    _resolve(options.host, options.port)
    count, duration = options.count, options.duration
    if count is None and duration is None:
        duration = DEFAULT_DURATION
    slots = split_slots(options.concurrency, options.processes)
    bar = Progress(progress_stream, total=count, duration=duration) if progress_stream else None
    started_at = time.time()
    try:
        pool = run_pool(
            _worker,
            options,
            slots=slots,
            count=count,
            duration=duration,
            progress=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    return build_report(options, pool, started_at, duration)


def _merge(pool: PoolResult, groups: int) -> list[_GroupRecord]:
    merged = [_GroupRecord() for _ in range(groups)]
    for report in pool.reports:
        for total, part in zip(merged, report.payload["groups"], strict=True):
            total.attempts += part["attempts"]
            total.latencies += part["latencies"]
            total.connects += part["connects"]
            total.slots += part["slots"]
            total.ends += part["ends"]
            total.errors.update(part["errors"])
            total.negotiated.update(part["negotiated"])
            total.hrr += part["hrr"]
            total.linger_expired += part["linger_expired"]
            total.bytes_sent += part["bytes_sent"]
            total.bytes_received += part["bytes_received"]
    return merged


CLIENT_BUSY_WARNING = 0.90
MACHINE_BUSY_WARNING = 0.95


def build_report(
    options: HandshakeOptions, pool: PoolResult, started_at: float, duration: float | None
) -> dict[str, Any]:
    records = _merge(pool, len(options.groups))
    wall = pool.wall_seconds
    concurrency = sum(r.slots for r in pool.reports)
    groups: dict[str, Any] = {}
    for name, record in zip(options.groups, records, strict=True):
        successes = len(record.latencies)
        errors = sum(record.errors.values())
        mean_slot = sum(record.slots) / successes if successes else 0.0
        mismatched = successes - record.negotiated.get(name, 0)
        groups[name] = {
            "offered": offered_groups(name, options.force_hrr),
            "attempts": record.attempts,
            "successes": successes,
            "errors": errors,
            "errors_by_reason": dict(record.errors.most_common()),
            "negotiated": dict(record.negotiated.most_common()),
            "negotiated_mismatches": mismatched,
            "hello_retry_requests": record.hrr,
            "handshakes_per_s": concurrency / mean_slot if mean_slot else 0.0,
            "completed_per_s": successes / wall if wall else 0.0,
            "latency_ms": summarize([x * 1000 for x in record.latencies]),
            "connect_ms": summarize([x * 1000 for x in record.connects]),
            "cdf_ms": cdf_points([x * 1000 for x in record.latencies]),
            "timeline_per_s": timeline(record.ends, wall, TIMELINE_BUCKETS),
            "bytes_sent_per_handshake": record.bytes_sent / record.attempts
            if record.attempts
            else 0.0,
            "bytes_received_per_handshake": record.bytes_received / record.attempts
            if record.attempts
            else 0.0,
            "linger_expired": record.linger_expired,
        }
    attempts = sum(r.attempts for r in records)
    successes = sum(len(r.latencies) for r in records)
    all_errors: Counter[str] = Counter()
    for record in records:
        all_errors.update(record.errors)
    client_cpu = sum(r.cpu_seconds for r in pool.reports)
    client_wall = sum(r.wall_seconds for r in pool.reports)
    busy = client_cpu / client_wall if client_wall else 0.0
    cores = os.cpu_count() or 1
    warnings = []
    if busy > CLIENT_BUSY_WARNING:
        warnings.append(
            f"the client processes were {busy:.0%} busy: the client, not the server, may be "
            "the limit (raise --processes, or run the client on another machine)"
        )
    if (
        pool.machine_busy is not None
        and pool.machine_busy > MACHINE_BUSY_WARNING
        and _is_local(options.host)
    ):
        warnings.append(
            f"this machine's CPUs were {pool.machine_busy:.0%} busy with the target on it: "
            "client and server compete for the same cores, so handshakes/s measure the pair"
        )
    mismatched = sum(g["negotiated_mismatches"] for g in groups.values())
    if mismatched:
        warnings.append(
            f"{mismatched} handshakes negotiated another group than the one asked for "
            "(see groups.*.negotiated)"
        )
    return {
        "schema": "pqproxy.bench.handshake/1",
        "tool": {
            "pqproxy": __version__,
            "openssl": openssl_version(),
            "python": sys.version.split()[0],
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "target": f"{options.host}:{options.port}",
        "options": {
            "groups": list(options.groups),
            "concurrency": options.concurrency,
            "processes": len(pool.reports),
            "duration": duration,
            "count": options.count,
            "sni": options.server_name,
            "force_hrr": options.force_hrr,
            "split_client_hello": options.split_client_hello,
            "split_segments": options.split_segments,
            "split_delay": options.split_delay,
            "verify": not options.insecure,
            "cafile": options.cafile,
            "timeout": options.timeout,
            "linger": options.linger,
        },
        "wall_seconds": wall,
        "attempts": attempts,
        "successes": successes,
        "errors": attempts - successes,
        "errors_by_reason": dict(all_errors.most_common()),
        "handshakes_per_s": successes / wall if wall else 0.0,
        "hello_retry_requests": sum(r.hrr for r in records),
        "groups": groups,
        "overhead": overhead(groups),
        "client": {
            "processes": len(pool.reports),
            "cores": cores,
            "cpu_seconds": client_cpu,
            "busy_fraction": busy,
            "cpu_per_handshake_us": client_cpu / successes * 1e6 if successes else 0.0,
            "machine_busy_fraction": pool.machine_busy,
            "bottleneck": busy > CLIENT_BUSY_WARNING,
        },
        "warnings": warnings,
    }


def _is_local(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def overhead(groups: dict[str, Any]) -> list[dict[str, Any]]:
    """Each post-quantum group against its classical counterpart (X25519MLKEM768 against
    X25519), or against the first classical group of the run when that one is absent."""
    classical = [g for g in groups if g not in POST_QUANTUM]
    pairs = []
    for group in groups:
        if group not in POST_QUANTUM or not classical:
            continue
        base = CLASSICAL_COUNTERPART.get(group)
        if base not in groups:
            base = classical[0]
        hybrid, plain = groups[group], groups[base]
        if not hybrid["successes"] or not plain["successes"]:
            continue
        entry: dict[str, Any] = {"group": group, "baseline": base}
        for stat in ("p50", "p99"):
            h, c = hybrid["latency_ms"][stat], plain["latency_ms"][stat]
            entry[f"latency_{stat}_ms"] = h - c
            entry[f"latency_{stat}_ratio"] = h / c if c else None
        h_rate, c_rate = hybrid["handshakes_per_s"], plain["handshakes_per_s"]
        entry["handshakes_per_s"] = h_rate - c_rate
        entry["handshakes_per_s_ratio"] = h_rate / c_rate if c_rate else None
        h_bytes = hybrid["bytes_sent_per_handshake"] + hybrid["bytes_received_per_handshake"]
        c_bytes = plain["bytes_sent_per_handshake"] + plain["bytes_received_per_handshake"]
        entry["bytes_per_handshake"] = h_bytes - c_bytes
        entry["bytes_per_handshake_ratio"] = h_bytes / c_bytes if c_bytes else None
        pairs.append(entry)
    return pairs
