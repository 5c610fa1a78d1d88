"""The side-by-side benchmark suite, in one go on this machine; writes ``bench/RESULTS.md``.

    .venv/bin/python bench/run_all.py [--rounds 3] [--duration 4] [--only cpu,throughput,...]

Sections (``--only`` picks some; the others are marked "not run"):

- ``cpu``: server CPU per handshake and handshakes/s per core, for pqproxy (1 worker and one
  per core), the OpenSSL-native baseline (bench/baseline_server.py, 1 worker and one per
  core) and nginx when installed (Debian 12's nginx links OpenSSL 3.0: classical groups only).
  The server's CPU is read from /proc/<pid>/stat (utime + stime of the server and every
  process below it) before and after each run of the load tester, never inferred from the
  client's wall time. Each (server, group) is run ``--rounds`` times, the order rotating
  every round so that no server always runs first or last; the table holds medians.
- ``profile``: where pqproxy's server CPU goes (bench/profile_handshake.py --profile).
- ``throughput``: bulk responses of 1, 10 and 100 MiB through pqproxy (1 worker, hybrid TLS)
  from a tiny upstream started by this script, beside the same bytes fetched directly.
- ``memory``: RSS of the server per idle TLS connection at 1,000 and 10,000 connections
  (each connection completed a hybrid handshake and one keep-alive request, then idles),
  pqproxy beside the baseline; a fresh server for each count.
- ``request``: time-to-first-token through pqproxy against direct (pqproxy bench request).
- ``burst``: open-loop connection bursts against pqproxy (1 worker, ``--workers auto``) and
  nginx (bench/burst.py, with its defaults); its section goes after the others.

Every figure in RESULTS.md comes with the command behind it. Loads go to 127.0.0.1 only.
Two helper modes are used by the suite itself: ``bulk-upstream`` and ``hold``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pqproxy.bench.procs import (  # noqa: E402
    DEMO_LISTENING,
    PQPROXY_LISTENING,
    ServerProcess,
    python_env,
    raise_nofile_limit,
)

PY = sys.executable
ENV = python_env(REPO_ROOT)
LOCAL = "127.0.0.1"
HYBRID = "X25519MLKEM768"
CLASSICAL = "X25519"
MIB = 1 << 20
MB = 1_000_000
BASELINE_READY = r"baseline listening on https://[^ ]*:(\d+) "
BULK_READY = r"bulk upstream listening on http://[^ ]*:(\d+)"
# Connections per source address stay well inside one address's ephemeral port range.
PER_SOURCE_ADDRESS = 5000
# Handshakes a holder keeps in flight while it opens its connections.
HOLD_IN_FLIGHT = 64
STABLE_RSS_TOLERANCE = 0.01
# Bytes moved through the proxy per response size while its CPU is read.
CPU_BLOCK = 300 * MIB


# --- helpers ----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[run_all {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def shown(argv: Sequence[str], replace: dict[str, str]) -> str:
    """A command as RESULTS.md shows it: the venv's python, temporary paths by name."""
    text = " ".join(argv)
    for old, new in sorted(replace.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(old, new)
    return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((LOCAL, port), timeout=1.0):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {LOCAL}:{port} after {timeout:g}s")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or not base or math.isnan(value) or math.isnan(base):
        return None
    return value / base


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# --- servers ----------------------------------------------------------------------------------


@dataclass
class Server:
    key: str
    label: str
    groups: tuple[str, ...]
    command: str
    process: ServerProcess
    port: int
    baseline: str | None = None  # the key of the row its ratios are against


class Suite:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.certs = workdir / "certs"
        self.runs = workdir / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.replace = {
            str(self.certs): "$CERTS",
            PY: ".venv/bin/python",
            str(REPO_ROOT) + "/": "",
            str(self.runs): "$RUNS",
            str(workdir): "$WORK",
        }
        self.cores = os.cpu_count() or 1
        self.commands: list[str] = []
        self.started: list[ServerProcess] = []

    # -- set-up ------------------------------------------------------------------------------

    def gen_cert(self) -> None:
        argv = [PY, "-m", "pqproxy", "gen-cert", "--out", str(self.certs)]
        subprocess.run(argv, check=True, env=ENV, cwd=REPO_ROOT, capture_output=True)
        self.commands.append(shown(argv, self.replace))

    @property
    def ca(self) -> str:
        return str(self.certs / "ca.pem")

    def start(self, argv: list[str], ready: str) -> ServerProcess:
        process = ServerProcess(argv, ready=ready, env=ENV, cwd=REPO_ROOT)
        self.started.append(process)
        return process

    def stop(self, process: ServerProcess) -> None:
        process.stop()
        if process in self.started:
            self.started.remove(process)

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop()
        self.started.clear()

    def demo_upstream(self) -> tuple[ServerProcess, int, str]:
        argv = [
            PY, "-m", "pqproxy", "demo-upstream", "--listen", f"{LOCAL}:0",
            "--tokens", "16", "--token-interval", "0", "--log-level", "WARNING",
        ]  # fmt: skip
        process = self.start(argv, DEMO_LISTENING)
        return process, int(process.match.group(1)), shown(argv, self.replace)

    def pqproxy(self, workers: int | str, upstream_port: int) -> Server:
        """pqproxy with ``workers`` worker processes (a count, or ``"auto"``)."""
        argv = [
            PY, "-m", "pqproxy", "serve", "--listen", f"{LOCAL}:0",
            "--cert", str(self.certs / "server.pem"), "--key", str(self.certs / "server.key"),
            "--upstream", f"http://{LOCAL}:{upstream_port}",
            # No log line per handshake: the baseline and nginx do not write one either.
            "--log-level", "WARNING",
            "--max-connections", "20000", "--idle-timeout", "600s",
        ]  # fmt: skip
        if workers != 1:
            argv += ["--workers", str(workers)]
        process = self.start(argv, PQPROXY_LISTENING)
        label = f"pqproxy, {workers} worker{'s' if workers != 1 else ''}"
        command = shown(argv, self.replace).replace(
            f"http://{LOCAL}:{upstream_port}", f"http://{LOCAL}:UPSTREAM_PORT"
        )
        return Server(
            key=f"pqproxy-{workers}",
            label=label,
            groups=(HYBRID, CLASSICAL),
            command=command,
            process=process,
            port=int(process.match.group(1)),
            baseline=f"openssl-{workers}",
        )

    def pqproxy_offload(self, mode: str, upstream_port: int) -> Server:
        """pqproxy, 1 worker, its key exchange and signing run through ``crypto.offload``
        ``mode`` (set in the config file: the flags have no such option)."""
        conf = self.workdir / f"pqproxy-offload-{mode}.yaml"
        workers = f", workers: {self.cores}" if mode in ("thread", "process") else ""
        conf.write_text(
            OFFLOAD_CONF.format(
                mode=mode,
                workers=workers,
                cert=self.certs / "server.pem",
                key=self.certs / "server.key",
                upstream=f"http://{LOCAL}:{upstream_port}",
            )
        )
        argv = [PY, "-m", "pqproxy", "serve", "--config", str(conf)]
        process = self.start(argv, PQPROXY_LISTENING)
        return Server(
            key=f"pqproxy-1-{mode}",
            label=f"pqproxy, 1 worker, offload {mode}",
            groups=(HYBRID,),
            command=shown(argv, self.replace) + f"  # {conf.name}: see below",
            process=process,
            port=int(process.match.group(1)),
            baseline="openssl-1",
        )

    def baseline(self, workers: int) -> Server:
        argv = [
            PY, str(REPO_ROOT / "bench" / "baseline_server.py"), "--listen", f"{LOCAL}:0",
            "--cert", str(self.certs / "server.pem"), "--key", str(self.certs / "server.key"),
            "--workers", str(workers),
        ]  # fmt: skip
        process = self.start(argv, BASELINE_READY)
        return Server(
            key=f"openssl-{workers}",
            label=f"OpenSSL baseline, {workers} worker{'s' if workers > 1 else ''}",
            groups=(HYBRID, CLASSICAL),
            command=shown(argv, self.replace),
            process=process,
            port=int(process.match.group(1)),
        )

    def nginx(self, workers: int) -> Server | None:
        binary = shutil.which("nginx")
        if binary is None:
            return None
        prefix = self.workdir / f"nginx-{workers}"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                workers=workers,
                prefix=prefix,
                port=port,
                cert=self.certs / "server.pem",
                key=self.certs / "server.key",
                user="root" if os.geteuid() == 0 else "nobody",
            )
        )
        argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", "stderr"]
        self.replace[str(prefix)] = "$PREFIX"
        # nginx says nothing when it is ready: its port answering is the sign.
        process = ServerProcess(argv, ready=None, env=ENV, cwd=prefix)
        self.started.append(process)
        wait_listening(port)
        version = subprocess.run([binary, "-V"], capture_output=True, text=True).stderr
        built = re.search(r"built with (OpenSSL [\d.]+)", version)
        return Server(
            key=f"nginx-{workers}",
            label=f"nginx {nginx_version(binary)} ({built.group(1) if built else 'OpenSSL'}), "
            f"{workers} worker{'s' if workers > 1 else ''}",
            groups=(CLASSICAL,),
            command=shown(argv, self.replace) + f"  # {conf.name} below",
            process=process,
            port=port,
            baseline=f"openssl-{workers}",
        )

    # -- the load tester ---------------------------------------------------------------------

    def handshake_bench(
        self, port: int, group: str, name: str, *, duration: float, extra: Sequence[str] = ()
    ) -> tuple[dict[str, Any], str]:
        out = self.runs / f"{name}.json"
        argv = [
            PY, "-m", "pqproxy.bench.cli", "handshake", "--target", f"{LOCAL}:{port}",
            "--groups", group, "--duration", f"{duration:g}",
            "--concurrency", str(self.args.concurrency), "--processes", str(self.args.processes),
            "--cafile", self.ca, "--json", str(out), "--quiet", *extra,
        ]  # fmt: skip
        done = subprocess.run(
            argv, env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=duration + 180
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result, shown(argv, self.replace)


OFFLOAD_CONF = """\
# pqproxy for bench/run_all.py: the flags' defaults, plus crypto.offload.
workers: 1
admin: off
logging: {{level: warning, access_log: false}}
crypto: {{offload: {mode}{workers}}}
listeners:
  - name: main
    listen: 127.0.0.1:0
    mode: http
    upstream: demo
    tls:
      certificates:
        - {{cert: {cert}, key: {key}}}
    timeouts: {{idle: 600s}}
    limits: {{max_connections: 20000}}
upstreams:
  demo:
    servers: [{upstream}]
    health_check: off
"""


def offload_modes() -> list[str]:
    """The offload modes other than inline (the default, the plain pqproxy row), or none
    when this pqproxy has no offload layer yet."""
    try:
        from pqproxy.crypto.offload import OffloadMode
    except ImportError:
        return []
    return [mode.value for mode in OffloadMode if mode.value != "inline"]


NGINX_CONF = """\
# nginx for pqproxy's bench/run_all.py: TLS 1.3 only, the classical groups pqproxy offers (this
# nginx's OpenSSL 3.0 has no ML-KEM), no resumption, no logging, a fixed answer.
user {user};
worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log stderr warn;
worker_rlimit_nofile 40000;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    keepalive_timeout 600s;
    keepalive_requests 1000000;
    server {{
        listen {LOCAL}:{port} ssl reuseport;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        ssl_ecdh_curve X25519:prime256v1:secp384r1;
        ssl_session_tickets off;
        ssl_session_cache off;
        location / {{ return 200 '{{"status":"ok"}}\\n'; }}
    }}
}}
""".replace("{LOCAL}", LOCAL)


def nginx_version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True)
    match = re.search(r"nginx/([\d.]+)", done.stderr)
    return match.group(1) if match else "?"


