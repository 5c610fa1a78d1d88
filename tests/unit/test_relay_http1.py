"""The HTTP/1.1 rules of pqproxy/relay/, driven through real h11 connections.

Requests are raw bytes fed into an h11 SERVER connection, as the driver does; what the proxy
sends is serialized by h11 and parsed back by an independent h11 connection in the other role.
"""

from __future__ import annotations

import dataclasses
import json

import h11
import pytest

from pqproxy.relay.body import body_too_large
from pqproxy.relay.errors import CLOSING_STATUSES, HttpError, classify_h11_error, error_response
from pqproxy.relay.fields import strip_hop_by_hop
from pqproxy.relay.forwarding import (
    ClientTLSInfo,
    ForwardingOptions,
    request_host,
    upstream_request_headers,
)
from pqproxy.relay.request import (
    HeaderLimits,
    RequestTarget,
    check_request,
    check_request_framing,
    expects_continue,
    head_size,
    request_summary,
)
from pqproxy.relay.response import downstream_response_headers, is_event_stream
from pqproxy.tls.enums import CipherSuite, NamedGroup, SignatureScheme
from pqproxy.tls.events import HandshakeComplete

TLS = ClientTLSInfo(
    group="X25519MLKEM768",
    cipher="TLS_AES_128_GCM_SHA256",
    resumed=False,
    signature="ecdsa_secp256r1_sha256",
    alpn="http/1.1",
    sni="api.example",
)

Events = list[h11.Request | h11.Data | h11.EndOfMessage]


def head(*lines: str, version: str = "1.1", request_line: str = "POST /v1/completions") -> bytes:
    return (
        f"{request_line} HTTP/{version}\r\n".encode()
        + b"".join(line.encode("latin-1") + b"\r\n" for line in lines)
        + b"\r\n"
    )


def receive(data: bytes, limits: HeaderLimits | None = None) -> Events:
    """Everything an h11 server yields for `data` (the driver's side of the proxy)."""
    conn = (limits or HeaderLimits()).server_connection()
    conn.receive_data(data)
    events: Events = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return events
        assert isinstance(event, h11.Request | h11.Data | h11.EndOfMessage)
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            return events


def admit(data: bytes, limits: HeaderLimits | None = None) -> h11.Request:
    """What the driver does with a request head: h11, then our checks. Raises HttpError."""
    limits = limits or HeaderLimits()
    try:
        events = receive(data, limits)
    except h11.RemoteProtocolError as exc:
        raise classify_h11_error(exc) from exc
    request = events[0]
    assert isinstance(request, h11.Request)
    check_request(request)
    limits.check_head(request)
    return request


def body_of(events: Events) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data))


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name for name, _ in headers]


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for n, value in headers if n == name]


# -- request framing ---------------------------------------------------------------------------

REFUSED = [
    pytest.param(head("Host: a", "Content-Length: 5", "Transfer-Encoding: chunked"), id="CL+TE"),
    pytest.param(head("Host: a", "Transfer-Encoding: chunked", "Content-Length: 5"), id="TE+CL"),
    pytest.param(head("Host: a", "Content-Length: 5", "Content-Length: 6"), id="CL-mismatch"),
    pytest.param(head("Host: a", "Content-Length: 5, 6"), id="CL-list-mismatch"),
    pytest.param(head("Host: a", "Content-Length: +5"), id="CL-signed"),
    pytest.param(head("Host: a", "Content-Length: 0x5"), id="CL-hex"),
    pytest.param(head("Host: a", "Transfer-Encoding: gzip"), id="TE-gzip"),
    pytest.param(head("Host: a", "Transfer-Encoding: chunked, gzip"), id="TE-chunked-gzip"),
    pytest.param(head("Host: a", "Transfer-Encoding: gzip, chunked"), id="TE-gzip-chunked"),
    pytest.param(
        head("Host: a", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), id="TE-twice"
    ),
    pytest.param(head("Host: a", "Transfer-Encoding: chunked", version="1.0"), id="TE-HTTP/1.0"),
    pytest.param(head("Host: a", "X: a\x00b"), id="NUL-in-value"),
    pytest.param(head("Host : a"), id="space-before-colon"),
    pytest.param(head(), id="HTTP/1.1-without-Host"),
    pytest.param(b"\x16\x03\x01\x00\x05hello\r\n\r\n", id="TLS-on-plain-port"),
]


