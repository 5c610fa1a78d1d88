"""Mutual TLS and session resumption through a real ``pqproxy serve --config`` process.

The server holds an ML-DSA-65 certificate (``pqproxy gen-cert --key-type mldsa65``) and
requires client certificates from an ML-DSA-65 client CA, with an allow list of one SPIFFE
ID. In front of it: pyOpenSSL clients (cryptography's OpenSSL 4.0) on real sockets; behind
it: an upstream that records every connection and request head (tests/mtls_peers.py), so
each refusal is checked where it matters, at the upstream, which must receive nothing.
Metrics are scraped from the admin endpoint; which worker served a handshake, and whether
it resumed, is read from the server's own log line (``pid=... handshake ok ... resumed=``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import mldsa
from OpenSSL import SSL
from prometheus_client.parser import text_string_to_metric_families

from tests.certs_factory import SPIFFE_CLIENT, Issued, bundle_pem, make_ca, make_client
from tests.e2e.processes import WAIT, Serve, pqproxy_run, start_serve
from tests.mtls_peers import Exchange, RecordingUpstream, exchange, request_bytes, tls_context

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

INTRUDER = "spiffe://example.org/ns/default/sa/intruder"
ADMIN_RE = r"pqproxy admin on http://127\.0\.0\.1:(\d+) "
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass(frozen=True)
class Pki:
    server_ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    good: Issued
    intruder: Issued
    unknown_ca: Issued
    expired: Issued
    directory: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    result = pqproxy_run("gen-cert", "--out", str(out / "server"), "--key-type", "mldsa65")
    assert result.returncode == 0, result.stderr
    client_ca = make_ca("mldsa65", common_name="client CA")
    (out / "client-ca.pem").write_bytes(bundle_pem(client_ca))
    return Pki(
        server_ca=out / "server" / "ca.pem",
        server_cert=out / "server" / "server.pem",
        server_key=out / "server" / "server.key",
        client_ca=out / "client-ca.pem",
        good=make_client(
            client_ca, "mldsa65", common_name="inference-client", uris=(SPIFFE_CLIENT,)
        ),
        intruder=make_client(client_ca, "mldsa65", common_name="intruder", uris=(INTRUDER,)),
        unknown_ca=make_client(client_ca, "mldsa65", unknown_ca=True, uris=(SPIFFE_CLIENT,)),
        expired=make_client(client_ca, "mldsa65", expired=True, uris=(SPIFFE_CLIENT,)),
        directory=out,
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    recorder = RecordingUpstream()
    yield recorder
    recorder.close()


def write_config(
    path: Path,
    pki: Pki,
    upstream_port: int,
    *,
    workers: int = 1,
    admin: str = "127.0.0.1:0",
    key_file: Path | None = None,
) -> Path:
    path.write_text(
        f"""\
workers: {workers}
admin: {json.dumps(admin) if admin else "null"}
logging: {{level: info, access_log: true, format: text}}
drain_timeout: 5s
tickets:
  per_handshake: 2
  lifetime: 1h
  rotation: 1h
  key_file: {json.dumps(str(key_file)) if key_file else "null"}
listeners:
  - name: main
    listen: "127.0.0.1:0"
    upstream: model
    tls:
      certificates:
        - {{cert: {pki.server_cert}, key: {pki.server_key}}}
      groups: [X25519MLKEM768, x25519]
      client_auth:
        mode: require
        ca: {pki.client_ca}
        allow: ["{SPIFFE_CLIENT}"]
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
    serve = start_serve("--config", str(config))
    try:
        yield serve
    finally:
        status = serve.proc.stop()
        assert "Traceback" not in serve.proc.output()
        assert status == 0, serve.proc.output()


@pytest.fixture(scope="module")
def proxy(
    pki: Pki, upstream: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Serve]:
    config = write_config(tmp_path_factory.mktemp("serve") / "pqproxy.yaml", pki, upstream.port)
    with serving(config) as serve:
        yield serve


def scrape(serve: Serve) -> Samples:
    port = int(serve.proc.wait_for_line(ADMIN_RE).group(1))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        body = response.read().decode("utf-8")
    finally:
        conn.close()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(value for (n, got), value in samples.items() if n == name and wanted <= got)


def handshake_line(serve: Serve, done: Exchange) -> re.Match[str]:
    """The server's log line for this client connection (found by its source port)."""
    return serve.proc.wait_for_line(
        r"pid=(\d+) pqproxy\.io\.tls_server handshake ok "
        rf"peer=127\.0\.0\.1:{done.local_port} .* sig=(\S+) .* resumed=(yes|no) client=(\S+) ",
        WAIT,
    )


