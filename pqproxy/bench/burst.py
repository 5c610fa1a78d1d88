"""Open-loop connection bursts: TLS clients that arrive on a schedule, whatever the server does.

A closed-loop load tester (``pqproxy bench handshake``) opens the next connection when one
finishes, so a slow server is offered less and its accept queue never overflows. Here the
arrivals are fixed in advance: client ``i`` starts at ``(i // clump) * clump / rate`` seconds
(``clump`` clients together, as a batch job's workers or a restarted fleet arrive), on time or
late but never waiting for another client. Each client reports whether its TLS handshake
completed within ``timeout``, how long it took from its ``connect()``, how late the client
itself started it (a busy client machine shows here, not in the server's figures), and how
many TCP retransmissions its socket needed (``TCP_INFO`` ``tcpi_total_retrans``: a SYN dropped
at a full accept queue is resent after 1 s, then 3 s, 7 s).

The clients run in a subprocess of their own (``python -m pqproxy.bench.burst OPTIONS_JSON``,
started by ``run_burst_client``), so they never share a GIL with an in-process server under
test. They are stdlib ``ssl`` on the system's OpenSSL (a classical X25519 handshake where that
OpenSSL has no ML-KEM): the same handshake for every server compared, nginx included. The
number of clients is bounded (``MAX_CONNECTIONS``), and so is the number in flight (``pool``);
loopback or any address the caller names, which must be its own.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Final

from .procs import raise_nofile_limit
from .report import summarize

MAX_CONNECTIONS: Final = 20_000
# The client process's own bound on the whole burst, on top of its schedule and timeouts.
CLOSE_TIMEOUT: Final = 5.0
# struct tcp_info: tcpi_total_retrans is the u32 at offset 100 (linux/tcp.h).
_TCP_INFO_LEN: Final = 104
_TOTAL_RETRANS_OFFSET: Final = 100


@dataclass(frozen=True)
class BurstOptions:
    host: str
    port: int
    cafile: str
    connections: int
    rate: float  # new connections offered per second
    clump: int = 1  # clients that start together
    pool: int | None = None  # in flight at most; None: every client (a true open loop)
    timeout: float = 15.0  # per client: connect and TLS handshake
    # Keep every connection open until every client has tried (a max_connections test).
    hold: bool = False
    server_hostname: str = "localhost"

    def __post_init__(self) -> None:
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be 1..{MAX_CONNECTIONS}, not {self.connections}")
        if self.rate <= 0 or self.clump < 1 or self.timeout <= 0:
            raise ValueError("rate and timeout must be > 0 and clump >= 1")
        if self.pool is not None and self.pool < 1:
            raise ValueError("pool must be >= 1")

    def scheduled(self, index: int) -> float:
        """When client ``index`` is due, in seconds from the start of the burst."""
        return (index // self.clump) * self.clump / self.rate

    @property
    def offered_seconds(self) -> float:
        """The schedule's length: the last clump's start plus one clump's spacing."""
        return self.scheduled(self.connections - 1) + self.clump / self.rate