@pytest.mark.parametrize("data", REFUSED)
def test_framing_attacks_get_400(data: bytes) -> None:
    with pytest.raises(HttpError) as info:
        admit(data)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("data", "h11_hint"),
    [
        # h11 0.16 accepts these two and reads the body as chunked: only our check stops them.
        (head("Host: a", "Content-Length: 5", "Transfer-Encoding: chunked"), None),
        (head("Host: a", "Transfer-Encoding: chunked", version="1.0"), None),
        (head("Host: a", "Content-Length: 5", "Content-Length: 6"), 400),
        (head("Host: a", "Content-Length: 5, 6"), 400),
        (head("Host: a", "Transfer-Encoding: gzip"), 501),
        (head("Host: a", "Transfer-Encoding: chunked, gzip"), 501),
        (head("Host: a", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), 501),
        (head("Host: a", request_line="GET /"), None),
    ],
)
def test_h11_behaviour_matches_the_module_docstring(data: bytes, h11_hint: int | None) -> None:
    """If h11 changes what it refuses, the table in relay/request.py's docstring is stale."""
    try:
        receive(data)
    except h11.RemoteProtocolError as exc:
        assert exc.error_status_hint == h11_hint
    else:
        assert h11_hint is None


def test_http_2_head_gets_505_and_closes() -> None:
    with pytest.raises(HttpError) as info:
        admit(head("Host: a", version="2.0", request_line="GET /"))
    assert info.value.status == 505
    assert 505 in CLOSING_STATUSES


def upstream_round_trip(request: h11.Request, body: bytes) -> Events:
    """Send `request` upstream as the driver would, and parse it as the model server would."""
    headers = upstream_request_headers(
        request.headers, client_ip="192.0.2.7", host=request_host(request), tls=TLS
    )
    client = h11.Connection(h11.CLIENT)
    wire = client.send(h11.Request(method=request.method, target=request.target, headers=headers))
    if body:
        wire += client.send(h11.Data(data=body))
    wire += client.send(h11.EndOfMessage())
    return receive(wire)


def test_valid_chunked_request_passes_and_stays_chunked_upstream() -> None:
    data = head("Host: a", "Transfer-Encoding: chunked") + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    request = admit(data)
    assert body_of(receive(data)) == b"abcde"
    upstream = upstream_round_trip(request, b"abcde")
    forwarded = upstream[0]
    assert isinstance(forwarded, h11.Request)
    assert values(list(forwarded.headers), b"transfer-encoding") == [b"chunked"]
    assert values(list(forwarded.headers), b"content-length") == []
    assert body_of(upstream) == b"abcde"


def test_valid_content_length_request_passes_and_keeps_its_length() -> None:
    data = head("Host: a", "Content-Length: 5", "Content-Length: 5") + b"hello"
    request = admit(data)
    upstream = upstream_round_trip(request, b"hello")
    forwarded = upstream[0]
    assert isinstance(forwarded, h11.Request)
    assert values(list(forwarded.headers), b"content-length") == [b"5"]
    assert values(list(forwarded.headers), b"transfer-encoding") == []
    assert body_of(upstream) == b"hello"


def test_bodiless_get_passes() -> None:
    request = admit(head("Host: a", request_line="GET /health"))
    assert request.method == b"GET"


@pytest.mark.parametrize(
    ("headers", "version"),
    [
        ([(b"Content-Length", b"5"), (b"content-length", b"5")], b"1.1"),
        ([(b"Content-Length", b"5, 5")], b"1.1"),
        ([(b"Content-Length", b" 5\t")], b"1.1"),
        ([(b"TRANSFER-ENCODING", b"Chunked")], b"1.1"),
        ([(b"Transfer-Encoding", b"chunked,")], b"1.1"),  # empty list element, RFC 9110 §5.6.1
        ([(b"Content-Length", b"5")], b"1.0"),
        ([], b"1.0"),
    ],
)
def test_raw_framing_accepted(headers: list[tuple[bytes, bytes]], version: bytes) -> None:
    check_request_framing(headers, http_version=version)


