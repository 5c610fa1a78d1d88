"""Handshakes per second through each offload mode, in one process, on each backend.

    .venv/bin/python bench/offload_modes.py [--lanes 64] [--seconds 3] [--rounds 3]
                                            [--workers 2] [--backends openssl,liboqs]
                                            [--append bench/RESULTS.md]

``--lanes`` handshakes are kept in flight at once on one event loop: each lane runs the
engine (``ServerConnection``) against a pyOpenSSL memory-BIO client (cryptography's
OpenSSL), X25519MLKEM768 and an ECDSA P-256 certificate, and starts the next handshake as
soon as one completes; the engine's KeyExchangeNeeded / SignatureNeeded requests go through
an ``Offloader`` in the mode measured, as the listener will send them.

Server CPU is everything this process and its worker processes spent (utime + stime from
/proc, every thread and child) minus what the clients spent (``time.thread_time`` around each
client call, all on the loop thread): the engine, the offload machinery and the backend calls.
Handshakes/s is for client and server together on this machine, so it is a comparison of the
modes, not a capacity figure. Medians of ``--rounds`` rounds, after a warm-up.

Needs the main-module guard below: process mode starts its workers with "spawn", which imports
this file again in each worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OpenSSL import SSL  # noqa: E402

from pqproxy.bench.procs import tree_cpu_seconds  # noqa: E402
from pqproxy.crypto.certs import load_certified_key  # noqa: E402
from pqproxy.crypto.offload import (  # noqa: E402
    BatchSettings,
    Offloader,
    OffloadMode,
    OffloadSettings,
    RecordingObserver,
    build_offloader,
    create_provider,
)
from pqproxy.crypto.provider import CryptoProvider  # noqa: E402
from pqproxy.devcert import generate_dev_certs  # noqa: E402
from pqproxy.tls.events import (  # noqa: E402
    HandshakeComplete,
    KeyExchangeNeeded,
    SignatureNeeded,
)
from pqproxy.tls.server import ServerConfig, ServerConnection  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
WARMUP = 0.5
HANDSHAKE_DEADLINE = 30.0
GROUP = "X25519MLKEM768"


@dataclass
class Counters:
    handshakes: int = 0
    failures: int = 0
    client_cpu: float = 0.0


def _client_context(ca: Path) -> SSL.Context:
    from OpenSSL._util import lib

    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.load_verify_locations(str(ca))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    if lib.SSL_CTX_set1_curves_list(ctx._context, GROUP.encode()) != 1:
        raise RuntimeError(f"OpenSSL refused {GROUP}")
    return ctx


def _drain(client: SSL.Connection) -> bytes:
    chunks = []
    while True:
        try:
            chunk = client.bio_read(65536)
        except SSL.WantReadError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def _handshake(
    offloader: Offloader,
    config: ServerConfig,
    provider: CryptoProvider,
    ctx: SSL.Context,
    counters: Counters,
) -> bool:
    loop = asyncio.get_running_loop()
    server = ServerConnection(config, provider, os.urandom)
    started = time.thread_time()
    client = SSL.Connection(ctx, None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"localhost")
    counters.client_cpu += time.thread_time() - started
    client_done = complete = False
    while True:
        started = time.thread_time()
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except SSL.WantReadError:
                pass
            except SSL.Error:
                counters.client_cpu += time.thread_time() - started
                return False
        to_server = _drain(client)
        counters.client_cpu += time.thread_time() - started
        if to_server:
            server.receive_data(to_server)
        pending: list[asyncio.Future[None]] = []
        # Answering one request may raise the next (the key exchange's answer asks for the
        # signature): drain until the engine has nothing.
        while (event := server.next_event()) is not None:
            if isinstance(event, KeyExchangeNeeded | SignatureNeeded):
                answered = _resolve(event, server, offloader, loop)
                if answered is not None:
                    pending.append(answered)
            elif isinstance(event, HandshakeComplete):
                complete = True
        to_client = server.data_to_send()
        if to_client:
            started = time.thread_time()
            client.bio_write(to_client)
            counters.client_cpu += time.thread_time() - started
        if client_done and complete:
            return True
        if server.closed:
            return False
        if pending:
            await asyncio.gather(*pending)
        elif not to_server and not to_client:
            await asyncio.sleep(0)  # a turn for the other lanes


def _resolve(
    event: KeyExchangeNeeded | SignatureNeeded,
    server: ServerConnection,
    offloader: Offloader,
    loop: asyncio.AbstractEventLoop,
) -> asyncio.Future[None] | None:
    """What ``_resolve_crypto`` does; a future when the answer comes later."""
    if offloader.inline:
        try:
            if isinstance(event, KeyExchangeNeeded):
                share, secret = offloader.run_inline_key_exchange(
                    event.group, event.exchange, event.client_share
                )
                server.complete_key_exchange(share, secret)
            else:
                server.complete_signature(
                    offloader.run_inline_signature(event.signer, event.scheme, event.message)
                )
        except Exception as exc:
            if isinstance(event, KeyExchangeNeeded):
                server.fail_key_exchange(exc)
            else:
                server.fail_signature(exc)
        return None
    answered: asyncio.Future[None] = loop.create_future()

    def done(result: Any) -> None:
        if isinstance(event, KeyExchangeNeeded):
            if isinstance(result, BaseException):
                server.fail_key_exchange(result)
            else:
                server.complete_key_exchange(*result)
        elif isinstance(result, BaseException):
            server.fail_signature(result)
        else:
            server.complete_signature(result)
        answered.set_result(None)

    if isinstance(event, KeyExchangeNeeded):
        offloader.submit_key_exchange(event.group, event.exchange, event.client_share, done)
    else:
        offloader.submit_signature(event.signer, event.scheme, event.message, done)
    return answered


async def _lane(
    offloader: Offloader,
    config: ServerConfig,
    provider: CryptoProvider,
    ctx: SSL.Context,
    counters: Counters,
    until: float,
) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        async with asyncio.timeout(HANDSHAKE_DEADLINE):
            ok = await _handshake(offloader, config, provider, ctx, counters)
        if ok:
            counters.handshakes += 1
        else:
            counters.failures += 1


@dataclass
class Round:
    handshakes_per_s: float
    server_cpu_us: float  # per handshake
    server_cores: float  # server CPU-seconds per wall second
    failures: int


async def _measure(
    offloader: Offloader,
    config: ServerConfig,
    provider: CryptoProvider,
    ctx: SSL.Context,
    lanes: int,
    seconds: float,
) -> Round:
    loop = asyncio.get_running_loop()
    await asyncio.gather(
        *(
            _lane(offloader, config, provider, ctx, Counters(), loop.time() + WARMUP)
            for _ in range(lanes)
        )
    )
    counters = Counters()
    cpu_before = tree_cpu_seconds(os.getpid())
    wall_before = time.perf_counter()
    until = loop.time() + seconds
    await asyncio.gather(
        *(_lane(offloader, config, provider, ctx, counters, until) for _ in range(lanes))
    )
    wall = time.perf_counter() - wall_before
    server_cpu = tree_cpu_seconds(os.getpid()) - cpu_before - counters.client_cpu
    done = max(1, counters.handshakes)
    return Round(
        handshakes_per_s=counters.handshakes / wall,
        server_cpu_us=server_cpu / done * 1e6,
        server_cores=server_cpu / wall,
        failures=counters.failures,
    )


@dataclass
class Row:
    backend: str
    mode: str
    workers: str
    rounds: list[Round]
    queue_us: float
    service_us: float
    batch: str


async def _run_mode(backend: str, mode: OffloadMode, args: argparse.Namespace, certs: Any) -> Row:
    provider = create_provider(backend)
    certified = load_certified_key(certs.cert, certs.key)
    config = ServerConfig(certificates=(certified,))
    settings = OffloadSettings(
        backend=backend,
        mode=mode,
        workers=args.workers,
        concurrency=max(64, args.lanes * 2),
        timeout=10.0,
        batch=BatchSettings(max_items=args.batch_items, max_delay=args.batch_delay_us / 1e6),
    )
    observer = RecordingObserver(keep=1_000_000)
    offloader = build_offloader(settings, provider, observer=observer)
    offloader.register_signer(certified.signer, Path(certs.key).read_bytes())
    ctx = _client_context(Path(certs.ca))
    await offloader.start()
    try:
        rounds = []
        for _ in range(args.rounds):
            observer.jobs.clear()
            observer.batch_sizes.clear()
            rounds.append(
                await _measure(offloader, config, provider, ctx, args.lanes, args.seconds)
            )
    finally:
        await offloader.close()
    jobs = list(observer.jobs)
    queue_us = statistics.median(j.queue_seconds for j in jobs) * 1e6 if jobs else 0.0
    service_us = statistics.median(j.service_seconds for j in jobs) * 1e6 if jobs else 0.0
    batch = "-"
    sizes = observer.batch_sizes.get(("key_exchange", backend))
    if sizes:
        total = sum(n for n in sizes.values())
        mean = sum(size * n for size, n in sizes.items()) / total
        batch = f"mean {mean:.1f}, max {max(sizes)}"
    workers = "-" if mode is OffloadMode.INLINE else str(args.workers)
    return Row(backend, mode.value, workers, rounds, queue_us, service_us, batch)


def _median(rounds: list[Round], attribute: str) -> float:
    return float(statistics.median(float(getattr(r, attribute)) for r in rounds))


def _table(rows: list[Row]) -> list[str]:
    lines = [
        "| backend | mode | workers | handshakes/s | server CPU per handshake (µs) | "
        "server cores busy | queue wait p50 (µs) | service p50 (µs) | key-exchange batch | "
        "rounds (handshakes/s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        per_round = ", ".join(f"{r.handshakes_per_s:,.0f}" for r in row.rounds)
        failures = sum(r.failures for r in row.rounds)
        if failures:
            per_round += f" ({failures} failed)"
        lines.append(
            f"| {row.backend} | {row.mode} | {row.workers} | "
            f"{_median(row.rounds, 'handshakes_per_s'):,.0f} | "
            f"{_median(row.rounds, 'server_cpu_us'):,.0f} | "
            f"{_median(row.rounds, 'server_cores'):.2f} | {row.queue_us:,.0f} | "
            f"{row.service_us:,.0f} | {row.batch} | {per_round} |"
        )
    return lines


def _git_revision() -> str:
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{revision}{' with uncommitted changes' if dirty else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--lanes", type=int, default=64, help="handshakes in flight at once")
    parser.add_argument("--seconds", type=float, default=3.0, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="thread/process/batch pool size")
    parser.add_argument("--batch-items", type=int, default=32)
    parser.add_argument("--batch-delay-us", type=float, default=200.0)
    parser.add_argument("--backends", default="openssl,liboqs")
    parser.add_argument("--modes", default=",".join(m.value for m in OffloadMode))
    parser.add_argument("--append", metavar="FILE", help="append the table to FILE (Markdown)")
    args = parser.parse_args()

    load_before = os.getloadavg()
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as directory:
        certs = generate_dev_certs(Path(directory), key_type="ecdsa-p256")
        for backend in args.backends.split(","):
            for mode in args.modes.split(","):
                row = asyncio.run(_run_mode(backend, OffloadMode(mode), args, certs))
                rows.append(row)
                print(
                    f"{backend} {mode}: {_median(row.rounds, 'handshakes_per_s'):,.0f} "
                    f"handshakes/s, {_median(row.rounds, 'server_cpu_us'):,.0f} µs server CPU "
                    "per handshake",
                    file=sys.stderr,
                )
    load_after = os.getloadavg()
    command = "`.venv/bin/python bench/offload_modes.py " + " ".join(sys.argv[1:]) + "`"
    text = [
        "",
        "## Offload modes, in-process (bench/offload_modes.py)",
        "",
        f"Written by {command.replace(' `', '`')} on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, in "
        f"{time.monotonic() - started:.0f} s.",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}; load average before / after: "
        f"{' '.join(f'{x:.2f}' for x in load_before)} / "
        f"{' '.join(f'{x:.2f}' for x in load_after)} (shared machine: other work inflates "
        "every figure alike)",
        f"- pqproxy {_git_revision()}, Python {platform.python_version()}; clients: pyOpenSSL "
        f"on {SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()}",
        f"- {args.lanes} handshakes in flight on one event loop, {GROUP}, ECDSA P-256 "
        f"certificate; {args.rounds} rounds of {args.seconds:g} s after a {WARMUP:g} s "
        f"warm-up, medians; batch mode gathers up to {args.batch_items} requests within "
        f"{args.batch_delay_us:g} µs",
        "- server CPU = this process and its workers (utime + stime) minus the clients' "
        "own CPU time: engine + offload + backend. Handshakes/s is clients and server "
        "together on these cores, so it compares the modes; it is not a capacity figure. "
        "Queue wait and service time are the offload observer's medians over every "
        "request (key exchanges and signatures).",
        "",
        *_table(rows),
        "",
    ]
    output = "\n".join(text)
    print(output)
    if args.append:
        path = Path(args.append)
        # Another writer may have changed the file since: read it just before appending.
        existing = path.read_text() if path.exists() else ""
        path.write_text(existing.rstrip("\n") + "\n" + output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