@dataclass
class BurstResult:
    """Every client's outcome; offsets are seconds from the start of the burst."""

    options: BurstOptions
    # One dict per client: ok, scheduled, started, done, seconds (connect to handshake
    # done, or to the failure), retrans (ok only), error (the exception's type name).
    results: list[dict[str, Any]]
    offered_seconds: float  # the client's own clock, from the start to its last connect()
    client_cpu_seconds: float

    @property
    def completed(self) -> int:
        return sum(1 for r in self.results if r["ok"])

    @property
    def failures(self) -> dict[str, int]:
        """Failed clients by reason (``TimeoutError``: no handshake within the timeout)."""
        reasons: dict[str, int] = {}
        for r in self.results:
            if not r["ok"]:
                reasons[r["error"]] = reasons.get(r["error"], 0) + 1
        return dict(sorted(reasons.items()))

    @property
    def retransmissions(self) -> int:
        return sum(max(0, r.get("retrans", 0)) for r in self.results if r["ok"])

    @property
    def retransmitting_clients(self) -> int:
        return sum(1 for r in self.results if r["ok"] and r.get("retrans", 0) > 0)

    @property
    def offered_per_s(self) -> float:
        """Connections offered per second as the client achieved it (a late client offers
        less than ``options.rate``)."""
        last = max(float(r["started"]) for r in self.results)
        return len(self.results) / (last + self.options.clump / self.options.rate)

    @property
    def completed_per_s(self) -> float:
        """Handshakes completed per second, from the start of the burst to the last one."""
        done = [float(r["done"]) for r in self.results if r["ok"]]
        return len(done) / max(done) if done else 0.0

    @property
    def client_busy(self) -> float:
        """The client's CPU over the run's length (1.0: a core busy all along, and the
        figures measure the client more than the server)."""
        end = max(float(r["done"]) for r in self.results)
        return self.client_cpu_seconds / end if end > 0 else 0.0

    def handshake_ms(self) -> dict[str, Any]:
        """Summary (count, min, p50, p90, p99, max, mean) of the completed handshakes."""
        return summarize(r["seconds"] * 1000 for r in self.results if r["ok"])

    def lateness_ms(self) -> dict[str, Any]:
        """How late the client started its connections (its own scheduling, not the server)."""
        return summarize(max(0.0, r["started"] - r["scheduled"]) * 1000 for r in self.results)

    def summary(self) -> dict[str, Any]:
        return {
            "connections": len(self.results),
            "rate": self.options.rate,
            "offered_per_s": self.offered_per_s,
            "completed": self.completed,
            "completed_per_s": self.completed_per_s,
            "failures": self.failures,
            "handshake_ms": self.handshake_ms(),
            "client_lateness_ms": self.lateness_ms(),
            "retransmissions": self.retransmissions,
            "retransmitting_clients": self.retransmitting_clients,
            "client_cpu_seconds": self.client_cpu_seconds,
            "client_busy": self.client_busy,
        }


def run_burst_client(options: BurstOptions, *, deadline: float | None = None) -> BurstResult:
    """Run the burst in a client subprocess and return every client's outcome. ``deadline``
    bounds the whole run (default: the schedule, the timeout, closing, and slack)."""
    if deadline is None:
        deadline = options.offered_seconds + options.timeout * (5 if options.hold else 1) + 60
    done = subprocess.run(
        [sys.executable, "-m", "pqproxy.bench.burst", json.dumps(asdict(options))],
        capture_output=True,
        text=True,
        timeout=deadline,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"burst client exited {done.returncode}: {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    return BurstResult(
        options=options,
        results=report["results"],
        offered_seconds=report["offered_seconds"],
        client_cpu_seconds=report["client_cpu_seconds"],
    )


# --- the client process ---------------------------------------------------------------------


def _retransmissions(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError):
        return -1
    retrans: int = struct.unpack_from("=I", info, _TOTAL_RETRANS_OFFSET)[0]
    return retrans


async def _burst(options: BurstOptions) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=options.cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    loop = asyncio.get_running_loop()
    pool = asyncio.Semaphore(options.pool or options.connections)
    everyone_tried = asyncio.Event()
    tried = 0
    start = loop.time()

    async def one(index: int) -> dict[str, Any]:
        nonlocal tried
        scheduled = options.scheduled(index)
        await asyncio.sleep(max(0.0, start + scheduled - loop.time()))
        async with pool:
            began = loop.time()
            result: dict[str, Any] = {"ok": False, "scheduled": scheduled, "started": began - start}
            writer = None
            try:
                _reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        options.host,
                        options.port,
                        ssl=ctx,
                        server_hostname=options.server_hostname,
                    ),
                    options.timeout,
                )
                result.update(ok=True, retrans=_retransmissions(writer))
            except Exception as exc:  # every failure is an outcome, named by its type
                result["error"] = type(exc).__name__
            finished = loop.time()
            result["done"] = finished - start
            result["seconds"] = finished - began
            tried += 1
            if tried == options.connections:
                everyone_tried.set()
            if writer is not None:
                if options.hold:
                    try:
                        await asyncio.wait_for(everyone_tried.wait(), options.timeout * 4)
                    except TimeoutError:
                        pass
                writer.close()
                try:
                    await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
                except Exception:  # a peer that reset the connection: closed all the same
                    pass
            return result

    results = await asyncio.gather(*(one(i) for i in range(options.connections)))
    last_start = max(r["started"] for r in results)
    return {"results": results, "offered_seconds": last_start}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pqproxy.bench.burst OPTIONS_JSON", file=sys.stderr)
        return 2
    options = BurstOptions(**json.loads(argv[0]))
    raise_nofile_limit()
    cpu = time.process_time()
    report = asyncio.run(_burst(options))
    report["client_cpu_seconds"] = time.process_time() - cpu
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