@pytest.mark.parametrize(
    ("headers", "version", "why"),
    [
        ([(b"content-length", b"5"), (b"Transfer-Encoding", b"chunked")], b"1.1", "together"),
        ([(b"Content-Length", b"5"), (b"Content-Length", b"6")], b"1.1", "conflicting"),
        ([(b"Content-Length", b"5, 6")], b"1.1", "conflicting"),
        ([(b"Content-Length", b"5,")], b"1.1", "decimal"),
        ([(b"Content-Length", b"")], b"1.1", "decimal"),
        ([(b"Content-Length", b"-1")], b"1.1", "decimal"),
        ([(b"Content-Length", b"\xd9\xa5")], b"1.1", "decimal"),  # Arabic-Indic five
        ([(b"Transfer-Encoding", b"gzip")], b"1.1", "final coding"),
        ([(b"Transfer-Encoding", b"chunked, gzip")], b"1.1", "final coding"),
        ([(b"Transfer-Encoding", b"")], b"1.1", "final coding"),
        (
            [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
            b"1.1",
            "more than once",
        ),
        ([(b"Transfer-Encoding", b"chunked")], b"1.0", "HTTP/1.0"),
    ],
)
def test_raw_framing_refused(headers: list[tuple[bytes, bytes]], version: bytes, why: str) -> None:
    with pytest.raises(HttpError) as info:
        check_request_framing(headers, http_version=version)
    assert info.value.status == 400
    assert why in info.value.reason
    assert why in info.value.message


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"foo, chunked", b"chunked;x=1", b"foo"])
def test_raw_framing_unknown_or_unrelayable_coding_is_501(coding: bytes) -> None:
    # RFC 9112 §6.1: a transfer coding the server does not understand SHOULD get 501.
    with pytest.raises(HttpError) as info:
        check_request_framing([(b"Transfer-Encoding", coding)])
    assert info.value.status == 501


# -- h11 errors --------------------------------------------------------------------------------


def h11_error(data: bytes, limits: HeaderLimits | None = None) -> h11.RemoteProtocolError:
    with pytest.raises(h11.RemoteProtocolError) as info:
        receive(data, limits)
    return info.value


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (head("Host: a", "Transfer-Encoding: gzip"), 400),  # h11 hints 501
        (head("Host: a", "Content-Length: 5, 6"), 400),
        (b"GET /\r\n\r\n", 400),
        (head("Host: a", "X-Big: " + "a" * 300)[:-4], 431),  # incomplete head beyond the cap
    ],
)
def test_classify_h11_error(data: bytes, status: int) -> None:
    error = classify_h11_error(h11_error(data, HeaderLimits(max_header_bytes=256)))
    assert error.status == status
    assert error.reason.startswith("h11 refused the request")


def test_classified_reason_does_not_log_the_offending_bytes() -> None:
    exc = h11_error(head("Host: a", "Authorization: Bearer sk-secret\x00"))
    assert "sk-secret" in str(exc)  # h11 quotes the line ...
    error = classify_h11_error(exc)
    assert "sk-secret" not in error.reason  # ... the log line does not
    assert "sk-secret" not in error.message
    assert error.status == 400


# -- header size limits ------------------------------------------------------------------------


def test_oversized_head_in_one_read_passes_h11_but_gets_431() -> None:
    limits = HeaderLimits(max_header_bytes=256)
    data = head("Host: a", "X-Big: " + "a" * 300, request_line="GET /")
    events = receive(data, limits)  # h11 only caps incomplete heads
    assert isinstance(events[0], h11.Request)
    assert head_size(events[0]) > 256
    with pytest.raises(HttpError) as info:
        limits.check_head(events[0])
    assert info.value.status == 431


