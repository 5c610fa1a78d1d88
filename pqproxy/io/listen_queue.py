"""Connections the kernel drops before pqproxy sees them: counted, sampled, and said.

When a listening socket's accept queue is full, Linux drops the client's SYN (or its final
ACK) and counts it in TcpExt ``ListenOverflows`` and ``ListenDrops`` of /proc/net/netstat;
the client retries after a second, then three, then seven, and gives up. Nothing reaches
pqproxy, so without this nobody sees it. Every ``interval`` this module:

- adds the growth of those two kernel counters to ``pqproxy_listen_overflows_total`` and
  ``pqproxy_listen_drops_total``. They are host-wide for the network namespace (every
  listening socket, anyone's), so exactly one process of a pqproxy counts them: the single
  process, or worker 0 of a supervisor;
- samples each listening socket's own queue (TCP_INFO: length and effective limit) into
  ``pqproxy_listen_queue_length`` / ``pqproxy_listen_backlog``, in every worker;
- logs one warning line per interval in which the counters grew or a queue was full.

And once at start-up, ``warn_backlog_capped`` says when net.core.somaxconn caps a listener's
``limits.backlog`` (the kernel does it silently), with the effective value.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..config import Config
from .telemetry import Telemetry
from .tls_server import ListenQueue, TLSListener

logger = logging.getLogger(__name__)

NETSTAT: Final = Path("/proc/net/netstat")
SOMAXCONN: Final = Path("/proc/sys/net/core/somaxconn")
DEFAULT_INTERVAL: Final = 5.0

Listeners = Callable[[], Iterable[tuple[str, TLSListener]]]


@dataclass(frozen=True)
class KernelCounters:
    overflows: int
    drops: int


def read_kernel_counters(path: Path = NETSTAT) -> KernelCounters | None:
    """TcpExt ListenOverflows and ListenDrops, or None where the file is not Linux's."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    # Pairs of lines: "TcpExt: Name1 Name2 ..." then "TcpExt: 1 2 ...".
    for header, values in zip(lines, lines[1:], strict=False):
        if header.startswith("TcpExt:") and values.startswith("TcpExt:"):
            fields = dict(zip(header.split()[1:], values.split()[1:], strict=False))
            try:
                return KernelCounters(int(fields["ListenOverflows"]), int(fields["ListenDrops"]))
            except (KeyError, ValueError):
                return None
    return None


def read_somaxconn(path: Path = SOMAXCONN) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def warn_backlog_capped(config: Config, somaxconn_path: Path = SOMAXCONN) -> list[str]:
    """Warn, once per listener, where net.core.somaxconn is below ``limits.backlog``; the
    lines logged (for tests)."""
    somaxconn = read_somaxconn(somaxconn_path)
    if somaxconn is None:
        return []
    lines = []
    for listener in config.listeners:
        backlog = listener.limits.backlog
        if somaxconn < backlog:
            line = (
                f"listener {listener.name}: limits.backlog {backlog} is above the kernel's "
                f"net.core.somaxconn {somaxconn}: the accept queue holds {somaxconn} "
                f"connections (raise it with sysctl net.core.somaxconn={backlog})"
            )
            logger.warning("%s", line)
            lines.append(line)
    return lines


@dataclass(frozen=True)
class ListenSample:
    """What one sample saw: counter growth since the previous one (None: not counted here
    or not readable) and each listener's fullest queue."""

    overflows: int | None
    drops: int | None
    queues: dict[str, ListenQueue]

    @property
    def full(self) -> list[str]:
        return [name for name, q in self.queues.items() if q.limit and q.length >= q.limit]


class ListenQueueMonitor:
    """Samples the kernel's listen counters and each listener's accept queue (see the module
    docstring). ``kernel_counters``: whether this process counts the host-wide counters."""

    def __init__(
        self,
        listeners: Listeners,
        telemetry: Telemetry | None,
        *,
        interval: float = DEFAULT_INTERVAL,
        kernel_counters: bool = True,
        netstat: Path = NETSTAT,
    ) -> None:
        self._listeners = listeners
        self._telemetry = telemetry
        self._interval = interval
        self._netstat = netstat
        self._counting = kernel_counters
        self._last = read_kernel_counters(netstat) if kernel_counters else None
        self._last_at = time.monotonic()
        self._elapsed = 0.0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> ListenSample:
        now_at = time.monotonic()
        self._elapsed, self._last_at = now_at - self._last_at, now_at
        overflows = drops = None
        if self._counting:
            now = read_kernel_counters(self._netstat)
            if now is not None and self._last is not None:
                # A counter that went down (a namespace that was recreated) restarts here.
                overflows = max(0, now.overflows - self._last.overflows)
                drops = max(0, now.drops - self._last.drops)
            if now is not None:
                self._last = now
        queues: dict[str, ListenQueue] = {}
        for name, listener in self._listeners():
            for queue in listener.listen_queues():
                seen = queues.get(name)
                if seen is None or queue.length > seen.length:
                    queues[name] = queue
        sample = ListenSample(overflows, drops, queues)
        self._record(sample)
        self._warn(sample)
        return sample

    def _record(self, sample: ListenSample) -> None:
        telemetry = self._telemetry
        if telemetry is None:
            return
        metrics = telemetry.metrics
        if sample.overflows:
            metrics.listen_overflows.inc(sample.overflows)
        if sample.drops:
            metrics.listen_drops.inc(sample.drops)
        for name, queue in sample.queues.items():
            metrics.listen_queue_length.labels(name).set(queue.length)
            metrics.listen_backlog.labels(name).set(queue.limit)

    def _warn(self, sample: ListenSample) -> None:
        full = sample.full
        if not sample.overflows and not sample.drops and not full:
            return
        queues = ", ".join(f"{name} {q.length}/{q.limit}" for name, q in sample.queues.items())
        counted = ""
        if sample.overflows is not None:
            counted = (
                f"the kernel dropped connection attempts at accept in the last "
                f"{self._elapsed:.1f}s (TcpExt ListenOverflows +{sample.overflows}, "
                f"ListenDrops +{sample.drops}; counters of the whole network namespace); "
            )
        logger.warning(
            "listen queue overflow: %saccept queues %s%s; raise limits.backlog (and "
            "net.core.somaxconn) or add workers",
            counted,
            queues or "-",
            f" (full: {', '.join(full)})" if full else "",
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.sample()
            except Exception as exc:
                logger.error("listen queue sample failed: %s: %s", type(exc).__name__, exc)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def named(names: Sequence[str], listeners: Sequence[TLSListener]) -> Listeners:
    """The ``listeners`` argument for a server's listener list, read at each sample (a
    reload may swap settings, never the listeners themselves)."""
    return lambda: zip(names, listeners, strict=False)
