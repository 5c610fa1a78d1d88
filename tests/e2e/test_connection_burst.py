"""Issue 19: a burst of TLS clients against one worker.

pqproxy runs in-process (one listener, one event loop on a background thread, http mode: a
handshake and nothing else per client). The clients are a separate process (so they do not
share the GIL with the server), the open-loop burst client of ``pqproxy.bench.burst`` (which
bench/burst.py uses too): a bounded asyncio pool of stdlib ``ssl`` clients on loopback,
opening 1,000 connections within about 2 s (in clumps of 100, as a batch job's workers or a
restarted fleet arrive), each reporting whether its TLS handshake completed within 15 s, how
long it took, and how many TCP retransmissions its socket needed (TCP_INFO
tcpi_total_retrans: a SYN dropped at a full accept queue is retransmitted after 1 s).

The kernel's ListenOverflows counter is host-wide for the network namespace, so each test
takes its delta over the burst window only, and asserts on this listener's own evidence
too: the clients' retransmissions and the listening socket's queue length (TCP_INFO),
sampled every few milliseconds during the burst.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pqproxy.bench.burst import BurstOptions, run_burst_client
from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.devcert import DevCertPaths
from pqproxy.io.http_proxy import HttpSettings
from pqproxy.io.listen_queue import ListenQueueMonitor, read_kernel_counters
from pqproxy.io.telemetry import Telemetry
from pqproxy.io.tls_server import ListenerSettings, TLSListener
from pqproxy.io.upstream import PoolSettings, UpstreamPool
from pqproxy.metrics import ProxyMetrics
from pqproxy.tls.server import ServerConfig
from tests.inprocess import LoopThread

CONNECTIONS = 1000
BURST_SECONDS = 2.0
CLIENT_TIMEOUT = 15.0
# Clients that start together: 10 clumps of 100 over the 2 s.
CLUMP = 100
# In-flight client connections at most: a pool, not a fork bomb.
POOL = 400
SOMAXCONN = int(Path("/proc/sys/net/core/somaxconn").read_text())
# The whole client run: the burst, SYN retries of a small backlog (1 + 2 + 4 s), slack.
RUN_DEADLINE = 120.0


@dataclass
class Burst:
    results: list[dict[str, Any]]
    offered_seconds: float
    overflows: int
    drops: int
    peak_queue: int
    queue_limit: int
    warnings: list[str] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return sum(1 for r in self.results if r["ok"])

    @property
    def retransmissions(self) -> int:
        return sum(max(0, r.get("retrans", 0)) for r in self.results if r["ok"])


@contextmanager
def one_worker(
    dev_certs: DevCertPaths, *, backlog: int, max_connections: int = 10_000
) -> Iterator[tuple[LoopThread, TLSListener, Telemetry]]:
    loop_thread = LoopThread()
    telemetry = Telemetry(ProxyMetrics())
    started: dict[str, Any] = {}

    async def start() -> TLSListener:
        # Never contacted: the clients only handshake.
        pool = UpstreamPool(
            PoolSettings(name="none", servers=(("127.0.0.1", 9),), health_check=None)
        )
        started["pool"] = pool
        settings = ListenerSettings(
            host="127.0.0.1",
            port=0,
            server_config=ServerConfig(
                certificates=(load_certified_key(dev_certs.cert, dev_certs.key),)
            ),
            provider=OpenSSLProvider(),
            upstream_host="127.0.0.1",
            upstream_port=9,
            # Queued handshakes are served in turn: the clients' 15 s is the bound here.
            handshake_timeout=60.0,
            max_connections=max_connections,
            backlog=backlog,
            mode="http",
            http=HttpSettings(),
            pool=pool,
            telemetry=telemetry,
        )
        listener = TLSListener(settings)
        started["listener"] = listener
        await listener.start()
        return listener

    async def stop() -> None:
        if "listener" in started:
            await started["listener"].close(grace=2.0)
        if "pool" in started:
            await started["pool"].close()

    try:
        yield loop_thread, loop_thread.run(start()), telemetry
    finally:
        loop_thread.run(stop())
        loop_thread.stop()


def run_burst(
    dev_certs: DevCertPaths,
    loop_thread: LoopThread,
    listener: TLSListener,
    telemetry: Telemetry,
    *,
    connections: int = CONNECTIONS,
    hold: bool = False,
) -> Burst:
    peak = {"length": 0, "limit": 0}
    sampling = {"on": True}

    async def make_monitor() -> ListenQueueMonitor:
        return ListenQueueMonitor(lambda: [("main", listener)], telemetry, kernel_counters=True)

    async def sample_queue() -> None:
        while sampling["on"]:
            for queue in listener.listen_queues():
                peak["length"] = max(peak["length"], queue.length)
                peak["limit"] = queue.limit
            await asyncio.sleep(0.005)

    before = read_kernel_counters()
    assert before is not None, "no /proc/net/netstat: these tests need Linux"
    monitor = loop_thread.run(make_monitor())
    sampler = asyncio.run_coroutine_threadsafe(sample_queue(), loop_thread.loop)
    options = BurstOptions(
        host="127.0.0.1",
        port=listener.port,
        cafile=str(dev_certs.ca),
        connections=connections,
        rate=connections / BURST_SECONDS,
        clump=CLUMP,
        pool=POOL,
        timeout=CLIENT_TIMEOUT,
        hold=hold,
    )
    try:
        client = run_burst_client(options, deadline=RUN_DEADLINE)
    finally:
        sampling["on"] = False
    sampler.result(timeout=10)
    after = read_kernel_counters()
    assert after is not None

    async def sample() -> None:
        monitor.sample()

    loop_thread.run(sample())
    return Burst(
        results=client.results,
        offered_seconds=client.offered_seconds,
        overflows=after.overflows - before.overflows,
        drops=after.drops - before.drops,
        peak_queue=peak["length"],
        queue_limit=peak["limit"],
    )


def _metric(telemetry: Telemetry, name: str, **labels: str) -> float:
    value = telemetry.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_issue19_burst_of_1000_handshakes_against_one_worker(
    dev_certs: DevCertPaths, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="pqproxy.io.listen_queue"),
        one_worker(dev_certs, backlog=4096) as (loop_thread, listener, telemetry),
    ):
        burst = run_burst(dev_certs, loop_thread, listener, telemetry)
    failures = [r for r in burst.results if not r["ok"]]
    assert failures == [], failures[:5]
    assert burst.completed == CONNECTIONS
    assert burst.offered_seconds < BURST_SECONDS * 3, burst.offered_seconds
    # This listener's own evidence: its queue never filled and no client had to resend its
    # SYN (a drop at accept costs a client at least the 1 s initial retransmission timeout).
    assert burst.queue_limit == min(4096, SOMAXCONN)
    assert burst.peak_queue < burst.queue_limit
    assert burst.retransmissions == 0
    # And the kernel's counter did not move during the burst (namespace-wide).
    assert burst.overflows == 0, burst
    assert _metric(telemetry, "pqproxy_listen_overflows_total") == 0
    assert [r for r in caplog.records if "listen queue overflow" in r.getMessage()] == []
    assert _metric(telemetry, "pqproxy_connections_total", result="over_capacity") == 0


def test_issue19_burst_overflows_a_backlog_of_16_and_says_so(
    dev_certs: DevCertPaths, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="pqproxy.io.listen_queue"),
        one_worker(dev_certs, backlog=16) as (loop_thread, listener, telemetry),
    ):
        burst = run_burst(dev_certs, loop_thread, listener, telemetry)
    assert burst.queue_limit == 16
    # The listener's own evidence: its queue filled, and clients resent their SYNs.
    assert burst.peak_queue >= 16
    assert burst.retransmissions > 0
    assert burst.overflows > 0
    counted = _metric(telemetry, "pqproxy_listen_overflows_total")
    assert counted >= burst.overflows > 0
    warnings = [r.getMessage() for r in caplog.records if "listen queue overflow" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "ListenOverflows +" in warnings[0] and "accept queues main " in warnings[0]


def test_issue19_max_connections_refusals_are_counted(dev_certs: DevCertPaths) -> None:
    with one_worker(dev_certs, backlog=4096, max_connections=50) as (
        loop_thread,
        listener,
        telemetry,
    ):
        burst = run_burst(dev_certs, loop_thread, listener, telemetry, connections=200, hold=True)
    refused = [r for r in burst.results if not r["ok"]]
    # Every client is held until all have tried, so at most 50 are admitted at once.
    assert burst.completed == 50
    assert len(refused) == 150
    assert _metric(telemetry, "pqproxy_connections_total", result="over_capacity") == len(refused)
