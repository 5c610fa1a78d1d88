"""Event-loop selection and process signals.

One process runs one event loop; uvloop when it is importable, because the relay's hot path
is callback-heavy and uvloop's transports cut that overhead roughly in half.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

SHUTDOWN_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` to completion on a fresh loop, uvloop when available."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            logger.info("event loop: asyncio (uvloop not installed)")
        else:
            logger.info("event loop: uvloop %s", getattr(uvloop, "__version__", "?"))
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    else:
        logger.info("event loop: asyncio (uvloop disabled)")
    return asyncio.run(main)


class ShutdownSignals:
    """Catch process signals (SIGTERM/SIGINT unless told otherwise; a worker adds SIGHUP) on
    the running loop for the span of a ``with`` block.

    Installed before a server announces readiness, so a signal sent the moment the "listening"
    line appears is already ours; removed on exit so a second Ctrl-C after shutdown gets the
    default behaviour instead of being swallowed. Signals arriving while nobody waits are
    queued, in order: ``wait()`` returns each once.

    On entry the signals are also unblocked: a supervisor blocks them around ``fork()`` so
    that a signal sent to a new worker before its handlers exist stays pending instead of
    killing it (SIGHUP's default action is to terminate); here it is delivered to us.
    """

    def __init__(self, signals: Iterable[signal.Signals] = SHUTDOWN_SIGNALS) -> None:
        self._signals = tuple(signals)
        self._installed: list[signal.Signals] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[signal.Signals] | None = None

    def __enter__(self) -> ShutdownSignals:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        for sig in self._signals:
            self._loop.add_signal_handler(sig, self._on_signal, sig)
            self._installed.append(sig)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self._signals)
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None
        for sig in self._installed:
            self._loop.remove_signal_handler(sig)
        self._installed.clear()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._queue is not None:
            self._queue.put_nowait(sig)

    async def wait(self) -> signal.Signals:
        """The next signal that arrived. The one wait with no deadline: the operator decides
        it."""
        if self._queue is None:
            raise RuntimeError("ShutdownSignals.wait() outside its with block")
        return await self._queue.get()
