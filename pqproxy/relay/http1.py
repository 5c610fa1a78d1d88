"""The HTTP/1.1 rules of the proxy, as pure functions over h11 types.

The asyncio driver (`pqproxy/io/`) owns the sockets and the clock; it holds client bytes in a
`RequestHeadReader` until a request head is complete (→ 400, 414, 431, 501 for a Transfer-Encoding
h11 could not read), feeds the head into an h11 SERVER connection made by
`HeaderLimits.server_connection()` and, for each request, calls:

1. `classify_h11_error` when h11 raises `RemoteProtocolError` (→ 400 or 431);
2. `HeaderLimits.check_head` and `check_request` on the `h11.Request` (→ 400, 405, 414, 431, 501,
   505); `check_request` returns the `RequestTarget` to send upstream;
3. `body_too_large` before reading a body (→ 413 at once, even under `Expect: 100-continue`);
4. `upstream_request_headers` to build the request it sends to the model server, and
   `downstream_response_headers` for the response it relays back;
5. `error_response` (or `HttpError.response`) for every answer the proxy writes itself.

The upstream's response is read by an `UpstreamResponseParser` (an h11 CLIENT that also reads
the framings h11 refuses: a Transfer-Encoding without final chunked, a 204 or 304 with a body).

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
Transfer-Encoding: gzip                 RemoteProtocolError, hint 501   → reader: 400
Transfer-Encoding: chunked, gzip        RemoteProtocolError, hint 501   → reader: 400
Transfer-Encoding: gzip, chunked / foo  RemoteProtocolError, hint 501   → reader: 501
Transfer-Encoding: chunked, ,           RemoteProtocolError, hint 501   → reader: chunked
two Transfer-Encoding lines             RemoteProtocolError, hint 501   → reader: joined
incomplete head > max_incomplete_...    RemoteProtocolError "Receive buffer too long", 431
complete head > max_incomplete_...      accepted (one read held all of it) → `check_head` 431
GET / HTTP/2.0                          accepted as http_version b"2.0" → we answer 505
GET / HTTP/1.2                          accepted as b"1.2", keep-alive  → handled as 1.1
X: a<0x01>b (controls but NUL, CR, LF) accepted                         → we answer 400
two Host lines / 1.1 without Host       RemoteProtocolError, hint 400
======================================  ================================================
"""

from __future__ import annotations

import ipaddress
import json
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus

import h11

from ..crypto.provider import PeerIdentity
from ..logtext import printable as _printable
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
    501 for any transfer coding other than one chunked, but the driver's `RequestHeadReader`
    has already answered those (400 or 501, `check_request_codings`) or made them readable;
    a 501 hint that still gets here is refused as malformed.
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

_SUPPORTED_MAJOR = b"1."


@dataclass(frozen=True)
class RequestTarget:
    """Where a checked request goes, as the upstream is told (`check_request`).

    `target` is what the upstream request line carries: the client's origin-form target as
    sent, the absolute-form rewritten to origin-form (RFC 9112 §3.2.2), or ``*``. `authority`
    is set for an absolute-form target: it replaces the client's Host upstream (a proxy "MUST
    generate a new Host field value based on the received request-target").
    """

    target: bytes
    authority: bytes | None = None


def check_request(request: h11.Request) -> RequestTarget:
    """Every check on a parsed request head that does not need configuration; returns where
    the request goes. Raises `HttpError` (400, 405, 501, 505)."""
    version = request.http_version
    if not version.startswith(_SUPPORTED_MAJOR):
        # h11 parses any HTTP/d.d; a 2.0 or 0.9 head on this port is not one we can relay.
        # A higher 1.x minor is read as 1.1 (RFC 9110 §2.5), see `effective_http_version`.
        raise HttpError(505, f"HTTP/{version.decode('ascii', 'replace')} request")
    check_request_framing(request.headers, http_version=version)
    check_field_values(request.headers)
    check_host(request)
    return parse_request_target(request.method, request.target)


def effective_http_version(version: bytes) -> bytes:
    """The version a checked request is handled as: "1.0", or "1.1" for every higher 1.x.

    RFC 9110 §2.5: a recipient SHOULD process a message with a higher minor version "as if it
    were in the highest minor version within that major version to which the recipient is
    conformant"; h11 already treats HTTP/1.2 as keep-alive, like 1.1.
    """
    return b"1.0" if version == b"1.0" else b"1.1"


