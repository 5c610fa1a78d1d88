"""``pqproxy bench request``: what a user pays end to end, through a TLS proxy to an upstream.

One run compares, request by request (interleaved: every path once per cycle of
``len(paths)`` requests, in a shuffled order, see ``pool.interleave``):

- ``direct``: plain HTTP straight to the upstream;
- ``proxy-X25519MLKEM768``: HTTPS through the proxy, the client offering only the hybrid;
- ``proxy-X25519``: HTTPS through the proxy, the client offering only X25519.

For each: requests/s, time to first byte, time to first token (the first complete SSE
``data:`` event) and total latency. With keep-alive (the default) every slot opens its
connections before the clock starts, so the figures are the relay's cost alone; with
``--new-connections`` each request opens its own connection and its times run from the TCP
connect, handshake included.

Without ``--proxy`` the run starts its own demo upstream and pqproxy (``pqproxy
demo-upstream`` and ``pqproxy serve`` with a throwaway certificate) and stops them after.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import h11
from OpenSSL import SSL

from .. import __version__
from .handshake import (
    CLIENT_BUSY_WARNING,
    _is_ip,
    _payload,
    _resolve,
    _run_loop,
    canonical_group,
    check_peer_name,
    client_context,
    drain,
    openssl_version,
    tls_error_reason,
)
from .pool import PoolResult, WorkerContext, interleave, run_pool, split_slots
from .procs import (
    DEMO_LISTENING,
    PQPROXY_LISTENING,
    ServerProcess,
    pqproxy_argv,
    python_env,
)
from .report import Progress, summarize

DEFAULT_PATH = "/v1/chat/completions"
DEFAULT_GROUPS = ("X25519MLKEM768", "X25519")
DEFAULT_DURATION = 10.0
READ_SIZE = 65536
# How long a worker waits for its connections to close at the end of a run.
CLOSE_TIMEOUT = 2.0
# The first SSE event is looked for in at most this much of the body.
MAX_FIRST_EVENT = 1 << 20
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RequestOptions:
    proxy_host: str
    proxy_port: int
    upstream_host: str | None = None
    upstream_port: int | None = None
    groups: tuple[str, ...] = DEFAULT_GROUPS
    method: str = "POST"
    path: str = DEFAULT_PATH
    # None: a chat completion for the demo upstream (stream and tokens below).
    body: bytes | None = None
    stream: bool = True
    tokens: int = 16
    concurrency: int = 4
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    duration: float | None = None
    count: int | None = None
    new_connections: bool = False
    cafile: str | None = None
    insecure: bool = False
    sni: str | None = None
    timeout: float = 30.0
    started_servers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.count is not None and self.duration is not None:
            raise ValueError("give --count or --duration, not both")
        if self.count is not None and self.count < 1:
            raise ValueError("count must be at least 1")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("duration must be greater than 0")
        if self.concurrency < 1 or self.processes < 1:
            raise ValueError("concurrency and processes must be at least 1")
        if (self.upstream_host is None) != (self.upstream_port is None):
            raise ValueError("upstream needs a host and a port")
        if self.cafile is not None and self.insecure:
            raise ValueError("give --cafile or --insecure, not both")

    def request_body(self) -> bytes:
        if self.body is not None:
            return self.body
        if self.method in ("GET", "HEAD"):
            return b""
        return json.dumps(
            {
                "model": "pqproxy-demo",
                "messages": [{"role": "user", "content": "Say hello."}],
                "stream": self.stream,
                "max_tokens": self.tokens,
            }
        ).encode()


@dataclass(frozen=True)
class BenchPath:
    name: str
    description: str
    host: str
    port: int
    group: str | None  # None: plain HTTP


def paths_of(options: RequestOptions) -> list[BenchPath]:
    paths = []
    if options.upstream_host is not None and options.upstream_port is not None:
        paths.append(
            BenchPath(
                "direct",
                "plain HTTP straight to the upstream",
                options.upstream_host,
                options.upstream_port,
                None,
            )
        )
    for group in options.groups:
        paths.append(
            BenchPath(
                f"proxy-{group}",
                f"HTTPS via the proxy, the client offering only {group}",
                options.proxy_host,
                options.proxy_port,
                group,
            )
        )
    return paths


# --- one HTTP connection ----------------------------------------------------------------------


class RequestFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HttpConnection:
    """HTTP/1.1 over a TCP stream, with pyOpenSSL through memory BIOs when ``tls`` is set."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tls: SSL.Connection | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.tls = tls
        self.http = h11.Connection(h11.CLIENT)
        self.requests = 0  # requests sent on this connection

    @classmethod
    async def open(
        cls,
        path: BenchPath,
        address: str,
        ctx: SSL.Context | None,
        options: RequestOptions,
        *,
        local_host: str | None = None,
    ) -> tuple[HttpConnection, str | None]:
        """Connect (and handshake); returns the connection and the group negotiated.
        ``local_host``: the source address (127.0.0.x spreads many connections over more
        than one address's ephemeral ports)."""
        try:
            reader, writer = await asyncio.open_connection(
                address,
                path.port,
                limit=READ_SIZE,
                local_addr=(local_host, 0) if local_host is not None else None,
            )
        except OSError as exc:
            raise RequestFailed(f"connect: {errno.errorcode.get(exc.errno or 0, exc)}") from None
        if ctx is None:
            return cls(reader, writer, None), None
        tls = SSL.Connection(ctx, None)
        tls.set_connect_state()
        name = options.sni or (None if _is_ip(path.host) else path.host)
        if name:
            tls.set_tlsext_host_name(name.encode("idna"))
        if not options.insecure:
            check_peer_name(tls, options.sni or path.host)
        conn = cls(reader, writer, tls)
        while True:
            try:
                tls.do_handshake()
                break
            except SSL.WantReadError:
                pass
            except SSL.Error as exc:
                conn.close()
                raise RequestFailed(tls_error_reason(exc)) from None
            await conn._flush()
            data = await reader.read(READ_SIZE)
            if not data:
                conn.close()
                raise RequestFailed("eof: the proxy closed the connection during the handshake")
            tls.bio_write(data)
        await conn._flush()
        return conn, canonical_group(tls.get_group_name() or "?")

    async def _flush(self) -> None:
        if self.tls is not None:
            out = drain(self.tls)
            if out:
                self.writer.write(out)
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        if self.tls is None:
            self.writer.write(data)
        else:
            self.tls.sendall(data)
        await self._flush()

    async def recv(self) -> bytes:
        """Up to READ_SIZE bytes of plaintext; b"" at the end of the stream."""
        if self.tls is None:
            return await self.reader.read(READ_SIZE)
        while True:
            try:
                return self.tls.recv(READ_SIZE)
            except SSL.WantReadError:
                pass
            except SSL.ZeroReturnError:
                return b""
            except SSL.Error as exc:
                raise RequestFailed(tls_error_reason(exc)) from None
            await self._flush()  # a KeyUpdate answer, if the server asked for one
            data = await self.reader.read(READ_SIZE)
            if not data:
                return b""
            self.tls.bio_write(data)

    def close(self) -> None:
        if self.tls is not None:
            with contextlib.suppress(SSL.Error):
                self.tls.shutdown()
            out = drain(self.tls)
            if out and not self.writer.is_closing():
                self.writer.write(out)
        self.writer.close()


