"""ML-DSA server certificates and dual certificates against independent clients, over real
sockets: pyOpenSSL (cryptography's OpenSSL 4.0) and Node.js 26 (OpenSSL 3.5.8).

The listener is built from a configuration by the same code ``pqproxy serve`` runs
(``parse_config`` -> ``build_runtime``), on an event loop in a background thread, in front
of an upstream that records every request (tests/mtls_peers.py). Each client trusts exactly
one CA, so a completed handshake proves which chain it was sent and that it verified it.

What Node 26.10's OpenSSL 3.5.8 offers, as captured from its ClientHello in
``test_node_offers_mldsa_first``: signature_algorithms starts mldsa65, mldsa87, mldsa44, then
the classical schemes; no signature_algorithms_cert. So Node verifies all three ML-DSA
levels, and the tests below run each one.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, mldsa

from pqproxy.config import parse_config
from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.io.supervisor import build_runtime
from pqproxy.io.telemetry import Telemetry
from pqproxy.io.tls_server import ConnectionClosed, TLSListener
from pqproxy.metrics import ProxyMetrics
from pqproxy.tls.enums import AlertDescription, NamedGroup, SignatureScheme
from pqproxy.tls.events import HandshakeComplete
from pqproxy.tls.messages import pull_client_hello
from tests.conftest import DevCertFactory
from tests.mtls_peers import WAIT, RecordingUpstream, exchange, leaf_public_key, tls_context

pytestmark = pytest.mark.interop

MLDSA = {
    "mldsa44": (SignatureScheme.mldsa44, mldsa.MLDSA44PublicKey, "ml-dsa-44"),
    "mldsa65": (SignatureScheme.mldsa65, mldsa.MLDSA65PublicKey, "ml-dsa-65"),
    "mldsa87": (SignatureScheme.mldsa87, mldsa.MLDSA87PublicKey, "ml-dsa-87"),
}


@dataclass
class Served:
    port: int
    metrics: ProxyMetrics
    handshakes: queue.Queue[HandshakeComplete] = field(default_factory=queue.Queue)
    closed: queue.Queue[ConnectionClosed] = field(default_factory=queue.Queue)

    def next_handshake(self) -> HandshakeComplete:
        return self.handshakes.get(timeout=WAIT)

    def next_close(self) -> ConnectionClosed:
        return self.closed.get(timeout=WAIT)


ServeTls = Callable[[dict[str, Any]], Served]


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    recorder = RecordingUpstream()
    yield recorder
    recorder.close()


@pytest.fixture
def serve_tls(upstream: RecordingUpstream, tmp_path: Path) -> Iterator[ServeTls]:
    """``serve_tls(tls_section)``: a listener configured as a YAML file's ``tls:`` section
    would configure it, running until the test ends."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cleanups: list[Callable[[], Any]] = []

    def run(coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, loop)
        return future.result(timeout=WAIT)

    def start(tls: dict[str, Any]) -> Served:
        data = {
            "admin": None,
            "listeners": [
                {"name": "main", "listen": "127.0.0.1:0", "upstream": "model", "tls": tls}
            ],
            "upstreams": {
                "model": {
                    "servers": [f"http://127.0.0.1:{upstream.port}"],
                    "health_check": None,
                }
            },
        }
        metrics = ProxyMetrics()
        runtime = build_runtime(
            parse_config(data, tmp_path), OpenSSLProvider(), telemetry=Telemetry(metrics)
        )
        served = Served(port=0, metrics=metrics)

        async def go() -> TLSListener:
            for pool in runtime.pools.values():
                await pool.start()
            listener = TLSListener(
                runtime.listeners[0],
                on_handshake=lambda event, _peer: served.handshakes.put(event),
                on_terminated=served.closed.put,
            )
            await listener.start()
            return listener

        listener = run(go())
        served.port = listener.port

        async def stop() -> None:
            await listener.close(grace=1.0)
            for pool in runtime.pools.values():
                await pool.close()

        cleanups.append(stop)
        return served

    yield start
    for stop in cleanups:
        run(stop())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT)
    loop.close()


def _certificate(paths: Any) -> dict[str, str]:
    return {"cert": str(paths.cert), "key": str(paths.key)}


# --- ML-DSA server certificates, pyOpenSSL ----------------------------------------------------