def test_oversized_head_in_pieces_is_refused_by_h11_as_431() -> None:
    limits = HeaderLimits(max_header_bytes=256)
    conn = limits.server_connection()
    conn.receive_data(head("Host: a", "X-Big: " + "a" * 300)[:200])
    assert conn.next_event() is h11.NEED_DATA
    conn.receive_data(b"a" * 100)
    with pytest.raises(h11.RemoteProtocolError) as info:
        conn.next_event()
    assert classify_h11_error(info.value).status == 431


def test_head_size_is_close_to_the_wire_size() -> None:
    data = head("Host: example", "Content-Length: 0", "X-A: b", request_line="GET /p?q=1")
    request = admit(data)
    assert head_size(request) == len(data)


def test_head_at_the_limit_passes() -> None:
    data = head("Host: a", "X-Pad: " + "p" * 100, request_line="GET /")
    limits = HeaderLimits(max_header_bytes=len(data))
    admit(data, limits)
    with pytest.raises(HttpError):
        admit(data, HeaderLimits(max_header_bytes=len(data) - 1))


def test_too_many_header_fields_get_431() -> None:
    limits = HeaderLimits(max_header_count=3)
    admit(head("Host: a", "A: 1", "B: 2", request_line="GET /"), limits)
    with pytest.raises(HttpError) as info:
        admit(head("Host: a", "A: 1", "B: 2", "C: 3", request_line="GET /"), limits)
    assert info.value.status == 431


def test_oversized_trailers_get_431() -> None:
    limits = HeaderLimits(max_header_bytes=128)
    data = head("Host: a", "Transfer-Encoding: chunked") + b"0\r\nX-T: " + b"a" * 200 + b"\r\n\r\n"
    end = receive(data, limits)[-1]
    assert isinstance(end, h11.EndOfMessage)
    with pytest.raises(HttpError) as info:
        limits.check_trailers(end.headers)
    assert info.value.status == 431
    limits.check_trailers([(b"x-t", b"small")])


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        HeaderLimits(max_header_bytes=0)
    with pytest.raises(ValueError):
        HeaderLimits(max_header_count=0)


# -- hop-by-hop --------------------------------------------------------------------------------


def test_strip_hop_by_hop() -> None:
    headers = [
        (b"Host", b"a"),
        (b"Connection", b"close, X-Custom"),
        (b"connection", b"x-other"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-T"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Proxy-Authorization", b"Basic dXNlcjpwYXNz"),
        (b"X-Custom", b"drop me"),
        (b"X-Other", b"drop me too"),
        (b"Authorization", b"Bearer keep-me"),
        (b"Content-Length", b"5"),
        (b"X-Kept", b"1"),
    ]
    assert strip_hop_by_hop(headers) == [
        (b"host", b"a"),
        (b"authorization", b"Bearer keep-me"),
        (b"content-length", b"5"),
        (b"x-kept", b"1"),
    ]


def test_connection_cannot_remove_host_or_content_length() -> None:
    headers = [(b"host", b"a"), (b"content-length", b"3"), (b"connection", b"Host, Content-Length")]
    assert strip_hop_by_hop(headers) == [(b"host", b"a"), (b"content-length", b"3")]


# -- forwarding headers ------------------------------------------------------------------------


def forward(
    request_head: bytes,
    options: ForwardingOptions | None = None,
    *,
    tls: ClientTLSInfo = TLS,
    upstream_host: bytes | None = None,
) -> list[tuple[bytes, bytes]]:
    request = admit(request_head)
    return upstream_request_headers(
        request.headers,
        client_ip="192.0.2.7",
        host=request_host(request),
        tls=tls,
        options=options or ForwardingOptions(),
        http_version=request.http_version,
        upstream_host=upstream_host,
    )


