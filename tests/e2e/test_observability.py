"""Observability of a real ``pqproxy serve``: real handshakes (hybrid through pyOpenSSL,
classical through stdlib ``ssl``) and requests through the real proxy, then ``/metrics``
scraped over HTTP and parsed with prometheus_client's own parser; ``/readyz`` following the
only upstream down and back; one scrape of a two-worker proxy counting both workers; the NSS
key log checked against the client's own secrets, which appear in no log."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import select
import signal
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from OpenSSL import SSL
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.processes import (
    WAIT,
    Certs,
    Process,
    Serve,
    gen_cert,
    get_json,
    start_demo_upstream,
    start_serve,
    tls_context,
)
from tests.peers import client_context

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

T = TypeVar("T")
ADMIN_RE = r"pqproxy admin on http://127\.0\.0\.1:(\d+) \(/metrics, /healthz, /readyz\)"
HANDSHAKE_PID_RE = r"pid=(\d+) pqproxy\.io\.tls_server handshake ok "
WORKER_STARTED_RE = r"supervisor: worker (\d+) started, pid=(\d+)"
REQUEST = b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
# The fields of a JSON access-log line (the list).
ACCESS_FIELDS = {
    "time",
    "client",
    "sni",
    "alpn",
    "tls_group",
    "tls_cipher",
    "handshake_ms",
    "method",
    "path",
    "status",
    "bytes_in",
    "bytes_out",
    "upstream",
    "first_byte_ms",
    "duration_ms",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- helpers -----------------------------------------------------------------------------------


def write_config(
    path: Path,
    *,
    certs: Certs,
    upstream_port: int,
    workers: int = 1,
    log_format: str = "json",
    log_level: str = "info",
    destination: str = "stderr",
    health_check: str = "null",
    admin: str = "127.0.0.1:0",
) -> Path:
    path.write_text(
        f"""\
workers: {workers}
admin: "{admin}"
logging: {{level: {log_level}, access_log: true, format: {log_format}, destination: {destination}}}
drain_timeout: 5s
listeners:
  - name: main
    listen: "127.0.0.1:0"
    upstream: model
    tls:
      certificates:
        - cert: {certs.cert}
          key: {certs.key}
