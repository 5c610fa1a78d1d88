"""A Hypothesis state machine through the real http mode (issue 13, "Tests and proof").

A real ``TLSListener`` in http mode runs on a background loop (tests/inprocess.py) before a raw
origin that records every request it received. The machine opens TLS connections with the
stdlib ``ssl`` client and writes pipelined runs of random valid and invalid requests, each run
cut at random byte boundaries, on a fresh connection or on one kept alive from before. The
model knows what each request should get, and after every step these hold:

- every request the proxy reads gets exactly one final response (1xx aside), in order; after
  a refusal, or after an HTTP/1.0 response, the connection closes and nothing later is
  answered;
- what the proxy refused, and what came after it, never reaches the origin;
- the origin never sees a proxy-owned header the proxy did not set (forged ones in every
  spelling a gateway would map to the same name are sent);
- the origin sees each admitted request as the proxy should rewrite it (target, Host, body);
- nothing reaches the loop's exception handler, and no log line holds a traceback (the
  suite-wide guard in tests/conftest.py).

The example count is bounded so that the run stays within seconds.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.devcert import DevCertPaths
from pqproxy.io.http_proxy import HttpSettings
from pqproxy.io.tls_server import ListenerSettings, TLSListener
from pqproxy.io.upstream import PoolSettings, UpstreamPool
from pqproxy.relay.errors import HttpError
from pqproxy.relay.forwarding import normalize_field_name
from pqproxy.relay.request import HeaderLimits, RequestHeadReader
from pqproxy.tls.server import ServerConfig
from tests.inprocess import LoopThread

WAIT = 10.0
BUFFERING = 16 * 1024  # request_buffering of the proxy under test
BIG_BODY = 20 * 1024  # past the budget: streams

# -- the raw origin (on the loop thread) -------------------------------------------------------


@dataclass
class Seen:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


class Origin:
    """Records each request whose body ended; answers as its X-Answer header says."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        current: Seen | None = None
        try:
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    parser.receive_data(data)
                elif isinstance(event, h11.Request):
                    current = Seen(event.method, event.target, list(event.headers))
                elif isinstance(event, h11.Data):
                    assert current is not None
                    current.body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    assert current is not None
                    self.seen.append(current)
                    response, close = answer(current)
                    writer.write(response)
                    await writer.drain()
                    if close:
                        return
                    leftover = parser.trailing_data[0]
                    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
                    if leftover:  # b"" would mean EOF to h11
                        parser.receive_data(leftover)
                    current = None
                else:
                    return
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            writer.close()


def answer(seen: Seen) -> tuple[bytes, bool]:
    (req_id,) = seen.values(b"x-req-id") or [b"?"]
    kind = (seen.values(b"x-answer") or [b"cl"])[0]
    head = b"HTTP/1.1 %s X\r\nX-Req-Id: " % (b"204" if kind == b"204" else b"200") + req_id
    body = b"id=" + req_id
    if kind == b"204":
        return head + b"\r\nContent-Length: 9\r\n\r\n123456789", False
    if kind == b"chunked":
        return head + b"\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            len(body),
            body,
        ), False
    if kind == b"gzip":
        return head + b"\r\nTransfer-Encoding: gzip\r\n\r\n" + gzip.compress(body), True
    return head + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body, False


# -- the harness -------------------------------------------------------------------------------


@dataclass
class Harness:
    loop: LoopThread
    origin: Origin
    port: int
    ctx: ssl.SSLContext
    loop_errors: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
