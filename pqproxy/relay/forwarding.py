"""The headers the proxy owns on the request it sends upstream: which names are proxy-owned
(`FORWARDING_HEADER_NAMES`, `proxy_owned`, `normalize_field_name`), what happens to client
names with ``_`` (`UnderscoreHeaders`), X-Forwarded-For/-Proto/-Host and Via
(`ForwardingOptions`, `ForwardedFor`), the TLS-info headers (`ClientTLSInfo`), and
`upstream_request_headers`, which builds the upstream request's fields from the client's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

import h11

from ..crypto.provider import PeerIdentity
from ..tls.enums import CipherSuite, SignatureScheme, group_name
from ..tls.events import HandshakeComplete
from .errors import HttpError
from .fields import Header, HeaderList, field_value, strip_hop_by_hop
from .identity import IdentityHeaders, identity_header_fields

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
        out.append((b"via", via_value(via, http_version)))
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


def via_value(existing: list[bytes], http_version: bytes) -> bytes:
    # Via names the received protocol as "1.1" (RFC 9110 §7.6.3: the "HTTP/" is omitted).
    return b", ".join([*existing, http_version + b" " + VIA_PSEUDONYM])


def _tls_info_headers(prefix: bytes, tls: ClientTLSInfo) -> HeaderList:
    out: HeaderList = [
        (prefix + b"-group", field_value(tls.group)),
        (prefix + b"-cipher", field_value(tls.cipher)),
        (prefix + b"-resumed", b"1" if tls.resumed else b"0"),
    ]
    if tls.signature is not None:
        out.append((prefix + b"-signature", field_value(tls.signature)))
    return out


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
