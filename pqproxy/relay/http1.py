"""The HTTP/1.1 rules of the proxy, as pure functions over h11 types.

The asyncio driver (`pqproxy/io/`) owns the sockets and the clock; it feeds client bytes into an
h11 SERVER connection made by `HeaderLimits.server_connection()` and, for each request, calls:

1. `classify_h11_error` when h11 raises `RemoteProtocolError` (→ 400 or 431);
2. `check_request` and `HeaderLimits.check_head` on the `h11.Request` (→ 400, 431, 505);
3. `body_too_large` before reading a body (→ 413 at once, even under `Expect: 100-continue`);
4. `upstream_request_headers` to build the request it sends to the model server, and
   `downstream_response_headers` for the response it relays back;
5. `error_response` (or `HttpError.response`) for every answer the proxy writes itself.

Why the framing checks are short: the upstream never sees the client's bytes. Each message is
parsed by h11 and written again by h11, so parser differentials on syntax (bare LF, obs-fold,
odd whitespace) die at this hop. What survives re-serialisation is *meaning*: a message whose
body length two parsers could read differently (RFC 9112 §6.3). Those are refused here.

What h11 0.16 does with each framing attack, measured (see tests/unit/test_relay_http1.py):

======================================  ================================================
request head                            h11 0.16 as a server
======================================  ================================================
Content-Length + Transfer-Encoding      accepted, body read as chunked   → we refuse 400
Transfer-Encoding on HTTP/1.0           accepted, body read as chunked   → we refuse 400
Content-Length: 5 / Content-Length: 6   RemoteProtocolError, hint 400
Content-Length: 5, 6                    RemoteProtocolError, hint 400
Content-Length: +5 (or -1, 0x5, empty)  RemoteProtocolError, hint 400
Transfer-Encoding: gzip                 RemoteProtocolError, hint 501   → we answer 400
Transfer-Encoding: chunked, gzip        RemoteProtocolError, hint 501   → we answer 400
two Transfer-Encoding lines             RemoteProtocolError, hint 501   → we answer 400
incomplete head > max_incomplete_...    RemoteProtocolError "Receive buffer too long", 431
complete head > max_incomplete_...      accepted (one read held all of it) → `check_head` 431
GET / HTTP/2.0                          accepted as http_version b"2.0" → we answer 505
======================================  ================================================
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus

import h11

from ..crypto.provider import PeerIdentity
from ..logtext import printable
from ..tls.enums import CipherSuite, SignatureScheme, group_name
from ..tls.events import HandshakeComplete

Header = tuple[bytes, bytes]
HeaderList = list[Header]

# -- errors ------------------------------------------------------------------------------------

# The `type` of the JSON error body, in the OpenAI-style vocabulary that inference clients
# already parse. A status not listed falls back to its HTTPStatus name in snake case.
ERROR_TYPES: dict[int, str] = {
    400: "bad_request",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    431: "request_header_fields_too_large",
    501: "not_implemented",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}

# RFC 9110 renamed these; Python 3.11's HTTPStatus still has the RFC 7231 phrases, and the
# phrase on the wire should not change with the interpreter version.
_REASON_OVERRIDES: dict[int, str] = {
    413: "Content Too Large",  # RFC 9110 §15.5.14
    414: "URI Too Long",  # RFC 9110 §15.5.15
    422: "Unprocessable Content",  # RFC 9110 §15.5.21
}

_DEFAULT_MESSAGES: dict[int, str] = {
    400: "The request is malformed.",
    408: "The request was not received in time.",
    413: "The request body is too large.",
    414: "The request target is too long.",
    431: "The request header fields are too large.",
    501: "The request uses a transfer coding the proxy does not implement.",
    502: "The upstream server could not be reached or sent an invalid response.",
    503: "The service is temporarily unavailable.",
    504: "The upstream server did not answer in time.",
    505: "Only HTTP/1.0 and HTTP/1.1 are supported.",
}

# After these the bytes that follow on the connection cannot be trusted to start a new
# request: the head was malformed (400), cut short (408), or its body is left unread (405,
# 413, 414, 431, 501: a body whose framing we refused cannot be skipped). Keeping the
# connection would let the remainder be parsed as a request (smuggling).
CLOSING_STATUSES = frozenset({400, 405, 408, 413, 414, 431, 501, 505})


class HttpError(Exception):
    """An HTTP status the proxy answers itself.

    `reason` is for the log line only (it may quote what the client sent); `message` is what the
    client reads in the JSON body, and is always text written here, never a library's string.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        message: str | None = None,
        headers: HeaderList | None = None,
    ) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
        self.message = message if message is not None else default_message(status)
        # Fields the status requires beside the error body (Allow on a 405).
        self.headers: HeaderList = list(headers or ())

    def response(
        self,
        *,
        request_id: str | None = None,
        close: bool | None = None,
        head_request: bool = False,
    ) -> tuple[h11.Response, bytes]:
        return error_response(
            self.status,
            self.message,
            request_id=request_id,
            close=close,
            head_request=head_request,
            headers=self.headers,
        )


