"""``pqproxy serve --config FILE`` and ``pqproxy check-config`` as real processes: a config file
in a temporary directory, gen-cert'd certificates, the demo upstream, stdlib ``ssl`` clients."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.processes import (
    Certs,
    SseStream,
    chunk_text,
    gen_cert,
    get_json,
    pqproxy_run,
    start_demo_upstream,
    start_serve,
    write_config,
)

pytestmark = pytest.mark.e2e

TOKENS = 4


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return gen_cert(tmp_path_factory.mktemp("serve-config-certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A second chain from a different CA."""
    return gen_cert(tmp_path_factory.mktemp("serve-config-other-certs"))


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    proc, port = start_demo_upstream("--tokens", str(TOKENS), "--token-interval", "0")
    try:
        yield port
    finally:
        status = proc.stop()
    assert status == 0, proc.output()
    assert "Traceback" not in proc.output()


def test_check_config_ok(tmp_path: Path, certs: Certs, upstream_port: int) -> None:
    path = write_config(tmp_path / "pqproxy.yaml", certs=certs, upstream_port=upstream_port)
    result = pqproxy_run("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: 1 listener, 1 upstream pool, 1 worker")
    assert f"upstream model: http://127.0.0.1:{upstream_port}" in result.stdout


BAD_CONFIG = """\
workers: 0
listeners:
  - name: main
    listen: "127.0.0.1:99999"
    upstream: nowhere
    tls:
      certificates:
        - {cert: missing.pem, key: missing.key}
      groups: [X25519MLKEM768, NotAGroup]
      pq_polcy: require
upstreams:
  model:
    servers: [http://127.0.0.1:1]
"""
# One fragment per problem in BAD_CONFIG, each naming its path.
BAD_CONFIG_PROBLEMS = (
    "workers: 0 is too small",
    "listeners[0].listen: '127.0.0.1:99999': port must be",
    "listeners[0].upstream: no upstream pool named 'nowhere'",
    "listeners[0].tls.certificates[0].cert: no such file",
    "listeners[0].tls.certificates[0].key: no such file",
    "listeners[0].tls.groups[1]: unknown group 'NotAGroup'",
    "listeners[0].tls.pq_polcy: unknown key (did you mean 'pq_policy'?)",
)


def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG, encoding="utf-8")
    result = pqproxy_run("check-config", str(path))
    assert result.returncode == 2
    assert f"invalid configuration ({len(BAD_CONFIG_PROBLEMS)} problems)" in result.stderr
    for problem in BAD_CONFIG_PROBLEMS:
        assert problem in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_bad_config_exits_2_listing_the_problems(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG, encoding="utf-8")
    result = pqproxy_run("serve", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == (
        f"pqproxy serve: error: invalid configuration {path} ({len(BAD_CONFIG_PROBLEMS)} problems):"
    )
    assert len(lines) == 1 + len(BAD_CONFIG_PROBLEMS)
    for problem in BAD_CONFIG_PROBLEMS:
        assert any(problem in line for line in lines[1:]), problem
    assert "Traceback" not in result.stderr


def test_serve_yaml_syntax_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("listeners:\n  - listen: [::1]:8443\n", encoding="utf-8")
    result = pqproxy_run("serve", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"pqproxy serve: error: {path}:2:")
    assert 'quote an IPv6 address: "[::1]:8443"' in lines[0]


def test_serve_from_config_relays_http(tmp_path: Path, certs: Certs, upstream_port: int) -> None:
    path = write_config(tmp_path / "pqproxy.yaml", certs=certs, upstream_port=upstream_port)
    serve = start_serve("--config", str(path))
    try:
        listening = serve.proc.wait_for_line(r"pqproxy listening on ")
        assert listening.string.endswith(
            "(groups: X25519MLKEM768,x25519,secp256r1, policy: prefer, mode: http)"
        )
        status, models = get_json(serve.port, certs.ca, "/v1/models")
        assert status == 200
        assert isinstance(models, dict) and models["data"][0]["id"] == "pqproxy-demo"
        stream = SseStream(serve.port, certs.ca, max_tokens=3)
        try:
            events = list(stream.events())
        finally:
            stream.close()
        assert events[-1] == b"[DONE]" and len(chunk_text(events)) == 3
        # The access log of the HTTP mode, with the pid of the one process.
        access = serve.proc.wait_for_line(r"pid=(\d+) pqproxy\.access .*POST /v1/chat/completions")
        assert int(access.group(1)) == serve.proc.popen.pid
    finally:
        status = serve.proc.stop()
    assert status == 0
    assert "Traceback" not in serve.proc.output()


def test_json_log_format(tmp_path: Path, certs: Certs, upstream_port: int) -> None:
    path = write_config(
        tmp_path / "pqproxy.yaml", certs=certs, upstream_port=upstream_port, log_format="json"
    )
    serve = start_serve("--config", str(path))
    try:
        assert get_json(serve.port, certs.ca, "/health")[0] == 200
        serve.proc.wait_for_line(r"handshake ok peer=127\.0\.0\.1:")
    finally:
        status = serve.proc.stop()
    assert status == 0
    logged = [line for line in serve.proc.lines if not line.startswith("pqproxy listening on ")]
    entries = [json.loads(line) for line in logged]
    assert {e["pid"] for e in entries} == {serve.proc.popen.pid}
    assert any(e["message"].startswith("handshake ok ") for e in entries)
    fixed = {"time", "level", "pid", "logger", "message"}
    assert all(fixed <= set(e) for e in entries)
    # Structured fields only where a line has them: the access log and connection ends.
    assert {e["logger"] for e in entries if set(e) != fixed} == {
        "pqproxy.access",
        "pqproxy.io.tls_server",
    }
    (access,) = [e for e in entries if e["logger"] == "pqproxy.access"]
    assert (access["method"], access["path"], access["status"]) == ("GET", "/health", 200)


def test_flags_override_the_file(
    tmp_path: Path, certs: Certs, other_certs: Certs, upstream_port: int
) -> None:
    # The file names a dead upstream, a taken port and the first chain; the flags replace all
    # three, so relaying works only if every override took effect.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        path = write_config(
            tmp_path / "pqproxy.yaml",
            certs=certs,
            upstream_port=1,
            listen=f"127.0.0.1:{taken_port}",
        )
        serve = start_serve(
            "--config",
            str(path),
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"http://127.0.0.1:{upstream_port}",
            "--cert",
            str(other_certs.cert),
            "--key",
            str(other_certs.key),
            "--log-level",
            "warning",
        )
    try:
        assert serve.port != taken_port
        assert get_json(serve.port, other_certs.ca, "/health") == (200, {"status": "ok"})
        with pytest.raises(ssl.SSLCertVerificationError):
            get_json(serve.port, certs.ca, "/health")
    finally:
        status = serve.proc.stop()
    assert status == 0
    # --log-level warning over the file's info: no handshake lines.
    assert not any("handshake ok" in line for line in serve.proc.lines)