def test_forged_tls_info_headers_are_replaced() -> None:
    headers = forward(
        head(
            "Host: a",
            "X-PQ-TLS-Group: x25519",
            "x-pq-tls-group: secp256r1",
            "X-Pq-Tls-Resumed: 1",
            "X-PQ-TLS-Made-Up: 1",
            request_line="GET /",
        )
    )
    assert values(headers, b"x-pq-tls-group") == [b"X25519MLKEM768"]
    assert values(headers, b"x-pq-tls-cipher") == [b"TLS_AES_128_GCM_SHA256"]
    assert values(headers, b"x-pq-tls-resumed") == [b"0"]
    assert values(headers, b"x-pq-tls-signature") == [b"ecdsa_secp256r1_sha256"]
    assert values(headers, b"x-pq-tls-made-up") == []


def test_forged_tls_info_headers_are_removed_even_when_disabled() -> None:
    data = head("Host: a", "X-PQ-TLS-Group: forged", "X-Mine-Group: forged", request_line="GET /")
    off = forward(data, ForwardingOptions(tls_info_prefix=None))
    assert not [n for n in names(off) if n.startswith(b"x-pq-tls")]
    custom = forward(data, ForwardingOptions(tls_info_prefix="X-Mine"))
    assert values(custom, b"x-mine-group") == [b"X25519MLKEM768"]
    # The client's header under the custom prefix is gone; the default-prefix one is passed on
    # (the operator chose another name, so the upstream does not trust that one).
    assert values(custom, b"x-pq-tls-group") == [b"forged"]


def test_resumed_connection_says_psk_as_its_signature() -> None:
    tls = ClientTLSInfo("X25519MLKEM768", "TLS_AES_256_GCM_SHA384", True, "psk", None, None)
    headers = forward(head("Host: a", request_line="GET /"), tls=tls)
    assert values(headers, b"x-pq-tls-resumed") == [b"1"]
    assert values(headers, b"x-pq-tls-signature") == [b"psk"]


def test_x_forwarded_for_is_appended() -> None:
    headers = forward(
        head(
            "Host: a",
            "X-Forwarded-For: 10.0.0.1",
            "X-Forwarded-For: 10.0.0.2",
            request_line="GET /",
        )
    )
    assert values(headers, b"x-forwarded-for") == [b"10.0.0.1, 10.0.0.2, 192.0.2.7"]
    assert values(forward(head("Host: a", request_line="GET /")), b"x-forwarded-for") == [
        b"192.0.2.7"
    ]


def test_proto_host_and_via_are_set() -> None:
    headers = forward(
        head(
            "Host: api.example",
            "X-Forwarded-Proto: http",
            "X-Forwarded-Host: evil.example",
            "Via: 1.1 edge",
            request_line="GET /",
        )
    )
    assert values(headers, b"x-forwarded-proto") == [b"https"]
    assert values(headers, b"x-forwarded-host") == [b"api.example"]
    assert values(headers, b"via") == [b"1.1 edge, 1.1 pqproxy"]
    assert values(headers, b"host") == [b"api.example"]


def test_via_names_the_received_protocol_version() -> None:
    headers = forward(head("Host: a", version="1.0", request_line="GET /"))
    assert values(headers, b"via") == [b"1.0 pqproxy"]


CLIENT_SENT = head(
    "Host: a",
    "X-Forwarded-For: 10.0.0.1",
    "X-Forwarded-Proto: http",
    "X-Forwarded-Host: b",
    "Via: 1.1 edge",
    request_line="GET /",
)


@pytest.mark.parametrize(
    ("off_options", "header", "client_value", "our_value"),
    [
        (
            ForwardingOptions(x_forwarded_for=False),
            b"x-forwarded-for",
            b"10.0.0.1",
            b"10.0.0.1, 192.0.2.7",
        ),
        (ForwardingOptions(x_forwarded_proto=False), b"x-forwarded-proto", b"http", b"https"),
        (ForwardingOptions(x_forwarded_host=False), b"x-forwarded-host", b"b", b"a"),
        (ForwardingOptions(via=False), b"via", b"1.1 edge", b"1.1 edge, 1.1 pqproxy"),
    ],
)
def test_each_option_switches_its_header_off(
    off_options: ForwardingOptions, header: bytes, client_value: bytes, our_value: bytes
) -> None:
    assert values(forward(CLIENT_SENT), header) == [our_value]
    off = forward(CLIENT_SENT, off_options)
    assert values(off, header) == [client_value]
    assert values(off, b"x-pq-tls-group") == [b"X25519MLKEM768"]