# -- transfer codings (RFC 9112 §6.1, §7) ------------------------------------------------------

# The IANA HTTP Transfer Coding Registry (RFC 9112 §7, §18.4). Anything else is "a transfer
# coding it does not understand" (RFC 9112 §6.1): 501.
KNOWN_TRANSFER_CODINGS = frozenset(
    {b"chunked", b"compress", b"deflate", b"gzip", b"x-compress", b"x-gzip"}
)


def transfer_codings(values: Iterable[bytes]) -> list[bytes]:
    """The codings of Transfer-Encoding field values, in order, lowercased, with empty list
    elements dropped (RFC 9110 §5.6.1: a recipient MUST accept and ignore them). Parameters
    stay on their coding (``chunked;x=1`` is not ``chunked``)."""
    return [
        coding
        for value in values
        for coding in (part.strip(b" \t").lower() for part in value.split(b","))
        if coding
    ]


def check_request_codings(codings: list[bytes]) -> None:
    """Refuse a request's Transfer-Encoding unless it is exactly one chunked.

    In this order, so that every refusal closes the connection with the most specific status:
    a coding outside the registry, or one with parameters (no registered coding takes any),
    is 501 (RFC 9112 §6.1); chunked not the final coding, twice, or no coding at all is 400
    (RFC 9112 §6.3 (4): the length "cannot be determined reliably", MUST 400; §7.1: chunked
    MUST NOT be applied more than once); a registered coding under a final chunked
    (``gzip, chunked``) is legal HTTP that h11 cannot relay: 501.
    """
    for coding in codings:
        if coding not in KNOWN_TRANSFER_CODINGS:
            raise HttpError(501, f"unknown transfer coding {_printable(coding[:40])}")
    if not codings or codings[-1] != b"chunked":
        _bad_request("Transfer-Encoding whose final coding is not chunked")
    if codings.count(b"chunked") > 1:
        _bad_request("chunked applied more than once")
    if codings != [b"chunked"]:
        raise HttpError(501, "transfer coding other than chunked")


def check_request_framing(headers: Iterable[Header], *, http_version: bytes = b"1.1") -> None:
    """Refuse a request whose body length two parsers could read differently (RFC 9112 §6.3).

    Works on raw header lists (any case, unvalidated values) as well as on h11's parsed ones,
    where h11 has already refused some of these cases itself. Raises 400, or 501 for a
    transfer coding that is unknown or not relayable (`check_request_codings`).
    """
    lengths: list[bytes] = []
    te_values: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            lengths.extend(part.strip(b" \t") for part in value.split(b","))
        elif lname == b"transfer-encoding":
            te_values.append(value)

    if te_values:
        if http_version < b"1.1":
            # RFC 9112 §6.1: an HTTP/1.0 recipient MUST treat such framing as faulty.
            _bad_request("Transfer-Encoding in an HTTP/1.0 request")
        if lengths:
            # RFC 9112 §6.1 lets a server reject this or obey Transfer-Encoding; h11 obeys it
            # silently, and an upstream or cache that obeyed Content-Length instead would see
            # a second request hidden in the body. Refuse.
            _bad_request("Transfer-Encoding together with Content-Length")
        check_request_codings(transfer_codings(te_values))
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


# -- field values, Host, request target ---------------------------------------------------------

# RFC 9110 §5.5: a field value is VCHAR, obs-text, SP and HTAB. h11 refuses NUL, CR, LF, VT and
# FF, and lets the other controls through (h11 issue 57: some cookies carry \x01); a control
# byte in a value is how a log line, a terminal or a gateway that reads it as a separator is
# fooled, so every one of them but HTAB is refused here.
_CONTROL_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def check_field_values(headers: Iterable[Header]) -> None:
    for name, value in headers:
        if _CONTROL_IN_VALUE.search(value):
            raise HttpError(
                400,
                f"control character in the value of {_printable(name[:40])}",
                message="A header field value holds a control character.",
            )


# RFC 3986 §3.2.2 reg-name: unreserved / pct-encoded / sub-delims, without ",": a comma makes a
# Host (and the X-Forwarded-Host copied from it) a list to every recipient that splits field
# values on it (RFC 9110 §5.3), so "a.test,b.test" would name two hosts at once. Empty is
# refused: an http(s) URI MUST NOT have an empty host (RFC 9110 §4.2.1, §4.2.2).
_REG_NAME = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+;=]|%[0-9A-Fa-f]{2})+")
# RFC 3986 §3.2.2 IPvFuture.
_IPV_FUTURE = re.compile(rb"[vV][0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+")
_MAX_PORT = 65535