def harness(dev_certs: DevCertPaths) -> Iterator[Harness]:
    loop_thread = LoopThread()
    origin = Origin()
    errors: list[dict[str, Any]] = []
    parts: dict[str, Any] = {}

    async def start() -> int:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
        await origin.start()
        pool = UpstreamPool(
            PoolSettings(name="fuzz", servers=(("127.0.0.1", origin.port),), health_check=None)
        )
        parts["pool"] = pool
        await pool.start()
        settings = ListenerSettings(
            host="127.0.0.1",
            port=0,
            server_config=ServerConfig(
                certificates=(load_certified_key(dev_certs.cert, dev_certs.key),)
            ),
            provider=OpenSSLProvider(),
            upstream_host="127.0.0.1",
            upstream_port=origin.port,
            mode="http",
            http=HttpSettings(request_buffering=BUFFERING, expect_continue_wait=0.05),
            pool=pool,
        )
        listener = TLSListener(settings)
        parts["listener"] = listener
        await listener.start()
        return listener.port

    async def stop() -> None:
        if "listener" in parts:
            await parts["listener"].close(grace=1.0)
        if "pool" in parts:
            await parts["pool"].close()
        if origin.server is not None:
            origin.server.close()
            await asyncio.wait_for(origin.server.wait_closed(), WAIT)

    ctx = ssl.create_default_context(cafile=str(dev_certs.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        port = loop_thread.run(start())
        yield Harness(loop_thread, origin, port, ctx, errors)
    finally:
        loop_thread.run(stop())
        loop_thread.stop()
    assert errors == [], errors


# -- requests and what each should get ---------------------------------------------------------

# Forged proxy-owned headers, in the spellings a gateway maps to the same HTTP_* name.
FORGED = [
    ("X-Forwarded-For", "203.0.113.9"),
    ("X_Forwarded_For", "198.51.100.1"),
    ("X-Forwarded-Proto", "http"),
    ("x_forwarded_proto", "http"),
    ("X-Forwarded-Host", "forged.test"),
    ("X_Forwarded_Host", "forged.test"),
    ("Via", "1.0 forged"),
    ("X-PQ-TLS-Group", "forged"),
    ("X_PQ_TLS_Group", "forged"),
    ("x-pq-tls-resumed", "forged"),
    ("X-Client-Subject", "CN=forged"),
    ("X_Client_Subject", "CN=forged"),
    ("X-Client-URI", "spiffe://forged"),
]
OWNED_SINGLE = [b"x-forwarded-proto", b"via", b"x-pq-tls-group", b"x-pq-tls-cipher"]
IDENTITY = {b"x-client-subject", b"x-client-uri", b"x-client-dns"}


def owned(normalized: bytes) -> bool:
    return (
        normalized.startswith(b"x-pq-tls-")
        or normalized in IDENTITY
        or normalized in {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via"}
    )


@dataclass
class Req:
    """One request of a run: its bytes, and what the model says it gets."""

    req_id: int
    wire: bytes
    method: bytes
    status: int  # the final status expected; the proxy's own for an invalid request
    valid: bool
    closes: bool = False  # the connection ends after the response (HTTP/1.0)
    target: bytes = b""  # what the origin must see
    host: bytes = b""
    body: bytes = b""
    http10: bool = False


INVALID: list[tuple[str, int]] = [
    ("bad_host", 400),
    ("two_hosts", 400),
    ("no_host", 400),
    ("connect", 405),
    ("asterisk_get", 400),
    ("climb", 400),
    ("control", 400),
    ("te_unknown", 501),
    ("te_gzip", 400),
    ("cl_te", 400),
    ("http2", 505),
    ("userinfo", 400),
    ("long_target", 414),
    ("bad_chunked", 400),
    ("bad_length", 400),
    ("too_many_fields", 431),
]


def chunked(body: bytes, size: int) -> bytes:
    size = max(1, size)
    out = b"".join(
        b"%x\r\n" % len(body[i : i + size]) + body[i : i + size] + b"\r\n"
        for i in range(0, len(body), size)
    )
    return out + b"0\r\n\r\n"


@st.composite
def valid_requests(draw: st.DrawFn, req_id: int) -> Req:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD"]))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.2", b"1.0"]))
    host = draw(st.sampled_from([b"api.test", b"api.test:8443", b"[::1]:443", b"127.0.0.1"]))
    form = draw(st.sampled_from(["origin", "origin", "dots", "absolute", "asterisk"]))
    path = b"/r/%d?q=%d" % (req_id, draw(st.integers(0, 9)))
    target, seen_target, seen_host = path, path, host
    if form == "dots":
        target = seen_target = b"/a/./b/../r/%d" % req_id
    elif form == "absolute":
        authority = draw(st.sampled_from([b"other.test", b"other.test:81"]))
        target, seen_host = b"http://" + authority + path, authority
    elif form == "asterisk":
        method, target, seen_target = b"OPTIONS", b"*", b"*"
    fields: list[tuple[bytes, bytes]] = [(b"X-Req-Id", b"%d" % req_id)]
    omit_host = version == b"1.0" and form != "absolute" and draw(st.booleans())
    if omit_host:
        seen_host = b"localhost"  # the SNI
    else:
        fields.insert(0, (b"Host", host))
    for name, value in draw(st.lists(st.sampled_from(FORGED), max_size=4, unique=True)):
        fields.append((name.encode(), value.encode()))
    answer_kind = draw(st.sampled_from([b"cl", b"cl", b"chunked", b"gzip", b"204"]))
    fields.append((b"X-Answer", answer_kind))
    body = b""
    framing = draw(st.sampled_from(["none", "none", "length", "chunked", "big"]))
    if method in (b"GET", b"HEAD", b"DELETE", b"OPTIONS") and framing != "length":
        framing = "none"
    if version == b"1.0" and framing in ("chunked", "big"):
        framing = "length"
    raw_body = b""
    if framing in ("length", "chunked", "big"):
        body = draw(st.binary(min_size=1, max_size=60)) if framing != "big" else b"B" * BIG_BODY
        if draw(st.booleans()):
            fields.append((b"Expect", b"100-continue"))
    if framing in ("length", "big"):
        fields.append((b"Content-Length", b"%d" % len(body)))
        raw_body = body
    elif framing == "chunked":
        te = draw(st.sampled_from([b"chunked", b"chunked, ,", b", chunked", b"Chunked"]))
        fields.append((b"Transfer-Encoding", te))
        raw_body = chunked(body, draw(st.integers(1, 30)))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    head = method + b" " + target + b" HTTP/" + version + eol
    head += b"".join(n + b": " + v + eol for n, v in fields) + eol
    status = 204 if answer_kind == b"204" else 200
    return Req(
        req_id,
        head + raw_body,
        method,
        status,
        valid=True,
        closes=version == b"1.0" or answer_kind == b"gzip" and False,
        target=seen_target,
        host=seen_host,
        body=body,
        http10=version == b"1.0",
    )