def default_message(status: int) -> str:
    if status in _DEFAULT_MESSAGES:
        return _DEFAULT_MESSAGES[status]
    return f"{reason_phrase(status).decode('ascii') or 'Error'}."


def reason_phrase(status: int) -> bytes:
    """The reason phrase for `status` (h11 sends none unless told)."""
    if status in _REASON_OVERRIDES:
        return _REASON_OVERRIDES[status].encode("ascii")
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    try:
        return HTTPStatus(status).name.lower()
    except ValueError:
        return "error"


def error_response(
    status: int,
    message: str,
    *,
    request_id: str | None = None,
    close: bool | None = None,
    head_request: bool = False,
    headers: Iterable[Header] = (),
) -> tuple[h11.Response, bytes]:
    """A response the proxy writes itself, and its JSON body; `headers` are added to it.

    `close=None` closes for `CLOSING_STATUSES`; the driver passes `close=True` for a 5xx when the
    client's request body was not read to its end. `head_request=True` returns an empty body
    (RFC 9110 §9.3.2: a response to HEAD has none; h11 raises if one is sent) while keeping the
    Content-Length a GET would have had.
    """
    error: dict[str, object] = {"type": error_type(status), "message": message, "status": status}
    if request_id is not None:
        error["request_id"] = request_id
    # ensure_ascii: the body is plain ASCII whatever the message holds.
    body = json.dumps({"error": error}, separators=(",", ":")).encode("ascii")
    fields: HeaderList = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        *headers,
    ]
    if request_id is not None:
        fields.append((b"x-request-id", _field_value(request_id)))
    if close if close is not None else status in CLOSING_STATUSES:
        fields.append((b"connection", b"close"))
    response = h11.Response(status_code=status, headers=fields, reason=reason_phrase(status))
    return response, b"" if head_request else body


def classify_h11_error(exc: h11.RemoteProtocolError) -> HttpError:
    """Map what h11 refused to the status we answer. Never raises.

    Classified by h11's `error_status_hint` only, never by its message text: 431 when an
    incomplete head outgrew `max_incomplete_event_size`; every other hint becomes 400. h11 hints
    501 for a transfer coding other than chunked; RFC 9112 §6.3 asks for 400 when chunked is not
    the final coding, and a proxy that cannot read the body cannot forward it either, so one
    status covers every Transfer-Encoding refusal.
    """
    hint = getattr(exc, "error_status_hint", 400)
    status = 431 if hint == 431 else 400
    return HttpError(status, f"h11 refused the request (hint {hint}): {_h11_summary(exc)}")


def _h11_summary(exc: BaseException) -> str:
    # h11's messages quote the offending bytes ("illegal header line: bytearray(b'...')"), and
    # those may be a bearer token. Keep h11's own words, before the first colon, for the log.
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else type(exc).__name__
    return text.split(":", 1)[0].strip()[:80]


# -- request framing ---------------------------------------------------------------------------

_SUPPORTED_VERSIONS = frozenset({b"1.0", b"1.1"})


def check_request(request: h11.Request) -> None:
    """Every check on a parsed request head that does not need configuration."""
    if request.http_version not in _SUPPORTED_VERSIONS:
        # h11 parses any HTTP/d.d; a 2.0 or 0.9 head on this port is not one we can relay.
        raise HttpError(505, f"HTTP/{request.http_version.decode('ascii', 'replace')} request")
    check_request_framing(request.headers, http_version=request.http_version)


