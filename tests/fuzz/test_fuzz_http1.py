"""Hypothesis on the HTTP/1.1 rules: random, generated and mutated request streams go through
h11 and the rules of pqproxy/relay/ the way the driver runs them.

Only `HttpError` and `h11.RemoteProtocolError` (which `classify_h11_error` turns into one) may
come out; every request the checks admit must reach an h11 upstream with the same framing and
the same body; every error response must serialize.
"""

from __future__ import annotations

import json

import h11
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pqproxy.relay.body import body_too_large, declared_content_length
from pqproxy.relay.errors import HttpError, classify_h11_error, error_response
from pqproxy.relay.fields import strip_hop_by_hop
from pqproxy.relay.forwarding import (
    ClientTLSInfo,
    ForwardingOptions,
    request_host,
    upstream_request_headers,
)
from pqproxy.relay.request import (
    HeaderLimits,
    check_request,
    check_request_framing,
    expects_continue,
    request_summary,
)
from pqproxy.relay.response import downstream_response_headers, is_event_stream

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = HeaderLimits(max_header_bytes=300, max_header_count=8)
MAX_BODY = 16
# Every status the driver may answer for a client's request before any upstream is involved.
CLIENT_ERRORS = frozenset({400, 405, 413, 414, 431, 501, 505})
TLS = ClientTLSInfo("X25519MLKEM768", "TLS_AES_128_GCM_SHA256", False, "ed25519", None, None)

Header = tuple[bytes, bytes]


# -- the driver's loop, minus the sockets ------------------------------------------------------


class Upstream:
    """One request as the proxy forwards it: an h11 client writing the bytes a model server
    would read."""

    def __init__(self, request: h11.Request) -> None:
        self.request = request
        self.headers = upstream_request_headers(
            request.headers,
            client_ip="198.51.100.4",
            host=request_host(request),
            tls=TLS,
            options=ForwardingOptions(),
            http_version=request.http_version,
        )
        self.conn = h11.Connection(h11.CLIENT)
        self.wire = self.conn.send(
            h11.Request(method=request.method, target=request.target, headers=self.headers)
        )
        self.body = b""

    def data(self, data: bytes) -> None:
        self.body += data
        if len(self.body) > MAX_BODY:
            raise HttpError(413, "chunked body over the cap")
        self.wire += self.conn.send(h11.Data(data=data))

    def end(self) -> None:
        self.wire += self.conn.send(h11.EndOfMessage())
        # The model server's view: one request, same framing, same body, no second request.
        server = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        server.receive_data(self.wire)
        forwarded = server.next_event()
        assert isinstance(forwarded, h11.Request)
        body = b""
        while not isinstance(received := server.next_event(), h11.EndOfMessage):
            assert isinstance(received, h11.Data)
            body += received.data
        assert body == self.body
        assert server.trailing_data == (b"", False)  # nothing smuggled after the body
        fields = list(forwarded.headers)
        te = [v for n, v in fields if n == b"transfer-encoding"]
        cl = [v for n, v in fields if n == b"content-length"]
        assert not (te and cl)
        client_chunked = any(n == b"transfer-encoding" for n, _ in self.request.headers)
        assert bool(te) == client_chunked
        if not client_chunked:
            assert cl == [v for n, v in self.request.headers if n == b"content-length"]
        assert [v for n, v in fields if n == b"x-pq-tls-group"] == [b"X25519MLKEM768"]
        event("forwarded " + ("chunked" if client_chunked else "content-length"))


def respond(conn: h11.Connection, error: HttpError, method: bytes | None) -> None:
    assert error.status in CLIENT_ERRORS, error
    event(f"answered {error.status}")
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    response, body = error.response(request_id="fuzz", head_request=method == b"HEAD")
    wire = conn.send(response)
    if body:
        wire += conn.send(h11.Data(data=body))
    wire += conn.send(h11.EndOfMessage())
    assert conn.states[h11.SERVER] is h11.MUST_CLOSE
    assert wire.startswith(b"HTTP/1.1 %d " % error.status)


def admit(request: h11.Request) -> Upstream:
    check_request(request)
    # What an admitted request may look like, whatever h11 lets through (RFC 9112 §6.1, §6.3).
    te = [v for n, v in request.headers if n == b"transfer-encoding"]
    cl = {v for n, v in request.headers if n == b"content-length"}
    assert te in ([], [b"chunked"])
    assert not (te and cl)
    assert not te or request.http_version == b"1.1"
    assert len(cl) <= 1 and all(v.isdigit() for v in cl)
    LIMITS.check_head(request)
    summary = request_summary(request)
    assert summary.isprintable() and "?" not in summary
    expects_continue(request)
    if body_too_large(request.headers, MAX_BODY):
        raise HttpError(413, "declared body over the cap")
    return Upstream(request)


