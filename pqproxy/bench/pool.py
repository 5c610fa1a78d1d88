"""Load spread over processes, so that the client is not the bottleneck (and says so when it is).

Each worker process runs its share of the concurrent slots on its own event loop. Work is
handed out one attempt at a time from a counter shared by every process: attempt ``i`` is
whatever the caller maps ``i`` to (``interleave``: the compared variants take turns, each
once per cycle), so they stay interleaved across processes and over time, and ``--count N``
means exactly N attempts in total.

Workers start with ``spawn``: forking a parent that runs threads (a test's in-process server,
a progress reader) can copy a held lock into the child.

Every worker measures its own CPU (``os.times``) and wall time from the common start, so the
report can tell how busy the client was.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import queue
import random
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from .procs import machine_cpu_times

# Workers import OpenSSL and build their contexts before reporting ready: seconds at most.
STARTUP_TIMEOUT = 60.0
# How often the parent looks at the progress counters and for dead workers.
POLL_INTERVAL = 0.2
# A worker that has finished sends its results at once; this bounds the wait for a worker
# process that died without a word.
EXIT_TIMEOUT = 30.0


class BenchError(Exception):
    """The benchmark could not run (a worker failed to start or crashed)."""


def split_slots(concurrency: int, processes: int) -> tuple[int, ...]:
    """``concurrency`` slots over at most ``processes`` processes, as evenly as possible; never
    a process with no slot."""
    processes = max(1, min(processes, concurrency))
    base, extra = divmod(concurrency, processes)
    return tuple(base + (1 if i < extra else 0) for i in range(processes))


def interleave(index: int, variants: int) -> int:
    """The variant attempt ``index`` uses: attempts come in cycles of ``variants``, each cycle
    takes every variant once, in an order shuffled per cycle (seeded by the cycle number, so
    runs repeat). Counts stay equal, and no variant always follows the same other one: with one
    request in flight, the one after a request that left the proxy idle would otherwise always
    pay for waking it up."""
    cycle, position = divmod(index, variants)
    order = list(range(variants))
    random.Random(cycle).shuffle(order)
    return order[position]


class WorkerContext:
    """What a worker process sees: its slots, the shared attempt counter, the common start."""

    def __init__(
        self,
        index: int,
        slots: int,
        count: int | None,
        duration: float | None,
        next_index: Synchronized[int],
        counters: Any,
        start_at: Synchronized[float],
        go: multiprocessing.synchronize.Event,
        messages: multiprocessing.Queue[tuple[Any, ...]],
    ) -> None:
        self.index = index
        self.slots = slots
        self.count = count
        self.duration = duration
        self._next = next_index
        self._counters = counters
        self._start_at = start_at
        self._go = go
        self._messages = messages
        self.start = 0.0
        self.deadline = float("inf")
        self.cpu_start = 0.0
        self.done = 0
        self.failed = 0

    def wait_start(self) -> float:
        """Report ready, wait for every other worker, and return the common start time
        (``time.monotonic``, one clock for every process on Linux)."""
        self._messages.put(("ready", self.index))
        if not self._go.wait(STARTUP_TIMEOUT * 2):
            raise BenchError("the benchmark never started")
        self.start = self._start_at.value
        if self.duration is not None:
            self.deadline = self.start + self.duration
        times = os.times()
        self.cpu_start = times.user + times.system
        return self.start

    def claim(self) -> int | None:
        """The next attempt's index, or None when the run is over (count reached, or the
        duration elapsed: attempts in flight finish, no new one starts)."""
        if time.monotonic() >= self.deadline:
            return None
        with self._next.get_lock():
            index = self._next.value
            if self.count is not None and index >= self.count:
                return None
            self._next.value = index + 1
        return index

    def record(self, ok: bool) -> None:
        """Count one finished attempt for the progress bar."""
        if ok:
            self.done += 1
            self._counters[2 * self.index] = self.done
        else:
            self.failed += 1
            self._counters[2 * self.index + 1] = self.failed


WorkerFn = Callable[[WorkerContext, Any], dict[str, Any]]


@dataclass(frozen=True)
class WorkerReport:
    index: int
    slots: int
    payload: dict[str, Any]
    cpu_seconds: float  # user + system of this worker process, from the start to its end
    wall_seconds: float  # from the common start to this worker's end


@dataclass(frozen=True)
class PoolResult:
    reports: list[WorkerReport]
    wall_seconds: float  # from the common start to the last worker's end
    machine_busy: float | None  # fraction of the whole machine's CPU busy during the run


ProgressFn = Callable[[int, int, float], None]  # (succeeded, failed, elapsed seconds)


def _entry(
    fn: WorkerFn,
    options: Any,
    index: int,
    slots: int,
    count: int | None,
    duration: float | None,
    next_index: Synchronized[int],
    counters: Any,
    start_at: Synchronized[float],
    go: multiprocessing.synchronize.Event,
    messages: multiprocessing.Queue[tuple[Any, ...]],
) -> None:
    context = WorkerContext(
        index, slots, count, duration, next_index, counters, start_at, go, messages
    )
    try:
        payload = fn(context, options)
        end = time.monotonic()
        times = os.times()
        cpu = times.user + times.system - context.cpu_start
        messages.put(("done", index, payload, cpu, end - context.start))
    except BaseException as exc:  # reported to the parent, which fails the run with it
        messages.put(("failed", index, "".join(traceback.format_exception(exc)).strip()))
    finally:
        messages.close()
        messages.join_thread()


def run_pool(
    fn: WorkerFn,
    options: Any,
    *,
    slots: tuple[int, ...],
    count: int | None,
    duration: float | None,
    progress: ProgressFn | None = None,
) -> PoolResult:
    """Run ``fn(context, options)`` in ``len(slots)`` processes, started together."""
    mp = multiprocessing.get_context("spawn")
    next_index = mp.Value("q", 0)
    counters = mp.Array("q", 2 * len(slots), lock=False)
    start_at = mp.Value("d", 0.0, lock=False)
    go = mp.Event()
    messages: multiprocessing.Queue[tuple[Any, ...]] = mp.Queue()
    processes = [
        mp.Process(
            target=_entry,
            args=(fn, options, i, n, count, duration, next_index, counters, start_at, go, messages),
            name=f"bench-worker-{i}",
            daemon=True,
        )
        for i, n in enumerate(slots)
    ]
    for process in processes:
        process.start()
    try:
        return _supervise(processes, slots, messages, counters, start_at, go, progress)
    finally:
        go.set()  # a worker still waiting to start must not wait for nothing
        for process in processes:
            process.join(EXIT_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join()
        messages.close()
        messages.join_thread()


def _supervise(
    processes: Sequence[multiprocessing.process.BaseProcess],
    slots: tuple[int, ...],
    messages: multiprocessing.Queue[tuple[Any, ...]],
    counters: Any,
    start_at: Any,
    go: multiprocessing.synchronize.Event,
    progress: ProgressFn | None,
) -> PoolResult:
    ready: set[int] = set()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while len(ready) < len(processes):
        message = _next_message(messages, processes, deadline, "start")
        if message[0] == "failed":
            raise BenchError(f"worker {message[1]} failed to start:\n{message[2]}")
        ready.add(message[1])
    machine_before = machine_cpu_times()
    start = time.monotonic()
    start_at.value = start
    go.set()
    reports: dict[int, WorkerReport] = {}
    while len(reports) < len(processes):
        try:
            message = messages.get(timeout=POLL_INTERVAL)
        except queue.Empty:
            _check_alive(processes, reports)
            if progress is not None:
                done = sum(counters[0::2])
                failed = sum(counters[1::2])
                progress(done, failed, time.monotonic() - start)
            continue
        if message[0] == "failed":
            raise BenchError(f"worker {message[1]} failed:\n{message[2]}")
        if message[0] == "done":
            _, index, payload, cpu, wall = message
            reports[index] = WorkerReport(index, slots[index], payload, cpu, wall)
    if progress is not None:
        progress(sum(counters[0::2]), sum(counters[1::2]), time.monotonic() - start)
    machine_after = machine_cpu_times()
    machine_busy = None
    if machine_before is not None and machine_after is not None:
        busy = machine_after[0] - machine_before[0]
        total = machine_after[1] - machine_before[1]
        machine_busy = busy / total if total > 0 else None
    ordered = [reports[i] for i in sorted(reports)]
    return PoolResult(
        reports=ordered,
        wall_seconds=max(r.wall_seconds for r in ordered),
        machine_busy=machine_busy,
    )


def _next_message(
    messages: multiprocessing.Queue[tuple[Any, ...]],
    processes: Sequence[multiprocessing.process.BaseProcess],
    deadline: float,
    what: str,
) -> tuple[Any, ...]:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"workers did not {what} within {STARTUP_TIMEOUT:g}s")
        try:
            return messages.get(timeout=min(POLL_INTERVAL, remaining))
        except queue.Empty:
            _check_alive(processes, {})


def _check_alive(
    processes: Sequence[multiprocessing.process.BaseProcess], reported: dict[int, WorkerReport]
) -> None:
    for index, process in enumerate(processes):
        if index not in reported and not process.is_alive() and process.exitcode not in (0, None):
            raise BenchError(f"worker {index} died (exit status {process.exitcode})")
