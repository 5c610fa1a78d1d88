"""The real ``python -m pqproxy`` processes: gen-cert, demo-upstream and serve, driven over real
sockets by the stdlib ``ssl`` client (OpenSSL 3.0, classical) and pyOpenSSL (OpenSSL 4.0, which
offers X25519MLKEM768)."""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from OpenSSL import SSL

from tests.peers import client_context

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
# Start-up imports cryptography and generates nothing; 30 s is far beyond a healthy start.
STARTUP_TIMEOUT = 30.0
WAIT = 10.0


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pqproxy_run(*args: str, timeout: float = STARTUP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pqproxy", *args],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Process:
    """A pqproxy subprocess whose stderr is read line by line on a thread, so the pipe never
    fills and a test can wait for a line with a deadline."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "pqproxy", *args],
            cwd=REPO_ROOT,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, pattern: str, timeout: float = STARTUP_TIMEOUT) -> re.Match[str]:
        """The first not yet consumed stderr line matching ``pattern``."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r}; stderr: {self.output()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(
                    f"process exited ({self.popen.poll()}) before a line matching "
                    f"{pattern!r}; stderr: {self.output()}"
                )
            match = regex.search(line)
            if match:
                return match

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, timeout: float = WAIT) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        self._reader.join(timeout)
        if self.popen.stderr is not None:
            self.popen.stderr.close()
        return self.popen.returncode


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    out = tmp_path_factory.mktemp("e2e-certs")
    result = pqproxy_run("gen-cert", "--out", str(out))
    assert result.returncode == 0, result.stderr
    paths = dict(re.findall(r"^(ca|cert|key):\s+(\S+)$", result.stdout, re.MULTILINE))
    certs = Certs(ca=Path(paths["ca"]), cert=Path(paths["cert"]), key=Path(paths["key"]))
    assert certs.ca.is_file() and certs.cert.is_file() and certs.key.is_file()
    return certs


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    proc = Process("demo-upstream", "--listen", "127.0.0.1:0", "--tokens", "8")
    try:
        match = proc.wait_for_line(r"demo upstream listening on http://127\.0\.0\.1:(\d+)")
        yield int(match.group(1))
    finally:
        status = proc.stop()
    assert status == 0, proc.output()
    assert "Traceback" not in proc.output()


@dataclass
class Serve:
    proc: Process
    port: int


def start_serve(certs: Certs, upstream_port: int, *extra: str) -> Serve:
    proc = Process(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--cert",
        str(certs.cert),
        "--key",
        str(certs.key),
        "--upstream",
        f"http://127.0.0.1:{upstream_port}",
        *extra,
    )
    try:
        match = proc.wait_for_line(r"pqproxy listening on https://127\.0\.0\.1:(\d+) \(groups: ")
    except BaseException:
        proc.stop()
        raise
    return Serve(proc, int(match.group(1)))


@pytest.fixture
def serve(certs: Certs, upstream_port: int) -> Iterator[Serve]:
    server = start_serve(certs, upstream_port)
    try:
        yield server
    finally:
        server.proc.stop()
    assert "Traceback" not in server.proc.output()


def stdlib_context(certs: Certs) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def test_get_models_over_stdlib_ssl(serve: Serve, certs: Certs) -> None:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", serve.port, context=stdlib_context(certs), timeout=WAIT
    )
    try:
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-type") == "application/json"
        models = json.loads(response.read())
        assert [m["id"] for m in models["data"]] == ["pqproxy-demo"]
        # Keep-alive through the relay: a second request on the same connection.
        conn.request("GET", "/health")
        health = conn.getresponse()
        assert health.status == 200 and json.loads(health.read()) == {"status": "ok"}
    finally:
        conn.close()
    line = serve.proc.wait_for_line(r"handshake ok peer=127\.0\.0\.1:\d+ ", WAIT)
    assert " group=x25519 " in line.string and " cipher=TLS_" in line.string


