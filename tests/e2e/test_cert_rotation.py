"""Certificate rotation without a restart or a signal: a real ``pqproxy serve --config``
whose certificate files live in a directory laid out and updated as the kubelet does a
Kubernetes Secret volume (``tests/secret_volume.py``), the demo upstream streaming slowly,
stdlib ``ssl`` clients that trust one CA at a time.

PENDING until the lead's integration lands: ``Config.cert_watch`` (pqproxy/config.py) and
the watch started by ``run_worker`` (pqproxy/io/supervisor.py). Until then every test here is
skipped with a reason that starts with PENDING; once ``Config`` has the field they run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqproxy.config import Config
from tests.e2e.processes import (
    WAIT,
    Certs,
    Serve,
    SseStream,
    chunk_text,
    gen_cert,
    get_json,
    start_demo_upstream,
    start_serve,
)
from tests.secret_volume import SecretVolume

PENDING = "cert_watch" not in {f.name for f in dataclasses.fields(Config)}

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        PENDING,
        reason="PENDING: Config.cert_watch and its watch in run_worker (lead's integration)",
    ),
]

# The upstream streams STREAM_TOKENS tokens STREAM_INTERVAL apart: about 3 s, far longer
# than a rotation takes to be seen at POLL_INTERVAL.
STREAM_TOKENS = 15
STREAM_INTERVAL = 0.2
POLL_INTERVAL = "100ms"
RELOADED = "certificate reloaded from {path} (listener main, "
REFUSED_MISMATCH = (
    r"certificate reload refused: listener main: key file \S+: key does not match the "
    r"certificate in \S+; the previous certificate keeps serving"
)
REFUSED_ANY = r"certificate reload refused: listener main: "


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
def chains(tmp_path_factory: pytest.TempPathFactory) -> tuple[Certs, Certs, Certs]:
    """Three chains from three different CAs."""
    return (
        gen_cert(tmp_path_factory.mktemp("rotation-first")),
        gen_cert(tmp_path_factory.mktemp("rotation-second")),
        gen_cert(tmp_path_factory.mktemp("rotation-third")),
    )


@pytest.fixture
def volume(tmp_path: Path, chains: tuple[Certs, Certs, Certs]) -> SecretVolume:
    """The Secret volume the config points at, holding the first chain."""
    vol = SecretVolume(tmp_path / "certs")
    vol.update_from(chains[0].cert, chains[0].key)
    return vol


def write_config(path: Path, volume: SecretVolume, upstream_port: int, workers: int) -> Path:
    path.write_text(
        f"""\
workers: {workers}
admin: null
logging: {{level: info, access_log: false, format: text}}
drain_timeout: 20s
cert_watch: {{interval: {POLL_INTERVAL}}}
listeners:
  - name: main
    listen: "127.0.0.1:0"
    upstream: model
    tls:
      certificates:
        - cert: {volume.path("tls.crt")}
          key: {volume.path("tls.key")}