@dataclass
class Timing:
    ttfb: float
    ttft: float | None
    total: float
    size: int


async def exchange(
    conn: HttpConnection, request: list[h11.Event], started: float, stream: bool
) -> Timing:
    """Send one request and read its response to the end; times from ``started``."""
    http = conn.http
    conn.requests += 1
    await conn.send(b"".join(http.send(event) or b"" for event in request))
    ttfb: float | None = None
    ttft: float | None = None
    first_event = bytearray()
    size = 0
    status = 0
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            raise RequestFailed(f"http: malformed response ({exc})") from None
        if event is h11.NEED_DATA:
            data = await conn.recv()
            if not data and ttfb is None:
                # Not a malformed response: no response at all. A server may close an idle
                # keep-alive connection, but it must say so (Connection: close) in the
                # response before; closing after reading the next request loses that request.
                reused = " (a reused keep-alive connection)" if conn.requests > 1 else ""
                raise RequestFailed(f"eof: the connection closed without a response{reused}")
            if ttfb is None:
                ttfb = time.perf_counter() - started
            http.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if stream and ttft is None and len(first_event) < MAX_FIRST_EVENT:
                first_event += event.data
                start = first_event.find(b"data:")
                if start >= 0 and first_event.find(b"\n\n", start) >= 0:
                    ttft = time.perf_counter() - started
        elif isinstance(event, h11.EndOfMessage):
            total = time.perf_counter() - started
            break
        elif isinstance(event, h11.ConnectionClosed):
            raise RequestFailed("eof: the connection closed before the response ended")
    if not 200 <= status < 300:
        raise RequestFailed(f"http {status}")
    assert ttfb is not None
    return Timing(ttfb=ttfb, ttft=ttft, total=total, size=size)