def valid_authority(value: bytes) -> bool:
    """Whether `value` is ``uri-host [ ":" port ]`` (RFC 9110 §7.2, RFC 3986 §3.2.2-3): a
    reg-name, IPv4 address or IP-literal, and a port of at most 65535. No userinfo: "@" is in
    no host form."""
    if value.startswith(b"["):
        end = value.find(b"]")
        if end < 0:
            return False
        literal, rest = value[1:end], value[end + 1 :]
        if not (_IPV_FUTURE.fullmatch(literal) or _is_ipv6(literal)):
            return False
    else:
        host, colon, port = value.partition(b":")
        if not _REG_NAME.fullmatch(host):
            return False
        rest = colon + port
    if not rest:
        return True
    port = rest[1:]
    # port = *DIGIT (RFC 3986 §3.2.3): empty is the scheme's default.
    return rest[:1] == b":" and (not port or (port.isdigit() and int(port[:6]) <= _MAX_PORT))


def _is_ipv6(literal: bytes) -> bool:
    # ipaddress accepts a zone ("fe80::1%eth0"), which a URI writes only as "%25" (RFC 6874)
    # and a Host header never needs.
    if b"%" in literal or not literal.isascii():
        return False
    try:
        ipaddress.IPv6Address(literal.decode("ascii"))
    except ValueError:
        return False
    return True


def check_host(request: h11.Request) -> None:
    """RFC 9112 §3.2: 400 for an HTTP/1.1 request without Host, for more than one Host field
    line, and for a Host that is not ``uri-host [":" port]``. HTTP/1.0 may omit it (and an
    empty one there is read as absent); the driver then supplies one."""
    hosts = [value for name, value in request.headers if name == b"host"]
    if len(hosts) > 1:
        raise HttpError(400, "more than one Host field", message="The request has two Hosts.")
    if not hosts or (not hosts[0] and request.http_version == b"1.0"):
        if request.http_version != b"1.0":
            raise HttpError(400, "request without Host", message="The request has no Host.")
        return
    if not valid_authority(hosts[0]):
        raise HttpError(
            400,
            f"invalid Host {_printable(hosts[0][:80])}",
            message="The Host header is not a valid host[:port].",
        )


# The methods named in the Allow field of a 405 (RFC 9110 §15.5.6: the origin "MUST generate
# an Allow header field"): the RFC 9110 §9.3 methods and PATCH (RFC 5789), all but CONNECT,
# which pqproxy never tunnels. Other extension methods are forwarded too, but Allow cannot say
# "anything else".
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*:")
_DOT_SEGMENT_ALIASES = re.compile(rb"%2[eE]")
_SEPARATOR_ALIASES = re.compile(rb"%2[fF]|%5[cC]|\\")


def parse_request_target(method: bytes, target: bytes) -> RequestTarget:
    """The four target forms of RFC 9112 §3.2, each only where its method allows it.

    origin-form (``/path?query``) for every method; absolute-form (``http://host/path``)
    rewritten to origin-form with its authority as the new Host, userinfo refused (RFC 9110
    §4.2.4) and only http/https; asterisk-form (``*``) only for OPTIONS; authority-form
    (``host:port``) only for CONNECT, which is 405 here. Anything else is 400.
    """
    if method == b"CONNECT":
        raise HttpError(
            405,
            "CONNECT is not proxied",
            message="CONNECT is not supported.",
            headers=[(b"allow", ALLOWED_METHODS)],
        )
    if target == b"*":
        if method != b"OPTIONS":
            raise _bad_target("asterisk-form target on a method other than OPTIONS")
        return RequestTarget(b"*")
    if target.startswith(b"/"):
        check_path(target)
        return RequestTarget(target)
    scheme = _SCHEME.match(target)
    if scheme is None:
        raise _bad_target("request target is not origin-form (must start with /)")
    rest = target[scheme.end() :]
    if scheme.group().lower() not in (b"http:", b"https:") or not rest.startswith(b"//"):
        # "api.test:443" reads as scheme "api.test": authority-form, for CONNECT only.
        raise _bad_target("request target is neither origin-form nor an http(s) URI")
    rest = rest[2:]
    end = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        found = rest.find(delimiter)
        if 0 <= found < end:
            end = found
    authority, path = rest[:end], rest[end:]
    if b"@" in authority:
        # Userinfo is deprecated (RFC 9110 §4.2.4) and may be a password: never forwarded.
        raise _bad_target("userinfo in the request target")
    if not valid_authority(authority):
        raise _bad_target("absolute-form target without a valid host[:port]")
    if not path.startswith(b"/"):
        # RFC 9112 §3.2.1: an empty path is sent as "/"; §3.2.4: OPTIONS to a bare authority
        # is the asterisk-form once it reaches the origin.
        if method == b"OPTIONS" and not path:
            return RequestTarget(b"*", authority)
        path = b"/" + path
    check_path(path)
    return RequestTarget(path, authority)