def check_request_framing(headers: Iterable[Header], *, http_version: bytes = b"1.1") -> None:
    """Refuse a request whose body length two parsers could read differently (RFC 9112 §6.3).

    Works on raw header lists (any case, unvalidated values) as well as on h11's parsed ones,
    where h11 has already refused some of these cases itself.
    """
    lengths: list[bytes] = []
    codings: list[bytes] = []
    has_te = False
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            lengths.extend(part.strip(b" \t") for part in value.split(b","))
        elif lname == b"transfer-encoding":
            has_te = True
            # Empty list elements are legal and ignored (RFC 9110 §5.6.1).
            codings.extend(c for c in (p.strip(b" \t").lower() for p in value.split(b",")) if c)

    if has_te:
        if http_version < b"1.1":
            # RFC 9112 §6.1: an HTTP/1.0 recipient MUST treat such framing as faulty.
            _bad_request("Transfer-Encoding in an HTTP/1.0 request")
        if lengths:
            # RFC 9112 §6.1 lets a server reject this or obey Transfer-Encoding; h11 obeys it
            # silently, and an upstream or cache that obeyed Content-Length instead would see
            # a second request hidden in the body. Refuse.
            _bad_request("Transfer-Encoding together with Content-Length")
        if not codings or codings[-1] != b"chunked":
            # RFC 9112 §6.3 (4): the body length cannot be determined; MUST answer 400.
            _bad_request("Transfer-Encoding whose final coding is not chunked")
        if codings != [b"chunked"]:
            # gzip, chunked is legal HTTP, but h11 decodes chunked only, and chunked twice is
            # forbidden (RFC 9112 §7): refuse what we cannot relay faithfully.
            _bad_request("Transfer-Encoding other than a single chunked")
        return

    for length in lengths:
        # 1*DIGIT (RFC 9110 §8.6): no sign, no hex, no spaces inside, not empty.
        if not length.isdigit():
            _bad_request("Content-Length is not a decimal number")
    if len(set(lengths)) > 1:
        # RFC 9110 §8.6 allows merging identical repeats ("5, 5"); different values mean two
        # parsers may each pick a different one.
        _bad_request("conflicting Content-Length values")


def _bad_request(reason: str) -> None:
    # Our own wording, safe to show the client: it helps whoever debugs a broken client.
    raise HttpError(400, reason, message=f"Bad request framing: {reason}.")