def drive(chunks: list[bytes]) -> None:
    conn = LIMITS.server_connection()
    upstream: Upstream | None = None
    method: bytes | None = None
    try:
        for chunk in [*chunks, b""]:
            conn.receive_data(chunk)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    break
                if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Request):
                    method = event.method
                    upstream = admit(event)
                elif isinstance(event, h11.Data):
                    assert upstream is not None
                    upstream.data(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    assert upstream is not None
                    LIMITS.check_trailers(event.headers)
                    upstream.end()
                    finish(conn, method)
                    upstream = method = None
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        respond(conn, classify_h11_error(exc), method)
    except HttpError as error:
        respond(conn, error, method)


def finish(conn: h11.Connection, method: bytes | None) -> None:
    upstream_headers: list[Header] = [
        (b"Content-Type", b"text/event-stream"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"keep-alive"),
    ]
    headers = downstream_response_headers(upstream_headers)
    assert is_event_stream(headers)
    conn.send(h11.Response(status_code=200, headers=headers, reason=b"OK"))
    if method != b"HEAD":
        conn.send(h11.Data(data=b"data: {}\n\n"))
    conn.send(h11.EndOfMessage())


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# -- strategies --------------------------------------------------------------------------------

NAMES = [
    b"Host",
    b"Content-Length",
    b"content-length",
    b"Transfer-Encoding",
    b"TRANSFER-ENCODING",
    b"Connection",
    b"Expect",
    b"Upgrade",
    b"TE",
    b"Trailer",
    b"Keep-Alive",
    b"Proxy-Authorization",
    b"X-Forwarded-For",
    b"X-Forwarded-Host",
    b"Via",
    b"X-PQ-TLS-Group",
    b"x-pq-tls-resumed",
    b"Content-Type",
    b"X-Custom",
]
VALUES = [
    b"chunked",
    b"Chunked",
    b" chunked ",
    b"chunked, chunked",
    b"gzip, chunked",
    b"chunked, gzip",
    b"chunked,",
    b"gzip",
    b"identity",
    b"",
    b"0",
    b"3",
    b"5",
    b"5, 5",
    b"5, 6",
    b"+5",
    b"-1",
    b"0x5",
    b"99999999999999999999999",
    b"100-continue",
    b"close",
    b"keep-alive, X-Custom",
    b"Host, Content-Length, X-Forwarded-For",
    b"a",
    b"example.com:8443",
    b"10.0.0.1, 10.0.0.2",
    b"text/event-stream",
]
TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
token = st.text(alphabet=TCHAR, min_size=1, max_size=12).map(str.encode)
names = st.one_of(st.sampled_from(NAMES), token)
field_values = st.one_of(st.sampled_from(VALUES), st.binary(max_size=24))


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out = b""
    for size in sizes:
        piece, body = body[: size + 1], body[size + 1 :]
        if piece:
            out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    if body:
        out += b"%x\r\n" % len(body) + body + b"\r\n"
    return out + b"0\r\n\r\n"


BENIGN_NAMES = [b"Connection", b"Expect", b"Upgrade", b"TE", b"Keep-Alive", b"Proxy-Authorization"]
BENIGN_NAMES += [b"X-Forwarded-For", b"Via", b"X-PQ-TLS-Group", b"Content-Type", b"X-Custom"]


# Each list smuggles a second reading of the body length past a parser that reads it once.
HOSTILE_FRAMING: list[list[Header]] = [
    [(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")],
    [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"0")],
    [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"identity")],
    [(b"Transfer-Encoding", b"gzip, chunked")],
    [(b"Transfer-Encoding", b" chunked")],
    [(b"Transfer-Encoding", b"chunked")],  # hostile only on HTTP/1.0
    [(b"Content-Length", b"3"), (b"Content-Length", b"03")],
    [(b"Content-Length", b"3, 3")],
    [(b"Content-Length", b"3, 4")],
]


@st.composite
def request_streams(draw: st.DrawFn) -> list[bytes]:
    """One or two pipelined requests: well framed (none, Content-Length, chunked) with noise
    around it, or with hostile framing fields thrown in."""
    stream = b""
    for _ in range(draw(st.integers(1, 2))):
        method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"get"]))
        target = draw(
            st.sampled_from(
                [b"/", b"/v1/chat/completions?key=sk-1", b"*", b"http://u:p@h:1/x?y", b"/%00"]
            )
        )
        version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.0", b"2.0"]))
        eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
        framing = draw(st.sampled_from(["none", "length", "chunked", "hostile"]))
        field_names = names if framing == "hostile" else st.sampled_from(BENIGN_NAMES) | token
        fields = draw(st.lists(st.tuples(field_names, field_values), max_size=8))
        if draw(st.integers(0, 9)):
            fields.insert(draw(st.integers(0, len(fields))), (b"Host", b"api.example"))
        body = draw(st.binary(max_size=80))
        if framing == "length":
            fields.append((b"Content-Length", b"%d" % len(body)))
        elif framing == "chunked":
            fields.append((b"Transfer-Encoding", b"chunked"))
            body = chunked(body, draw(st.lists(st.integers(0, 20), max_size=4)))
        elif framing == "none":
            body = b""
        else:
            hostile = draw(st.sampled_from(HOSTILE_FRAMING))
            fields[len(fields) // 2 : len(fields) // 2] = hostile
            if draw(st.booleans()):
                body = chunked(body, [])
        head = method + b" " + target + b" HTTP/" + version + eol
        head += b"".join(name + b": " + value + eol for name, value in fields) + eol
        stream += head + body
    return split(stream, draw(st.lists(st.integers(0, 10_000), max_size=6)))


VALID = [
    b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-A\r\nX-A: 1\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: b\r\n\r\n",
]
SNIPPETS = [
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 0\r\n",
    b"Content-Length: 4\r\n",
    b"\r\n",
    b"\n",
    b" ",
    b",",
    b"\x00",
    b"0\r\n\r\n",
    b"GET / HTTP/1.1\r\n",
]


@st.composite
def mutated_streams(draw: st.DrawFn) -> list[bytes]:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.integers(0, 3))
        if action == 0 and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif action == 1:
            data[at:at] = draw(st.sampled_from(SNIPPETS))
        elif action == 2:
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data[at:at] = bytes(data[at : at + draw(st.integers(1, 40))])  # duplicate a run
    return split(bytes(data), draw(st.lists(st.integers(0, 10_000), max_size=6)))