def check_path(target: bytes) -> None:
    """400 for a path that climbs above the root once dot segments are removed (RFC 3986
    §5.2.4).

    The check is stricter than the algorithm, so that no upstream reading of the path climbs
    either: ``%2e`` counts as ".", ``%2f``, ``%5c`` and "\\\\" as "/" (servers that decode
    before they resolve), ";params" are ignored in a segment (``..;`` is ".." to a Servlet
    container), and empty segments do not count as depth (servers that merge slashes).

    Only checked: the target is forwarded as the client sent it, dot segments included, as
    nginx does for a ``proxy_pass`` without a URI. pqproxy makes no decision on the path, so
    normalising would protect nothing, and would break whatever an upstream computes over the
    exact target (a signature, a cache key, a path that really holds "." segments).
    """
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    path = _SEPARATOR_ALIASES.sub(b"/", _DOT_SEGMENT_ALIASES.sub(b".", path))
    depth = 0
    for segment in path.split(b"/")[1:]:
        name = segment.split(b";", 1)[0]
        if name == b"..":
            if depth == 0:
                raise _bad_target("path climbs above the root")
            depth -= 1
        elif name not in (b"", b"."):
            depth += 1


def _bad_target(reason: str) -> HttpError:
    return HttpError(400, reason, message=f"Bad request target: {reason}.")


def forwarded_request_fields(request: h11.Request, *, expect_answered: bool) -> HeaderList:
    """The client's fields the upstream request is built from (`upstream_request_headers`).

    Expect goes when the request is HTTP/1.0 (RFC 9110 §10.1.1: a server MUST ignore a
    100-continue expectation there, and the proxy never sends a 1xx to a 1.0 client), and when
    the proxy has answered it itself (`expect_answered`: it reads the body before the upstream
    hears of the request).
    """
    if request.http_version == b"1.0" or expect_answered:
        return [(name, value) for name, value in request.headers if name != b"expect"]
    return list(request.headers)


# -- the request head before h11 ----------------------------------------------------------------

# Where h11 ends a head (h11/_receivebuffer.py): a line feed, an optional CR, a line feed.
_HEAD_END = re.compile(rb"\n\r?\n")
# Method, spaces and "HTTP/1.1\r\n" beside the target on a request line.
_REQUEST_LINE_SLACK = 64


class RequestHeadReader:
    """Holds a client's bytes until one request head is complete, then gives the head to h11
    with its Transfer-Encoding made readable.

    h11 refuses every Transfer-Encoding but one exact "chunked" with the same error, so it can
    neither accept ``chunked, ,`` (legal, RFC 9110 §5.6.1) nor tell ``chunked, gzip`` (400)
    from ``foo`` (501); and it answers a request line longer than its buffer like any large
    head, where RFC 9112 §3 asks for 414. Here the Transfer-Encoding lines are read as h11
    would split and unfold them (`check_request_codings` decides), and replaced by one
    ``Transfer-Encoding: chunked`` line when their codings are exactly that; every other
    byte goes to h11 unchanged, which then parses and validates the head as always.
    """

    def __init__(self, limits: HeaderLimits) -> None:
        self._limits = limits
        self._data = bytearray()
        self._searched = 0
        self._line_searched = 0

    def __len__(self) -> int:
        return len(self._data)

    def receive(self, data: bytes) -> None:
        self._data += data

    def next_head(self) -> tuple[bytes, bytes] | None:
        """``(head, rest)`` once a whole head is held: the head to give h11, and the bytes
        after it (a body, the next request). None until then. Raises `HttpError` (400 for an
        illegal request line, 414, 431, and as `check_request_codings`)."""
        data = self._data
        # RFC 9112 §2.2: a server SHOULD ignore at least one empty line before a request line
        # (an old client's CRLF after a POST body).
        while data[:1] == b"\n" or data[:2] == b"\r\n":
            del data[: 1 if data[:1] == b"\n" else 2]
            self._searched = self._line_searched = 0
        if not data or data == b"\r":
            return None
        if data[0] < 0x21:
            # As h11 does: a TLS ClientHello on this port, or any binary, fails at once.
            raise HttpError(400, "illegal request line")
        match = _HEAD_END.search(data, max(0, self._searched - 2))
        if match is None:
            self._searched = len(data)
            self._check_incomplete()
            return None
        end = match.end()
        head, rest = bytes(data[:end]), bytes(data[end:])
        data.clear()
        self._searched = self._line_searched = 0
        return _readable_transfer_encoding(head), rest

    def _check_incomplete(self) -> None:
        data, limits = self._data, self._limits
        if self._line_searched >= 0:
            if data.find(b"\n", self._line_searched) >= 0:
                self._line_searched = -1  # the request line is complete
            else:
                self._line_searched = len(data)
                line_cap = min(
                    limits.max_header_bytes, limits.max_target_bytes + _REQUEST_LINE_SLACK
                )
                if len(data) > line_cap:
                    if b" " in data[:_REQUEST_LINE_SLACK]:
                        raise HttpError(414, f"request line over {line_cap} bytes")
                    raise HttpError(400, "illegal request line")
        if len(data) > limits.max_header_bytes:
            raise HttpError(431, f"request head over {limits.max_header_bytes} bytes")


