"""The NSS key log: the file pqproxy.io.keylog writes, fed by the engine's ``key_log`` hook,
against what pyOpenSSL (an independent TLS 1.3 client) logs for the same connection."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from OpenSSL import SSL

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.devcert import DevCertPaths
from pqproxy.io.keylog import KeyLogWriter, close_key_logs, open_key_log
from pqproxy.tls.events import HandshakeComplete
from pqproxy.tls.server import ServerConfig, ServerConnection
from tests.peers import client_context, memory_client, pump

PROVIDER = OpenSSLProvider()
LABELS = {
    b"CLIENT_HANDSHAKE_TRAFFIC_SECRET",
    b"SERVER_HANDSHAKE_TRAFFIC_SECRET",
    b"CLIENT_TRAFFIC_SECRET_0",
    b"SERVER_TRAFFIC_SECRET_0",
    b"EXPORTER_SECRET",
}


def handshake(
    dev_certs: DevCertPaths, key_log: KeyLogWriter | None, groups: str | None = None
) -> list[bytes]:
    """One handshake through the engine; the client's own key-log lines."""
    client_lines: list[bytes] = []
    ctx = client_context(dev_certs.ca, groups=groups)
    ctx.set_keylog_callback(lambda _conn, line: client_lines.append(line))
    config = ServerConfig(certificates=(load_certified_key(dev_certs.cert, dev_certs.key),))
    server = ServerConnection(config, PROVIDER, os.urandom, key_log=key_log)
    client: SSL.Connection = memory_client(ctx)
    events = pump(client, server)
    assert any(isinstance(e, HandshakeComplete) for e in events)
    return client_lines


@pytest.mark.parametrize(
    "groups", [None, "X25519MLKEM768:*X25519"], ids=["hybrid", "hybrid-after-hrr"]
)
def test_lines_match_the_clients(tmp_path: Path, dev_certs: DevCertPaths, groups: str) -> None:
    path = tmp_path / "keys.log"
    writer = KeyLogWriter(str(path))
    try:
        client_lines = handshake(dev_certs, writer, groups)
    finally:
        writer.close()
    written = path.read_bytes().splitlines()
    assert len(client_lines) == 5
    assert sorted(written) == sorted(client_lines)
    assert {line.split()[0] for line in written} == LABELS
    # The same client random on every line: after an HRR it is still the first hello's.
    assert len({line.split()[1] for line in written}) == 1


def test_file_is_private_and_appended(tmp_path: Path, dev_certs: DevCertPaths) -> None:
    path = tmp_path / "keys.log"
    for _ in range(2):
        writer = KeyLogWriter(str(path))
        handshake(dev_certs, writer)
        writer.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes().splitlines()) == 10


def test_repr_names_the_file_only(tmp_path: Path) -> None:
    writer = KeyLogWriter(str(tmp_path / "keys.log"))
    secret = bytes(range(32))
    writer("CLIENT_TRAFFIC_SECRET_0", b"\x01" * 32, secret)
    writer.close()
    assert repr(writer) == f"<KeyLogWriter {tmp_path / 'keys.log'}>"
    assert secret.hex() not in repr(writer)


def test_loose_permissions_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.log"
    path.write_bytes(b"")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="pqproxy.io.keylog"):
        KeyLogWriter(str(path)).close()
    assert f"TLS key log {path} is readable by others (mode 644)" in caplog.text


def test_a_failed_write_stops_the_key_log_without_the_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # /dev/full: every write fails with ENOSPC.
    writer = KeyLogWriter("/dev/full")
    secret = bytes(range(100, 132))
    with caplog.at_level(logging.ERROR, logger="pqproxy.io.keylog"):
        writer("SERVER_TRAFFIC_SECRET_0", b"\x02" * 32, secret)
        writer("CLIENT_TRAFFIC_SECRET_0", b"\x02" * 32, secret)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "TLS key log /dev/full: write failed" in errors[0].getMessage()
    assert secret.hex() not in caplog.text
    writer.close()


def test_open_key_log_opens_and_warns_once_per_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.log"
    try:
        with caplog.at_level(logging.WARNING, logger="pqproxy.io.keylog"):
            first = open_key_log(str(path), "SSLKEYLOGFILE")
            second = open_key_log(str(path), "SSLKEYLOGFILE")
        assert first is second
        warnings = [r.getMessage() for r in caplog.records if "TLS key log ON" in r.getMessage()]
        assert warnings == [
            f"TLS key log ON (SSLKEYLOGFILE): writing the secrets of every TLS session to {path}; "
            "anyone who can read that file can decrypt the traffic. For debugging only."
        ]
    finally:
        close_key_logs()
    assert open_key_log(str(path), "again") is not first
    close_key_logs()