# --- section: server CPU per handshake --------------------------------------------------------

# A client that offers the hybrid but sends only an X25519 share: the server asks again (HRR).
HRR_VARIANT = f"{HYBRID} via HRR"
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    HYBRID: (HYBRID, ()),
    CLASSICAL: (CLASSICAL, ()),
    HRR_VARIANT: (HYBRID, ("--force-hrr",)),
}


@dataclass
class CpuSample:
    cpu_us: float  # server CPU per handshake
    per_core: float  # handshakes per server CPU-second
    wall_rate: float  # handshakes/s the run achieved
    successes: int
    errors: int
    hrr: int
    client_busy: float
    machine_busy: float | None


@dataclass
class CpuResults:
    servers: list[Server] = field(default_factory=list)
    # (server key, variant) -> one sample per round, in round order
    samples: dict[tuple[str, str], list[CpuSample]] = field(default_factory=dict)
    client_command: str = ""
    skipped: list[str] = field(default_factory=list)


def cpu_section(suite: Suite, upstream_port: int) -> CpuResults:
    args = suite.args
    results = CpuResults()
    one_pq, one_ssl = suite.pqproxy(1, upstream_port), suite.baseline(1)
    # The HRR variant on the single-worker rows only: what pq_policy "prefer" costs a client
    # that sent the wrong share.
    one_pq.groups = one_ssl.groups = (HYBRID, CLASSICAL, HRR_VARIANT)
    servers = [one_pq, one_ssl]
    if suite.cores > 1:
        servers += [suite.pqproxy(suite.cores, upstream_port), suite.baseline(suite.cores)]
    for mode in offload_modes():
        servers.append(suite.pqproxy_offload(mode, upstream_port))
    nginx = suite.nginx(1)
    if nginx is not None:
        servers.append(nginx)
    else:
        results.skipped.append("nginx: not installed (`which nginx` finds nothing)")
    results.servers = servers
    # Each pqproxy row runs next to its OpenSSL row with the same variant, so that the ratio of
    # the two comes from runs seconds apart.
    pairs: list[tuple[Server, str]] = []
    for variant in VARIANTS:
        for server in servers:
            if variant in server.groups:
                pairs.append((server, variant))
    pairs.sort(key=lambda p: (p[0].key.split("-")[1], list(VARIANTS).index(p[1])))
    log(f"cpu: warming up {len(servers)} servers")
    for server in servers:
        for group in (g for g in server.groups if g in (HYBRID, CLASSICAL)):
            suite.handshake_bench(server.port, group, f"warmup-{server.key}-{group}", duration=1)
    for round_ in range(args.rounds):
        # Rotate: each (server, variant) runs at another position every round.
        shift = round_ % len(pairs)
        for server, variant in pairs[shift:] + pairs[:shift]:
            group, extra = VARIANTS[variant]
            name = f"cpu-{server.key}-{variant.replace(' ', '-')}-{round_}"
            before = server.process.cpu_seconds()
            result, command = suite.handshake_bench(
                server.port, group, name, duration=args.duration, extra=extra
            )
            cpu = server.process.cpu_seconds() - before
            ok = result["successes"]
            if not extra:
                results.client_command = (
                    command.replace(f":{server.port}", ":PORT")
                    .replace(f"--groups {group}", "--groups GROUP")
                    .replace(name, "cpu-SERVER-GROUP-ROUND")
                )
            sample = CpuSample(
                cpu_us=cpu / ok * 1e6 if ok else math.nan,
                per_core=ok / cpu if cpu else math.nan,
                wall_rate=result["handshakes_per_s"],
                successes=ok,
                errors=result["errors"],
                hrr=result["hello_retry_requests"],
                client_busy=result["client"]["busy_fraction"],
                machine_busy=result["client"]["machine_busy_fraction"],
            )
            results.samples.setdefault((server.key, variant), []).append(sample)
            log(
                f"cpu round {round_ + 1}/{args.rounds}: {server.label} {variant}: "
                f"{sample.cpu_us:.0f} us/handshake, {sample.wall_rate:.0f}/s, "
                f"{sample.errors} errors"
            )
    for server in servers:
        suite.stop(server.process)
    return results