upstreams:
  model:
    servers: [http://127.0.0.1:{upstream_port}]
    health_check: {health_check}
""",
        encoding="utf-8",
    )
    return path


def admin_port(serve: Serve) -> int:
    return int(serve.proc.wait_for_line(ADMIN_RE).group(1))


def admin_get(port: int, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("content-type") or "", response.read()
    finally:
        conn.close()


def scrape(port: int) -> Samples:
    status, content_type, body = admin_get(port, "/metrics")
    assert status == 200, body
    assert content_type.startswith("text/plain; version="), content_type
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode("utf-8"))
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over every series whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (n, got), value in samples.items() if n == name and wanted <= got)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def wait_until(check: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
    """Poll ``check`` (state, not time) until it returns something, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _retry(sock: socket.socket, call: Callable[[], T]) -> T:
    """pyOpenSSL on a socket with a timeout is non-blocking: wait for readability with a
    deadline instead of spinning."""
    while True:
        try:
            return call()
        except SSL.WantReadError:
            ready, _, _ = select.select([sock], [], [], WAIT)
            if not ready:
                raise TimeoutError(f"no data from pqproxy within {WAIT:g} s") from None


def openssl_get(
    port: int, ctx: SSL.Context, keylog: list[bytes] | None = None
) -> tuple[str, bytes]:
    """One request over a pyOpenSSL connection: (negotiated group, response)."""
    if keylog is not None:
        ctx.set_keylog_callback(lambda _conn, line: keylog.append(line))
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        conn = SSL.Connection(ctx, sock)
        conn.set_tlsext_host_name(b"localhost")
        conn.set_connect_state()
        _retry(sock, conn.do_handshake)
        group = conn.get_group_name() or "?"
        conn.sendall(REQUEST)
        response = b""
        while True:
            try:
                chunk = _retry(sock, lambda: conn.recv(65536))
            except SSL.ZeroReturnError:
                break
            if not chunk:
                break
            response += chunk
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    return group, response


def openssl_refused(port: int, ctx: SSL.Context) -> None:
    """A handshake that pqproxy must refuse with an alert."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        conn = SSL.Connection(ctx, sock)
        conn.set_connect_state()
        with pytest.raises(SSL.Error):
            _retry(sock, conn.do_handshake)


@contextlib.contextmanager
def serving(config: Path, extra_env: dict[str, str] | None = None) -> Iterator[Serve]:
    serve = start_serve("--config", str(config), extra_env=extra_env)
    try:
        yield serve
    finally:
        serve.proc.stop()
    assert "Traceback" not in serve.proc.output()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return gen_cert(tmp_path_factory.mktemp("observability-certs"))


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    proc, port = start_demo_upstream("--token-interval", "0")
    try:
        yield port
    finally:
        proc.stop()


# --- one process --------------------------------------------------------------------------------


def test_handshakes_and_requests_move_the_right_series(
    tmp_path: Path, certs: Certs, upstream_port: int
) -> None:
    config = write_config(tmp_path / "pqproxy.yaml", certs=certs, upstream_port=upstream_port)
    with serving(config) as serve:
        port = admin_port(serve)
        before = scrape(port)
        assert admin_get(port, "/healthz")[:1] == (200,)

        # Hybrid (pyOpenSSL offers X25519MLKEM768 first), hybrid after a HelloRetryRequest
        # (a share for X25519 only), classical (stdlib ssl on Debian's OpenSSL 3.0).
        assert openssl_get(serve.port, client_context(certs.ca))[0] == "X25519MLKEM768"
        hrr_ctx = client_context(certs.ca, groups="X25519MLKEM768:*X25519")
        assert openssl_get(serve.port, hrr_ctx)[0] == "X25519MLKEM768"
        assert get_json(serve.port, certs.ca, "/v1/models")[0] == 200
        # Refused: no shared group (and no hybrid offered), and no TLS 1.3 at all.
        openssl_refused(serve.port, client_context(certs.ca, groups="P-521"))
        legacy = tls_context(certs.ca)
        legacy.minimum_version = legacy.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket.create_connection(("127.0.0.1", serve.port), timeout=WAIT) as raw:
            with pytest.raises(ssl.SSLError):
                legacy.wrap_socket(raw, server_hostname="127.0.0.1")

        def all_ended() -> Samples | None:
            samples = scrape(port)
            return samples if moved(before, samples, "pqproxy_connections_total") >= 5 else None

        after = wait_until(all_ended, "five connections to end")

    def hs(**labels: str) -> float:
        return moved(before, after, "pqproxy_tls_handshakes_total", **labels)

    ok = {"backend": "openssl", "cipher_suite": "TLS_AES_128_GCM_SHA256", "result": "ok"}
    assert hs(group="X25519MLKEM768", hrr="false", **ok) == 1
    assert hs(group="X25519MLKEM768", hrr="true", **ok) == 1
    assert hs(group="x25519", hrr="false", **ok) == 1
    assert hs(result="failed") == 2
    assert hs() == 5

    def count(name: str, **labels: str) -> float:
        return moved(before, after, name, **labels)

    duration = "pqproxy_tls_handshake_duration_seconds_count"
    assert count(duration, group="X25519MLKEM768", backend="openssl") == 2
    assert count(duration, group="x25519", backend="openssl") == 1
    key_exchange = "pqproxy_tls_key_exchange_seconds_count"
    assert count(key_exchange, group="X25519MLKEM768", backend="openssl") == 2
    assert count(key_exchange, group="x25519", backend="openssl") == 1
    # The buckets resolve sub-millisecond crypto: key exchanges land below 1 ms.
    assert count("pqproxy_tls_key_exchange_seconds_bucket", le="0.001") >= 1
    sign = "pqproxy_tls_sign_seconds_count"
    assert count(sign, scheme="ecdsa_secp256r1_sha256", backend="openssl") == 3
    kem = "pqproxy_kem_operations_total"
    assert count(kem, backend="openssl", op="encapsulate", result="ok") == 3
    assert count("pqproxy_kem_operation_seconds_count", backend="openssl", op="encapsulate") == 3

    assert count("pqproxy_tls_handshake_failures_total", reason="handshake_failure") == 1
    assert count("pqproxy_tls_handshake_failures_total", reason="protocol_version") == 1
    assert count("pqproxy_tls_alerts_sent_total", alert="handshake_failure") == 1
    assert count("pqproxy_tls_alerts_sent_total", alert="protocol_version") == 1
    offered = "pqproxy_tls_client_groups_offered_total"
    # Both pyOpenSSL clients that completed offered the hybrid; the refused P-521 one did not.
    assert count(offered, group="X25519MLKEM768") == 2
    assert count(offered, group="secp521r1") >= 1
    no_hybrid = "pqproxy_tls_handshakes_no_hybrid_offered_total"
    assert count(no_hybrid, result="ok") == 1  # stdlib ssl: x25519 only
    assert count(no_hybrid, result="failed") == 1  # the P-521 client

    upstream = f"127.0.0.1:{upstream_port}"
    assert count("pqproxy_http_requests_total", upstream=upstream, status="200") == 3
    assert count("pqproxy_http_request_duration_seconds_count", upstream=upstream) == 3
    assert count("pqproxy_upstream_first_byte_seconds_count", upstream=upstream) == 3
    # How a served connection ends (our close_notify first, or the client's close) is a race.
    served = count("pqproxy_connections_total", result="closed")
    assert served + count("pqproxy_connections_total", result="peer_eof") == 3
    assert count("pqproxy_connections_total", result="tls_alert") == 2
    assert count("pqproxy_client_received_bytes_total") > 0
    assert count("pqproxy_client_sent_bytes_total") > 0
    assert total(after, "pqproxy_connections_active") == 0
    assert total(after, "pqproxy_upstream_healthy", upstream=upstream) == 1
    assert total(after, "pqproxy_ready") == 3

    # One JSON access-log line per request, with every field the issue lists.
    access = [
        entry
        for line in serve.proc.lines
        if line.startswith("{") and (entry := json.loads(line))["logger"] == "pqproxy.access"
    ]
    assert len(access) == 3
    assert all(ACCESS_FIELDS <= set(entry) for entry in access)
    assert {entry["tls_group"] for entry in access} == {"X25519MLKEM768", "x25519"}
    assert {entry["status"] for entry in access} == {200}
    assert {entry["path"] for entry in access} == {"/v1/models"}
    assert all(entry["upstream"] == upstream and entry["bytes_out"] > 0 for entry in access)
    assert all(0 < entry["first_byte_ms"] <= entry["duration_ms"] for entry in access)
    # Error lines carry the alert that was sent and its reason.
    ends = [json.loads(line) for line in serve.proc.lines if '"kind": "tls_alert"' in line]
    assert {(e["alert"], e["alert_sent"]) for e in ends} == {
        ("handshake_failure", True),
        ("protocol_version", True),
    }
    assert all(e["reason"] for e in ends)


def test_readyz_follows_the_only_upstream(tmp_path: Path, certs: Certs) -> None:
    upstream, port = start_demo_upstream()
    restarted: Process | None = None
    config = write_config(
        tmp_path / "pqproxy.yaml",
        certs=certs,
        upstream_port=port,
        health_check="{path: /health, interval: 0.2s, timeout: 0.2s, healthy_threshold: 1, "
        "unhealthy_threshold: 1}",
    )
    try:
        with serving(config) as serve:
            admin = admin_port(serve)

            def readyz(expected: int) -> bytes | None:
                status, _, body = admin_get(admin, "/readyz")
                return body if status == expected else None

            assert wait_until(lambda: readyz(200), "/readyz 200").startswith(b"ready")
            assert upstream.stop() == 0

            body = wait_until(lambda: readyz(503), "/readyz 503 once the upstream is down")
            assert body.startswith(b"not ready: no healthy upstream in pool model")
            assert f"127.0.0.1:{port} unhealthy".encode() in body
            samples = scrape(admin)
            assert total(samples, "pqproxy_upstream_healthy", upstream=f"127.0.0.1:{port}") == 0
            assert total(samples, "pqproxy_ready", check="upstream") == 0
            assert total(samples, "pqproxy_ready", check="listeners") == 1
            # The liveness probe does not care.
            assert admin_get(admin, "/healthz")[0] == 200

            restarted = Process("demo-upstream", "--listen", f"127.0.0.1:{port}")
            restarted.wait_for_line(r"demo upstream listening on ")
            wait_until(lambda: readyz(200), "/readyz 200 once the upstream is back")
            samples = scrape(admin)
            assert total(samples, "pqproxy_upstream_healthy", upstream=f"127.0.0.1:{port}") == 1
    finally:
        upstream.stop()
        if restarted is not None:
            restarted.stop()


# --- workers ------------------------------------------------------------------------------------


def test_one_scrape_counts_every_worker(tmp_path: Path, certs: Certs, upstream_port: int) -> None:
    config = write_config(
        tmp_path / "pqproxy.yaml",
        certs=certs,
        upstream_port=upstream_port,
        workers=2,
        log_format="text",
    )
    with serving(config) as serve:
        admin = admin_port(serve)
        metrics_dir = Path(
            serve.proc.wait_for_line(r"supervisor: workers write their metrics to (\S+)").group(1)
        )
        started = serve.proc.wait_for_lines(WORKER_STARTED_RE, 2)
        workers = {int(m.group(2)) for m in started}
        status, _, body = admin_get(admin, "/readyz")
        assert (status, body) == (200, b"ready: 2 of 2 workers serving\n")

        connections = 30
        for _ in range(connections):
            assert get_json(serve.port, certs.ca, "/health") == (200, {"status": "ok"})
        handshakes = serve.proc.wait_for_lines(HANDSHAKE_PID_RE, connections)
        pids = {int(m.group(1)) for m in handshakes}
        assert pids == workers, f"handshakes only in {pids} of {workers}"

        # A handshake is counted before its request is served, a request once its response is
        # written (the client may read it first): wait for the last one.
        def all_counted() -> Samples | None:
            samples = scrape(admin)
            done = total(samples, "pqproxy_http_requests_total", status="200") >= connections
            return samples if done else None

        samples = wait_until(all_counted, "every request counted")
        assert total(samples, "pqproxy_http_requests_total", status="200") == connections
        assert total(samples, "pqproxy_tls_handshakes_total", result="ok") == connections
        assert total(samples, "pqproxy_tls_handshakes_total", group="x25519") == connections
        assert total(samples, "pqproxy_tls_handshake_duration_seconds_count") == connections
        # A multiprocess scrape keeps one series per label set: merged, not one per worker.
        series = [k for k in samples if k[0] == "pqproxy_tls_handshakes_total"]
        assert len(series) == 1

        # A worker that dies takes its live gauges with it, never its counts.
        victim = sorted(workers)[0]
        mark = serve.proc.mark()
        os.kill(victim, signal.SIGKILL)
        serve.proc.wait_for_line(WORKER_STARTED_RE, after=mark)
        samples = scrape(admin)
        assert total(samples, "pqproxy_tls_handshakes_total", result="ok") == connections
        wait_until(
            lambda: True if admin_get(admin, "/readyz")[0] == 200 else None,
            "/readyz 200 after the restart",
        )
        assert metrics_dir.is_dir()
    # The private metrics directory goes with the supervisor.
    assert serve.proc.popen.returncode == 0
    assert not metrics_dir.exists()


# --- key log ------------------------------------------------------------------------------------


def test_key_log_matches_the_clients_secrets(
    tmp_path: Path, certs: Certs, upstream_port: int
) -> None:
    key_log = tmp_path / "keys.log"
    log_file = tmp_path / "pqproxy.log"
    config = write_config(
        tmp_path / "pqproxy.yaml",
        certs=certs,
        upstream_port=upstream_port,
        log_level="debug",
        destination=str(log_file),
    )
    client_lines: list[bytes] = []
    with serving(config, extra_env={"SSLKEYLOGFILE": str(key_log)}) as serve:
        openssl_get(serve.port, client_context(certs.ca), keylog=client_lines)
        hrr_ctx = client_context(certs.ca, groups="X25519MLKEM768:*X25519")
        openssl_get(serve.port, hrr_ctx, keylog=client_lines)
    assert serve.proc.popen.returncode == 0

    written = key_log.read_bytes().splitlines()
    # Five secrets per TLS 1.3 connection, exactly those OpenSSL logs on the client side.
    assert len(client_lines) == 10
    assert sorted(written) == sorted(client_lines)
    assert {line.split()[0] for line in written} == {
        b"CLIENT_HANDSHAKE_TRAFFIC_SECRET",
        b"SERVER_HANDSHAKE_TRAFFIC_SECRET",
        b"CLIENT_TRAFFIC_SECRET_0",
        b"SERVER_TRAFFIC_SECRET_0",
        b"EXPORTER_SECRET",
    }
    assert stat.S_IMODE(key_log.stat().st_mode) == 0o600

    logged = log_file.read_text(encoding="utf-8") + "\n" + serve.proc.output()
    assert re.search(r"TLS key log ON \(SSLKEYLOGFILE\)", logged)
    assert '"level": "WARNING"' in logged
    assert "handshake ok" in log_file.read_text(encoding="utf-8")  # the file got the log
    for line in written:
        secret = line.split()[2].decode("ascii")
        assert secret not in logged.lower()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_taken_admin_port_fails_at_start(
    tmp_path: Path, certs: Certs, upstream_port: int, workers: int
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path / "pqproxy.yaml",
            certs=certs,
            upstream_port=upstream_port,
            workers=workers,
            admin=f"127.0.0.1:{port}",
        )
        proc = Process("serve", "--config", str(config))
        status = proc.wait(WAIT)
    assert status == 1
    # One line naming the address (asyncio and socket word errno differently).
    error = rf"pqproxy serve: error: cannot listen on admin 127\.0\.0\.1:{port}: .*already in use"
    assert re.search(error, proc.output(), re.IGNORECASE), proc.output()
    assert "Traceback" not in proc.output()
