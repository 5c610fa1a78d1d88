"""Size rules on a request body: the declared Content-Length against `max_body_bytes`
(`body_too_large`), and `ChunkedBodyGuard`, which judges each chunk of a chunked body by its
declared size as the bytes arrive (400 for an over-long size line, 413 at once).
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import HttpError
from .fields import Header


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