@pytest.mark.parametrize("key_type", list(MLDSA))
def test_pyopenssl_verifies_mldsa_certificate(
    serve_tls: ServeTls,
    upstream: RecordingUpstream,
    dev_certs_factory: DevCertFactory,
    tmp_path: Path,
    key_type: str,
) -> None:
    scheme, key_class, _ = MLDSA[key_type]
    certs = dev_certs_factory(key_type)
    served = serve_tls({"certificates": [_certificate(certs)]})
    done = exchange(served.port, tls_context(certs.ca, tmp_path))
    assert done.error is None and done.status == 200, done
    assert done.group == "X25519MLKEM768"
    # The certificate the client verified against its one trust anchor is the server's.
    assert isinstance(done.peer_key, key_class)
    assert done.peer_key == leaf_public_key(certs.cert)
    event = served.next_handshake()
    assert (event.group, event.signature_scheme) == (NamedGroup.X25519MLKEM768, scheme)
    seen = upstream.last()
    assert seen.value("X-PQ-TLS-Signature") == key_type
    assert seen.value("X-PQ-TLS-Group") == "X25519MLKEM768"


def test_pyopenssl_refuses_mldsa_certificate_from_another_ca(
    serve_tls: ServeTls, dev_certs_factory: DevCertFactory, tmp_path: Path
) -> None:
    """The control for the test above: the client really verifies the chain."""
    served = serve_tls({"certificates": [_certificate(dev_certs_factory("mldsa65"))]})
    other_ca = dev_certs_factory("mldsa44").ca
    done = exchange(served.port, tls_context(other_ca, tmp_path))
    assert done.error is not None and "certificate verify failed" in done.error
    closed = served.next_close()
    assert (closed.alert, closed.alert_sent) == (AlertDescription.unknown_ca, False)


# --- ML-DSA server certificates, Node.js -------------------------------------------------------

NODE_CLIENT = r"""
const tls = require('tls');
const [port, caPath, sigalgs] = process.argv.slice(1);
const options = {
  host: '127.0.0.1', port: Number(port), servername: 'localhost',
  ca: require('fs').readFileSync(caPath), ecdhCurve: 'X25519MLKEM768',
};
if (sigalgs !== '-') options.sigalgs = sigalgs;
const socket = tls.connect(options, () => {
  socket.write('GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
});
let body = '';
socket.setEncoding('utf8');
socket.on('data', (chunk) => { body += chunk; });
socket.on('end', () => {
  console.log(JSON.stringify({
    openssl: process.versions.openssl,
    authorized: socket.authorized,
    group: socket.getEphemeralKeyInfo(),
    keyType: socket.getPeerX509Certificate().publicKey.asymmetricKeyType,
    body,
  }));
});
socket.on('error', (err) => {
  console.log(JSON.stringify({ error: err.message, code: err.code }));
  process.exit(1);
});
setTimeout(() => { console.log(JSON.stringify({ error: 'timeout' })); process.exit(2); },
           15000).unref();
"""


