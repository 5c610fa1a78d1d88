"""The rules on the upstream's response: `UpstreamResponseParser` (an h11 CLIENT that also
reads the framings h11 refuses: the head cap on every read, a Transfer-Encoding without final
chunked, decoded gzip/deflate, a 204 or 304 with a body), `downstream_response_headers` for
the response relayed to the client, and `is_event_stream`.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable

import h11

from .fields import HEAD_END, Header, HeaderList, strip_hop_by_hop, transfer_codings
from .forwarding import ForwardingOptions, via_value

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
        out.append((b"via", via_value(via, http_version)))
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
            match = HEAD_END.search(self._pending, max(0, self._searched - 2))
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
