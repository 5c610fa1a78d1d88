"""Issue 13, trust: headers the upstream believes, and requests it must never see twice.

- Item 1: a client header whose name contains ``_`` is dropped by default (nginx
  ``underscores_in_headers off``, Envoy ``headers_with_underscores_action``), refused with 400
  under ``underscore_headers: reject``, and passed under ``allow`` except when it normalises
  (``_`` -> ``-``, any case) to a header pqproxy owns. Every CGI/WSGI/ASGI gateway maps
  ``X_Client_Subject`` and ``X-Client-Subject`` to the same ``HTTP_X_CLIENT_SUBJECT``: the
  proof is a real wsgiref application behind a real pqproxy built from a config file, with
  and without a client certificate, reading its own WSGI environ.
- Item 2: ``forwarded_for: append | replace``.
- Item 3: a request is sent again on a fresh upstream connection only when its method is
  idempotent (RFC 9110 §9.2.2) and no byte of the response arrived (RFC 9112 §9.3.1).

The HTTP clients are real TLS clients (the stdlib's ``ssl``, pyOpenSSL for client
certificates); the upstreams record exactly what reached them.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import h11
import pytest
import pytest_asyncio

from pqproxy.config import ConfigError, parse_config
from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.provider import CertifiedKey
from pqproxy.devcert import DevCertPaths
from pqproxy.io.http_proxy import HttpSettings
from pqproxy.io.supervisor import build_runtime
from pqproxy.io.telemetry import Telemetry
from pqproxy.io.tls_server import ConnectionClosed, ListenerSettings, TLSListener
from pqproxy.io.upstream import PoolSettings, UpstreamPool
from pqproxy.metrics import ProxyMetrics
from pqproxy.relay.errors import HttpError
from pqproxy.relay.forwarding import (
    ClientTLSInfo,
    ForwardedFor,
    ForwardingOptions,
    UnderscoreHeaders,
    normalize_field_name,
    proxy_owned,
    upstream_request_headers,
)
from pqproxy.tls.server import ServerConfig
from tests.certs_factory import SPIFFE_CLIENT, Issued, bundle_pem, make_ca, make_client
from tests.inprocess import LoopThread
from tests.mtls_peers import exchange, tls_context
from tests.unit import test_http_proxy as base
from tests.unit.test_http_proxy import (
    WAIT,
    Connect,
    Exchange,
    UpstreamFactory,
    answer_who,
    assert_json_error,
    http_request,
    within,
)

# The in-process proxy suite's fixtures, used here by name: raw-recording upstreams, the
# stdlib TLS client, the loop's exception handler asserted empty.
certified = base.certified
client_ctx = base.client_ctx
connect = base.connect
loop_errors = base.loop_errors
make_upstream = base.make_upstream

PROVIDER = OpenSSLProvider()


# -- an in-process proxy with metrics ----------------------------------------------------------


@dataclass
class Proxy:
    listener: TLSListener
    pool: UpstreamPool
    metrics: ProxyMetrics
    closed: asyncio.Queue[ConnectionClosed]

    @property
    def port(self) -> int:
        return self.listener.port

    def count(self, name: str, **labels: str) -> float:
        found = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found


class ProxyFactory(Protocol):
    async def __call__(
        self, *ports: int, http: HttpSettings | None = None, **listener: Any
    ) -> Proxy: ...


@pytest_asyncio.fixture
async def start_proxy(
    certified: CertifiedKey,
    loop_errors: list[dict[str, Any]],
) -> AsyncIterator[ProxyFactory]:
    """A TLSListener (http mode unless told) before a pool of ``ports``, counting in its own
    ProxyMetrics; ``listener`` sets any other ListenerSettings field."""
    proxies: list[Proxy] = []

    async def make(*ports: int, http: HttpSettings | None = None, **listener: Any) -> Proxy:
        pool = UpstreamPool(
            PoolSettings(
                name="test",
                servers=tuple(("127.0.0.1", p) for p in ports),
                health_check=None,
                connect_timeout=WAIT / 2,
            )
        )
        metrics = ProxyMetrics()
        listener.setdefault("mode", "http")
        settings = ListenerSettings(
            host="127.0.0.1",
            port=0,
            server_config=ServerConfig(certificates=(certified,)),
            provider=PROVIDER,
            upstream_host="127.0.0.1",
            upstream_port=ports[0],
            http=http or HttpSettings(),
            pool=pool,
            telemetry=Telemetry(metrics),
            **listener,
        )
        closed: asyncio.Queue[ConnectionClosed] = asyncio.Queue()
        proxy = Proxy(TLSListener(settings, on_terminated=closed.put_nowait), pool, metrics, closed)
        await pool.start()
        await proxy.listener.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.listener.close(grace=WAIT)
        await proxy.pool.close()


# -- item 1: a real WSGI application behind pqproxy --------------------------------------------


class WsgiUpstream:
    """wsgiref's reference server in a thread: the application answers with the HTTP_*
    keys of its own environ, exactly as a WSGI framework would read them."""

    def __init__(self) -> None:
        self.environs: list[dict[str, str]] = []

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            seen = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
            self.environs.append(seen)
            body = json.dumps(seen).encode()
            start_response(
                "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            )
            return [body]

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test reads the environ, not a log

        self.server: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=Quiet)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(WAIT)


@pytest.fixture
def wsgi_upstream() -> Iterator[WsgiUpstream]:
    upstream = WsgiUpstream()
    try:
        yield upstream
    finally:
        upstream.close()


@pytest.fixture(scope="module")
def client_pki() -> tuple[Issued, Issued]:
    ca = make_ca("ecdsa-p256", common_name="hardening client CA")
    return ca, make_client(ca, "ecdsa-p256", common_name="real-client", uris=(SPIFFE_CLIENT,))


@contextmanager
def proxy_from_config(
    tmp_path: Path,
    dev_certs: DevCertPaths,
    client_ca: Issued,
    upstream_port: int,
    headers: dict[str, Any],
) -> Iterator[int]:
    """pqproxy built from a config file (``headers`` is the listener's headers section), with
    optional client certificates from ``client_ca``, on a loop thread; yields its port."""
    (tmp_path / "clients.pem").write_bytes(bundle_pem(client_ca))
    data: dict[str, Any] = {
        "admin": None,
        "listeners": [
            {
                "name": "api",
                "listen": "127.0.0.1:0",
                "mode": "http",
                "upstream": "m",
                "tls": {
                    "certificates": [{"cert": str(dev_certs.cert), "key": str(dev_certs.key)}],
                    "client_auth": {"mode": "optional", "ca": "clients.pem"},
                },
                "headers": headers,
            }
        ],
        "upstreams": {
            "m": {"servers": [f"http://127.0.0.1:{upstream_port}"], "health_check": None}
        },
    }
    runtime = build_runtime(parse_config(data, tmp_path), PROVIDER)
    loop_thread = LoopThread()
    listener = TLSListener(runtime.listeners[0])

    async def start() -> int:
        for pool in runtime.pools.values():
            await pool.start()
        await listener.start()
        return listener.port

    async def stop() -> None:
        await listener.close(grace=1.0)
        for pool in runtime.pools.values():
            await pool.close()

    try:
        yield loop_thread.run(start())
    finally:
        loop_thread.run(stop())
        loop_thread.stop()


OWNED_NAMES = (
    "X-Client-Subject",
    "X-Client-URI",
    "X-Client-DNS",
    "X-PQ-TLS-Group",
    "X-PQ-TLS-Cipher",
    "X-PQ-TLS-Resumed",
    "X-PQ-TLS-Signature",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "Via",
)
# The environ keys the upstream trusts: whatever holds them came from pqproxy, or nobody.
TRUSTED_PREFIXES = ("HTTP_X_CLIENT_", "HTTP_X_PQ_TLS_", "HTTP_X_FORWARDED_", "HTTP_VIA")


def spellings(name: str) -> list[str]:
    """Every spelling a gateway maps to the same environ key: case variants, all or some of
    the hyphens written as underscores."""
    hyphens = [i for i, char in enumerate(name) if char == "-"]
    found = [name, name.lower(), name.upper()]
    found += [
        name.replace("-", "_"),
        name.lower().replace("-", "_"),
        name.upper().replace("-", "_"),
    ]
    for i in hyphens[:1] + hyphens[-1:]:
        found.append(name[:i] + "_" + name[i + 1 :])
    return list(dict.fromkeys(found))


def forged_headers() -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for name in OWNED_NAMES:
        for n, spelling in enumerate(spellings(name)):
            headers.append((spelling, f"forged-{name.lower()}-{n}"))
    return headers


def request_with(headers: list[tuple[str, str]]) -> bytes:
    lines = ["GET /env HTTP/1.1", "Host: localhost"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def expected_trusted(
    sent: list[tuple[str, str]], client: Issued | None, environ: dict[str, str]
) -> dict[str, str]:
    """What the trusted environ keys must hold: the proxy's own values, the client's values
    only where the proxy documents it keeps them (X-Forwarded-For and Via are appended to,
    and only under their exact hyphenated names)."""

    def hyphen_values(name: str) -> list[str]:
        return [v for n, v in sent if n.lower() == name.lower()]

    expected = {
        "HTTP_X_FORWARDED_FOR": ", ".join([*hyphen_values("X-Forwarded-For"), "127.0.0.1"]),
        "HTTP_X_FORWARDED_PROTO": "https",
        "HTTP_X_FORWARDED_HOST": "localhost",
        "HTTP_VIA": ", ".join([*hyphen_values("Via"), "1.1 pqproxy"]),
        "HTTP_X_PQ_TLS_GROUP": "X25519MLKEM768",
        "HTTP_X_PQ_TLS_RESUMED": "0",
    }
    # The cipher and signature depend on what OpenSSL picked: taken from the environ, and
    # checked to be pqproxy's vocabulary, not a forged value.
    cipher, signature = (
        environ.get("HTTP_X_PQ_TLS_CIPHER", ""),
        environ.get("HTTP_X_PQ_TLS_SIGNATURE", ""),
    )
    assert cipher.startswith("TLS_") and "forged" not in cipher, cipher
    assert signature and "forged" not in signature, signature
    expected["HTTP_X_PQ_TLS_CIPHER"] = cipher
    expected["HTTP_X_PQ_TLS_SIGNATURE"] = signature
    if client is not None:
        expected["HTTP_X_CLIENT_SUBJECT"] = client.subject
        expected["HTTP_X_CLIENT_URI"] = SPIFFE_CLIENT
    return expected


def trusted(environ: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith(TRUSTED_PREFIXES)}


@pytest.mark.parametrize("with_certificate", [False, True], ids=["no-cert", "client-cert"])
@pytest.mark.parametrize("option", ["default", "drop", "reject", "allow"])
def test_item1_underscore_headers_never_forge_what_a_wsgi_upstream_trusts(
    tmp_path: Path,
    dev_certs: DevCertPaths,
    wsgi_upstream: WsgiUpstream,
    client_pki: tuple[Issued, Issued],
    option: str,
    with_certificate: bool,
) -> None:
    ca, client_cert = client_pki
    client = client_cert if with_certificate else None
    headers = {} if option == "default" else {"underscore_headers": option}
    forged = forged_headers()
    extra = [("My_Header", "underscore-kept"), ("Plain-Header", "plain-kept")]
    with proxy_from_config(tmp_path, dev_certs, ca, wsgi_upstream.port, headers) as port:
        ctx = tls_context(dev_certs.ca, tmp_path, client)
        done = exchange(port, ctx, request_with(forged + extra))
        assert done.error is None, done.error
        if option == "reject":
            # One underscore name is enough: 400, and the application never ran.
            assert done.status == 400, done.response[:200]
            assert json.loads(done.body)["error"]["status"] == 400
            assert wsgi_upstream.environs == []
            # The hyphenated spellings alone are an ordinary request.
            sent = [(n, v) for n, v in forged + extra if "_" not in n]
            done = exchange(port, ctx, request_with(sent))
        else:
            sent = forged + extra
        assert done.status == 200, done.response[:300]
    (environ,) = wsgi_upstream.environs
    assert environ == json.loads(done.body)
    assert trusted(environ) == expected_trusted(sent, client, environ)
    assert environ["HTTP_PLAIN_HEADER"] == "plain-kept"
    if option == "allow":
        assert environ["HTTP_MY_HEADER"] == "underscore-kept"
    else:
        assert "HTTP_MY_HEADER" not in environ


def _tls_info() -> ClientTLSInfo:
    return ClientTLSInfo("X25519MLKEM768", "TLS_AES_128_GCM_SHA256", False, "ecdsa", None, None)


def test_item1_names_normalise_in_one_place() -> None:
    assert normalize_field_name(b"X_Client_Subject") == b"x-client-subject"
    assert normalize_field_name(b"x-CLIENT_uri") == b"x-client-uri"
    options = ForwardingOptions(underscore_headers=UnderscoreHeaders.ALLOW)
    for name in OWNED_NAMES:
        for spelling in spellings(name):
            assert proxy_owned(normalize_field_name(spelling.encode()), options), spelling
    assert not proxy_owned(b"my-header", options)
    # Under allow, an owned spelling is dropped, another underscore name is kept; under
    # reject, any underscore name is a 400; the count of what was dropped is reported.
    dropped: list[int] = []
    out = upstream_request_headers(
        [(b"host", b"a.test"), (b"x_client_subject", b"CN=admin"), (b"my_header", b"1")],
        client_ip="10.0.0.1",
        host=b"a.test",
        tls=_tls_info(),
        options=options,
        on_dropped=dropped.append,
    )
    assert (b"my_header", b"1") in out and dropped == [1]
    assert not any(normalize_field_name(n) == b"x-client-subject" for n, _ in out)
    with pytest.raises(HttpError) as refused:
        upstream_request_headers(
            [(b"host", b"a.test"), (b"my_header", b"1")],
            client_ip="10.0.0.1",
            host=b"a.test",
            tls=_tls_info(),
            options=ForwardingOptions(underscore_headers=UnderscoreHeaders.REJECT),
        )
    assert refused.value.status == 400


@pytest.mark.asyncio
async def test_item1_dropping_is_counted_and_logged_once_per_request(
    start_proxy: ProxyFactory,
    make_upstream: UpstreamFactory,
    connect: Connect,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = await make_upstream()
    proxy = await start_proxy(upstream.port)
    client = await connect(proxy.port)
    caplog.set_level("INFO", logger="pqproxy.io.http_proxy")
    response = await client.request(
        http_request("GET", "/", ("X_Client_Subject", "CN=admin"), ("X_Pq_Tls_Group", "x"))
    )
    assert response.status == 200
    (seen,) = upstream.requests
    assert not [n for n, _ in seen.headers if b"_" in n]
    assert proxy.count("pqproxy_http_underscore_headers_total", action="dropped") == 2
    lines = [r.getMessage() for r in caplog.records if "underscore" in r.getMessage()]
    assert len(lines) == 1 and "2 " in lines[0], lines
    # The client's names are not in the log line (they are client text).
    assert "X_Client_Subject" not in lines[0]

    proxy_reject = await start_proxy(
        upstream.port,
        http=HttpSettings(
            forwarding=ForwardingOptions(underscore_headers=UnderscoreHeaders.REJECT)
        ),
    )
    client = await connect(proxy_reject.port)
    response = await client.request(http_request("GET", "/", ("X_Client_Subject", "CN=admin")))
    assert_json_error(response, 400)
    assert len(upstream.requests) == 1
    assert proxy_reject.count("pqproxy_http_underscore_headers_total", action="rejected") == 1


# -- item 2: X-Forwarded-For -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("append", b"203.0.113.7, 198.51.100.1, 127.0.0.1"), ("replace", b"127.0.0.1")],
)
@pytest.mark.asyncio
async def test_item2_forwarded_for_append_or_replace(
    start_proxy: ProxyFactory,
    make_upstream: UpstreamFactory,
    connect: Connect,
    mode: str,
    expected: bytes,
) -> None:
    upstream = await make_upstream()
    proxy = await start_proxy(
        upstream.port,
        http=HttpSettings(forwarding=ForwardingOptions(forwarded_for=ForwardedFor(mode))),
    )
    client = await connect(proxy.port)
    response = await client.request(
        http_request(
            "GET",
            "/",
            ("X-Forwarded-For", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.1"),
            ("X_Forwarded_For", "192.0.2.66"),
        )
    )
    assert response.status == 200
    (seen,) = upstream.requests
    assert seen.values("x-forwarded-for") == [expected]


def test_item2_config_keys_parse_validate_and_reach_the_session(tmp_path: Path) -> None:
    def config(headers: dict[str, Any], timeouts: dict[str, Any] | None = None) -> Any:
        listener: dict[str, Any] = {
            "listen": "127.0.0.1:8443",
            "upstream": "m",
            "tls": {"certificates": [{"cert": "c.pem", "key": "k.pem"}]},
            "headers": headers,
        }
        if timeouts is not None:
            listener["timeouts"] = timeouts
        data = {
            "admin": None,
            "listeners": [listener],
            "upstreams": {"m": {"servers": ["http://127.0.0.1:8000"]}},
        }
        (tmp_path / "c.pem").write_text("x")
        (tmp_path / "k.pem").write_text("x")
        return parse_config(data, tmp_path)

    default = config({}).listeners[0]
    assert default.headers.underscore_headers is UnderscoreHeaders.DROP
    assert default.headers.forwarded_for is ForwardedFor.APPEND
    assert default.timeouts.send == 60.0
    chosen = config(
        {"underscore_headers": "reject", "forwarded_for": "replace"}, {"send": "5s"}
    ).listeners[0]
    assert chosen.headers.underscore_headers is UnderscoreHeaders.REJECT
    assert chosen.headers.forwarded_for is ForwardedFor.REPLACE
    assert chosen.timeouts.send == 5.0
    with pytest.raises(ConfigError) as bad:
        config({"underscore_headers": "keep", "forwarded_for": "prepend"}, {"send": 0})
    text = str(bad.value)
    assert "listeners[0].headers.underscore_headers" in text
    assert "listeners[0].headers.forwarded_for" in text
    assert "listeners[0].timeouts.send" in text

    from pqproxy.io.supervisor import http_settings

    settings = http_settings(chosen, config({}).upstreams[0])
    assert settings.forwarding.underscore_headers is UnderscoreHeaders.REJECT
    assert settings.forwarding.forwarded_for is ForwardedFor.REPLACE


# -- item 3: never send a non-idempotent request twice ----------------------------------------


def closes_on_second_request(posts: list[bytes]) -> Any:
    """An origin that answers the first request of its first connection, then reads the
    second one whole and closes without answering (a keep-alive timer that fired, a crash);
    later connections are answered. ``posts`` records every request target it read."""

    async def handler(ex: Exchange) -> None:
        body = await ex.read_body()
        posts.append(ex.received.method + b" " + ex.received.target + b" " + body)
        if ex.received.conn_id == 1 and len(posts) == 2:
            ex.writer.close()
            return
        if ex.received.method == b"HEAD":
            await ex.respond(200)  # a response to HEAD has no body (RFC 9110 §9.3.2)
            return
        await answer_who(ex)

    return handler


@pytest.mark.parametrize(
    ("method", "body"),
    [("POST", b""), ("POST", b'{"prompt":"x"}'), ("PATCH", b""), ("LOCK", b"")],
)
@pytest.mark.asyncio
async def test_item3_non_idempotent_request_is_never_sent_twice(
    start_proxy: ProxyFactory,
    make_upstream: UpstreamFactory,
    connect: Connect,
    method: str,
    body: bytes,
) -> None:
    seen: list[bytes] = []
    upstream = await make_upstream(closes_on_second_request(seen))
    proxy = await start_proxy(upstream.port)
    client = await connect(proxy.port)
    headers = [] if body else [("Content-Length", "0")]
    first = await client.request(http_request(method, "/first", *headers, body=body))
    assert first.status == 200
    second = await client.request(http_request(method, "/second", *headers, body=body))
    assert_json_error(second, 502)
    # The origin read the second request exactly once.
    assert [s.split(b" ")[1] for s in seen] == [b"/first", b"/second"]
    assert upstream.connections == 1
    assert proxy.count("pqproxy_http_upstream_retries_total", outcome="not_retried") == 1
    assert proxy.count("pqproxy_http_upstream_retries_total", outcome="retried") == 0
    # The request was read whole: the client's connection is still good (item 17).
    third = await client.request(http_request("GET", "/third"))
    assert third.status == 200


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"])
@pytest.mark.asyncio
async def test_item3_idempotent_request_is_retried_once_on_a_fresh_connection(
    start_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect, method: str
) -> None:
    seen: list[bytes] = []
    upstream = await make_upstream(closes_on_second_request(seen))
    proxy = await start_proxy(upstream.port)
    client = await connect(proxy.port)
    assert (await client.request(http_request("GET", "/first"))).status == 200
    if method == "HEAD":
        await client.send(http_request(method, "/second"))
        head = await client.next_event()
        assert isinstance(head, h11.Response) and head.status_code == 200
        assert isinstance(await client.next_event(), h11.EndOfMessage)
    else:
        assert (await client.request(http_request(method, "/second"))).status == 200
    assert [s.split(b" ")[1] for s in seen] == [b"/first", b"/second", b"/second"]
    assert upstream.connections == 2
    assert proxy.count("pqproxy_http_upstream_retries_total", outcome="retried") == 1


@pytest.mark.asyncio
async def test_item3_no_retry_once_a_response_byte_arrived(
    start_proxy: ProxyFactory, make_upstream: UpstreamFactory, connect: Connect
) -> None:
    seen: list[bytes] = []

    async def handler(ex: Exchange) -> None:
        await ex.read_body()
        seen.append(ex.received.target)
        if ex.received.target == b"/second":
            # Part of a status line, then gone: the origin did answer, and may have acted.
            ex.writer.write(b"HTTP/1.1 2")
            await within(ex.writer.drain())
            ex.writer.close()
            return
        await answer_who(ex)

    upstream = await make_upstream(handler)
    proxy = await start_proxy(upstream.port)
    client = await connect(proxy.port)
    assert (await client.request(http_request("GET", "/first"))).status == 200
    assert_json_error(await client.request(http_request("GET", "/second")), 502)
    assert seen == [b"/first", b"/second"]