def test_sse_stream_over_stdlib_ssl(serve: Serve, certs: Certs) -> None:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", serve.port, context=stdlib_context(certs), timeout=WAIT
    )
    try:
        body = json.dumps({"model": "pqproxy-demo", "stream": True, "messages": []})
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-type") == "text/event-stream"
        events = [line for line in response.read().split(b"\n") if line.startswith(b"data: ")]
    finally:
        conn.close()
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[len(b"data: ") :]) for e in events[:-1]]
    assert len(chunks) == 8
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def _pyopenssl_get(port: int, ctx: SSL.Context, path: bytes) -> tuple[str | None, bytes]:
    """One HTTP/1.0 request over pyOpenSSL on a blocking socket with kernel timeouts; the
    negotiated group name and the raw response."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    # pyOpenSSL wants a blocking socket; SO_RCVTIMEO/SO_SNDTIMEO still bound every wait.
    sock.settimeout(None)
    timeval = struct.pack("ll", int(WAIT), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    conn = SSL.Connection(ctx, sock)
    try:
        conn.set_tlsext_host_name(b"localhost")
        conn.set_connect_state()
        conn.do_handshake()
        group = conn.get_group_name()
        conn.sendall(b"GET " + path + b" HTTP/1.0\r\nHost: localhost\r\n\r\n")
        chunks: list[bytes] = []
        while True:
            try:
                chunk = conn.recv(65536)
            except SSL.ZeroReturnError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return group, b"".join(chunks)
    finally:
        conn.close()
        sock.close()


def test_pyopenssl_negotiates_x25519mlkem768(serve: Serve, certs: Certs) -> None:
    ctx = client_context(ca=certs.ca, groups="X25519MLKEM768")
    group, response = _pyopenssl_get(serve.port, ctx, b"/health")
    assert group == "X25519MLKEM768"
    assert response.startswith(b"HTTP/1.1 200 ")
    assert response.endswith(b'{"status":"ok"}')
    line = serve.proc.wait_for_line(r"handshake ok ", WAIT)
    assert " group=X25519MLKEM768 " in line.string


def test_pq_policy_require_refuses_classical_client(certs: Certs, upstream_port: int) -> None:
    server = start_serve(certs, upstream_port, "--pq-policy", "require")
    try:
        ctx = client_context(ca=certs.ca, groups="X25519")
        with pytest.raises(SSL.Error):
            _pyopenssl_get(server.port, ctx, b"/health")
        # And the hybrid client still gets through.
        hybrid = client_context(ca=certs.ca, groups="X25519MLKEM768")
        group, response = _pyopenssl_get(server.port, hybrid, b"/health")
        assert group == "X25519MLKEM768" and response.startswith(b"HTTP/1.1 200 ")
    finally:
        status = server.proc.stop()
    assert status == 0
    assert "Traceback" not in server.proc.output()


def test_sigterm_exits_zero(certs: Certs, upstream_port: int) -> None:
    server = start_serve(certs, upstream_port)
    server.proc.popen.send_signal(signal.SIGTERM)
    assert server.proc.popen.wait(WAIT) == 0
    server.proc.stop()
    assert "Traceback" not in server.proc.output()


def test_unknown_group_exits_2_naming_it(certs: Certs) -> None:
    result = pqproxy_run(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--cert",
        str(certs.cert),
        "--key",
        str(certs.key),
        "--upstream",
        "http://127.0.0.1:9",
        "--groups",
        "x25519mlkem768,NotAGroup",
    )
    assert result.returncode == 2
    assert "'NotAGroup'" in result.stderr
    assert "X25519MLKEM768" in result.stderr and "secp384r1" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_cert_is_one_line(certs: Certs, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    result = pqproxy_run(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--cert",
        str(missing),
        "--key",
        str(certs.key),
        "--upstream",
        "http://127.0.0.1:9",
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(missing) in lines[0]
    assert "Traceback" not in result.stderr
