"""The rules on a client's request head before anything goes upstream: the head held until
complete (`RequestHeadReader`, 414/431 and Transfer-Encoding made readable for h11), size
caps (`HeaderLimits`), `check_request` (version, framing, field values, Host, the request
target and its form per method, dot segments), the transfer codings a request may carry,
`expects_continue`, which methods may be retried (`is_idempotent`), and `request_summary`
for the log line.

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
import re
from collections.abc import Iterable
from dataclasses import dataclass

import h11

from ..logtext import printable as _printable
from .errors import HttpError
from .fields import HEAD_END, KNOWN_TRANSFER_CODINGS, Header, transfer_codings

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


# -- the request head before h11 ----------------------------------------------------------------

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
        match = HEAD_END.search(data, max(0, self._searched - 2))
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