def declared_content_length(headers: Iterable[Header]) -> int | None:
    """The Content-Length value, or None when absent or unreadable (framing checks refuse it)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            first = value.split(b",", 1)[0].strip(b" \t")
            return int(first) if first.isdigit() else None
    return None


def body_too_large(headers: Iterable[Header], max_body_bytes: int) -> bool:
    """True when the declared Content-Length exceeds the cap.

    The driver answers 413 before reading any of the body (and before relaying any 100
    Continue), then closes: the unread body would otherwise be parsed as the next request. A
    chunked body has no declared length; the driver counts it as it streams.
    """
    length = declared_content_length(headers)
    return length is not None and length > max_body_bytes


def expects_continue(request: h11.Request) -> bool:
    """True when the client waits for 100 Continue before sending its body.

    RFC 9110 §10.1.1: the expectation is case-insensitive, and a server MUST ignore it in an
    HTTP/1.0 request. The Expect header is end-to-end: the driver forwards it and relays the
    upstream's 100 (an `h11.InformationalResponse`) to the client.
    """
    if request.http_version < b"1.1":
        return False
    return any(
        token.strip(b" \t").lower() == b"100-continue"
        for name, value in request.headers
        if name == b"expect"
        for token in value.split(b",")
    )


# -- size limits -------------------------------------------------------------------------------

# h11's default max_incomplete_event_size, and what nginx's large_client_header_buffers allow.
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
# Apache's LimitRequestFields: more fields than this is an attack or a bug, not a client.
DEFAULT_MAX_HEADER_COUNT = 100


@dataclass(frozen=True)
class HeaderLimits:
    """Caps on a request head.

    h11 enforces `max_header_bytes` only on a head that is still incomplete, which is why
    `check_head` exists: a head that arrives whole in one read is returned by h11 whatever its
    size. The driver must call `next_event()` after every `receive_data()`, so that the buffer
    never holds more than one read beyond the cap.
    """

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT

    def __post_init__(self) -> None:
        if self.max_header_bytes < 64:
            raise ValueError(f"max_header_bytes must be at least 64, not {self.max_header_bytes}")
        if self.max_header_count < 1:
            raise ValueError(f"max_header_count must be at least 1, not {self.max_header_count}")

    def server_connection(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)

    def check_head(self, request: h11.Request) -> None:
        size = head_size(request)
        if size > self.max_header_bytes:
            raise HttpError(431, f"request head of {size} bytes > {self.max_header_bytes}")
        self._check_count(len(request.headers), "header")

    def check_trailers(self, trailers: Iterable[Header]) -> None:
        """The same caps on a chunked body's trailer section (h11's `EndOfMessage.headers`)."""
        fields = list(trailers)
        size = fields_size(fields)
        if size > self.max_header_bytes:
            raise HttpError(431, f"trailer section of {size} bytes > {self.max_header_bytes}")
        self._check_count(len(fields), "trailer")

    def _check_count(self, count: int, kind: str) -> None:
        if count > self.max_header_count:
            raise HttpError(431, f"{count} {kind} fields > {self.max_header_count}")


def fields_size(headers: Iterable[Header]) -> int:
    """Serialized size of header lines: `name: value\\r\\n` each."""
    return sum(len(name) + 2 + len(value) + 2 for name, value in headers)


def head_size(request: h11.Request) -> int:
    """Approximate serialized size of a request head: request line, fields, blank line.

    A lower bound of what was on the wire: h11 has already dropped optional whitespace and
    unfolded obs-fold lines.
    """
    request_line = len(request.method) + 1 + len(request.target) + 1 + len(b"HTTP/1.1") + 2
    return request_line + fields_size(request.headers) + 2


# -- hop-by-hop fields -------------------------------------------------------------------------

# RFC 9110 §7.6.1 names Connection, Proxy-Connection, Keep-Alive, TE, Transfer-Encoding and
# Upgrade; Trailer announces fields of a chunked body that this hop re-frames. Proxy-Authenticate
# and Proxy-Authorization (RFC 9110 §11.7) are addressed to the proxy that asks for them;
# pqproxy does no proxy authentication, so they are either meant for us (and unused) or a
# credential that must not leak to the model server.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# A Connection option naming one of these is ignored. Dropping Host or Content-Length would make
# the forwarded message unroutable or unframeable (h11 sends a request without Content-Length or
# Transfer-Encoding as bodiless), which is the "hop-by-hop header abuse" trick.
_NOT_CONNECTION_OPTIONS = frozenset({b"host", b"content-length"})


def connection_options(headers: Iterable[Header]) -> frozenset[bytes]:
    """The lowercased tokens of every Connection field."""
    return frozenset(
        token
        for name, value in headers
        if name.lower() == b"connection"
        for token in (t.strip(b" \t").lower() for t in value.split(b","))
        if token
    )


def strip_hop_by_hop(headers: Iterable[Header]) -> HeaderList:
    """Headers without hop-by-hop fields (RFC 9110 §7.6.1), names lowercased.

    Transfer-Encoding goes too: framing belongs to each hop, and the caller re-frames
    (`upstream_request_headers` and `downstream_response_headers` do).
    """
    fields = [(name.lower(), value) for name, value in headers]
    drop = HOP_BY_HOP | (connection_options(fields) - _NOT_CONNECTION_OPTIONS)
    return [(name, value) for name, value in fields if name not in drop]


# -- forwarding --------------------------------------------------------------------------------

DEFAULT_TLS_INFO_PREFIX = "X-PQ-TLS"
VIA_PSEUDONYM = b"pqproxy"
# X-PQ-TLS-Signature of a resumed session: it authenticated with the ticket's PSK, and no
# signature was made (RFC 8446 §2.2).
PSK_SIGNATURE = "psk"


# Headers pqproxy writes for the upstream besides the identity and TLS-info ones (whose names
# come from the configuration): the one list of what the proxy owns, with `proxy_owned`.
# Forwarded (RFC 7239) and X-Real-IP are not written by pqproxy and pass through as sent: an
# upstream must not trust them behind pqproxy.
FORWARDING_HEADER_NAMES = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via"}
)


class UnderscoreHeaders(StrEnum):
    """What happens to a client header whose name contains ``_``.

    CGI, WSGI and ASGI gateways map ``X_Client_Subject`` and ``X-Client-Subject`` to the same
    ``HTTP_X_CLIENT_SUBJECT``, so such a name can forge a header the proxy owns, or smuggle a
    second value beside the real one. nginx drops them (``underscores_in_headers off``), as
    does Envoy (``headers_with_underscores_action``).
    """

    DROP = "drop"  # removed, counted and logged (the default)
    REJECT = "reject"  # the request is answered 400 and never forwarded
    ALLOW = "allow"  # forwarded, except a name that normalises to one the proxy owns


class ForwardedFor(StrEnum):
    """How X-Forwarded-For is written.

    APPEND keeps the client's own entries and adds the peer address at the end: an upstream
    must count trusted hops from the right, because every entry left of them is whatever the
    client wrote. REPLACE sends the peer address alone, for upstreams that read the first
    (leftmost) entry as the client.
    """

    APPEND = "append"
    REPLACE = "replace"


def normalize_field_name(name: bytes) -> bytes:
    """A field name as every gateway compares it: case-folded, ``_`` read as ``-``.

    The one place names are normalised: whatever two spellings map to here reaches a
    CGI/WSGI/ASGI application as the same ``HTTP_*`` key.
    """
    return name.lower().replace(b"_", b"-")


@dataclass(frozen=True)
class IdentityHeaders:
    """Names of the request headers that carry the client certificate's identity upstream;
    None: that part is not sent. Whatever the client sent under these names is always
    removed first, whether or not the connection has an identity."""

    subject: str | None = "X-Client-Subject"
    uris: str | None = "X-Client-URI"
    dns: str | None = "X-Client-DNS"

    def lowered(self) -> frozenset[bytes]:
        return frozenset(
            n.lower().encode("ascii") for n in (self.subject, self.uris, self.dns) if n
        )


@dataclass(frozen=True)
class ForwardingOptions:
    """Which headers the proxy adds upstream. A disabled one is passed through as the client
    sent it, except the TLS-info and identity headers: those are always removed from the
    client's request."""

    x_forwarded_for: bool = True
    x_forwarded_proto: bool = True
    x_forwarded_host: bool = True
    via: bool = True
    tls_info_prefix: str | None = DEFAULT_TLS_INFO_PREFIX
    identity_headers: IdentityHeaders = IdentityHeaders()
    underscore_headers: UnderscoreHeaders = UnderscoreHeaders.DROP
    forwarded_for: ForwardedFor = ForwardedFor.APPEND

    def __post_init__(self) -> None:
        # Accept the plain strings a config or a test passes, keep the enum members.
        object.__setattr__(self, "underscore_headers", UnderscoreHeaders(self.underscore_headers))
        object.__setattr__(self, "forwarded_for", ForwardedFor(self.forwarded_for))

    @property
    def tls_prefix(self) -> bytes:
        """The lowercased TLS-info prefix; the default one when none is sent, so that a
        client's ``X-PQ-TLS-*`` never reaches the upstream either way."""
        return (self.tls_info_prefix or DEFAULT_TLS_INFO_PREFIX).lower().encode("ascii")