def test_tls_info_option_off() -> None:
    headers = forward(
        head("Host: a", request_line="GET /"), ForwardingOptions(tls_info_prefix=None)
    )
    assert not [n for n in names(headers) if n.startswith(b"x-pq-tls")]
    assert values(headers, b"x-forwarded-proto") == [b"https"]


def test_hop_by_hop_and_connection_named_headers_do_not_go_upstream() -> None:
    headers = forward(
        head(
            "Host: a",
            "Connection: keep-alive, X-Secret-Hop, X-Forwarded-For",
            "X-Secret-Hop: 1",
            "Proxy-Authorization: Basic dXNlcjpwYXNz",
            "Upgrade: websocket",
            "X-Forwarded-For: 10.0.0.1",
            request_line="GET /",
        )
    )
    for name in (b"connection", b"x-secret-hop", b"proxy-authorization", b"upgrade"):
        assert name not in names(headers)
    # The client can drop its own X-Forwarded-For by naming it, never the proxy's entry.
    assert values(headers, b"x-forwarded-for") == [b"192.0.2.7"]


def test_http_1_0_request_without_host() -> None:
    data = head(version="1.0", request_line="GET /")
    with pytest.raises(HttpError) as info:
        forward(data)
    assert info.value.status == 400
    headers = forward(data, upstream_host=b"127.0.0.1:8000")
    assert values(headers, b"host") == [b"127.0.0.1:8000"]
    assert values(headers, b"x-forwarded-host") == []


def test_upstream_host_replaces_host_and_the_original_is_forwarded() -> None:
    headers = forward(head("Host: api.example", request_line="GET /"), upstream_host=b"vllm:8000")
    assert values(headers, b"host") == [b"vllm:8000"]
    assert values(headers, b"x-forwarded-host") == [b"api.example"]


def test_absolute_form_target_names_the_host() -> None:
    request = admit(head("Host: ignored", request_line="GET http://api.example:8443/v1?k=1"))
    assert request_host(request) == b"api.example:8443"
    assert request_summary(request) == "GET /v1"
    assert check_request(request) == RequestTarget(b"/v1?k=1", b"api.example:8443")
    # Userinfo may be a password (RFC 9110 §4.2.4): refused, and never in a log line.
    with pytest.raises(HttpError) as info:
        admit(head("Host: a", request_line="GET http://user:pw@api.example:8443/v1"))
    assert info.value.status == 400 and "pw" not in info.value.reason


def test_client_tls_info_from_handshake() -> None:
    event = HandshakeComplete(
        group=NamedGroup.X25519MLKEM768,
        cipher_suite=CipherSuite.TLS_AES_128_GCM_SHA256,
        signature_scheme=SignatureScheme.ecdsa_secp256r1_sha256,
        alpn_protocol="http/1.1",
        server_name="api.example",
        hello_retry=False,
    )
    assert ClientTLSInfo.from_handshake(event) == TLS
    # A resumed session made no signature (the engine reports scheme 0): "psk" stands for it.
    resumed = ClientTLSInfo.from_handshake(
        dataclasses.replace(event, signature_scheme=0, resumed=True)
    )
    assert resumed.resumed and resumed.signature == "psk"
    odd = HandshakeComplete(0x1234, 0x1399, 0x0999, None, None, False)
    info = ClientTLSInfo.from_handshake(odd)
    assert (info.group, info.cipher, info.signature) == ("0x1234", "0x1399", "0x0999")


# -- response side -----------------------------------------------------------------------------


def serve(request_head: bytes, response: h11.Response, body: bytes) -> bytes:
    """The bytes an h11 server writes for `response` after reading `request_head`."""
    conn = HeaderLimits().server_connection()
    conn.receive_data(request_head)
    while not isinstance(conn.next_event(), h11.EndOfMessage):
        pass
    wire = conn.send(response)
    if body:
        wire += conn.send(h11.Data(data=body))
    return wire + conn.send(h11.EndOfMessage())