def test_flag_that_belongs_in_the_file_is_refused(
    tmp_path: Path, certs: Certs, upstream_port: int
) -> None:
    path = write_config(tmp_path / "pqproxy.yaml", certs=certs, upstream_port=upstream_port)
    result = pqproxy_run("serve", "--config", str(path), "--groups", "x25519", "--mode", "tcp")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "pqproxy serve: error: --groups, --mode: cannot be combined with --config; "
        "set them in the file"
    )


def test_bad_override_names_the_flag(tmp_path: Path, certs: Certs, upstream_port: int) -> None:
    path = write_config(tmp_path / "pqproxy.yaml", certs=certs, upstream_port=upstream_port)
    result = pqproxy_run("serve", "--config", str(path), "--upstream", "ftp://x", "--workers", "0")
    assert result.returncode == 2
    assert "--workers" in result.stderr
    result = pqproxy_run("serve", "--config", str(path), "--upstream", "ftp://x")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "pqproxy serve: error: --upstream: not an http:// URL: 'ftp://x'"
    )


def test_without_config_the_flags_are_required() -> None:
    result = pqproxy_run("serve", "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "pqproxy serve: error: without --config, --cert, --key, --upstream are required"
    )


def test_flags_only_tcp_mode(certs: Certs, upstream_port: int) -> None:
    serve = start_serve(
        "--listen",
        "127.0.0.1:0",
        "--cert",
        str(certs.cert),
        "--key",
        str(certs.key),
        "--upstream",
        f"http://127.0.0.1:{upstream_port}",
        "--mode",
        "tcp",
    )
    try:
        assert serve.proc.wait_for_line(r"pqproxy listening on ").string.endswith("mode: tcp)")
        # The raw relay passes HTTP through untouched.
        assert get_json(serve.port, certs.ca, "/health") == (200, {"status": "ok"})
    finally:
        assert serve.proc.stop() == 0
    assert not any("pqproxy.access" in line for line in serve.proc.lines)


def test_certificate_that_does_not_load_exits_1(tmp_path: Path, certs: Certs) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    path = write_config(
        tmp_path / "pqproxy.yaml",
        certs=Certs(ca=certs.ca, cert=garbage, key=certs.key),
        upstream_port=1,
    )
    result = pqproxy_run("serve", "--config", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"pqproxy serve: error: listener main: certificate file {garbage}")


@pytest.mark.parametrize("workers", [1, 2])
def test_port_in_use_exits_1(tmp_path: Path, certs: Certs, workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(
            tmp_path / "pqproxy.yaml",
            certs=certs,
            upstream_port=1,
            listen=f"127.0.0.1:{port}",
            workers=workers,
        )
        result = pqproxy_run("serve", "--config", str(path))
    assert result.returncode == 1
    assert f"pqproxy serve: error: cannot listen on 127.0.0.1:{port}: " in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = pqproxy_run("serve", "--config", str(missing))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"pqproxy serve: error: {missing}: cannot read: No such file or directory"
    )
