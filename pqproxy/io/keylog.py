"""The NSS key log (``SSLKEYLOGFILE``): TLS secrets in the format Wireshark reads, for debugging.

One line per secret: ``LABEL <client_random hex> <secret hex>``
(https://firefox-source-docs.mozilla.org/security/nss/legacy/key_log_format/). The engine
calls the writer through its ``key_log`` hook; only this module touches the file.

Rules this module keeps:

- Off unless asked for (``tls.key_log_file`` or ``SSLKEYLOGFILE``), and loud when on: a
  WARNING names the file when it is opened, because anyone who can read it can decrypt every
  connection it covers.
- The file is opened once per process and path, append-only, created 0600; each line is one
  ``write(2)`` on an O_APPEND descriptor, so the lines of several workers never interleave.
- A secret goes to that file and nowhere else: not into a log line, not into a repr, not into
  an exception message. A write that fails is logged (path and errno only) once, and the key
  log stops; the connection carries on.
"""

from __future__ import annotations

import logging
import os
import stat

logger = logging.getLogger(__name__)

KEY_LOG_ENV = "SSLKEYLOGFILE"


class KeyLogWriter:
    """Appends NSS key-log lines to ``path``; an instance is the engine's ``key_log`` hook."""

    __slots__ = ("path", "_fd")

    def __init__(self, path: str) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd: int | None = os.open(path, flags, 0o600)
        try:
            mode = os.fstat(self._fd).st_mode
        except OSError:
            return
        if stat.S_IMODE(mode) & 0o077:
            # O_CREAT's mode only applies to a new file; say so rather than tighten a file
            # the operator made.
            logger.warning(
                "TLS key log %s is readable by others (mode %o): restrict it", path, mode & 0o777
            )

    def __call__(self, label: str, client_random: bytes, secret: bytes) -> None:
        fd = self._fd
        if fd is None:
            return
        line = f"{label} {client_random.hex()} {secret.hex()}\n".encode("ascii")
        try:
            os.write(fd, line)
        except OSError as exc:
            self._fd = None
            logger.error(
                "TLS key log %s: write failed (%s); key logging stopped",
                self.path,
                exc.strerror or type(exc).__name__,
            )

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __repr__(self) -> str:
        return f"<KeyLogWriter {self.path}>"


# Per process: a forked worker opens its own descriptor rather than share its parent's.
_open: dict[tuple[int, str], KeyLogWriter] = {}


def open_key_log(path: str, source: str) -> KeyLogWriter:
    """The writer for ``path`` in this process, opened (and warned about) the first time.
    ``source`` says where the path came from, for the warning. Raises OSError."""
    path = os.path.abspath(path)
    key = (os.getpid(), path)
    writer = _open.get(key)
    if writer is None:
        writer = _open[key] = KeyLogWriter(path)
        logger.warning(
            "TLS key log ON (%s): writing the secrets of every TLS session to %s; anyone who "
            "can read that file can decrypt the traffic. For debugging only.",
            source,
            path,
        )
    return writer


def close_key_logs() -> None:
    """Close this process's key logs (at exit)."""
    pid = os.getpid()
    for (owner, path), writer in list(_open.items()):
        if owner == pid:
            writer.close()
            del _open[(owner, path)]