def proxy_owned(normalized: bytes, options: ForwardingOptions) -> bool:
    """Whether a normalised name (`normalize_field_name`) is one pqproxy writes itself: an
    identity header, a TLS-info header, X-Forwarded-For/-Proto/-Host or Via, whether or not
    the option that writes it is on."""
    return (
        normalized.startswith(options.tls_prefix)
        or normalized in FORWARDING_HEADER_NAMES
        or any(normalized == normalize_field_name(n) for n in options.identity_headers.lowered())
    )


@dataclass(frozen=True)
class ClientTLSInfo:
    """How the client connected, as the upstream sees it in the TLS-info headers."""

    group: str
    cipher: str
    resumed: bool
    signature: str | None
    alpn: str | None
    sni: str | None
    # The verified client certificate's identity (mutual TLS), None without one.
    identity: PeerIdentity | None = None

    @classmethod
    def from_handshake(cls, event: HandshakeComplete) -> ClientTLSInfo:
        return cls(
            group=group_name(event.group),
            cipher=_enum_name(CipherSuite, event.cipher_suite),
            resumed=event.resumed,
            signature=(
                PSK_SIGNATURE
                if event.resumed
                else _enum_name(SignatureScheme, event.signature_scheme)
            ),
            alpn=event.alpn_protocol,
            sni=event.server_name,
            identity=event.peer_identity,
        )