def _readable_transfer_encoding(head: bytes) -> bytes:
    """`head` with its Transfer-Encoding lines replaced by one ``chunked`` line, or unchanged
    when it has none. Raises as `check_request_codings` for any other codings."""
    lines = head.split(b"\n")
    # h11 drops one CR before each LF; the last two "lines" are the blank line's.
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines][:-2]
    te_at: int | None = None
    values: list[bytes] = []
    kept: list[bytes] = []
    in_te = False
    for index, line in enumerate(lines):
        if index and line[:1] in (b" ", b"\t"):
            # obs-fold: h11 joins it to the line before with one space (RFC 9112 §5.2).
            if in_te:
                values[-1] += b" " + line.lstrip(b" \t")
                continue
        else:
            # Only a line h11 reads as a field: "name:" with nothing between name and colon.
            name, colon, value = line.partition(b":")
            in_te = index > 0 and bool(colon) and name.lower() == b"transfer-encoding"
            if in_te:
                if te_at is None:
                    te_at = len(kept)
                values.append(value.strip(b" \t"))
                continue
        kept.append(line)
    if te_at is None:
        return head
    check_request_codings(transfer_codings(values))
    kept.insert(te_at, b"Transfer-Encoding: chunked")
    return b"\r\n".join(kept) + b"\r\n\r\n"


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


# 16 hex digits hold any 64-bit size; a longer chunk-size line is padding or an attack on a
# parser that overflows (h11 reads up to 20 digits into a Python int).
MAX_CHUNK_SIZE_DIGITS = 16
_HEX_VALUES = {b: int(chr(b), 16) for b in b"0123456789abcdefABCDEF"}