def read_response(
    wire: bytes, method: bytes = b"GET"
) -> tuple[h11.Response, bytes, h11.Connection]:
    """Parse `wire` as a client that sent `method /` would (an independent h11 CLIENT)."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("host", "a")]))
    client.send(h11.EndOfMessage())
    client.receive_data(wire)
    client.receive_data(b"")
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data)
        body += event.data
    return response, body, client


UPSTREAM_RESPONSE = [
    (b"Content-Type", b"text/event-stream"),
    (b"Transfer-Encoding", b"chunked"),
    (b"Content-Length", b"999"),
    (b"Connection", b"keep-alive, X-Upstream-Hop"),
    (b"Keep-Alive", b"timeout=5"),
    (b"X-Upstream-Hop", b"1"),
    (b"Via", b"1.1 vllm"),
    (b"X-Request-Id", b"r1"),
]


def test_downstream_response_headers() -> None:
    headers = downstream_response_headers(UPSTREAM_RESPONSE)
    assert headers == [
        (b"content-type", b"text/event-stream"),
        (b"x-request-id", b"r1"),
        (b"via", b"1.1 vllm, 1.1 pqproxy"),
    ]
    no_via = downstream_response_headers(UPSTREAM_RESPONSE, options=ForwardingOptions(via=False))
    assert values(no_via, b"via") == [b"1.1 vllm"]


def test_downstream_keeps_content_length_without_transfer_encoding() -> None:
    headers = downstream_response_headers([(b"content-length", b"5")], http_version=b"1.0")
    assert headers == [(b"content-length", b"5"), (b"via", b"1.0 pqproxy")]


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_relayed_stream_is_framed_by_h11_for_each_client(version: str) -> None:
    response = h11.Response(
        status_code=200, headers=downstream_response_headers(UPSTREAM_RESPONSE), reason=b"OK"
    )
    wire = serve(head("Host: a", version=version, request_line="GET /"), response, b"data: x\n\n")
    parsed, body, _ = read_response(wire)
    assert parsed.status_code == 200
    assert body == b"data: x\n\n"
    assert is_event_stream(parsed.headers)
    if version == "1.1":
        assert values(list(parsed.headers), b"transfer-encoding") == [b"chunked"]
    else:
        assert values(list(parsed.headers), b"connection") == [b"close"]


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (b"text/event-stream", True),
        (b"Text/Event-Stream; charset=utf-8", True),
        (b"application/json", False),
        (b"text/event-streamx", False),
    ],
)
def test_is_event_stream(content_type: bytes, expected: bool) -> None:
    assert is_event_stream([(b"Content-Type", content_type)]) is expected
    assert not is_event_stream([])


# -- error responses ---------------------------------------------------------------------------

ERRORS = [
    (400, "bad_request", b"Bad Request", True),
    (408, "request_timeout", b"Request Timeout", True),
    (413, "payload_too_large", b"Content Too Large", True),
    (431, "request_header_fields_too_large", b"Request Header Fields Too Large", True),
    (502, "bad_gateway", b"Bad Gateway", False),
    (503, "service_unavailable", b"Service Unavailable", False),
    (504, "gateway_timeout", b"Gateway Timeout", False),
]


@pytest.mark.parametrize(("status", "error_type", "phrase", "closes"), ERRORS)
def test_error_response_serializes(
    status: int, error_type: str, phrase: bytes, closes: bool
) -> None:
    response, body = error_response(status, "it broke", request_id="req-1")
    wire = serve(head("Host: a", request_line="GET /"), response, body)
    parsed, parsed_body, client = read_response(wire)
    assert parsed.status_code == status
    assert parsed.reason == phrase
    assert values(list(parsed.headers), b"content-type") == [b"application/json"]
    assert values(list(parsed.headers), b"x-request-id") == [b"req-1"]
    assert json.loads(parsed_body) == {
        "error": {
            "type": error_type,
            "message": "it broke",
            "status": status,
            "request_id": "req-1",
        }
    }
    assert (values(list(parsed.headers), b"connection") == [b"close"]) is closes
    assert (client.their_state is h11.MUST_CLOSE) is closes


def test_error_response_after_h11_refused_the_head() -> None:
    """The driver answers on the same h11 connection that raised, before any Request event."""
    conn = HeaderLimits().server_connection()
    conn.receive_data(head("Host: a", "Content-Length: 5, 6"))
    with pytest.raises(h11.RemoteProtocolError) as info:
        conn.next_event()
    error = classify_h11_error(info.value)
    response, body = error.response(request_id="r-9")
    wire = conn.send(response) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    assert conn.our_state is h11.MUST_CLOSE
    parsed, parsed_body, _ = read_response(wire)
    assert parsed.status_code == 400
    document = json.loads(parsed_body)["error"]
    assert document["type"] == "bad_request"
    assert "h11" not in document["message"]  # library text never goes on the wire
    assert document["request_id"] == "r-9"


def test_framing_error_message_explains_itself() -> None:
    with pytest.raises(HttpError) as info:
        admit(head("Host: a", "Content-Length: 5", "Transfer-Encoding: chunked"))
    _, body = info.value.response()
    assert "Content-Length" in json.loads(body)["error"]["message"]


def test_error_response_to_head_has_no_body() -> None:
    response, body = error_response(502, "down", head_request=True)
    assert body == b""
    wire = serve(head("Host: a", request_line="HEAD /"), response, body)
    parsed, parsed_body, _ = read_response(wire, method=b"HEAD")
    assert parsed.status_code == 502
    assert parsed_body == b""
    assert int(values(list(parsed.headers), b"content-length")[0]) > 0


def test_error_response_close_can_be_forced() -> None:
    response, _ = error_response(502, "upstream reset", close=True)
    assert (b"connection", b"close") in list(response.headers)
    response, _ = error_response(400, "x", close=False)
    assert b"connection" not in names(list(response.headers))


def test_error_response_for_other_statuses() -> None:
    response, body = error_response(500, "oops")
    assert response.reason == b"Internal Server Error"
    assert json.loads(body)["error"]["type"] == "internal_server_error"
    response, body = error_response(599, "odd")
    assert response.reason == b""
    assert json.loads(body)["error"]["type"] == "error"


def test_request_id_is_made_a_legal_field_value() -> None:
    response, _ = error_response(502, "x", request_id="a b\r\nInjected: 1")
    assert values(list(response.headers), b"x-request-id") == [b"a?b??Injected:?1"]


# -- Expect: 100-continue and body caps --------------------------------------------------------


def test_expects_continue() -> None:
    assert expects_continue(admit(head("Host: a", "Expect: 100-Continue", "Content-Length: 3")))
    assert not expects_continue(admit(head("Host: a", "Content-Length: 3")))
    # RFC 9110 §10.1.1: ignored in HTTP/1.0.
    assert not expects_continue(
        admit(head("Host: a", "Expect: 100-continue", "Content-Length: 3", version="1.0"))
    )


def test_body_too_large_answers_413_before_the_body() -> None:
    request = admit(head("Host: a", "Expect: 100-continue", "Content-Length: 11"))
    assert body_too_large(request.headers, 10)
    assert not body_too_large(request.headers, 11)
    chunked = admit(head("Host: a", "Transfer-Encoding: chunked"))
    assert not body_too_large(chunked.headers, 0)
    assert not body_too_large([(b"content-length", b"junk")], 0)
    response, body = error_response(413, "too big")
    assert (b"connection", b"close") in list(response.headers)


# -- logging -----------------------------------------------------------------------------------


def test_request_summary_drops_the_query_string() -> None:
    request = admit(head("Host: a", request_line="GET /v1/models?api_key=sk-secret"))
    assert request_summary(request) == "GET /v1/models"


def test_request_summary_is_capped_and_printable() -> None:
    request = h11.Request(method="GET", target="/" + "a" * 500, headers=[("host", "a")])
    assert len(request_summary(request)) == 200
    odd = h11.Request(method="GET", target="http://h", headers=[("host", "a")])
    assert request_summary(odd) == "GET /"