def _enum_name(enum: type[CipherSuite] | type[SignatureScheme], value: int) -> str:
    try:
        return enum(value).name
    except ValueError:
        return f"0x{value:04x}"


def upstream_request_headers(
    headers: Iterable[Header],
    *,
    client_ip: str,
    host: bytes | None,
    tls: ClientTLSInfo,
    options: ForwardingOptions = ForwardingOptions(),  # noqa: B008 - frozen, so shared safely
    http_version: bytes = b"1.1",
    upstream_host: bytes | None = None,
    on_dropped: Callable[[int], None] | None = None,
) -> HeaderList:
    """The headers of the request sent upstream, from the client's (already framing-checked).

    `host` is the request's host (`request_host`), for X-Forwarded-Host. `http_version` is the
    client's, for Via (RFC 9110 §7.6.3: the protocol the proxy *received*). `upstream_host`
    replaces Host when set; otherwise the client's Host is kept. Headers the proxy sets are
    removed from the client's list first and appended at the end, so the client can neither
    forge them nor, by naming them in Connection, make the proxy drop its own.

    A name with ``_`` goes as `options.underscore_headers` says (raises `HttpError` 400 under
    reject); `on_dropped` is called once with how many such fields were dropped, when any.
    """
    fields = _underscore_policy([(name.lower(), value) for name, value in headers], options)
    if on_dropped is not None and fields.dropped:
        on_dropped(fields.dropped)
    chunked = any(name == b"transfer-encoding" for name, _ in fields.kept)
    prefix = options.tls_prefix

    # The identity headers are the upstream's proof of who the client is: never the client's.
    replaced = set(options.identity_headers.lowered())
    if upstream_host is not None:
        replaced.add(b"host")
    if options.x_forwarded_proto:
        replaced.add(b"x-forwarded-proto")
    if options.x_forwarded_host:
        replaced.add(b"x-forwarded-host")
    if chunked:
        # RFC 9112 §6.3 (3): Transfer-Encoding overrides Content-Length, and a forwarder MUST
        # remove the Content-Length. (check_request_framing refuses the pair; this is the
        # belt to its braces.)
        replaced.add(b"content-length")

    out: HeaderList = []
    forwarded_for: list[bytes] = []
    via: list[bytes] = []
    for name, value in strip_hop_by_hop(fields.kept):
        if name.startswith(prefix) or name in replaced:
            continue
        if name == b"x-forwarded-for" and options.x_forwarded_for:
            if options.forwarded_for is ForwardedFor.APPEND:
                forwarded_for.append(value)
        elif name == b"via" and options.via:
            via.append(value)
        else:
            out.append((name, value))

    if upstream_host is not None:
        out.append((b"host", upstream_host))
    elif not any(name == b"host" for name, _ in out):
        # Only HTTP/1.0 allows a request without Host, and h11 cannot send an HTTP/1.1 one.
        raise HttpError(400, "request without Host", message="The request has no Host header.")
    if chunked:
        # h11 frames an outgoing request with neither Content-Length nor Transfer-Encoding as
        # bodiless (unlike a response, where it picks chunked): say chunked again for this hop.
        out.append((b"transfer-encoding", b"chunked"))

    if options.x_forwarded_for:
        # Appended (unless forwarded_for: replace): the upstream trusts only the entries its
        # own proxies added, counted from the right; the client's own are kept for the record.
        out.append((b"x-forwarded-for", b", ".join([*forwarded_for, client_ip.encode("ascii")])))
    if options.x_forwarded_proto:
        out.append((b"x-forwarded-proto", b"https"))
    if options.x_forwarded_host and host is not None:
        out.append((b"x-forwarded-host", host))
    if options.via:
        out.append((b"via", _via(via, http_version)))
    if options.tls_info_prefix is not None:
        out.extend(_tls_info_headers(prefix, tls))
    if tls.identity is not None:
        out.extend(identity_header_fields(options.identity_headers, tls.identity))
    return out


@dataclass(frozen=True)
class _Filtered:
    kept: HeaderList
    dropped: int