# --- a worker process -------------------------------------------------------------------------


@dataclass
class _PathRecord:
    requests: int = 0
    ttfb: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    connect: list[float] = field(default_factory=list)
    sizes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    negotiated: Counter[str] = field(default_factory=Counter)


def _worker(context: WorkerContext, options: RequestOptions) -> dict[str, Any]:
    paths = paths_of(options)
    contexts = [
        client_context(p.group, cafile=options.cafile, insecure=options.insecure)
        if p.group is not None
        else None
        for p in paths
    ]
    addresses = [_resolve(p.host, p.port)[1] for p in paths]
    records = [_PathRecord() for _ in paths]
    _run_loop(_worker_main(context, options, paths, contexts, addresses, records))
    return {"paths": [_payload(r) for r in records]}


def request_events(options: RequestOptions, path: BenchPath) -> list[h11.Event]:
    body = options.request_body()
    headers = [
        ("host", f"{path.host}:{path.port}"),
        ("user-agent", f"pqproxy-bench/{__version__}"),
        ("accept", "text/event-stream" if options.stream else "application/json"),
    ]
    if body or options.method not in ("GET", "HEAD"):
        headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
    events: list[h11.Event] = [
        h11.Request(method=options.method, target=options.path, headers=headers)
    ]
    if body:
        events.append(h11.Data(data=body))
    events.append(h11.EndOfMessage())
    return events


async def _worker_main(
    context: WorkerContext,
    options: RequestOptions,
    paths: list[BenchPath],
    contexts: list[SSL.Context | None],
    addresses: list[str],
    records: list[_PathRecord],
) -> None:
    count = len(paths)

    async def connect(i: int) -> HttpConnection:
        started = time.perf_counter()
        conn, group = await asyncio.wait_for(
            HttpConnection.open(paths[i], addresses[i], contexts[i], options), options.timeout
        )
        records[i].connect.append(time.perf_counter() - started)
        if group is not None:
            records[i].negotiated[group] += 1
        return conn

    # Keep-alive: every slot holds one connection per path, opened before the clock starts.
    held: list[list[HttpConnection | None]] = [[None] * count for _ in range(context.slots)]
    if not options.new_connections:
        for slot_conns in held:
            for i in range(count):
                slot_conns[i] = await connect(i)
    context.wait_start()

    async def one(slot: int, index: int) -> None:
        i = interleave(index, count)
        record = records[i]
        record.requests += 1
        conn = held[slot][i]
        try:
            if conn is None and not options.new_connections:
                # Reopened after the server closed it: not timed, like the first opening.
                conn = held[slot][i] = await connect(i)
            started = time.perf_counter()
            if conn is None:
                conn = await connect(i)
            timing = await asyncio.wait_for(
                exchange(conn, request_events(options, paths[i]), started, options.stream),
                options.timeout,
            )
        except RequestFailed as exc:
            record.errors[exc.reason] += 1
            _drop(held, slot, i, conn)
            context.record(False)
            return
        except TimeoutError:
            record.errors[f"timeout: no complete response within {options.timeout:g}s"] += 1
            _drop(held, slot, i, conn)
            context.record(False)
            return
        except (OSError, EOFError) as exc:
            record.errors[f"io: {type(exc).__name__}"] += 1
            _drop(held, slot, i, conn)
            context.record(False)
            return
        record.ttfb.append(timing.ttfb)
        if timing.ttft is not None:
            record.ttft.append(timing.ttft)
        record.total.append(timing.total)
        record.sizes += timing.size
        context.record(True)
        http = conn.http
        if (
            options.new_connections
            or http.our_state is not h11.DONE
            or http.their_state is not h11.DONE
        ):
            _drop(held, slot, i, conn)
        else:
            http.start_next_cycle()

    async def run_slot(slot: int) -> None:
        while (index := context.claim()) is not None:
            await one(slot, index)

    await asyncio.gather(*(run_slot(s) for s in range(context.slots)))
    closing = [conn for slot_conns in held for conn in slot_conns if conn is not None]
    for conn in closing:
        conn.close()
    # Let the close_notify and the FIN leave before the loop (and the process) ends.
    if closing:
        waits = [asyncio.create_task(_closed(conn)) for conn in closing]
        await asyncio.wait(waits, timeout=CLOSE_TIMEOUT)
        for task in waits:
            task.cancel()