# --- section: throughput ----------------------------------------------------------------------


async def _bulk_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    zeros = memoryview(bytes(MIB))
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            size = int(target.rsplit("/", 1)[1]) if target.startswith("/bytes/") else 2
            writer.write(
                f"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                f"content-length: {size}\r\n\r\n".encode()
            )
            left = size
            while left:
                chunk = min(left, MIB)
                writer.write(zeros[:chunk])
                left -= chunk
                await writer.drain()
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
        pass
    finally:
        writer.close()


async def _bulk_upstream(host: str, port: int) -> None:
    server = await asyncio.start_server(_bulk_connection, host, port)
    bound = server.sockets[0].getsockname()[1]
    print(f"bulk upstream listening on http://{host}:{bound}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def bulk_upstream_main(listen: str) -> int:
    """``run_all.py bulk-upstream``: GET /bytes/N answers N zero bytes, keep-alive."""
    host, _, port = listen.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop

            uvloop.run(_bulk_upstream(host, int(port)))
        except ImportError:
            asyncio.run(_bulk_upstream(host, int(port)))
    return 0


class _Fetcher:
    """One keep-alive connection, plain or TLS (pyOpenSSL on the socket: OpenSSL does the
    I/O, so the client reads as fast as it can)."""

    def __init__(self, port: int, tls_group: str | None, ca: str) -> None:
        from pqproxy.bench.handshake import check_peer_name, client_context

        self.sock = socket.create_connection((LOCAL, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn: Any = self.sock
        if tls_group is not None:
            from OpenSSL import SSL

            ctx = client_context(tls_group, cafile=ca, insecure=False)
            tls = SSL.Connection(ctx, self.sock)
            tls.set_connect_state()
            check_peer_name(tls, LOCAL)
            tls.do_handshake()
            self.conn = tls
        self.buffer = bytearray(256 * 1024)

    def fetch(self, size: int) -> float:
        """Seconds from sending the request to the last byte of an N-byte response."""
        started = time.perf_counter()
        self.conn.sendall(f"GET /bytes/{size} HTTP/1.1\r\nhost: {LOCAL}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise RuntimeError("closed before the response head")
            head += chunk
        head_end = head.index(b"\r\n\r\n") + 4
        match = re.search(rb"content-length:\s*(\d+)", head[:head_end], re.IGNORECASE)
        if not match or int(match.group(1)) != size:
            raise RuntimeError(f"unexpected response head {head[:head_end]!r}")
        left = size - (len(head) - head_end)
        view = memoryview(self.buffer)
        while left > 0:
            got = self.conn.recv_into(view, min(len(view), left))
            if not got:
                raise RuntimeError("closed inside the body")
            left -= got
        return time.perf_counter() - started

    def close(self) -> None:
        self.sock.close()


@dataclass
class ThroughputResults:
    sizes: list[int]
    direct: dict[int, list[float]]  # MB/s per transfer
    proxy: dict[int, list[float]]
    proxy_cpu: dict[int, float]  # pqproxy's CPU seconds over a block of transfers of that size
    proxy_bytes: dict[int, int]  # bytes moved in that block
    commands: list[str]


def throughput_section(suite: Suite) -> ThroughputResults:
    sizes = [1 * MIB, 10 * MIB, 100 * MIB]
    reps = {1 * MIB: 20, 10 * MIB: 8, 100 * MIB: 3}
    bulk_argv = [PY, str(Path(__file__).resolve()), "bulk-upstream", "--listen", f"{LOCAL}:0"]
    bulk = suite.start(bulk_argv, BULK_READY)
    bulk_port = int(bulk.match.group(1))
    proxy = suite.pqproxy(1, bulk_port)
    results = ThroughputResults(
        sizes=sizes,
        direct={s: [] for s in sizes},
        proxy={s: [] for s in sizes},
        proxy_cpu=dict.fromkeys(sizes, 0.0),
        proxy_bytes=dict.fromkeys(sizes, 0),
        commands=[shown(bulk_argv, suite.replace), proxy.command],
    )
    direct = _Fetcher(bulk_port, None, suite.ca)
    via = _Fetcher(proxy.port, HYBRID, suite.ca)
    try:
        for size in sizes:  # warm-up: buffers, code paths, the upstream pool
            direct.fetch(size)
            via.fetch(size)
        for rep in range(max(reps.values())):
            for size in sizes:
                if rep >= reps[size]:
                    continue
                results.direct[size].append(size / direct.fetch(size) / MB)
                results.proxy[size].append(size / via.fetch(size) / MB)
        # CPU in one block per size: /proc counts in 10 ms ticks, too coarse for one 1 MiB
        # transfer, fine for CPU_BLOCK bytes in a row.
        for size in sizes:
            before = proxy.process.cpu_seconds()
            for _ in range(max(1, CPU_BLOCK // size)):
                via.fetch(size)
                results.proxy_bytes[size] += size
            results.proxy_cpu[size] = proxy.process.cpu_seconds() - before
        log("throughput: done")
    finally:
        direct.close()
        via.close()
        suite.stop(proxy.process)
        suite.stop(bulk)
    return results


# --- section: memory per idle connection ------------------------------------------------------


async def _hold(
    port: int, count: int, ca: str, group: str, sources: Sequence[str]
) -> tuple[list[Any], dict[str, int]]:
    from pqproxy.bench.handshake import client_context
    from pqproxy.bench.request import (
        HttpConnection,
        RequestFailed,
        RequestOptions,
        exchange,
        paths_of,
        request_events,
    )

    options = RequestOptions(
        proxy_host=LOCAL,
        proxy_port=port,
        groups=(group,),
        method="GET",
        path="/health",
        stream=False,
        cafile=ca,
    )
    [path] = paths_of(options)
    ctx = client_context(group, cafile=ca, insecure=False)
    held: list[Any] = []
    errors: dict[str, int] = {}
    gate = asyncio.Semaphore(HOLD_IN_FLIGHT)

    async def one(i: int) -> None:
        async with gate:
            try:
                conn, _ = await asyncio.wait_for(
                    HttpConnection.open(
                        path, LOCAL, ctx, options, local_host=sources[i % len(sources)]
                    ),
                    30,
                )
                await asyncio.wait_for(
                    exchange(conn, request_events(options, path), time.perf_counter(), False), 30
                )
                conn.http.start_next_cycle()
                held.append(conn)
            except (RequestFailed, OSError, TimeoutError) as exc:
                reason = getattr(exc, "reason", type(exc).__name__)
                errors[reason] = errors.get(reason, 0) + 1

    await asyncio.gather(*(one(i) for i in range(count)))
    return held, errors


def hold_main(target: str, count: int, ca: str, group: str, sources: list[str]) -> int:
    """``run_all.py hold``: open ``count`` TLS connections, each with one keep-alive request,
    print ``held N`` (or ``failed``), keep them open until stdin closes."""
    raise_nofile_limit()
    port = int(target.rpartition(":")[2])

    async def main() -> None:
        held, errors = await _hold(port, count, ca, group, sources)
        print(f"held {len(held)} errors {json.dumps(errors)}", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)
        for conn in held:
            conn.close()
        await asyncio.sleep(0)

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    return 0


def stable_rss(process: ServerProcess, timeout: float = 15.0) -> int:
    """The server's RSS once two samples half a second apart agree within 1%."""
    deadline = time.monotonic() + timeout
    last = process.rss_bytes()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = process.rss_bytes()
        if abs(now - last) <= STABLE_RSS_TOLERANCE * max(last, 1):
            return now
        last = now
    return last


@dataclass
class MemoryRow:
    label: str
    connections: int
    held: int
    rss_before: int
    rss_after: int
    errors: dict[str, int]

    @property
    def per_connection(self) -> float:
        return (self.rss_after - self.rss_before) / self.held if self.held else math.nan


@dataclass
class MemoryResults:
    rows: list[MemoryRow] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


def _holders(suite: Suite, port: int, count: int, group: str) -> list[subprocess.Popen[str]]:
    processes = max(1, min(suite.args.processes, count // 100 or 1))
    per = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
    holders = []
    for index, share in enumerate(per):
        addresses = max(1, math.ceil(share / PER_SOURCE_ADDRESS))
        sources = [f"127.0.{index + 1}.{a + 1}" for a in range(addresses)]
        argv = [
            PY, str(Path(__file__).resolve()), "hold", "--target", f"{LOCAL}:{port}",
            "--count", str(share), "--cafile", suite.ca, "--group", group,
            "--sources", ",".join(sources),
        ]  # fmt: skip
        holders.append(
            subprocess.Popen(
                argv,
                env=ENV,
                cwd=REPO_ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    return holders


def _wait_held(holders: list[subprocess.Popen[str]], timeout: float) -> tuple[int, dict[str, int]]:
    held = 0
    errors: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    for holder in holders:
        assert holder.stdout is not None
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([holder.stdout], [], [], max(0.0, remaining))
        if not ready:
            raise RuntimeError(f"a holder did not report within {timeout:g}s")
        line = holder.stdout.readline()
        match = re.match(r"held (\d+) errors (.*)$", line.strip())
        if not match:
            raise RuntimeError(f"holder said {line!r}")
        held += int(match.group(1))
        for reason, n in json.loads(match.group(2)).items():
            errors[reason] = errors.get(reason, 0) + n
    return held, errors


def _release(holders: list[subprocess.Popen[str]]) -> None:
    for holder in holders:
        assert holder.stdin is not None
        holder.stdin.close()
    for holder in holders:
        try:
            holder.wait(60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def memory_section(suite: Suite, upstream_port: int) -> MemoryResults:
    results = MemoryResults()
    counts = suite.args.memory_counts
    makers: list[tuple[str, Callable[[], Server]]] = [
        ("pqproxy", lambda: suite.pqproxy(1, upstream_port)),
        ("openssl", lambda: suite.baseline(1)),
    ]
    for count in counts:
        for _kind, make in makers:
            server = make()
            try:
                # Warm-up: the code paths and allocator pools a connection touches, then
                # released, so that the figure is what each extra connection costs.
                warm = _holders(suite, server.port, min(200, count), HYBRID)
                _wait_held(warm, 120)
                _release(warm)
                before = stable_rss(server.process)
                holders = _holders(suite, server.port, count, HYBRID)
                try:
                    held, errors = _wait_held(holders, 300)
                    after = stable_rss(server.process)
                finally:
                    _release(holders)
                row = MemoryRow(server.label, count, held, before, after, errors)
                results.rows.append(row)
                if server.command not in results.commands:
                    results.commands.append(server.command)
                log(
                    f"memory: {server.label} {count} connections: held {held}, "
                    f"{row.per_connection / 1024:.1f} KiB each"
                )
            finally:
                suite.stop(server.process)
    results.commands.append(
        shown([PY, "bench/run_all.py", "hold", "--target", "127.0.0.1:PORT", "--count", "N",
               "--cafile", suite.ca, "--group", HYBRID, "--sources", "127.0.1.1,..."],
              suite.replace)
    )  # fmt: skip
    return results


# --- section: time to first token -------------------------------------------------------------


@dataclass
class RequestResults:
    keepalive: list[dict[str, Any]] = field(default_factory=list)
    new_connections: dict[str, Any] | None = None
    commands: list[str] = field(default_factory=list)


def request_section(suite: Suite, upstream_port: int, upstream_command: str) -> RequestResults:
    results = RequestResults()
    proxy = suite.pqproxy(1, upstream_port)
    results.commands += [upstream_command, proxy.command]
    try:
        for round_ in range(suite.args.rounds + 1):
            new = round_ == suite.args.rounds
            out = suite.runs / f"request-{'new' if new else round_}.json"
            argv = [
                PY, "-m", "pqproxy.bench.cli", "request",
                "--proxy", f"{LOCAL}:{proxy.port}", "--upstream", f"{LOCAL}:{upstream_port}",
                "--cafile", suite.ca, "--concurrency", "1", "--processes", "1",
                "--duration", f"{suite.args.request_duration:g}", "--tokens", "16",
                "--json", str(out), "--quiet",
            ]  # fmt: skip
            if new:
                argv.append("--new-connections")
            subprocess.run(argv, env=ENV, cwd=REPO_ROOT, check=True, capture_output=True)
            result = json.loads(out.read_text())
            if new:
                results.new_connections = result
            else:
                results.keepalive.append(result)
            command = (
                shown(argv, suite.replace)
                .replace(f":{proxy.port}", ":PROXY_PORT")
                .replace(f":{upstream_port}", ":UPSTREAM_PORT")
                .replace(f"request-{round_}.json", "request-ROUND.json")
            )
            if command not in results.commands:
                results.commands.append(command)
            log(f"request: run {round_ + 1} done")
    finally:
        suite.stop(proxy.process)
    return results


# --- section: profile -------------------------------------------------------------------------


def profile_section(suite: Suite) -> tuple[str, str]:
    argv = [PY, "bench/profile_handshake.py", "--count", "1000", "--profile"]
    done = subprocess.run(argv, env=ENV, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return shown(argv, suite.replace), done.stdout


# --- RESULTS.md -------------------------------------------------------------------------------


def write_results(
    suite: Suite,
    path: Path,
    *,
    started: float,
    load_before: str,
    cpu: CpuResults | None,
    profile: tuple[str, str] | None,
    throughput: ThroughputResults | None,
    memory: MemoryResults | None,
    request: RequestResults | None,
) -> None:
    from OpenSSL import SSL

    args = suite.args
    elapsed = time.monotonic() - started
    lines: list[str] = []
    add = lines.append
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "--no-optional-locks", "status", "--porcelain"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    add("# pqproxy benchmark results")
    add("")
    add(
        f"Written by `{' '.join(['.venv/bin/python', 'bench/run_all.py', *args.argv])}`"
        + f" on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, in {elapsed / 60:.1f} min."
    )
    add("")
    add(f"- machine: {cpu_model}, {suite.cores} cores, {platform.system()} {platform.release()}")
    add(
        f"- load average before / after the run: {load_before} / {loadavg()} (the machine "
        "is shared: other work running at the same time inflates every CPU figure alike)"
    )
    add(
        f"- pqproxy {commit}{' with uncommitted changes' if dirty else ''}, Python "
        f"{platform.python_version()}; client and baseline: "
        f"{SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()} (cryptography's)"
    )
    add(
        f"- load tester: `pqproxy bench handshake`, {args.processes} client processes, "
        f"{args.concurrency} connections in flight, {args.duration:g} s per run, "
        f"{args.rounds} rounds"
    )
    add("- certificates: `CERTS=$(mktemp -d) && .venv/bin/python -m pqproxy gen-cert --out "
        "$CERTS` (ECDSA P-256 leaf and CA); `$RUNS` is where each run's JSON goes")  # fmt: skip
    add("")
    targets: list[tuple[str, str, bool | None, str, str]] = []
    # The targets table goes here, once every section has added its rows.
    marker = len(lines)
    if cpu is not None:
        _write_cpu(lines, cpu, targets)
    else:
        add("## Server CPU per handshake\n\nNot run (`--only`).\n")
    if profile is not None:
        command, text = profile
        add("### Where pqproxy's handshake CPU goes")
        add("")
        add(f"`{command}` (the engine alone, in process, against a pyOpenSSL memory-BIO client):")
        add("")
        add("```")
        add("\n".join(text.strip().splitlines()[:28]))
        add("```")
        add("")
    if throughput is not None:
        _write_throughput(lines, throughput, targets)
    else:
        add("## Throughput through the proxy\n\nNot run (`--only`).\n")
    if memory is not None:
        _write_memory(lines, memory, targets)
    else:
        add("## Memory per idle TLS connection\n\nNot run (`--only`).\n")
    if request is not None:
        _write_request(lines, request, targets)
    else:
        add("## Time to first token added by the proxy\n\nNot run (`--only`).\n")
    _write_offload(lines, cpu)
    measured = {t[0] for t in targets}
    for name in TARGET_NAMES:
        if name not in measured:
            targets.append((name, "-", None, "-", "-"))
    order = {name: i for i, name in enumerate(TARGET_NAMES)}
    targets.sort(key=lambda t: order.get(t[0], len(order)))
    block = [
        "## Targets",
        "",
        "Each target as the issue states it, from the figures below.",
        "",
        "| target | measured | met | gap | what would close it |",
        "|---|---|---|---|---|",
    ]
    for name, value, met, gap, closing in targets:
        verdict = "not measured" if met is None else ("**met**" if met else "**not met**")
        block.append(
            f"| {name} | {value} | {verdict} | {gap} | {closing if met is False else '-'} |"
        )
    block.append("")
    lines[marker:marker] = block
    path.write_text("\n".join(lines) + "\n")


TARGET_NAMES = (
    "Server CPU per X25519MLKEM768 handshake ≤ the OpenSSL baseline's",
    "Hybrid CPU overhead ≤ 15% over X25519 (pqproxy)",
    "The proxy adds ≤ 1 ms at p50 to time-to-first-token",
    "≥ 200 MB/s bulk per worker",
    "≤ 64 KiB per idle TLS connection",
)


def _cell_ms(samples: list[CpuSample]) -> str:
    return ", ".join(f"{s.cpu_us:.0f}" for s in samples)


def _round_ratios(
    samples: dict[tuple[str, str], list[CpuSample]], a: tuple[str, str], b: tuple[str, str]
) -> list[float]:
    """a's CPU per handshake / b's, round by round: runs seconds apart see the same load on
    the machine, so these ratios are steadier than a ratio of medians."""
    if a not in samples or b not in samples:
        return []
    ratios = [x.cpu_us / y.cpu_us for x, y in zip(samples[a], samples[b], strict=False)]
    return [r for r in ratios if not math.isnan(r)]


def _round_ratio(
    samples: dict[tuple[str, str], list[CpuSample]], a: tuple[str, str], b: tuple[str, str]
) -> float | None:
    """The median of ``_round_ratios``."""
    ratios = _round_ratios(samples, a, b)
    return median(ratios) if ratios else None


def _spread(ratios: list[float], *, percent: bool) -> str:
    """The range of the per-round ratios: how far one run's verdict could move."""
    if not ratios:
        return ""
    low, high = min(ratios), max(ratios)
    if percent:
        return f"; rounds {(low - 1) * 100:.0f}% to {(high - 1) * 100:.0f}%"
    return f"; rounds {low:.2f}x to {high:.2f}x"


def _is_offload_row(server: Server) -> bool:
    return server.key.startswith("pqproxy-1-")


def _main_rows(cpu: CpuResults) -> list[Server]:
    return [s for s in cpu.servers if not _is_offload_row(s)]


def _write_offload(lines: list[str], cpu: CpuResults | None) -> None:
    add = lines.append
    add("## Offload modes")
    add("")
    rows = [s for s in cpu.servers if _is_offload_row(s)] if cpu is not None else []
    if not rows or cpu is None:
        if cpu is None:
            add("Not run (`--only`): the offload rows are part of the `cpu` section.")
        else:
            add(
                "Pending: this pqproxy has no offload layer (`pqproxy.crypto.offload`), so "
                "there is nothing to compare."
            )
        add("")
        return
    samples = cpu.samples
    add(
        "The same measurement as the CPU table, X25519MLKEM768, with the key exchange and the "
        "signature run through each `crypto.offload` mode (set in a config file; inline, the "
        "default, is the plain `pqproxy, 1 worker` row). The server's CPU includes its offload "
        "threads and processes. Ratios are medians of per-round ratios."
    )
    add("")
    add(
        "| offload | CPU per handshake (µs) | vs inline | vs OpenSSL | handshakes/s per core | "
        "handshakes/s achieved | rounds (µs) |"
    )
    add("|---|---:|---:|---:|---:|---:|---|")
    inline = ("pqproxy-1", HYBRID)
    for server in [None, *rows]:
        key = inline if server is None else (server.key, HYBRID)
        runs = samples.get(key, [])
        if not runs:
            continue
        name = "inline (default)" if server is None else server.key.rsplit("-", 1)[1]
        versus_inline = (
            "1 (base)" if server is None else fmt_ratio(_round_ratio(samples, key, inline))
        )
        add(
            f"| {name} | {fmt(median([r.cpu_us for r in runs]))} | {versus_inline} | "
            f"{fmt_ratio(_round_ratio(samples, key, ('openssl-1', HYBRID)))} | "
            f"{fmt(median([r.per_core for r in runs]))} | "
            f"{fmt(median([r.wall_rate for r in runs]))} | {_cell_ms(runs)} |"
        )
    add("")
    add("Commands:")
    add("")
    for server in rows:
        add(f"- {server.label}: `{server.command}`")
    add("- the same client as the CPU table, `--groups X25519MLKEM768`")
    add("- the config file (MODE and, for thread and process, `workers: "
        f"{os.cpu_count()}`):")  # fmt: skip
    add("")
    add("```yaml")
    add(
        OFFLOAD_CONF.format(
            mode="MODE",
            workers="",
            cert="$CERTS/server.pem",
            key="$CERTS/server.key",
            upstream="http://127.0.0.1:UPSTREAM_PORT",
        ).rstrip()
    )
    add("```")
    add("")


def _write_cpu(
    lines: list[str], cpu: CpuResults, targets: list[tuple[str, str, bool | None, str, str]]
) -> None:
    add = lines.append
    samples = cpu.samples
    med = {k: median([s.cpu_us for s in v]) for k, v in samples.items()}
    per_core = {k: median([s.per_core for s in v]) for k, v in samples.items()}
    add("## Server CPU per handshake and handshakes/s per core")
    add("")
    add(
        "Server CPU = utime + stime of the server's processes (/proc/<pid>/stat, the server "
        "and every worker) over a run, divided by the handshakes completed in it. Handshakes/s "
        "per core = handshakes / server CPU-seconds: what one fully busy core would sustain. "
        "Each figure is the median of the rounds (every round's figure is listed); each ratio "
        "is the median over the rounds of the two servers' figures in the same round (runs "
        "seconds apart), against the OpenSSL baseline with the same workers and group: for "
        "CPU lower is better, for handshakes/s per core higher."
    )
    add("")
    add(
        "| server | group | CPU per handshake (µs) | vs OpenSSL | handshakes/s per core | "
        "vs OpenSSL | handshakes/s achieved | client busy | rounds (µs) |"
    )
    add("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for server in _main_rows(cpu):
        for variant in server.groups:
            key = (server.key, variant)
            rows = samples.get(key, [])
            if not rows:
                continue
            base = server.baseline
            value = _round_ratio(samples, key, (base, variant)) if base else None
            cpu_ratio = fmt_ratio(value) if base else "1 (base)"
            core_ratio = fmt_ratio(1 / value if value else None) if base else "1"
            errors = sum(s.errors for s in rows)
            add(
                f"| {server.label} | {variant} | {fmt(med[key])} | {cpu_ratio} | "
                f"{fmt(per_core[key])} | {core_ratio} | {fmt(median([s.wall_rate for s in rows]))}"
                f"{f' ({errors} errors)' if errors else ''} | "
                f"{median([s.client_busy for s in rows]):.0%} | {_cell_ms(rows)} |"
            )
    add("")
    add("Each server's own costs, from its rows above (medians of the per-round ratios):")
    add("")
    for server in _main_rows(cpu):
        hybrid, classical = (server.key, HYBRID), (server.key, CLASSICAL)
        if hybrid in med and classical in med:
            value = _round_ratio(samples, hybrid, classical)
            add(
                f"- {server.label}: X25519MLKEM768 / X25519 = {fmt_ratio(value)} "
                f"({fmt(med[hybrid] - med[classical])} µs more per hybrid handshake)"
            )
        hrr = (server.key, HRR_VARIANT)
        if hrr in med and hybrid in med:
            value = _round_ratio(samples, hrr, hybrid)
            seen = sum(s.hrr for s in samples[hrr])
            add(
                f"- {server.label}: X25519MLKEM768 after an HRR / without = {fmt_ratio(value)} "
                f"({seen:,} HRRs seen by the client in those runs)"
            )
    nginx_key = next((s.key for s in cpu.servers if s.key.startswith("nginx")), None)
    if nginx_key is not None and ("openssl-1", CLASSICAL) in med:
        value = _round_ratio(samples, ("openssl-1", CLASSICAL), (nginx_key, CLASSICAL))
        add(
            f"- the OpenSSL baseline against nginx (X25519, 1 worker, both OpenSSL in C): "
            f"{fmt_ratio(value)}: the baseline's Python event loop adds little to OpenSSL's "
            "own handshake, so it is a fair stand-in for a native OpenSSL server"
        )
    add("")
    busy = [s.machine_busy for v in samples.values() for s in v if s.machine_busy]
    add(
        f"Handshakes/s achieved is what the run reached with the client and the server on the "
        f"same {os.cpu_count()} cores (the whole machine was {median(busy):.0%} busy, median): "
        "it measures the pair, not the server; the per-core column is the server's own figure."
    )
    add("")
    add("Commands:")
    add("")
    for server in _main_rows(cpu):
        add(f"- {server.label}: `{server.command}`")
    add(f"- client, per (server, group, round): `{cpu.client_command}`; the HRR rows add "
        "`--force-hrr` with `--groups X25519MLKEM768`")  # fmt: skip
    add("- server CPU: /proc/<pid>/stat fields 14+15 of the server and its descendants, "
        "read just before and just after each client run")  # fmt: skip
    for note in cpu.skipped:
        add(f"- {note}")
    if nginx_key is not None:
        add(
            "- nginx is Debian 12's 1.22, linked with OpenSSL 3.0, which has no ML-KEM: "
            "a classical (X25519) row only. Its configuration:"
        )
        add("")
        add("```nginx")
        add(NGINX_CONF.format(workers=1, prefix="$PREFIX", port="PORT", cert="$CERTS/server.pem",
                              key="$CERTS/server.key", user="root").rstrip())  # fmt: skip
        add("```")
    add("")
    one, ssl_one = "pqproxy-1", "openssl-1"
    vs_openssl = _round_ratios(samples, (one, HYBRID), (ssl_one, HYBRID))
    vs_classical = _round_ratios(samples, (one, HYBRID), (one, CLASSICAL))
    value = _round_ratio(samples, (one, HYBRID), (ssl_one, HYBRID))
    if value is not None:
        targets.append(
            (
                TARGET_NAMES[0],
                f"{fmt(med[(one, HYBRID)])} µs vs {fmt(med[(ssl_one, HYBRID)])} µs "
                f"({fmt_ratio(value)}, 1 worker each"
                f"{_spread(vs_openssl, percent=False)})",
                value <= 1.0,
                f"{fmt((value - 1) * 100)}% more CPU" if value > 1 else "-",
                CLOSE_CPU,
            )
        )
    value = _round_ratio(samples, (one, HYBRID), (one, CLASSICAL))
    if value is not None:
        targets.append(
            (
                TARGET_NAMES[1],
                f"{fmt((value - 1) * 100, 1)}% ({fmt(med[(one, HYBRID)])} vs "
                f"{fmt(med[(one, CLASSICAL)])} µs"
                f"{_spread(vs_classical, percent=True)})",
                value <= 1.15,
                f"{fmt((value - 1.15) * 100, 1)} points" if value > 1.15 else "-",
                CLOSE_HYBRID,
            )
        )


CLOSE_CPU = (
    "The engine does in Python what OpenSSL does in C: the key schedule (about 16 "
    "HKDF-Expand-Label calls per handshake, each a few HMACs through the `hmac` module), record "
    "framing and protection, message parsing, and the per-connection asyncio plumbing; the "
    "profile above shows the split. Ways to close it, largest first: derive each key-schedule "
    "stage in one C call (cryptography's HKDFExpand, or one extension function for the whole "
    "schedule), build the server flight with fewer intermediate objects and one record write, "
    "and keep per-connection set-up (engine, timers, protocol objects) minimal; the crypto "
    "primitives themselves are already OpenSSL's."
)
CLOSE_HYBRID = (
    "The hybrid adds ML-KEM-768 encapsulation and public-key decoding (both in C) and "
    "about 2.2 KB on the wire; lower the fixed Python cost of a handshake and the ratio falls."
)
CLOSE_TTFT = (
    "The first token crosses the proxy twice in Python: h11 parses the upstream response and "
    "re-frames it, and each chunk becomes a TLS record through the engine. Relaying the "
    "chunked body as raw bytes after the response head, writing each chunk as soon as it is "
    "read without an extra task hop, and keeping the upstream connection warm in the pool "
    "remove most of it."
)
CLOSE_BULK = (
    "Each 16 KiB record is sealed by one cryptography AESGCM call from Python, and the body is "
    "copied between h11 events and the transport. Larger reads from the upstream, sealing "
    "several records per call into one preallocated buffer, and writing with writelines "
    "instead of joining would raise it; more workers scale it per core."
)
CLOSE_MEMORY = (
    "Every idle connection holds Python objects: the engine and its key schedule, the asyncio "
    "protocol and transport, the h11 connection and the session task waiting for the next "
    "request. Dropping handshake-only state once the handshake completes, `__slots__` on the "
    "per-connection classes, and a callback instead of a parked task per idle connection "
    "would shrink it."
)


def _write_throughput(
    lines: list[str],
    results: ThroughputResults,
    targets: list[tuple[str, str, bool | None, str, str]],
) -> None:
    add = lines.append
    add("## Bulk throughput through the proxy")
    add("")
    add(
        "One keep-alive connection per path; each transfer timed from the request to the last "
        "byte of the body; MB = 10^6 bytes; medians of the transfers (1 MiB x20, 10 MiB x8, "
        "100 MiB x3, interleaved). The client reads with pyOpenSSL on the socket "
        "(X25519MLKEM768, AES-128-GCM). CPU per MiB and MB/s per core: pqproxy's CPU-seconds "
        "over a further 300 MiB of back-to-back responses of each size."
    )
    add("")
    add("| response | direct, plain HTTP (MB/s) | via pqproxy, 1 worker (MB/s) | "
        "pqproxy CPU per MiB (ms) | MB/s per pqproxy core |")  # fmt: skip
    add("|---|---:|---:|---:|---:|")
    best: float | None = None
    for size in results.sizes:
        cpu = results.proxy_cpu[size]
        moved = results.proxy_bytes[size]
        per_core = moved / cpu / MB if cpu else math.nan
        via = median(results.proxy[size])
        if size == results.sizes[-1]:
            best = via
        add(
            f"| {size // MIB} MiB | {fmt(median(results.direct[size]))} | {fmt(via)} | "
            f"{fmt(cpu / (moved / MIB) * 1000, 2) if moved else '-'} | {fmt(per_core)} |"
        )
    add("")
    add("Commands (run by `bench/run_all.py --only throughput`):")
    add("")
    for command in results.commands:
        add(f"- `{command}`")
    add(
        "- client: `_Fetcher` in bench/run_all.py: `GET /bytes/N` on one keep-alive connection, "
        "direct to the upstream and through pqproxy"
    )
    add("")
    if best is not None:
        targets.append(
            (
                TARGET_NAMES[3],
                f"{fmt(best)} MB/s (100 MiB, 1 worker)",
                best >= 200,
                f"{fmt(200 - best)} MB/s short" if best < 200 else "-",
                CLOSE_BULK,
            )
        )


def _write_memory(
    lines: list[str], results: MemoryResults, targets: list[tuple[str, str, bool | None, str, str]]
) -> None:
    add = lines.append
    add("## Memory per idle TLS connection")
    add("")
    add(
        "A fresh server (1 worker) per row; 200 connections opened and closed to warm it; its "
        "RSS; then N connections opened (each: an X25519MLKEM768 handshake and one keep-alive "
        "`GET /health`, then idle) by client processes spread over 127.0.x.y source addresses; "
        "its RSS again once stable. Per connection = the difference / N."
    )
    add("")
    add("| server | connections | held | RSS before (MiB) | RSS after (MiB) | "
        "per connection (KiB) | vs OpenSSL |")  # fmt: skip
    add("|---|---:|---:|---:|---:|---:|---:|")
    baseline = {r.connections: r for r in results.rows if r.label.startswith("OpenSSL")}
    for row in results.rows:
        errors = f" ({sum(row.errors.values())} failed: {row.errors})" if row.errors else ""
        base = baseline.get(row.connections)
        versus = (
            "1 (base)"
            if base is row
            else fmt_ratio(ratio(row.per_connection, base.per_connection if base else None))
        )
        add(
            f"| {row.label} | {row.connections:,} | {row.held:,}{errors} | "
            f"{row.rss_before / MIB:.1f} | {row.rss_after / MIB:.1f} | "
            f"{row.per_connection / 1024:.1f} | {versus} |"
        )
    add("")
    add("Commands (run by `bench/run_all.py --only memory`):")
    add("")
    for command in results.commands:
        add(f"- `{command}`")
    add("- RSS: /proc/<pid>/statm resident pages of the server, sampled until two samples "
        "0.5 s apart agree within 1%")  # fmt: skip
    add("")
    rows = [r for r in results.rows if r.label.startswith("pqproxy")]
    if rows:
        worst = max(rows, key=lambda r: r.connections)
        kib = worst.per_connection / 1024
        targets.append(
            (
                TARGET_NAMES[4],
                f"{kib:.1f} KiB at {worst.connections:,} connections",
                kib <= 64,
                f"{kib - 64:.1f} KiB over" if kib > 64 else "-",
                CLOSE_MEMORY,
            )
        )


def _write_request(
    lines: list[str], results: RequestResults, targets: list[tuple[str, str, bool | None, str, str]]
) -> None:
    add = lines.append
    add("## Time to first token added by the proxy")
    add("")
    add(
        "`pqproxy bench request`: a streamed chat completion (16 tokens, no pacing) from the "
        "demo upstream, one request at a time, keep-alive connections opened before the clock, "
        "the three paths interleaved request by request. TTFT = request sent -> first complete "
        "SSE `data:` event. Medians over the runs of each run's p50."
    )
    add("")
    add("| path | requests (errors) | TTFT p50 (ms) | TTFT p99 (ms) | total p50 (ms) | "
        "TTFT added vs direct (ms) | requests/s (1 in flight) |")  # fmt: skip
    add("|---|---:|---:|---:|---:|---:|---:|")
    names = list(results.keepalive[0]["paths"]) if results.keepalive else []

    def med_of(name: str, key: str, stat: str) -> float:
        return median([r["paths"][name][key][stat] for r in results.keepalive])

    added: dict[str, float] = {}
    per_run: dict[str, list[float]] = {}
    for name in names:
        if "direct" in names and name != "direct":
            per_run[name] = [
                r["paths"][name]["ttft_ms"]["p50"] - r["paths"]["direct"]["ttft_ms"]["p50"]
                for r in results.keepalive
            ]
            added[name] = median(per_run[name])
        requests = sum(r["paths"][name]["requests"] for r in results.keepalive)
        failed = sum(r["paths"][name]["errors"] for r in results.keepalive)
        add(
            f"| {name} | {requests:,} ({failed:,}) | {fmt(med_of(name, 'ttft_ms', 'p50'), 2)} | "
            f"{fmt(med_of(name, 'ttft_ms', 'p99'), 2)} | {fmt(med_of(name, 'total_ms', 'p50'), 2)}"
            f" | {fmt(added.get(name), 2) if name in added else '-'} | "
            f"{fmt(median([r['paths'][name]['requests_per_s'] for r in results.keepalive]))} |"
        )
    add("")
    if len(added) == 2:
        (a, x), (b, y) = added.items()
        add(
            f"Once the handshake is done both proxy paths do the same work (the same AES-128-GCM "
            f"records): the {abs(x - y):.2f} ms between them is the resolution of this "
            "measurement on this machine. Per run, the TTFT added was "
            + "; ".join(f"{n}: {', '.join(f'{v:.2f}' for v in vs)} ms" for n, vs in per_run.items())
            + "."
        )
        add("")
    if results.new_connections is not None:
        add("A new connection per request (the handshake is in every figure):")
        add("")
        add("| path | requests (errors) | connect + handshake p50 (ms) | TTFT p50 (ms) | "
            "TTFT p99 (ms) |")  # fmt: skip
        add("|---|---:|---:|---:|---:|")
        for name, path in results.new_connections["paths"].items():
            add(
                f"| {name} | {path['requests']:,} ({path['errors']:,}) | "
                f"{fmt(path['connect_ms']['p50'], 2)} | "
                f"{fmt(path['ttft_ms']['p50'], 2)} | {fmt(path['ttft_ms']['p99'], 2)} |"
            )
        add("")
    reasons: dict[str, int] = {}
    everything = [
        *results.keepalive,
        *([results.new_connections] if results.new_connections else []),
    ]
    for run in everything:
        for name, path in run["paths"].items():
            for reason, count in path["errors_by_reason"].items():
                reasons[f"{name}: {reason}"] = reasons.get(f"{name}: {reason}", 0) + count
    if reasons:
        add("Errors (counted, not timed; the slot reopens its connection, untimed, and goes on):")
        add("")
        for reason, count in sorted(reasons.items()):
            add(f"- {count:,} x {reason}")
        add("")
    add("Commands:")
    add("")
    for command in results.commands:
        add(f"- `{command}`")
    add("")
    hybrid = f"proxy-{HYBRID}"
    proxied = sum(p["requests"] for r in everything for n, p in r["paths"].items() if n != "direct")
    proxied_errors = sum(
        p["errors"] for r in everything for n, p in r["paths"].items() if n != "direct"
    )
    if hybrid in added:
        value = added[hybrid]
        targets.append(
            (
                TARGET_NAMES[2],
                f"{value:.2f} ms (X25519MLKEM768 connection, keep-alive; runs "
                f"{min(per_run[hybrid]):.2f} to {max(per_run[hybrid]):.2f} ms)"
                + (
                    f"; {proxied_errors:,} of {proxied:,} requests through the proxy failed "
                    "(Errors, below)"
                    if proxied_errors
                    else ""
                ),
                value <= 1.0,
                f"{value - 1.0:.2f} ms over" if value > 1.0 else "-",
                CLOSE_TTFT,
            )
        )


# --- main -------------------------------------------------------------------------------------

SECTIONS = ("cpu", "profile", "throughput", "memory", "request", "burst")


def run_suite(args: argparse.Namespace) -> int:
    raise_nofile_limit()
    started = time.monotonic()
    load_before = loadavg()
    sections = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = sections - set(SECTIONS)
    if unknown:
        print(f"run_all: unknown section(s) {','.join(sorted(unknown))}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pqproxy-run-all-") as tmp:
        workdir = Path(tmp)
        suite = Suite(args, workdir)
        try:
            suite.gen_cert()
            _, upstream_port, upstream_command = suite.demo_upstream()
            cpu = cpu_section(suite, upstream_port) if "cpu" in sections else None
            profile = profile_section(suite) if "profile" in sections else None
            throughput = throughput_section(suite) if "throughput" in sections else None
            memory = memory_section(suite, upstream_port) if "memory" in sections else None
            request = (
                request_section(suite, upstream_port, upstream_command)
                if "request" in sections
                else None
            )
            write_results(
                suite,
                Path(args.out),
                started=started,
                load_before=load_before,
                cpu=cpu,
                profile=profile,
                throughput=throughput,
                memory=memory,
                request=request,
            )
            if "burst" in sections:
                import burst  # bench/burst.py, beside this file

                command = " ".join([".venv/bin/python", "bench/run_all.py", *args.argv])
                text, _ = burst.run_section(suite, upstream_port, command=command)
                burst.replace_section(Path(args.out), burst.HEADING, text)
            if args.keep:
                keep = Path(args.keep)
                keep.mkdir(parents=True, exist_ok=True)
                for item in suite.runs.iterdir():
                    shutil.copy(item, keep / item.name)
        finally:
            suite.stop_all()
    log(f"wrote {args.out} in {(time.monotonic() - started) / 60:.1f} min")
    return 0


def _counts(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bulk-upstream":
        parser = argparse.ArgumentParser(prog="run_all.py bulk-upstream")
        parser.add_argument("--listen", required=True)
        return bulk_upstream_main(parser.parse_args(argv[1:]).listen)
    if argv and argv[0] == "hold":
        parser = argparse.ArgumentParser(prog="run_all.py hold")
        parser.add_argument("--target", required=True)
        parser.add_argument("--count", type=int, required=True)
        parser.add_argument("--cafile", required=True)
        parser.add_argument("--group", default=HYBRID)
        parser.add_argument("--sources", default=LOCAL)
        held = parser.parse_args(argv[1:])
        return hold_main(held.target, held.count, held.cafile, held.group, held.sources.split(","))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs per (server, group)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per handshake run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--request-duration", type=float, default=6.0)
    parser.add_argument("--memory-counts", type=_counts, default=[1000, 10000])
    parser.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--keep", metavar="DIR", help="copy every run's JSON there")
    args = parser.parse_args(argv)
    args.argv = argv
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