def _underscore_policy(fields: HeaderList, options: ForwardingOptions) -> _Filtered:
    policy = options.underscore_headers
    kept: HeaderList = []
    dropped = 0
    for name, value in fields:
        if b"_" not in name:
            kept.append((name, value))
        elif policy is UnderscoreHeaders.REJECT:
            raise HttpError(
                400,
                "header name with an underscore (underscore_headers: reject)",
                message="Header names with underscores are not accepted.",
            )
        elif policy is UnderscoreHeaders.ALLOW and not proxy_owned(
            normalize_field_name(name), options
        ):
            kept.append((name, value))
        else:
            dropped += 1
    return _Filtered(kept, dropped)


def identity_header_fields(names: IdentityHeaders, identity: PeerIdentity) -> HeaderList:
    """The identity as request headers. The subject is the RFC 4514 string with every byte
    that is not printable ASCII escaped as RFC 4514 §2.4 allows (``\\0d``, ``\\c3\\a9``), so it
    still names the same DN; URIs and DNS names are joined with ", ", with a comma or an
    unprintable byte inside one percent-encoded."""
    out: HeaderList = []
    if names.subject is not None and identity.subject:
        out.append((names.subject.lower().encode("ascii"), escape_dn(identity.subject)))
    if names.uris is not None and identity.uris:
        out.append((names.uris.lower().encode("ascii"), _join_values(identity.uris)))
    if names.dns is not None and identity.dns_names:
        out.append((names.dns.lower().encode("ascii"), _join_values(identity.dns_names)))
    return out


def escape_dn(subject: str) -> bytes:
    """An RFC 4514 string made a safe header value: no CR, LF, NUL or other control byte, no
    non-ASCII byte, no whitespace at either end; the DN it names is unchanged."""
    out = bytearray()
    for char in subject:
        if 0x20 <= ord(char) < 0x7F:
            out += char.encode("ascii")
        else:
            for byte in char.encode("utf-8", "surrogatepass"):
                out += b"\\%02x" % byte
    # h11 refuses a value with whitespace at either end (RFC 9110 §5.5); cryptography escapes
    # a DN's leading and trailing spaces already, this keeps it so for any input.
    if out[:1] == b" ":
        out[:1] = b"\\20"
    if out[-1:] == b" ":
        # Already escaped ("\\ ", as cryptography writes it) when an odd number of
        # backslashes precedes it: then only the space itself becomes its hex pair.
        backslashes = len(out) - 1 - len(out[:-1].rstrip(b"\\"))
        out[-1:] = b"20" if backslashes % 2 else b"\\20"
    return bytes(out)


def _join_values(values: Iterable[str]) -> bytes:
    return b", ".join(_percent_encode(v) for v in values)


def _percent_encode(value: str) -> bytes:
    return b"".join(
        bytes((b,)) if 0x21 <= b <= 0x7E and b != 0x2C else b"%%%02X" % b
        for b in value.encode("utf-8", "surrogatepass")
    )


def identity_allowed(identity: PeerIdentity | None, allow: frozenset[str]) -> bool:
    """Whether any name of ``identity`` is on ``allow``: a URI SAN or the RFC 4514 subject
    exactly, a DNS SAN case-insensitively (the verifier lower-cases them). No identity (no
    certificate under client_auth: optional) is never allowed."""
    if identity is None:
        return False
    if identity.subject in allow or any(uri in allow for uri in identity.uris):
        return True
    lowered = {entry.lower() for entry in allow}
    return any(name in lowered for name in identity.dns_names)


def identity_label(identity: PeerIdentity | None) -> str:
    """One word for a key=value log line: the first URI SAN, else the first DNS SAN, else the
    subject, percent-encoded so that it holds no space or control character; "-" for none."""
    if identity is None:
        return "-"
    first = (identity.uris or identity.dns_names or (identity.subject,))[0]
    return _percent_encode(first).decode("ascii") or "-"


def describe_identity(identity: PeerIdentity | None) -> str:
    """The identity for a log line, with every name made printable."""
    if identity is None:
        return "no client certificate"
    parts = [f"subject={escape_dn(identity.subject).decode('ascii')}"]
    if identity.uris:
        parts.append(f"uris={_join_values(identity.uris).decode('ascii')}")
    if identity.dns_names:
        parts.append(f"dns={_join_values(identity.dns_names).decode('ascii')}")
    return " ".join(parts)