def context(pki: Pki, tmp_path: Path, client: Issued | None) -> SSL.Context:
    return tls_context(pki.server_ca, tmp_path, client)


# --- mutual TLS ---------------------------------------------------------------------------------


def test_mldsa_client_is_admitted_and_its_identity_reaches_the_upstream(
    proxy: Serve, pki: Pki, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    done = exchange(proxy.port, context(pki, tmp_path, pki.good))
    assert done.error is None and done.status == 200, done
    assert done.group == "X25519MLKEM768"
    assert isinstance(done.peer_key, mldsa.MLDSA65PublicKey)
    seen = upstream.last()
    assert seen.value("X-Client-URI") == SPIFFE_CLIENT
    assert seen.value("X-Client-Subject") == pki.good.subject
    assert seen.value("X-Client-Subject") == "CN=inference-client,O=pqproxy tests"
    assert seen.value("X-Client-DNS") is None  # the certificate has no DNS SAN
    assert seen.value("X-PQ-TLS-Signature") == "mldsa65"
    assert seen.value("X-PQ-TLS-Resumed") == "0"
    line = handshake_line(proxy, done)
    assert (line.group(2), line.group(3), line.group(4)) == ("mldsa65", "no", SPIFFE_CLIENT)


def test_identity_headers_from_the_client_are_replaced(
    proxy: Serve, pki: Pki, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    forged = request_bytes(
        "/v1/models",
        (
            "X-Client-URI: spiffe://forged",
            "x-client-subject: CN=admin",
            "X-Client-DNS: admin.internal",
            "X-PQ-TLS-Signature: forged",
        ),
    )
    done = exchange(proxy.port, context(pki, tmp_path, pki.good), forged)
    assert done.status == 200, done
    seen = upstream.last()
    assert seen.values("X-Client-URI") == [SPIFFE_CLIENT]
    assert seen.values("X-Client-Subject") == [pki.good.subject]
    assert seen.values("X-Client-DNS") == []
    assert seen.values("X-PQ-TLS-Signature") == ["mldsa65"]


@pytest.mark.parametrize(
    ("client", "alert", "client_sees"),
    [
        (None, "certificate_required", "certificate required"),
        ("unknown_ca", "unknown_ca", "unknown ca"),
        ("expired", "certificate_expired", "certificate expired"),
    ],
    ids=["no-certificate", "unknown-ca", "expired"],
)
def test_refused_client_certificates_get_their_alert_and_reach_nothing(
    proxy: Serve,
    pki: Pki,
    upstream: RecordingUpstream,
    tmp_path: Path,
    client: str | None,
    alert: str,
    client_sees: str,
) -> None:
    issued = getattr(pki, client) if client is not None else None
    before, counts = scrape(proxy), upstream.counts()
    done = exchange(proxy.port, context(pki, tmp_path, issued))
    assert done.error is not None and client_sees in done.error, done
    assert done.response == b""
    # The reason is in the server's log, with the alert it sent.
    proxy.proc.wait_for_line(
        rf"connection end peer=127\.0\.0\.1:{done.local_port} kind=tls_alert "
        rf"alert={alert}\(sent\) reason=\S",
        WAIT,
    )
    after = scrape(proxy)
    failures = "pqproxy_tls_handshake_failures_total"
    assert total(after, failures, reason=alert) - total(before, failures, reason=alert) == 1
    assert upstream.counts() == counts


def test_client_not_on_the_allow_list_gets_403_and_reaches_nothing(
    proxy: Serve, pki: Pki, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    counts = upstream.counts()
    done = exchange(proxy.port, context(pki, tmp_path, pki.intruder))
    assert done.error is None
    assert done.status == 403, done
    body = json.loads(done.body)
    assert body["error"]["type"] == "forbidden" and body["error"]["status"] == 403
    assert INTRUDER not in done.body.decode()  # who was refused is for the log only
    proxy.proc.wait_for_line(
        rf"peer=127\.0\.0\.1:{done.local_port} refused: client not on the allow list "
        rf"\(subject=CN=intruder,O=pqproxy tests uris={re.escape(INTRUDER)}\)",
        WAIT,
    )
    assert upstream.counts() == counts


# --- resumption ---------------------------------------------------------------------------------


def test_ticket_resumes_with_the_hybrid_group_and_the_identity(
    proxy: Serve, pki: Pki, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    ctx = context(pki, tmp_path, pki.good)
    first = exchange(proxy.port, ctx)
    assert first.status == 200 and not first.reused and first.session is not None
    before = scrape(proxy)
    again = exchange(proxy.port, ctx, session=first.session)
    assert again.error is None and again.status == 200, again
    assert again.reused is True
    # psk_dhe_ke: a fresh X25519MLKEM768 exchange on the resumed session too.
    assert again.group == "X25519MLKEM768"
    seen = upstream.last()
    assert seen.value("X-PQ-TLS-Resumed") == "1"
    assert seen.value("X-PQ-TLS-Signature") == "psk"
    # The identity came with the ticket: no certificate was sent this time.
    assert seen.value("X-Client-URI") == SPIFFE_CLIENT
    line = handshake_line(proxy, again)
    assert (line.group(2), line.group(3), line.group(4)) == ("psk", "yes", SPIFFE_CLIENT)
    after = scrape(proxy)
    name = "pqproxy_tls_handshakes_total"
    labels = {"group": "X25519MLKEM768", "signature": "psk", "resumed": "true", "result": "ok"}
    assert total(after, name, **labels) - total(before, name, **labels) == 1
    assert total(after, name, resumed="false") == total(before, name, resumed="false")


def _pid_and_resumed(serve: Serve, done: Exchange) -> tuple[int, bool]:
    line = handshake_line(serve, done)
    return int(line.group(1)), line.group(3) == "yes"


# The kernel spreads connections over the workers by their 4-tuple (a new source port each
# time): about half land on each. Enough connections that all of them landing on one worker
# (2 * 2^-n) does not happen.
SPREAD = 24


def test_ticket_from_one_worker_resumes_on_the_other(
    pki: Pki, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    """OpenSSL offers a ticket once (RFC 8446 §C.4: clients should not reuse one), so every
    connection resumes with the ticket the previous one received, and the worker that issued
    the ticket in hand is the one that served the previous connection."""
    config = write_config(tmp_path / "pqproxy.yaml", pki, upstream.port, workers=2, admin="")
    ctx = context(pki, tmp_path, pki.good)
    with serving(config) as serve:
        done = exchange(serve.port, ctx)
        assert done.status == 200
        issuer, resumed = _pid_and_resumed(serve, done)
        assert not resumed
        crossed: tuple[int, int, Exchange] | None = None
        for _ in range(SPREAD):
            assert done.session is not None
            again = exchange(serve.port, ctx, session=done.session)
            pid, resumed = _pid_and_resumed(serve, again)
            assert resumed and again.reused and again.status == 200, again
            if pid != issuer:
                crossed = (issuer, pid, again)
                break
            done, issuer = again, pid
        assert crossed is not None, f"{SPREAD} connections all went to worker {issuer}"
        assert crossed[2].group == "X25519MLKEM768"
        workers = {crossed[0], crossed[1]}

        # SIGHUP keeps the generated ticket secret: tickets issued before the reload resume
        # after it, on every worker (each reloads by itself).
        held = [exchange(serve.port, ctx) for _ in range(SPREAD)]
        assert all(h.status == 200 and h.session is not None for h in held)
        mark = serve.proc.mark()
        serve.proc.signal(signal.SIGHUP)
        serve.proc.wait_for_lines(r"reloaded configuration from ", 2, WAIT, after=mark)
        resumed_on: set[int] = set()
        for ticket in held:
            again = exchange(serve.port, ctx, session=ticket.session)
            pid, resumed = _pid_and_resumed(serve, again)
            assert resumed and again.reused, again
            resumed_on.add(pid)
        assert resumed_on == workers


def test_a_shared_key_file_lets_another_host_resume(
    pki: Pki, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    """Two servers (two hosts, as far as tickets go) with one key_file: a ticket from the
    first resumes on the second; a third with its own generated secret does not."""
    key_file = tmp_path / "tickets.key"
    first_config = write_config(
        tmp_path / "a.yaml", pki, upstream.port, admin="", key_file=key_file
    )
    second_config = write_config(
        tmp_path / "b.yaml", pki, upstream.port, admin="", key_file=key_file
    )
    alone_config = write_config(tmp_path / "c.yaml", pki, upstream.port, admin="")
    ctx = context(pki, tmp_path, pki.good)
    with serving(first_config) as first:
        issued = [exchange(first.port, ctx) for _ in range(2)]
        assert all(i.status == 200 and i.session is not None for i in issued)
    # Created by the first server, readable by its owner only.
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(key_file.read_bytes()) == 32
    with serving(second_config) as second:
        again = exchange(second.port, ctx, session=issued[0].session)
        assert again.status == 200 and again.reused
        assert _pid_and_resumed(second, again)[1]
    with serving(alone_config) as alone:
        full = exchange(alone.port, ctx, session=issued[1].session)
        # A ticket that does not open is no error: a full handshake, with the certificate.
        assert full.status == 200 and not full.reused
        assert not _pid_and_resumed(alone, full)[1]