# -- the properties ----------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
def test_random_bytes(data: bytes, cuts: list[int]) -> None:
    drive(split(data, cuts))


@FUZZ
@given(request_streams())
def test_generated_requests(chunks: list[bytes]) -> None:
    drive(chunks)


@FUZZ
@given(mutated_streams())
def test_mutated_requests(chunks: list[bytes]) -> None:
    drive(chunks)


@FUZZ
@given(
    st.lists(st.tuples(names, field_values), max_size=10),
    st.sampled_from([b"1.1", b"1.0", b"0.9", b"2.0", b""]),
)
def test_header_functions_on_raw_lists(fields: list[Header], version: bytes) -> None:
    try:
        check_request_framing(fields, http_version=version)
    except HttpError as error:
        assert error.status in (400, 501)  # 501: a transfer coding not relayable
    declared_content_length(fields)
    is_event_stream(fields)
    stripped = strip_hop_by_hop(fields)
    assert all(name == name.lower() for name, _ in stripped)
    assert not {name for name, _ in stripped} & {b"connection", b"transfer-encoding", b"te"}
    response = downstream_response_headers(fields)
    assert [v for n, v in response if n == b"via"][-1].endswith(b"1.1 pqproxy")
    try:
        upstream = upstream_request_headers(
            fields, client_ip="2001:db8::1", host=b"a", tls=TLS, http_version=version
        )
    except HttpError as error:
        assert error.status == 400
    else:
        forged = [v for n, v in upstream if n.startswith(b"x-pq-tls-group")]
        assert forged == [b"X25519MLKEM768"]


@FUZZ
@given(st.text(max_size=40), st.integers(0, 1000))
def test_classify_never_raises(message: str, hint: int) -> None:
    error = classify_h11_error(h11.RemoteProtocolError(message, hint))
    assert error.status == (431 if hint == 431 else 400)
    assert isinstance(error.reason, str) and isinstance(error.message, str)


@FUZZ
@given(st.integers(400, 599), st.text(max_size=60), st.none() | st.text(max_size=30))
def test_error_responses_serialize(status: int, message: str, request_id: str | None) -> None:
    response, body = error_response(status, message, request_id=request_id)
    server = h11.Connection(h11.SERVER)
    server.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(server.next_event(), h11.Request)
    wire = (
        server.send(response) + server.send(h11.Data(data=body)) + server.send(h11.EndOfMessage())
    )

    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
    client.send(h11.EndOfMessage())
    client.receive_data(wire)
    parsed = client.next_event()
    assert isinstance(parsed, h11.Response) and parsed.status_code == status
    data = client.next_event()
    assert isinstance(data, h11.Data)
    document = json.loads(bytes(data.data))["error"]
    assert document["message"] == message and document["status"] == status
    assert document.get("request_id") == request_id
