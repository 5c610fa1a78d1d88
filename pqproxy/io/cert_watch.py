"""Certificate rotation without a restart or a signal: watch the files, swap the pair.

cert-manager renews a certificate into a Secret; the kubelet projects the Secret into the pod
by writing the new files into a fresh timestamped directory and swapping a ``..data``
symlink over to it in one rename. Nobody sends pqproxy a signal, so pqproxy looks.

Rules this module keeps:

- Polling, every ``interval`` seconds (``DEFAULT_INTERVAL``), not inotify: a Secret update
  replaces a symlink two levels above the path in the config, which inotify on that path
  never reports, and network or overlay volumes may deliver no events at all. The kubelet
  takes up to a minute to project a Secret anyway; a few seconds more cost nothing.
- A file has changed when its ``(st_dev, st_ino, st_mtime_ns, st_size)``, read through
  every symlink as ``open()`` would, differs from the last one seen: the ``..data`` swap gives
  every file a new inode, and an in-place rewrite a new mtime or size.
- A changed pair is loaded with ``load_certified_key``, which refuses a key that does not
  match its certificate. What cannot be loaded (half written, mismatched, missing) is
  refused with one line, ``certificate reload refused: <reason>``, and the previous pair
  keeps serving; the next change is tried again, without a line per poll in between.
- All or nothing per listener: every certificate of the listener loads, or none is swapped,
  so a listener never serves half of an update.
- The stamp kept after an attempt is the one taken before the files were read: a write
  that lands while they are read shows as a change at the next poll and is loaded again,
  never lost.
- Only new handshakes see the new pair. The callback swaps the listener's ``ServerConfig``
  for one with the new certificates; established connections keep the configuration they
  were accepted with, so their streams run on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from cryptography import x509

from ..config import CertificateConfig, ListenerConfig
from ..crypto.certs import CertificateLoadError, load_certified_key
from ..crypto.provider import CertifiedKey
from .tls_server import ListenerSettings

logger = logging.getLogger(__name__)

# How often the files are looked at. A kubelet projects a Secret update within its sync
# period (about a minute), so checking more often than this buys nothing in Kubernetes.
DEFAULT_INTERVAL = 5.0

# (st_dev, st_ino, st_mtime_ns, st_size) of a file through its symlinks; None: stat failed
# (missing, for one, while a non-atomic deploy step replaces it).
FileStamp = tuple[int, int, int, int] | None
LoadPair = Callable[[Path, Path], CertifiedKey]
# Called with the listener's name and its new certificates, in config order.
OnReload = Callable[[str, tuple[CertifiedKey, ...]], None]


class PollResult(StrEnum):
    UNCHANGED = "unchanged"
    RELOADED = "reloaded"
    REFUSED = "refused"


def file_stamp(path: Path) -> FileStamp:
    """What identifies this version of the file: follows symlinks, as ``open()`` does."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def replace_certificates(
    settings: ListenerSettings, certificates: tuple[CertifiedKey, ...]
) -> ListenerSettings:
    """The listener's settings serving ``certificates``; everything else as it was.

    ``ServerConfig`` validates and encodes its Certificate messages in ``__post_init__``, so
    ``dataclasses.replace`` gives a fully built configuration (or raises ValueError)."""
    return replace(
        settings, server_config=replace(settings.server_config, certificates=certificates)
    )


def _describe_leaf(certified: CertifiedKey) -> str:
    try:
        leaf = x509.load_der_x509_certificate(certified.chain[0])
    except ValueError:
        return "leaf unreadable"
    return f"serial {leaf.serial_number:x}, not after {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"