def _node(node: Path, port: int, ca: Path, sigalgs: str = "-") -> dict[str, Any]:
    result = subprocess.run(
        [str(node), "-e", NODE_CLIENT, str(port), str(ca), sigalgs],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def _capture_client_hello(connect: Callable[[int], object]) -> Any:
    """The ClientHello a client sends to a bare TCP socket (then the socket closes)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(WAIT)
        port = server.getsockname()[1]
        client = threading.Thread(target=connect, args=(port,), daemon=True)
        client.start()
        peer, _ = server.accept()
        with peer:
            peer.settimeout(WAIT)
            data = b""
            while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
                chunk = peer.recv(65536)
                assert chunk, "the client closed before its ClientHello was complete"
                data += chunk
        client.join(WAIT)
    record = data[5 : 5 + int.from_bytes(data[3:5], "big")]
    assert record[0] == 1, "not a ClientHello"
    return pull_client_hello(record[4 : 4 + int.from_bytes(record[1:4], "big")])


def test_node_offers_mldsa_first(node_binary: Path) -> None:
    """What Node 26's OpenSSL offers, recorded: every ML-DSA level, before the classical
    schemes, and no signature_algorithms_cert (so signature_algorithms alone picks the
    chain)."""

    def connect(port: int) -> None:
        subprocess.run(
            [
                str(node_binary),
                "-e",
                "require('tls').connect({host: '127.0.0.1', port: Number(process.argv[1]), "
                "servername: 'localhost'}).on('error', () => {})",
                str(port),
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )

    version = subprocess.run(
        [str(node_binary), "-p", "process.versions.openssl"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert version.startswith("3.5."), version
    hello = _capture_client_hello(connect)
    assert hello.signature_algorithms[:4] == (
        SignatureScheme.mldsa65,
        SignatureScheme.mldsa87,
        SignatureScheme.mldsa44,
        SignatureScheme.ecdsa_secp256r1_sha256,
    )
    assert hello.signature_algorithms_cert is None
    assert hello.supported_groups[0] == NamedGroup.X25519MLKEM768


@pytest.mark.parametrize("key_type", list(MLDSA))
def test_node_verifies_mldsa_certificate(
    serve_tls: ServeTls,
    upstream: RecordingUpstream,
    dev_certs_factory: DevCertFactory,
    node_binary: Path,
    key_type: str,
) -> None:
    scheme, _, node_key_type = MLDSA[key_type]
    certs = dev_certs_factory(key_type)
    served = serve_tls({"certificates": [_certificate(certs)]})
    report = _node(node_binary, served.port, certs.ca)
    assert "error" not in report, report
    assert report["openssl"].startswith("3.5.")
    assert report["authorized"] is True
    assert report["group"] == {"type": "TLSGroup", "name": "X25519MLKEM768"}
    assert report["keyType"] == node_key_type
    assert report["body"].startswith("HTTP/1.1 200")
    event = served.next_handshake()
    assert (event.group, event.signature_scheme) == (NamedGroup.X25519MLKEM768, scheme)
    assert upstream.last().value("X-PQ-TLS-Signature") == key_type


def test_node_offering_another_mldsa_level_is_refused(
    serve_tls: ServeTls, dev_certs_factory: DevCertFactory, node_binary: Path
) -> None:
    """A client that can verify only ML-DSA-65 meets a server holding only an ML-DSA-44 key:
    handshake_failure (RFC 8446 §4.4.2.2 leaves no chain to send)."""
    certs = dev_certs_factory("mldsa44")
    served = serve_tls({"certificates": [_certificate(certs)]})
    report = _node(node_binary, served.port, certs.ca, sigalgs="mldsa65")
    assert report["code"] == "ERR_SSL_SSL/TLS_ALERT_HANDSHAKE_FAILURE", report
    closed = served.next_close()
    assert (closed.alert, closed.alert_sent) == (AlertDescription.handshake_failure, True)
    assert "signature_algorithms" in closed.reason


# --- dual certificates -------------------------------------------------------------------------


def test_dual_certificates_follow_the_client_signature_algorithms(
    serve_tls: ServeTls,
    upstream: RecordingUpstream,
    dev_certs_factory: DevCertFactory,
    tmp_path: Path,
) -> None:
    pq, classical = dev_certs_factory("mldsa65"), dev_certs_factory("ecdsa-p256")
    served = serve_tls({"certificates": [_certificate(pq), _certificate(classical)]})

    # pyOpenSSL's default offer starts with mldsa65: the ML-DSA chain, the first listed.
    modern = exchange(served.port, tls_context(pq.ca, tmp_path))
    assert modern.error is None and modern.status == 200
    assert isinstance(modern.peer_key, mldsa.MLDSA65PublicKey)
    assert served.next_handshake().signature_scheme == SignatureScheme.mldsa65
    assert upstream.last().value("X-PQ-TLS-Signature") == "mldsa65"

    # A client that offers only ECDSA P-256 with SHA-256 gets the ECDSA chain.
    legacy = exchange(served.port, tls_context(classical.ca, tmp_path, sigalgs="ECDSA+SHA256"))
    assert legacy.error is None and legacy.status == 200
    assert isinstance(legacy.peer_key, ec.EllipticCurvePublicKey)
    assert legacy.peer_key == leaf_public_key(classical.cert)
    assert served.next_handshake().signature_scheme == SignatureScheme.ecdsa_secp256r1_sha256
    assert upstream.last().value("X-PQ-TLS-Signature") == "ecdsa_secp256r1_sha256"
    # Both connections ran the hybrid key exchange: the chain choice is independent of it.
    assert modern.group == legacy.group == "X25519MLKEM768"

    # The control: that ECDSA-only client trusting only the ML-DSA CA is refused, because it
    # is sent the ECDSA chain, not because trust was mixed up.
    mismatched = exchange(served.port, tls_context(pq.ca, tmp_path, sigalgs="ECDSA+SHA256"))
    assert mismatched.error is not None and "certificate verify failed" in mismatched.error


def test_dual_certificate_order_is_the_preference(
    serve_tls: ServeTls, dev_certs_factory: DevCertFactory, tmp_path: Path
) -> None:
    """The same two chains listed ECDSA first: a client that offers both gets ECDSA."""
    pq, classical = dev_certs_factory("mldsa65"), dev_certs_factory("ecdsa-p256")
    served = serve_tls({"certificates": [_certificate(classical), _certificate(pq)]})
    done = exchange(served.port, tls_context(classical.ca, tmp_path))
    assert done.error is None and isinstance(done.peer_key, ec.EllipticCurvePublicKey)
    assert served.next_handshake().signature_scheme == SignatureScheme.ecdsa_secp256r1_sha256