def invalid_request(kind: str, status: int, req_id: int) -> Req:
    rid = b"X-Req-Id: %d\r\n" % req_id
    line, head_fields, body = b"GET /r/%d HTTP/1.1" % req_id, [b"Host: api.test"], b""
    method = b"GET"
    if kind == "bad_host":
        head_fields = [b"Host: a b/c"]
    elif kind == "two_hosts":
        head_fields = [b"Host: a.test", b"Host: b.test"]
    elif kind == "no_host":
        head_fields = []
    elif kind == "connect":
        line, method = b"CONNECT api.test:443 HTTP/1.1", b"CONNECT"
    elif kind == "asterisk_get":
        line = b"GET * HTTP/1.1"
    elif kind == "climb":
        line = b"GET /a/%2e%2e/../etc HTTP/1.1"
    elif kind == "control":
        head_fields.append(b"X-V: a\x01b")
    elif kind == "te_unknown":
        line, method = b"POST /r HTTP/1.1", b"POST"
        head_fields.append(b"Transfer-Encoding: foo, chunked")
        body = b"0\r\n\r\n"
    elif kind == "te_gzip":
        line, method = b"POST /r HTTP/1.1", b"POST"
        head_fields.append(b"Transfer-Encoding: gzip")
    elif kind == "cl_te":
        line, method = b"POST /r HTTP/1.1", b"POST"
        head_fields += [b"Content-Length: 5", b"Transfer-Encoding: chunked"]
        body = b"0\r\n\r\n"
    elif kind == "http2":
        line = b"GET / HTTP/2.0"
    elif kind == "userinfo":
        line = b"GET http://u:p@api.test/x HTTP/1.1"
    elif kind == "long_target":
        line = b"GET /" + b"a" * (HeaderLimits().max_target_bytes + 1) + b" HTTP/1.1"
    elif kind == "bad_chunked":
        line, method = b"POST /r HTTP/1.1", b"POST"
        head_fields.append(b"Transfer-Encoding: chunked")
        body = b"5\r\nhello\r\nZZ\r\nxx\r\n0\r\n\r\n"
    elif kind == "bad_length":
        line, method = b"POST /r HTTP/1.1", b"POST"
        head_fields.append(b"Content-Length: 5, 6")
        body = b"hello"
    elif kind == "too_many_fields":
        head_fields += [b"X-F%d: 1" % i for i in range(HeaderLimits().max_header_count + 1)]
    head = line + b"\r\n" + b"".join(f + b"\r\n" for f in head_fields) + rid + b"\r\n"
    return Req(req_id, head + body, method, status, valid=False, closes=True)


@st.composite
def runs(draw: st.DrawFn, first_id: int) -> list[Req]:
    reqs: list[Req] = []
    for offset in range(draw(st.integers(1, 4))):
        req_id = first_id + offset
        if draw(st.integers(0, 3)) == 0:
            kind, status = draw(st.sampled_from(INVALID))
            reqs.append(invalid_request(kind, status, req_id))
        else:
            reqs.append(draw(valid_requests(req_id)))
    return reqs


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


# -- a blocking TLS client ---------------------------------------------------------------------