class CertificateWatcher:
    """Watches one listener's certificate and key files and hands over a new set of
    ``CertifiedKey`` when they changed and load.

    The files' state is recorded when the watcher is made: make it *before* the pair that
    is served is loaded, so that a change between the two is seen rather than missed.
    ``poll()`` is one look (synchronous: a few ``stat`` calls, and a load when something
    changed); ``start()`` runs it every ``interval`` seconds on the running loop.
    """

    def __init__(
        self,
        name: str,
        certificates: Sequence[CertificateConfig],
        *,
        interval: float = DEFAULT_INTERVAL,
        load: LoadPair = load_certified_key,
    ) -> None:
        if not certificates:
            raise ValueError("a certificate watcher needs at least one certificate")
        if not interval > 0:
            raise ValueError(f"interval must be more than 0 seconds, got {interval!r}")
        self.name = name
        self.certificates = tuple(certificates)
        self.interval = interval
        self._load = load
        self._stamps = self._stamp_all()
        self._task: asyncio.Task[None] | None = None
        self._on_reload: OnReload | None = None
        # Counts, for tests and whoever wants to export them.
        self.reloads = 0
        self.refusals = 0

    def _paths(self) -> list[Path]:
        return [path for cert in self.certificates for path in (cert.cert, cert.key)]

    def _stamp_all(self) -> tuple[FileStamp, ...]:
        return tuple(file_stamp(path) for path in self._paths())

    def poll(self, on_reload: OnReload | None = None) -> PollResult:
        """Look once: reload if any file changed since the last look."""
        on_reload = on_reload or self._on_reload
        stamps = self._stamp_all()
        if stamps == self._stamps:
            return PollResult.UNCHANGED
        changed = [
            path
            for path, old, new in zip(self._paths(), self._stamps, stamps, strict=True)
            if old != new
        ]
        # Recorded before reading (see the module rules): a refused version is not retried
        # until the files change again, and a write racing this load is seen next time.
        self._stamps = stamps
        try:
            loaded = tuple(self._load_one(cert) for cert in self.certificates)
            if on_reload is not None:
                on_reload(self.name, loaded)
        except CertificateLoadError as exc:
            return self._refuse(str(exc))
        except ValueError as exc:
            # The new set does not make a valid ServerConfig.
            return self._refuse(str(exc))
        except Exception as exc:
            # A reload must never take a serving process down.
            return self._refuse(f"{type(exc).__name__}: {exc}")
        self.reloads += 1
        changed_certs = {
            index
            for index, cert in enumerate(self.certificates)
            if cert.cert in changed or cert.key in changed
        }
        for index in sorted(changed_certs):
            logger.info(
                "certificate reloaded from %s (listener %s, %s)",
                self.certificates[index].cert,
                self.name,
                _describe_leaf(loaded[index]),
            )
        return PollResult.RELOADED

    def _load_one(self, cert: CertificateConfig) -> CertifiedKey:
        certified = self._load(cert.cert, cert.key)
        if cert.server_names is not None:
            # As at start-up: the configured names replace the certificate's own.
            certified = replace(certified, names=cert.server_names)
        return certified

    def _refuse(self, reason: str) -> PollResult:
        self.refusals += 1
        logger.error(
            "certificate reload refused: listener %s: %s; the previous certificate keeps serving",
            self.name,
            reason,
        )
        return PollResult.REFUSED

    def start(self, on_reload: OnReload) -> None:
        """Poll every ``interval`` seconds on the running loop until ``close()``."""
        if self._task is not None:
            raise RuntimeError("certificate watcher already started")
        self._on_reload = on_reload
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"cert-watch-{self.name}"
        )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.poll()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class CertificateWatch:
    """One ``CertificateWatcher`` per listener of a configuration, started and closed
    together. Made before the configuration's certificates are loaded (see
    ``CertificateWatcher``); a reload makes a new one for the new configuration."""

    watchers: tuple[CertificateWatcher, ...]

    @classmethod
    def for_listeners(
        cls,
        listeners: Sequence[ListenerConfig],
        interval: float = DEFAULT_INTERVAL,
        *,
        load: LoadPair = load_certified_key,
    ) -> CertificateWatch:
        return cls(
            tuple(
                CertificateWatcher(
                    listener.name, listener.tls.certificates, interval=interval, load=load
                )
                for listener in listeners
            )
        )

    def start(self, on_reload: OnReload) -> None:
        for watcher in self.watchers:
            watcher.start(on_reload)

    def poll(self, on_reload: OnReload) -> list[PollResult]:
        return [watcher.poll(on_reload) for watcher in self.watchers]

    async def close(self) -> None:
        await asyncio.gather(*(watcher.close() for watcher in self.watchers))