class ChunkedBodyGuard:
    """Reads the chunk-size lines of a chunked request body (RFC 9112 §7.1) as the bytes
    arrive, before h11 sees them, so that a chunk is judged by its declared size:

    - a size line with more than `MAX_CHUNK_SIZE_DIGITS` hex digits -> 400;
    - a chunk whose declared size takes the body past ``max_body_bytes`` -> 413 at once,
      instead of forwarding it until the count runs over (or waiting for 10^16 bytes).

    Feed it exactly the bytes h11 is fed, in order, starting at the first byte of the body;
    `peek` reads bytes already received but not yet fed to h11 (the check runs at once, and
    `feed` skips them when they come through). It follows h11's framing
    (a size line ends at CRLF; chunk data is followed by two bytes h11 checks); on anything
    it does not recognise it stops and leaves the refusal to h11. It stops at the last
    chunk: the trailer section and any pipelined request after it are h11's.
    """

    def __init__(self, max_body_bytes: int) -> None:
        self._limit = max_body_bytes
        self._declared = 0
        self._state = "size"  # size | line | data | crlf | done
        self._digits = 0
        self._size = 0
        self._remaining = 0
        self._after_cr = False
        self._ahead = 0  # bytes peeked at that feed has not been given yet

    @property
    def done(self) -> bool:
        return self._state == "done"

    def peek(self, data: bytes) -> None:
        """Check bytes that will be fed later (the same bytes, in the same order)."""
        self._scan(data)
        self._ahead += len(data)

    def feed(self, data: bytes) -> None:
        if self._ahead:
            skipped = min(self._ahead, len(data))
            self._ahead -= skipped
            data = data[skipped:]
        self._scan(data)

    def _scan(self, data: bytes) -> None:
        i, end = 0, len(data)
        while i < end and self._state != "done":
            if self._state == "data":
                taken = min(self._remaining, end - i)
                i += taken
                self._remaining -= taken
                if not self._remaining:
                    self._state, self._remaining = "crlf", 2
            elif self._state == "crlf":
                taken = min(self._remaining, end - i)
                i += taken
                self._remaining -= taken
                if not self._remaining:
                    self._state, self._digits, self._size = "size", 0, 0
            elif self._state == "size":
                value = _HEX_VALUES.get(data[i])
                if value is None:
                    # The digits ended: what follows up to CRLF (extensions, OWS) is h11's.
                    self._state = "line" if self._digits else "done"
                    continue
                i += 1
                self._digits += 1
                if self._digits > MAX_CHUNK_SIZE_DIGITS:
                    raise HttpError(
                        400,
                        f"chunk-size line longer than {MAX_CHUNK_SIZE_DIGITS} hex digits",
                        message="Bad request framing: chunk size too long.",
                    )
                self._size = self._size * 16 + value
                if self._declared + self._size > self._limit:
                    # More digits only make it larger: refuse before the data is awaited.
                    raise HttpError(
                        413, f"declared chunk size takes the body past {self._limit} bytes"
                    )
            else:  # "line": skip to the CRLF that ends the size line
                if self._after_cr:
                    self._after_cr = False
                    if data[i] == 0x0A:  # the CRLF was split between two reads
                        i += 1
                        self._line_done()
                        continue
                found = data.find(b"\r\n", i)
                if found < 0:
                    self._after_cr = data[end - 1] == 0x0D
                    i = end
                else:
                    i = found + 2
                    self._line_done()

    def _line_done(self) -> None:
        self._after_cr = False
        if self._size == 0:
            self._state = "done"  # the last chunk: trailers follow
        else:
            self._declared += self._size
            self._state, self._remaining = "data", self._size


# RFC 9110 §9.2.2: methods whose repetition has the same effect as one request. Only these
# are sent again automatically (RFC 9112 §9.3.1); an inference POST costs real GPU time.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def is_idempotent(method: bytes) -> bool:
    """Whether a request may be retried automatically (methods are case-sensitive)."""
    return method in IDEMPOTENT_METHODS


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
# The longest request target: nginx's large_client_header_buffers (8k for one request line)
# and Apache's LimitRequestLine (8190). Past it the answer is 414 (RFC 9112 §3: a server that
# receives a request-target longer than any URI it wishes to parse MUST respond 414).
DEFAULT_MAX_TARGET_BYTES = 8 * 1024


@dataclass(frozen=True)
class HeaderLimits:
    """Caps on a request head.

    h11 enforces `max_header_bytes` only on a head that is still incomplete, which is why
    `check_head` exists: a head that arrives whole in one read is returned by h11 whatever its
    size. The driver must call `next_event()` after every `receive_data()`, so that the buffer
    never holds more than one read beyond the cap. `RequestHeadReader` applies the same caps
    (and 414 for the request line) to a head before h11 sees it.
    """

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT
    max_target_bytes: int = DEFAULT_MAX_TARGET_BYTES

    def __post_init__(self) -> None:
        if self.max_header_bytes < 64:
            raise ValueError(f"max_header_bytes must be at least 64, not {self.max_header_bytes}")
        if self.max_header_count < 1:
            raise ValueError(f"max_header_count must be at least 1, not {self.max_header_count}")
        if self.max_target_bytes < 1:
            raise ValueError(f"max_target_bytes must be at least 1, not {self.max_target_bytes}")

    def server_connection(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)

    def check_head(self, request: h11.Request) -> None:
        if len(request.target) > self.max_target_bytes:
            raise HttpError(
                414, f"request target of {len(request.target)} bytes > {self.max_target_bytes}"
            )
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


class UnderscoreHeaderRefused(HttpError):
    """400 under ``underscore_headers: reject`` (its own type, for the metric)."""

    def __init__(self) -> None:
        super().__init__(
            400,
            "header name with an underscore (underscore_headers: reject)",
            message="Header names with underscores are not accepted.",
        )


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
            raise UnderscoreHeaderRefused()
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