upstreams:
  model:
    servers: [http://127.0.0.1:{upstream_port}]
    health_check: null
""",
        encoding="utf-8",
    )
    return path


@contextlib.contextmanager
def serving(config: Path) -> Iterator[Serve]:
    """``pqproxy serve --config``; killed at the end if a failed test left it running."""
    serve = start_serve("--config", str(config))
    try:
        yield serve
    finally:
        serve.proc.stop()


def stop(serve: Serve) -> None:
    serve.proc.signal(signal.SIGTERM)
    assert serve.proc.wait(WAIT) == 0, serve.proc.output()
    assert "Traceback" not in serve.proc.output()


def served_by(serve: Serve, ca: Path) -> bool:
    """Whether a new connection's certificate verifies against ``ca`` alone."""
    try:
        status, body = get_json(serve.port, ca, "/health")
    except ssl.SSLCertVerificationError:
        return False
    assert (status, body) == (200, {"status": "ok"})
    return True


def wait_reloaded(serve: Serve, volume: SecretVolume, workers: int, mark: int) -> None:
    # Every worker watches and swaps by itself: one line from each.
    pattern = r"pid=(\d+) .*" + re.escape(RELOADED.format(path=volume.path("tls.crt")))
    found = serve.proc.wait_for_lines(pattern, workers, WAIT, after=mark)
    assert len({match.group(1) for match in found}) == workers


def lines_after(serve: Serve, mark: int, pattern: str) -> list[str]:
    return [line for line in serve.proc.lines[mark:] if re.search(pattern, line)]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_rotated_secret_is_served_while_a_stream_runs(
    tmp_path: Path,
    volume: SecretVolume,
    chains: tuple[Certs, Certs, Certs],
    upstream_port: int,
    workers: int,
) -> None:
    first, second, _ = chains
    config = write_config(tmp_path / "pqproxy.yaml", volume, upstream_port, workers)
    with serving(config) as serve:
        assert served_by(serve, first.ca)
        stream = SseStream(serve.port, first.ca, max_tokens=STREAM_TOKENS)
        try:
            events = stream.events()
            before = [next(events) for _ in range(3)]
            mark = serve.proc.mark()
            # The Secret is updated: no signal, no restart.
            volume.update_from(second.cert, second.key)
            wait_reloaded(serve, volume, workers, mark)
            # The next handshake presents the new certificate: trusting only the new CA
            # works, trusting only the old one no longer does.
            assert served_by(serve, second.ca)
            assert not served_by(serve, first.ca)
            # The stream opened before the swap runs to its end on its connection.
            after = list(events)
        finally:
            stream.close()
        assert after, "the stream had ended before the rotation"
        assert after[-1] == b"[DONE]"
        assert len(chunk_text(before + after)) == STREAM_TOKENS
        output = serve.proc.output()
        assert "certificate reload refused" not in output
        assert "reloaded configuration" not in output  # no SIGHUP was involved
        stop(serve)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_broken_pair_is_refused_and_the_old_one_keeps_serving(
    tmp_path: Path,
    volume: SecretVolume,
    chains: tuple[Certs, Certs, Certs],
    upstream_port: int,
    workers: int,
) -> None:
    first, second, _ = chains
    config = write_config(tmp_path / "pqproxy.yaml", volume, upstream_port, workers)
    with serving(config) as serve:
        # A certificate with a key that is not its own.
        mark = serve.proc.mark()
        volume.update({"tls.crt": second.cert.read_bytes(), "tls.key": first.key.read_bytes()})
        serve.proc.wait_for_lines(REFUSED_MISMATCH, workers, WAIT, after=mark)
        assert served_by(serve, first.ca)
        assert not served_by(serve, second.ca)

        # A half-written certificate beside the right key.
        half = second.cert.read_bytes()[: second.cert.stat().st_size // 2]
        mark_half = serve.proc.mark()
        volume.update({"tls.crt": half, "tls.key": second.key.read_bytes()})
        serve.proc.wait_for_lines(
            REFUSED_ANY + r"certificate file \S+: malformed PEM", workers, WAIT, after=mark_half
        )
        assert served_by(serve, first.ca)

        # The next good version is taken.
        mark_good = serve.proc.mark()
        volume.update_from(second.cert, second.key)
        wait_reloaded(serve, volume, workers, mark_good)
        assert served_by(serve, second.ca)
        assert not served_by(serve, first.ca)

        # One refusal per worker and broken version, though many polls saw each: the same
        # broken files are not retried, only the next change is.
        assert len(lines_after(serve, mark, REFUSED_ANY)) == 2 * workers
        # Nothing was swapped in before the good version.
        reloaded = r"certificate reloaded from"
        assert len(lines_after(serve, mark, reloaded)) == workers
        assert len(lines_after(serve, mark_good, reloaded)) == workers
        stop(serve)


def test_rotation_keeps_working_after_a_sighup_reload(
    tmp_path: Path,
    volume: SecretVolume,
    chains: tuple[Certs, Certs, Certs],
    upstream_port: int,
) -> None:
    """SIGHUP replaces the watch with one for the new configuration; rotation goes on."""
    first, second, third = chains
    config = write_config(tmp_path / "pqproxy.yaml", volume, upstream_port, workers=1)
    with serving(config) as serve:
        mark = serve.proc.mark()
        volume.update_from(second.cert, second.key)
        wait_reloaded(serve, volume, 1, mark)
        assert served_by(serve, second.ca)

        mark = serve.proc.mark()
        serve.proc.signal(signal.SIGHUP)
        serve.proc.wait_for_line(
            rf"reloaded configuration from {re.escape(str(config))}$", WAIT, after=mark
        )
        assert served_by(serve, second.ca)

        mark = serve.proc.mark()
        volume.update_from(third.cert, third.key)
        wait_reloaded(serve, volume, 1, mark)
        assert served_by(serve, third.ca)
        assert not served_by(serve, second.ca)
        assert not served_by(serve, first.ca)
        assert "refused" not in serve.proc.output()
        stop(serve)