async def _closed(conn: HttpConnection) -> None:
    # A peer that reset the connection has closed it too.
    with contextlib.suppress(OSError):
        await conn.writer.wait_closed()


def _drop(
    held: list[list[HttpConnection | None]], slot: int, i: int, conn: HttpConnection | None
) -> None:
    if conn is not None:
        conn.close()
    held[slot][i] = None


# --- the parent -------------------------------------------------------------------------------


def run_request_bench(
    options: RequestOptions, *, progress_stream: TextIO | None = None
) -> dict[str, Any]:
    """Run the comparison; returns the ``--json`` document (see ``report.REQUEST_FIELDS``)."""
    for p in paths_of(options):
        if p.group is not None:
            client_context(p.group, cafile=options.cafile, insecure=options.insecure)
        _resolve(p.host, p.port)
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


def _ms(values: list[float]) -> dict[str, Any]:
    return summarize(x * 1000 for x in values)


def build_report(
    options: RequestOptions, pool: PoolResult, started_at: float, duration: float | None
) -> dict[str, Any]:
    paths = paths_of(options)
    merged = [_PathRecord() for _ in paths]
    for report in pool.reports:
        for total, part in zip(merged, report.payload["paths"], strict=True):
            total.requests += part["requests"]
            total.ttfb += part["ttfb"]
            total.ttft += part["ttft"]
            total.total += part["total"]
            total.connect += part["connect"]
            total.sizes += part["sizes"]
            total.errors.update(part["errors"])
            total.negotiated.update(part["negotiated"])
    concurrency = sum(r.slots for r in pool.reports)
    out_paths: dict[str, Any] = {}
    for path, record in zip(paths, merged, strict=True):
        successes = len(record.total)
        mean_total = sum(record.total) / successes if successes else 0.0
        out_paths[path.name] = {
            "description": path.description,
            "requests": record.requests,
            "successes": successes,
            "errors": sum(record.errors.values()),
            "errors_by_reason": dict(record.errors.most_common()),
            "negotiated": dict(record.negotiated.most_common()),
            "requests_per_s": concurrency / mean_total if mean_total else 0.0,
            "ttfb_ms": _ms(record.ttfb),
            "ttft_ms": _ms(record.ttft),
            "total_ms": _ms(record.total),
            "connect_ms": _ms(record.connect),
            "response_bytes_mean": record.sizes / successes if successes else 0.0,
        }
    requests = sum(r.requests for r in merged)
    successes = sum(len(r.total) for r in merged)
    client_cpu = sum(r.cpu_seconds for r in pool.reports)
    client_wall = sum(r.wall_seconds for r in pool.reports)
    busy = client_cpu / client_wall if client_wall else 0.0
    warnings = []
    if busy > CLIENT_BUSY_WARNING:
        warnings.append(f"the client processes were {busy:.0%} busy: the client may be the limit")
    for name, path in out_paths.items():
        asked = name.removeprefix("proxy-")
        if name.startswith("proxy-") and set(path["negotiated"]) - {asked}:
            warnings.append(f"{name}: negotiated {path['negotiated']}, not only {asked}")
    return {
        "schema": "pqproxy.bench.request/1",
        "tool": {
            "pqproxy": __version__,
            "openssl": openssl_version(),
            "python": sys.version.split()[0],
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "proxy": f"{options.proxy_host}:{options.proxy_port}",
        "upstream": (
            f"{options.upstream_host}:{options.upstream_port}"
            if options.upstream_host is not None
            else None
        ),
        "options": {
            "method": options.method,
            "path": options.path,
            "body_bytes": len(options.request_body()),
            "stream": options.stream,
            "concurrency": options.concurrency,
            "processes": len(pool.reports),
            "duration": duration,
            "count": options.count,
            "new_connections": options.new_connections,
            "verify": not options.insecure,
            "groups": list(options.groups),
            "started_servers": list(options.started_servers),
        },
        "wall_seconds": pool.wall_seconds,
        "requests": requests,
        "successes": successes,
        "errors": requests - successes,
        "paths": out_paths,
        "overhead": request_overhead(out_paths),
        "client": {
            "processes": len(pool.reports),
            "cores": os.cpu_count() or 1,
            "cpu_seconds": client_cpu,
            "busy_fraction": busy,
            "machine_busy_fraction": pool.machine_busy,
            "bottleneck": busy > CLIENT_BUSY_WARNING,
        },
        "warnings": warnings,
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def request_overhead(paths: dict[str, Any]) -> list[dict[str, Any]]:
    """Each proxy path against direct; each hybrid proxy path against the X25519 one."""
    pairs: list[tuple[str, str]] = []
    for name in paths:
        if name.startswith("proxy-") and "direct" in paths:
            pairs.append((name, "direct"))
    for name in paths:
        if name.startswith("proxy-") and name != "proxy-X25519" and "proxy-X25519" in paths:
            pairs.append((name, "proxy-X25519"))
    entries = []
    for name, base in pairs:
        a, b = paths[name], paths[base]
        if not a["successes"] or not b["successes"]:
            continue
        entries.append(
            {
                "path": name,
                "baseline": base,
                "ttfb_p50_ms": _diff(a["ttfb_ms"]["p50"], b["ttfb_ms"]["p50"]),
                "ttft_p50_ms": _diff(a["ttft_ms"]["p50"], b["ttft_ms"]["p50"]),
                "ttft_p50_ratio": _div(a["ttft_ms"]["p50"], b["ttft_ms"]["p50"]),
                "total_p50_ms": _diff(a["total_ms"]["p50"], b["total_ms"]["p50"]),
                "total_p50_ratio": _div(a["total_ms"]["p50"], b["total_ms"]["p50"]),
                "total_p99_ms": _diff(a["total_ms"]["p99"], b["total_ms"]["p99"]),
            }
        )
    return entries


# --- servers started for the run -------------------------------------------------------------


@dataclass(frozen=True)
class DefaultServers:
    proxy_port: int
    upstream_port: int
    cafile: str
    commands: tuple[str, ...]


@contextlib.contextmanager
def default_servers(tokens: int, token_interval: float = 0.0) -> Iterator[DefaultServers]:
    """A demo upstream and pqproxy in front of it, as subprocesses on free local ports."""
    env = python_env(REPO_ROOT)
    with tempfile.TemporaryDirectory(prefix="pqproxy-bench-") as tmp:
        certs = Path(tmp)
        from ..devcert import generate_dev_certs

        paths = generate_dev_certs(certs)
        upstream_argv = pqproxy_argv(
            "demo-upstream",
            "--listen",
            "127.0.0.1:0",
            "--tokens",
            str(tokens),
            "--token-interval",
            f"{token_interval:g}",
            "--log-level",
            "WARNING",
        )
        with ServerProcess(upstream_argv, ready=DEMO_LISTENING, env=env) as upstream:
            upstream_port = int(upstream.match.group(1))
            proxy_argv = pqproxy_argv(
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--cert",
                str(paths.cert),
                "--key",
                str(paths.key),
                "--upstream",
                f"http://127.0.0.1:{upstream_port}",
                "--log-level",
                "WARNING",
            )
            with ServerProcess(proxy_argv, ready=PQPROXY_LISTENING, env=env) as proxy:
                yield DefaultServers(
                    proxy_port=int(proxy.match.group(1)),
                    upstream_port=upstream_port,
                    cafile=str(paths.ca),
                    commands=(" ".join(upstream_argv[1:]), " ".join(proxy_argv[1:])),
                )