class SyncClient:
    def __init__(self, harness: Harness) -> None:
        raw = socket.create_connection(("127.0.0.1", harness.port), timeout=WAIT)
        self.tls = harness.ctx.wrap_socket(raw, server_hostname="localhost")
        self.tls.settimeout(WAIT)
        self.leftover = b""
        self.eof = False
        self.closed_by_proxy = False

    def send(self, parts: list[bytes]) -> None:
        for part in parts:
            try:
                self.tls.sendall(part)
            except (ConnectionError, ssl.SSLError, OSError):
                return  # the proxy closed after a refusal: the rest goes nowhere

    def _recv(self) -> bytes:
        if self.eof:
            return b""
        try:
            data = self.tls.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            data = b""
        self.eof = not data
        return data

    def response(
        self, method: bytes
    ) -> tuple[list[h11.InformationalResponse], h11.Response, bytes]:
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        parser.send(h11.EndOfMessage())
        if self.leftover:  # b"" would mean EOF to h11
            parser.receive_data(self.leftover)
        if self.eof:
            parser.receive_data(b"")
        interim: list[h11.InformationalResponse] = []
        head: h11.Response | None = None
        body = b""
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                parser.receive_data(self._recv())
                continue
            if isinstance(event, h11.InformationalResponse):
                interim.append(event)
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                self.leftover = parser.trailing_data[0]
                return interim, head, body
            else:
                raise AssertionError(f"unexpected {event!r}")

    def rest(self) -> bytes:
        out = self.leftover
        self.leftover = b""
        while not self.eof:
            out += self._recv()
        return out

    def close(self) -> None:
        self.tls.close()


# -- the machine -------------------------------------------------------------------------------


class ProxyMachine(RuleBasedStateMachine):
    def __init__(self, harness: Harness) -> None:
        super().__init__()
        self.harness = harness
        self.client: SyncClient | None = None
        self.next_id = 1
        # What the origin has seen, by request id, across the whole run.
        self.admitted: set[int] = set()
        self.checked_seen = len(harness.origin.seen)

    @rule(data=st.data(), fresh=st.booleans(), cuts=st.lists(st.integers(0, 1 << 16), max_size=5))
    def pipeline(self, data: st.DataObject, fresh: bool, cuts: list[int]) -> None:
        reqs = data.draw(runs(self.next_id))
        self.next_id += len(reqs)
        if fresh or self.client is None:
            self._drop_client()
            self.client = SyncClient(self.harness)
        client = self.client
        client.send(split(b"".join(r.wire for r in reqs), cuts))
        open_after = True
        for req in reqs:
            interim, head, body = client.response(req.method)
            assert head.status_code == req.status, (req, head, body[:200])
            if req.valid:
                assert dict(head.headers).get(b"x-req-id") == b"%d" % req.req_id
                if req.method != b"HEAD" and req.status != 204:
                    assert body == b"id=%d" % req.req_id
                self.admitted.add(req.req_id)
            else:
                assert b'"error"' in body
            if req.http10:
                # RFC 9110 §15.2: no 1xx to an HTTP/1.0 client.
                assert interim == []
            if req.closes:
                # Nothing after this is answered: the proxy closes.
                assert client.rest() == b""
                open_after = False
                break
        if not open_after:
            self._drop_client()
        self._check_origin(reqs)

    @precondition(lambda self: self.client is not None)
    @rule()
    def close_client(self) -> None:
        self._drop_client()

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def _check_origin(self, reqs: list[Req]) -> None:
        by_id = {r.req_id: r for r in reqs}
        new = self.harness.origin.seen[self.checked_seen :]
        self.checked_seen += len(new)
        seen_ids = []
        for seen in new:
            (raw_id,) = seen.values(b"x-req-id")
            req = by_id.get(int(raw_id))
            assert req is not None and req.valid, f"the origin got a refused request: {seen}"
            seen_ids.append(req.req_id)
            assert seen.target == req.target, (seen.target, req)
            assert seen.values(b"host") == [req.host], (seen.values(b"host"), req)
            assert seen.body == req.body
            assert seen.values(b"expect") in ([], [b"100-continue"])
            if req.http10:
                assert seen.values(b"expect") == []
            check_owned_headers(seen)
        expected = [r.req_id for r in reqs if r.req_id in self.admitted]
        # In order, each once, and nothing the model did not admit.
        assert seen_ids == expected, (seen_ids, expected)

    @invariant()
    def no_loop_errors(self) -> None:
        assert self.harness.loop_errors == []

    def teardown(self) -> None:
        self._drop_client()


