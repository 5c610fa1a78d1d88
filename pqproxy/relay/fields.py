"""What both directions of the HTTP/1.1 relay share: header-list types, where a head ends,
transfer-coding lists, the hop-by-hop fields, and the one way the proxy makes a value it
writes a legal field value. Imports nothing else of `pqproxy.relay`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Header = tuple[bytes, bytes]
HeaderList = list[Header]


# Where h11 ends a head (h11/_receivebuffer.py): a line feed, an optional CR, a line feed.
HEAD_END = re.compile(rb"\n\r?\n")


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


_UNSAFE_VALUE_BYTES = re.compile(rb"[^\x21-\x7e]")


def field_value(text: str) -> bytes:
    # Values we emit are names from our own enums; anything else (a request id, a future
    # field) must still be a legal field value, or h11 raises on send.
    return _UNSAFE_VALUE_BYTES.sub(b"?", text.encode("ascii", "replace"))
