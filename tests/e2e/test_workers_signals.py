"""Workers and signals of ``pqproxy serve --config FILE``, as real processes: SO_REUSEPORT
workers sharing a port, a worker restarted after a crash, SIGHUP swapping the certificate under
a running SSE stream (or refusing a bad configuration), SIGTERM draining a running stream."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqproxy.demo_upstream import DEFAULT_TOKENS
from tests.e2e.processes import (
    WAIT,
    Certs,
    Serve,
    SseStream,
    chunk_text,
    gen_cert,
    get_json,
    install_certs,
    start_demo_upstream,
    start_serve,
    tls_context,
    write_config,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# The slow upstream streams STREAM_TOKENS tokens STREAM_INTERVAL apart: a stream lasts about
# 3 s, long enough to reload or drain in its middle.
STREAM_TOKENS = 15
STREAM_INTERVAL = 0.2
WORKER_STARTED_RE = r"supervisor: worker (\d+) started, pid=(\d+)"
HANDSHAKE_PID_RE = r"pid=(\d+) pqproxy\.io\.tls_server handshake ok "


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    proc, port = start_demo_upstream("--token-interval", str(STREAM_INTERVAL))
    try:
        yield port
    finally:
        status = proc.stop()
    assert status == 0, proc.output()
    assert "Traceback" not in proc.output()


@pytest.fixture(scope="module")
def ca_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Certs, Certs]:
    """Two chains from two different CAs."""
    return (
        gen_cert(tmp_path_factory.mktemp("first-ca")),
        gen_cert(tmp_path_factory.mktemp("second-ca")),
    )


@pytest.fixture
def served_certs(tmp_path: Path, ca_dirs: tuple[Certs, Certs]) -> Certs:
    """The first chain, copied where the config points, so a test may replace the files."""
    first, _ = ca_dirs
    target = Certs(ca=first.ca, cert=tmp_path / "server.pem", key=tmp_path / "server.key")
    install_certs(first, target)
    return target


def worker_pids(serve: Serve, count: int) -> set[int]:
    started = serve.proc.wait_for_lines(WORKER_STARTED_RE, count)
    return {int(m.group(2)) for m in started}


@contextlib.contextmanager
def serving(config: Path) -> Iterator[Serve]:
    """``pqproxy serve --config``; killed at the end if a failed test left it running."""
    serve = start_serve("--config", str(config))
    try:
        yield serve
    finally:
        serve.proc.stop()


def assert_clean_exit(serve: Serve, timeout: float = WAIT) -> None:
    """The process exits 0 on its own within ``timeout``."""
    assert serve.proc.wait(timeout) == 0, serve.proc.output()
    assert "Traceback" not in serve.proc.output()


def stop(serve: Serve) -> None:
    serve.proc.signal(signal.SIGTERM)
    assert_clean_exit(serve)


def test_two_workers_share_the_port(
    tmp_path: Path, served_certs: Certs, upstream_port: int
) -> None:
    config = write_config(
        tmp_path / "pqproxy.yaml", certs=served_certs, upstream_port=upstream_port, workers=2
    )
    with serving(config) as serve:
        assert serve.proc.wait_for_line(r"pqproxy listening on ").string.endswith(", workers: 2)")
        workers = worker_pids(serve, 2)
        assert serve.proc.popen.pid not in workers and len(workers) == 2
        # Each a new TCP connection and handshake: the kernel spreads them over the workers.
        connections = 30
        for _ in range(connections):
            assert get_json(serve.port, served_certs.ca, "/health") == (200, {"status": "ok"})
        handshakes = serve.proc.wait_for_lines(HANDSHAKE_PID_RE, connections, WAIT)
        pids = {int(m.group(1)) for m in handshakes}
        assert pids == workers, f"handshakes only in {pids} of {workers}"
        stop(serve)
        serve.proc.wait_for_line(r"supervisor: all workers exited")


def test_a_dead_worker_is_restarted(
    tmp_path: Path, served_certs: Certs, upstream_port: int
) -> None:
    config = write_config(
        tmp_path / "pqproxy.yaml", certs=served_certs, upstream_port=upstream_port, workers=2
    )
    with serving(config) as serve:
        before = worker_pids(serve, 2)
        victim = min(before)
        mark = serve.proc.mark()
        os.kill(victim, signal.SIGKILL)
        died = serve.proc.wait_for_line(
            rf"supervisor: worker (\d+) \(pid={victim}\) killed by SIGKILL unexpectedly",
            WAIT,
            after=mark,
        )
        # Restarted, and reported ready through its pipe.
        ready = serve.proc.wait_for_line(
            rf"supervisor: worker {died.group(1)} ready, pid=(\d+)", WAIT, after=mark
        )
        replacement = int(ready.group(1))
        assert replacement not in before
        # Every new connection is served: the dead worker's socket left the group.
        for _ in range(10):
            assert get_json(serve.port, served_certs.ca, "/health")[0] == 200
        handshakes = serve.proc.wait_for_lines(HANDSHAKE_PID_RE, 10, WAIT, after=mark)
        assert {int(m.group(1)) for m in handshakes} <= (before - {victim}) | {replacement}
        stop(serve)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_swaps_the_certificate_under_a_running_stream(
    tmp_path: Path,
    served_certs: Certs,
    ca_dirs: tuple[Certs, Certs],
    upstream_port: int,
    workers: int,
) -> None:
    _, second = ca_dirs
    config = write_config(
        tmp_path / "pqproxy.yaml", certs=served_certs, upstream_port=upstream_port, workers=workers
    )
    with serving(config) as serve:
        stream = SseStream(serve.port, served_certs.ca, max_tokens=STREAM_TOKENS)
        try:
            events = stream.events()
            first = [next(events) for _ in range(3)]
            # A new pair from a different CA where the config points, then SIGHUP.
            install_certs(second, served_certs)
            mark = serve.proc.mark()
            serve.proc.signal(signal.SIGHUP)
            serve.proc.wait_for_lines(
                rf"reloaded configuration from {re.escape(str(config))}$", workers, WAIT, after=mark
            )
            # New connections present the new certificate: trusting only the new CA works...
            assert get_json(serve.port, second.ca, "/health") == (200, {"status": "ok"})
            # ...and trusting only the old one does not.
            with pytest.raises(ssl.SSLCertVerificationError):
                get_json(serve.port, served_certs.ca, "/health")
            # The stream begun before the reload runs to its end.
            rest = list(events)
        finally:
            stream.close()
        all_events = first + rest
        assert all_events[-1] == b"[DONE]"
        assert len(chunk_text(all_events)) == STREAM_TOKENS
        assert "reload refused" not in serve.proc.output()
        stop(serve)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_refuses_a_bad_configuration(
    tmp_path: Path,
    served_certs: Certs,
    upstream_port: int,
    workers: int,
) -> None:
    config = write_config(
        tmp_path / "pqproxy.yaml", certs=served_certs, upstream_port=upstream_port, workers=workers
    )
    good = config.read_text(encoding="utf-8")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    bad_versions = [
        # Invalid as a configuration: both problems named on one line.
        (
            good.replace("health_check: null", "health_check: null\n    retries: -1").replace(
                "groups: [", "groups: [NotAGroup, "
            ),
            r"reload refused: .*pqproxy\.yaml: 2 problems: "
            r"(?=.*listeners\[0\]\.tls\.groups\[0\]: unknown group 'NotAGroup')"
            r"(?=.*upstreams\.model\.retries: -1 is too small)",
        ),
        # Valid, but its certificate does not load.
        (
            good.replace(str(served_certs.cert), str(garbage)),
            rf"reload refused: listener main: certificate file {re.escape(str(garbage))}",
        ),
        # Valid, but a bound socket cannot move.
        (
            good.replace('listen: "127.0.0.1:0"', 'listen: "127.0.0.2:0"'),
            r"reload refused: listener main: listen address changed from 127\.0\.0\.1:0 to "
            r"127\.0\.0\.2:0; .*needs a restart",
        ),
    ]
    with serving(config) as serve:
        stream = SseStream(serve.port, served_certs.ca, max_tokens=STREAM_TOKENS)
        try:
            events = stream.events()
            first = [next(events) for _ in range(2)]
            for text, refusal in bad_versions:
                config.write_text(text, encoding="utf-8")
                mark = serve.proc.mark()
                serve.proc.signal(signal.SIGHUP)
                line = serve.proc.wait_for_line(refusal, WAIT, after=mark)
                assert " ERROR " in line.string
                # The old configuration keeps serving new connections.
                assert get_json(serve.port, served_certs.ca, "/health")[0] == 200
            rest = list(events)
        finally:
            stream.close()
        assert len(chunk_text(first + rest)) == STREAM_TOKENS
        assert "reloaded configuration" not in serve.proc.output()
        # With workers, the supervisor checks first: one refusal per SIGHUP, not one per worker.
        assert len(re.findall("reload refused", serve.proc.output())) == len(bad_versions)
        stop(serve)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_a_running_stream(
    tmp_path: Path, served_certs: Certs, upstream_port: int, workers: int
) -> None:
    config = write_config(
        tmp_path / "pqproxy.yaml",
        certs=served_certs,
        upstream_port=upstream_port,
        workers=workers,
        drain_timeout="20s",
    )
    with serving(config) as serve:
        stream = SseStream(serve.port, served_certs.ca, max_tokens=STREAM_TOKENS)
        try:
            events = stream.events()
            first = [next(events) for _ in range(3)]
            mark = serve.proc.mark()
            serve.proc.signal(signal.SIGTERM)
            draining = serve.proc.wait_for_lines(
                r"received SIGTERM: draining (\d+) connections \(deadline 20s\)",
                workers,
                WAIT,
                after=mark,
            )
            # The worker holding the stream has it to drain; any other has nothing.
            assert sorted(int(m.group(1)) for m in draining) == [0] * (workers - 1) + [1]
            # No new connections once every worker drains: the listening sockets are closed.
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", serve.port), timeout=WAIT).close()
            rest = list(events)
        finally:
            stream.close()
        all_events = first + rest
        assert all_events[-1] == b"[DONE]"
        assert len(chunk_text(all_events)) == STREAM_TOKENS
        # Exits by itself once the stream is over, long before the drain deadline.
        assert_clean_exit(serve)


def completion_words(conn: http.client.HTTPSConnection) -> int:
    """Words in a text completion without max_tokens: the upstream's own --tokens (the module's
    upstream runs with the default, DEFAULT_TOKENS)."""
    conn.request(
        "POST", "/v1/completions", json.dumps({"prompt": "hi"}), {"Connection": "keep-alive"}
    )
    response = conn.getresponse()
    assert response.status == 200
    return len(json.loads(response.read())["choices"][0]["text"].split())


def test_sighup_moves_new_connections_to_a_new_upstream(
    tmp_path: Path, served_certs: Certs, upstream_port: int
) -> None:
    other, other_port = start_demo_upstream("--tokens", "3")
    try:
        config = write_config(
            tmp_path / "pqproxy.yaml", certs=served_certs, upstream_port=upstream_port
        )
        with serving(config) as serve:
            before = http.client.HTTPSConnection(
                "127.0.0.1", serve.port, context=tls_context(served_certs.ca), timeout=WAIT
            )
            try:
                assert completion_words(before) == DEFAULT_TOKENS
                write_config(config, certs=served_certs, upstream_port=other_port)
                mark = serve.proc.mark()
                serve.proc.signal(signal.SIGHUP)
                serve.proc.wait_for_line(r"reloaded configuration from ", WAIT, after=mark)
                # A new connection relays to the new pool...
                after = http.client.HTTPSConnection(
                    "127.0.0.1", serve.port, context=tls_context(served_certs.ca), timeout=WAIT
                )
                try:
                    assert completion_words(after) == 3
                finally:
                    after.close()
                # ...and so does the next request on a keep-alive connection from before
                # the reload: it is not dropped, and its requests follow the new config
                # (the old pool is closed once in-flight requests on it are done).
                assert completion_words(before) == 3
            finally:
                before.close()
            stop(serve)
    finally:
        assert other.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_second_sigterm_closes_at_once(
    tmp_path: Path, served_certs: Certs, upstream_port: int, workers: int
) -> None:
    config = write_config(
        tmp_path / "pqproxy.yaml",
        certs=served_certs,
        upstream_port=upstream_port,
        workers=workers,
        drain_timeout="60s",
    )
    with serving(config) as serve:
        stream = SseStream(serve.port, served_certs.ca, max_tokens=STREAM_TOKENS)
        try:
            events = stream.events()
            first = [next(events) for _ in range(2)]
            mark = serve.proc.mark()
            serve.proc.signal(signal.SIGTERM)
            serve.proc.wait_for_lines(r"received SIGTERM: draining", workers, WAIT, after=mark)
            serve.proc.signal(signal.SIGTERM)
            serve.proc.wait_for_line(
                r"received SIGTERM again: closing 1 connections now", WAIT, after=mark
            )
            # The stream is cut, long before its end and the 60 s deadline: the body ends
            # early (http.client reports the cut chunked body as an early EOF or an error).
            rest: list[bytes] = []
            with contextlib.suppress(http.client.HTTPException, OSError):
                while line := stream.response.readline():
                    rest.append(line)
        finally:
            stream.close()
        assert not any(b"[DONE]" in line for line in rest)
        assert len([line for line in rest if line.startswith(b"data: ")]) < STREAM_TOKENS - 2
        assert len(first) == 2
        assert_clean_exit(serve)
        assert "drain failed" not in serve.proc.output()