def check_owned_headers(seen: Seen) -> None:
    """The origin sees only the proxy's own values under names the proxy owns."""
    for name, value in seen.headers:
        normalized = normalize_field_name(name)
        if owned(normalized):
            assert name == normalized, f"a forged spelling reached the origin: {name!r}"
            # X-Forwarded-For and Via are lists the proxy appends its own entry to.
            appended = name in (b"x-forwarded-for", b"via")
            assert b"forged" not in value or appended, (name, value)
            assert not name.startswith(b"x-client-"), "identity without a client certificate"
    for name in OWNED_SINGLE:
        assert len(seen.values(name)) == 1, (name, seen.headers)
    (forwarded_for,) = seen.values(b"x-forwarded-for")
    assert forwarded_for.rsplit(b",", 1)[-1].strip() == b"127.0.0.1"
    assert seen.values(b"x-forwarded-proto") == [b"https"]
    assert seen.values(b"x-forwarded-host") in ([], seen.values(b"host"))
    # Via names the protocol the proxy received (RFC 9110 §7.6.3): 1.0 or 1.1.
    last_via = seen.values(b"via")[0].rsplit(b",", 1)[-1].strip()
    assert last_via in (b"1.0 pqproxy", b"1.1 pqproxy"), seen.values(b"via")


def test_proxy_state_machine(harness: Harness) -> None:
    run_state_machine_as_test(
        lambda: ProxyMachine(harness),  # type: ignore[arg-type]
        settings=settings(
            max_examples=25,
            stateful_step_count=4,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )


# -- the head reader alone ---------------------------------------------------------------------

READER_FUZZ = settings(max_examples=300, deadline=None)
PLAIN_FIELDS = [b"X: 1", b"Content-Length: 0", b"Connection: keep-alive", b"Y:\t2", b"Z:"]
CHUNKED_LINES = [b"Transfer-Encoding: chunked", b"transfer-encoding: , Chunked,"]
EMPTY_TE_LINES = [b"TRANSFER-ENCODING:", b"Transfer-Encoding: ,  ,"]


@st.composite
def pipelined_heads(draw: st.DrawFn) -> list[tuple[bytes, bool]]:
    """Heads (and whether each carries Transfer-Encoding lines whose codings are exactly one
    chunked, in one line or spread over several) that h11 accepts once made readable."""
    heads = []
    for index in range(draw(st.integers(1, 3))):
        fields = [b"Host: a", *draw(st.lists(st.sampled_from(PLAIN_FIELDS), max_size=4))]
        te = draw(st.booleans())
        if te:
            te_lines = draw(st.lists(st.sampled_from(EMPTY_TE_LINES), max_size=2))
            te_lines.insert(
                draw(st.integers(0, len(te_lines))), draw(st.sampled_from(CHUNKED_LINES))
            )
            at = draw(st.integers(1, len(fields)))
            fields[at:at] = te_lines
        eol = draw(st.sampled_from([b"\r\n", b"\n"]))
        head = b"POST /%d HTTP/1.1" % index + eol + b"".join(f + eol for f in fields) + eol
        heads.append((head, te))
    return heads


def parsed(head: bytes) -> list[tuple[bytes, bytes]]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    return list(event.headers)


@READER_FUZZ
@given(pipelined_heads(), st.lists(st.integers(0, 400), max_size=5))
def test_head_reader_changes_only_transfer_encoding(
    heads: list[tuple[bytes, bool]], cuts: list[int]
) -> None:
    """At any split, the reader hands on each head whole: byte for byte without a
    Transfer-Encoding line, and with its lines made one chunked field otherwise."""
    reader = RequestHeadReader(HeaderLimits())
    out: list[bytes] = []
    for piece in split(b"".join(h for h, _ in heads), cuts):
        reader.receive(piece)
        while (got := reader.next_head()) is not None:
            head, rest = got
            out.append(head)
            reader.receive(rest)  # as the driver does once h11 has the head
    assert len(reader) == 0 and len(out) == len(heads)
    for (original, te), forwarded in zip(heads, out, strict=True):
        if not te:
            assert forwarded == original
            continue
        before, after = parsed(original_without_te(original)), parsed(forwarded)
        assert [f for f in after if f[0] != b"transfer-encoding"] == before
        assert [v for n, v in after if n == b"transfer-encoding"] == [b"chunked"]


def original_without_te(head: bytes) -> bytes:
    lines = head.split(b"\n")
    kept = [line for line in lines if not line.lower().startswith(b"transfer-encoding:")]
    return b"\n".join(kept)


@READER_FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5))
def test_head_reader_only_raises_http_error(data: bytes, cuts: list[int]) -> None:
    reader = RequestHeadReader(HeaderLimits(max_header_bytes=128, max_target_bytes=64))
    try:
        for piece in split(data, cuts):
            reader.receive(piece)
            while (got := reader.next_head()) is not None:
                reader.receive(got[1])
    except HttpError as error:
        assert error.status in (400, 414, 431, 501)