# What `UpstreamResponseParser` decodes, as zlib's wbits: 31 the gzip wrapper (RFC 1952), 15
# the zlib wrapper, which is what "deflate" means in HTTP (RFC 9112 §7.2, RFC 1950).
_DECODABLE_CODINGS: dict[bytes, int] = {b"gzip": 31, b"x-gzip": 31, b"deflate": 15}
# The most decoded bytes one Data event carries: a small compressed body may expand a
# thousandfold, and the relay writes (and waits for the client to drain) between events.
DECODED_PIECE_BYTES = 64 * 1024
_STATUS_LINE = re.compile(rb"HTTP/[0-9]\.[0-9] ([0-9]{3})")


class UpstreamResponseParser(h11.Connection):
    """An h11 CLIENT connection for one exchange with the upstream, which also reads the
    response framings h11 refuses or misreads. Each final response head passes through here
    before h11 parses it (1xx heads go unchanged); every other byte is h11's as always.

    - ``Transfer-Encoding`` without a final chunked (``gzip``): RFC 9112 §6.3 (4), the body
      lasts until the upstream closes; any Content-Length is ignored. h11 reads a response
      with neither field until close, so both go, and ``Connection: close`` is added.
    - A coding under the final chunked (``gzip, chunked``): h11 reads the chunks.
    - Either way the one coding (gzip, x-gzip or deflate) is decoded here: a transfer coding
      belongs to the hop (RFC 9112 §7), and the client gets the body chunked (HTTP/1.1) or
      close-delimited (HTTP/1.0), its length unknown. Another coding, two of them, or chunked
      anywhere but last cannot be relayed faithfully: 502.
    - A 204 loses its Content-Length (RFC 9110 §8.6: a server MUST NOT send one) and a 204 or
      304 its Transfer-Encoding (neither has content, RFC 9110 §15.3.5, §15.4.5); a 304 keeps
      its Content-Length, which RFC 9110 §8.6 lets it send for the selected representation.
      When the upstream announced a body there (chunked, or a 204 with a length), the
      connection is read as ``Connection: close``: whatever body bytes follow are never read as
      the next response on a reused connection.

    Errors are `h11.RemoteProtocolError` (hint 502), as for anything else h11 refuses.
    """

    def __init__(self, max_head: int) -> None:
        super().__init__(h11.CLIENT, max_incomplete_event_size=max_head)
        self._max_head = max_head
        self._pending = bytearray()
        self._searched = 0
        self._passthrough = False
        self._decoder: _TransferDecoder | None = None
        self._held_end: h11.EndOfMessage | None = None

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        data, closed = super().trailing_data
        return data + bytes(self._pending), closed

    def receive_data(self, data: bytes) -> None:
        if self._passthrough:
            super().receive_data(data)
            return
        if not data:
            # The upstream closed inside a head: h11 gets what there is and says so.
            held = bytes(self._pending)
            self._pending.clear()
            self._passthrough = True
            if held:
                super().receive_data(held)
            super().receive_data(b"")
            return
        self._pending += data
        out = bytearray()
        while not self._passthrough:
            match = _HEAD_END.search(self._pending, max(0, self._searched - 2))
            if match is None:
                self._searched = len(self._pending)
                if len(self._pending) > self._max_head:
                    # h11's own cap (max_incomplete_event_size) refuses it.
                    out += self._pending
                    self._pending.clear()
                    self._passthrough = True
                break
            head = bytes(self._pending[: match.end()])
            del self._pending[: match.end()]
            self._searched = 0
            status = _STATUS_LINE.match(head)
            if status is not None and status.group(1).startswith(b"1"):
                out += head
                continue
            out += self._final_head(head, int(status.group(1))) if status is not None else head
            out += self._pending
            self._pending.clear()
            self._passthrough = True
        if out:
            super().receive_data(bytes(out))

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            decoder = self._decoder
            if decoder is not None and decoder.has_input:
                piece = decoder.decode()
                if piece:
                    return h11.Data(data=piece)
                continue
            if self._held_end is not None:
                end, self._held_end = self._held_end, None
                return end
            event = super().next_event()
            if decoder is None:
                return event
            if isinstance(event, h11.Data):
                decoder.feed(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                tail = decoder.finish()
                self._decoder = None
                self._held_end = event
                if tail:
                    return h11.Data(data=tail)
            else:
                return event

    def _final_head(self, head: bytes, status: int) -> bytes:
        lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")][:-2]
        fields = _head_fields(lines)
        te = [value for name, value, _ in fields if name == b"transfer-encoding"]
        lengths = [value for name, value, _ in fields if name == b"content-length"]
        drop = {b"transfer-encoding"}
        framing: bytes | None = None
        close = False
        if status in (204, 304):
            if status == 204:
                drop.add(b"content-length")
            close = bool(te) or (status == 204 and any(v.strip(b" \t") != b"0" for v in lengths))
            if not te and not (status == 204 and lengths):
                return head
        elif not te:
            return head
        else:
            codings = transfer_codings(te)
            under = codings[:-1] if codings and codings[-1] == b"chunked" else codings
            if len(under) < len(codings):
                framing = b"Transfer-Encoding: chunked"
            else:
                close = True  # RFC 9112 §6.3 (4): read until the connection closes
            if b"chunked" in under or len(under) > 1:
                raise h11.RemoteProtocolError(
                    "unrelayable transfer codings (chunked not last, or stacked)",
                    error_status_hint=502,
                )
            if under:
                if under[0] not in _DECODABLE_CODINGS:
                    raise h11.RemoteProtocolError(
                        "transfer coding pqproxy cannot decode", error_status_hint=502
                    )
                self._decoder = _TransferDecoder(_DECODABLE_CODINGS[under[0]])
            drop.add(b"content-length")  # RFC 9112 §6.3 (3): Transfer-Encoding overrides it
        kept = [lines[0]]
        for name, _value, raw in fields:
            if name in drop:
                if framing is not None:
                    kept.append(framing)
                    framing = None
            else:
                kept.extend(raw)
        if close:
            kept.append(b"Connection: close")
        return b"\r\n".join(kept) + b"\r\n\r\n"


def _head_fields(lines: list[bytes]) -> list[tuple[bytes, bytes, list[bytes]]]:
    """``(lowercased name, unfolded value, raw lines)`` of each field after the start line, as
    h11 splits and unfolds them (RFC 9112 §5.2). A line h11 would refuse keeps its raw bytes
    under the name b"" so that h11 still sees (and refuses) it."""
    fields: list[tuple[bytes, bytes, list[bytes]]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t") and fields:
            name, value, raw = fields[-1]
            fields[-1] = (name, value + b" " + line.lstrip(b" \t"), [*raw, line])
            continue
        name, colon, value = line.partition(b":")
        fields.append((name.lower() if colon else b"", value.strip(b" \t"), [line]))
    return fields


class _TransferDecoder:
    """One gzip or deflate transfer coding, decoded in bounded pieces."""

    def __init__(self, wbits: int) -> None:
        self._wbits = wbits
        self._zlib = zlib.decompressobj(wbits)
        self._input = b""
        self._fed = False

    @property
    def has_input(self) -> bool:
        return bool(self._input)

    def feed(self, data: bytes) -> None:
        self._input += data
        self._fed = self._fed or bool(data)

    def decode(self) -> bytes:
        """At most DECODED_PIECE_BYTES of output; call while `has_input`."""
        try:
            if self._zlib.eof:
                # RFC 1952 §2.2: a gzip body may hold several members, one after another.
                if self._wbits != 31:
                    raise h11.RemoteProtocolError(
                        "bytes after the end of a deflate body", error_status_hint=502
                    )
                self._zlib = zlib.decompressobj(self._wbits)
            out = self._zlib.decompress(self._input, DECODED_PIECE_BYTES)
        except zlib.error:
            raise h11.RemoteProtocolError(
                "corrupt transfer-coded body", error_status_hint=502
            ) from None
        self._input = self._zlib.unconsumed_tail or self._zlib.unused_data
        return out

    def finish(self) -> bytes:
        """The body ended: what zlib still holds (output it could not return under the
        piece cap), after refusing a coded stream cut short (a truncated body must not look
        complete to the client)."""
        try:
            tail = self._zlib.flush()
        except zlib.error:
            raise h11.RemoteProtocolError(
                "corrupt transfer-coded body", error_status_hint=502
            ) from None
        if self._fed and not self._zlib.eof:
            raise h11.RemoteProtocolError("transfer-coded body cut short", error_status_hint=502)
        return tail


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
    line = f"{_printable(request.method)} {_printable(target)}"
    return line[:_MAX_SUMMARY_CHARS]