def _via(existing: list[bytes], http_version: bytes) -> bytes:
    # Via names the received protocol as "1.1" (RFC 9110 §7.6.3: the "HTTP/" is omitted).
    return b", ".join([*existing, http_version + b" " + VIA_PSEUDONYM])


def _tls_info_headers(prefix: bytes, tls: ClientTLSInfo) -> HeaderList:
    out: HeaderList = [
        (prefix + b"-group", _field_value(tls.group)),
        (prefix + b"-cipher", _field_value(tls.cipher)),
        (prefix + b"-resumed", b"1" if tls.resumed else b"0"),
    ]
    if tls.signature is not None:
        out.append((prefix + b"-signature", _field_value(tls.signature)))
    return out


_UNSAFE_VALUE_BYTES = re.compile(rb"[^\x21-\x7e]")


def _field_value(text: str) -> bytes:
    # Values we emit are names from our own enums; anything else (a request id, a future
    # field) must still be a legal field value, or h11 raises on send.
    return _UNSAFE_VALUE_BYTES.sub(b"?", text.encode("ascii", "replace"))


def request_host(request: h11.Request) -> bytes | None:
    """The host the request is for: the authority of an absolute-form target, else Host.

    RFC 9112 §3.2.2: with an absolute-form target the Host header is ignored.
    """
    target = request.target
    scheme_end = target.find(b"://")
    if scheme_end > 0 and not target.startswith(b"/"):
        authority = target[scheme_end + 3 :].split(b"/", 1)[0].split(b"?", 1)[0]
        # Userinfo is deprecated and may be a password (RFC 9110 §4.2.4).
        return authority.rsplit(b"@", 1)[-1] or None
    for name, value in request.headers:
        if name == b"host":
            return value
    return None


# -- response side -----------------------------------------------------------------------------


def downstream_response_headers(
    headers: Iterable[Header],
    *,
    http_version: bytes = b"1.1",
    options: ForwardingOptions = ForwardingOptions(),  # noqa: B008 - frozen, so shared safely
) -> HeaderList:
    """The headers of the upstream's response as relayed to the client.

    Framing is re-chosen by h11 on the client side: with Content-Length it is kept; without it
    h11 sends chunked to an HTTP/1.1 client and closes the connection after the body for an
    HTTP/1.0 one. `http_version` is the upstream's, for Via.
    """
    fields = [(name.lower(), value) for name, value in headers]
    chunked = any(name == b"transfer-encoding" for name, _ in fields)
    out: HeaderList = []
    via: list[bytes] = []
    for name, value in strip_hop_by_hop(fields):
        if chunked and name == b"content-length":
            # RFC 9112 §6.3 (3): the received Content-Length MUST be removed before forwarding.
            continue
        if name == b"via" and options.via:
            via.append(value)
        else:
            out.append((name, value))
    if options.via:
        out.append((b"via", _via(via, http_version)))
    return out


def is_event_stream(headers: Iterable[Header]) -> bool:
    """True for a Server-Sent Events response (`text/event-stream`, any parameters).

    The driver forwards every chunk as soon as it arrives, whatever the type; this tells it a
    response is a token stream, for metrics and for never enabling any future buffering on it.
    """
    return any(
        name.lower() == b"content-type"
        and value.split(b";", 1)[0].strip(b" \t").lower() == b"text/event-stream"
        for name, value in headers
    )


# -- logging -----------------------------------------------------------------------------------

_MAX_SUMMARY_CHARS = 200


def request_summary(request: h11.Request) -> str:
    """`METHOD /path` for a log line.

    The query string is dropped (API keys and prompts travel in query parameters), and so are
    the scheme and authority of an absolute-form target (its userinfo may be a password).
    Non-ASCII bytes are escaped, so a log line cannot be forged with control characters.
    """
    target = request.target.split(b"?", 1)[0].split(b"#", 1)[0]
    scheme_end = target.find(b"://")
    if scheme_end > 0 and not target.startswith(b"/"):
        path_start = target.find(b"/", scheme_end + 3)
        target = target[path_start:] if path_start >= 0 else b"/"
    line = f"{printable(request.method)} {printable(target)}"
    return line[:_MAX_SUMMARY_CHARS]
