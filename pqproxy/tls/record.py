"""The TLS 1.3 record layer (RFC 8446 §5): framing of received bytes into records,
AEAD protection of one direction, and fragmentation of outgoing data.

Rules enforced here, each with the alert RFC 8446 names for it:

- A record whose declared length exceeds the cap is ``record_overflow`` (§5.1, §5.2),
  raised as soon as its 5-byte header is in, before the body is waited for.
- An unknown content type is ``unexpected_message`` (§5).
- A zero-length handshake or alert fragment is ``unexpected_message``: §5.1 forbids
  sending them without naming an alert, and a record that may not be sent is an
  unexpected record (Go's crypto/tls answers the same way).
- A protected record too long to decrypt to at most 2^14 + 1 bytes is ``record_overflow``
  before any AEAD work (§5.2, §5.4): the tag cannot make it legal.
- A record that fails AEAD authentication is ``bad_record_mac`` (§5.2), and leaves the
  sequence number where it was: the server's caller may skip it as rejected 0-RTT (§4.2.10).
- A decrypted TLSInnerPlaintext over 2^14 + 1 bytes is ``record_overflow`` (§5.2).
- A TLSInnerPlaintext of only zeros has no content type: ``unexpected_message`` (§5.4).
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag

from . import alerts
from .enums import LEGACY_VERSION, ContentType
from .key_schedule import SuiteParams, traffic_keys

__all__ = [
    "MAX_CIPHERTEXT",
    "MAX_INNER_PLAINTEXT",
    "MAX_PLAINTEXT",
    "MAX_PLAINTEXT_RECORD_LENGTH",
    "MAX_RECEIVE_BUFFER",
    "MAX_SEQUENCE",
    "RECORD_HEADER",
    "RecordProtection",
    "RecordReader",
    "encode_header",
    "encode_plaintext_records",
    "encode_protected_records",
]

# RFC 8446 §5.1: no fragment carries more than 2^14 bytes of content.
MAX_PLAINTEXT = 2**14
# RFC 8446 §5.4: content + content type byte + padding never exceeds 2^14 + 1.
MAX_INNER_PLAINTEXT = MAX_PLAINTEXT + 1
# RFC 8446 §5.2: TLSCiphertext.length MUST NOT exceed 2^14 + 256.
MAX_CIPHERTEXT = 2**14 + 256
# RFC 8446 §5.1: TLSPlaintext.length MUST NOT exceed 2^14 (unprotected records).
MAX_PLAINTEXT_RECORD_LENGTH = 2**14
# type(1) + legacy_record_version(2) + length(2).
RECORD_HEADER = 5
# RFC 8446 §5.3: sequence numbers must never wrap; the engine rekeys (KeyUpdate)
# long before, so reaching this is a bug, not a peer's doing.
MAX_SEQUENCE = 2**64 - 1
# The reader holds at most this many unconsumed bytes: a few maximal records,
# enough for any read size the I/O layer uses as long as it drains after each feed.
MAX_RECEIVE_BUFFER = 4 * (RECORD_HEADER + MAX_CIPHERTEXT)
# Consumed bytes are dropped from the front of the receive buffer once this many
# have piled up, so a burst of small records costs one memmove, not one per record.
_COMPACT_AT = 64 * 1024

_HEADER = struct.Struct(">BHH")
_APPLICATION_DATA = int(ContentType.APPLICATION_DATA)
_HANDSHAKE = int(ContentType.HANDSHAKE)
_ALERT = int(ContentType.ALERT)
_KNOWN_TYPES = frozenset(int(t) for t in ContentType)
# Content types that may appear inside TLSInnerPlaintext; change_cipher_spec is
# only ever sent in the clear (RFC 8446 §5).
_INNER_TYPES = frozenset((_ALERT, _HANDSHAKE, _APPLICATION_DATA))
# RFC 8446 §5.1: these must never be sent as zero-length fragments.
_NON_EMPTY_TYPES = frozenset((_ALERT, _HANDSHAKE))


def encode_header(content_type: int, length: int, legacy_version: int = LEGACY_VERSION) -> bytes:
    """The 5-byte record header; for a protected record it is also the AEAD's AAD."""
    return _HEADER.pack(content_type, legacy_version, length)


class RecordProtection:
    """AEAD protection for one direction under one traffic secret (RFC 8446 §5.2).

    Build a new one on every key change; ``seq`` counts the records sealed or
    opened under this key.
    """

    __slots__ = ("params", "seq", "_aead", "_iv")

    def __init__(self, params: SuiteParams, traffic_secret: bytes) -> None:
        key, iv = traffic_keys(params, traffic_secret)
        self.params = params
        self.seq = 0
        self._aead = params.aead(key)
        self._iv = int.from_bytes(iv, "big")

    def __repr__(self) -> str:
        return f"<RecordProtection suite=0x{self.params.suite:04x} seq={self.seq}>"

    def _nonce(self) -> bytes:
        # RFC 8446 §5.3: the 64-bit sequence number, left-padded to iv_length,
        # XORed with the static IV.
        seq = self.seq
        if seq >= MAX_SEQUENCE:
            raise alerts.InternalError("record sequence number exhausted")
        return (self._iv ^ seq).to_bytes(self.params.iv_len, "big")

    def seal(self, content_type: int, data: bytes | memoryview, padding: int = 0) -> bytes:
        """One complete protected record (header included) carrying ``data`` as
        ``content_type``, followed by ``padding`` zero bytes inside the encryption."""
        if content_type not in _INNER_TYPES:
            raise ValueError(f"cannot protect content type {content_type}")
        if padding < 0 or len(data) + 1 + padding > MAX_INNER_PLAINTEXT:
            raise ValueError("record content plus padding exceeds 2^14 + 1 bytes")
        inner = b"".join((data, bytes((content_type,)), bytes(padding)))
        header = encode_header(_APPLICATION_DATA, len(inner) + self.params.tag_len)
        record = header + self._aead.encrypt(self._nonce(), inner, header)
        self.seq += 1
        return record

    def open(self, header: bytes, ciphertext: bytes | memoryview) -> tuple[int, bytes]:
        """(inner content type, content) of a received protected record; ``header``
        is its 5 bytes exactly as received, as they are the AEAD's AAD."""
        if header[0] != _APPLICATION_DATA:
            raise alerts.UnexpectedMessage("unprotected record where a protected one is due")
        if len(ciphertext) > MAX_CIPHERTEXT:
            raise alerts.RecordOverflow("protected record longer than 2^14 + 256")
        if len(ciphertext) - self.params.tag_len > MAX_INNER_PLAINTEXT:
            # An AEAD's output is its input less the tag: this record can only open to more
            # than §5.4 allows. Refused before the AEAD work, whatever its tag (tlsfuzzer
            # expects record_overflow here, not bad_record_mac).
            raise alerts.RecordOverflow("protected record would decrypt to over 2^14 + 1")
        try:
            inner = self._aead.decrypt(self._nonce(), ciphertext, header)
        except InvalidTag:
            raise alerts.BadRecordMac() from None
        # Only a record that opened counts (RFC 8446 §5.3: one sequence number per record
        # read). A rejected 0-RTT record skipped by trial decryption (§4.2.10) was never
        # read under this key, so it must not move the nonce of the next record.
        self.seq += 1
        if len(inner) > MAX_INNER_PLAINTEXT:
            raise alerts.RecordOverflow("decrypted record longer than 2^14 + 1")
        if inner and inner[-1]:
            content_type, end = inner[-1], len(inner) - 1
        else:
            # Padded (or empty): the content type is the last non-zero byte.
            end = len(inner.rstrip(b"\0")) - 1
            if end < 0:
                raise alerts.UnexpectedMessage("protected record without a content type")
            content_type = inner[end]
        if content_type not in _INNER_TYPES:
            raise alerts.UnexpectedMessage(f"inner content type {content_type}")
        if end == 0 and content_type in _NON_EMPTY_TYPES:
            raise alerts.UnexpectedMessage("zero-length handshake or alert fragment")
        return content_type, inner[:end]


class RecordReader:
    """Splits received bytes into records. Feed bytes with ``feed``; take records
    with ``next_record`` until it returns None (an incomplete record stays buffered).
    """

    __slots__ = ("_buf", "_pos", "_max_buffer")

    def __init__(self, max_buffer: int = MAX_RECEIVE_BUFFER) -> None:
        if max_buffer < RECORD_HEADER + MAX_CIPHERTEXT:
            raise ValueError("receive buffer cap below one maximal record")
        self._buf = bytearray()
        self._pos = 0
        self._max_buffer = max_buffer

    def __repr__(self) -> str:
        return f"<RecordReader pending={self.pending}>"

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as part of a record (non-zero at
        EOF means the peer stopped mid-record)."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.pending + len(data) > self._max_buffer:
            # Only a caller that stops draining records gets here; the peer cannot
            # on its own, since every header is checked before its body is awaited.
            raise alerts.InternalError("receive buffer over its cap")
        self._buf += data

    def next_record(self) -> tuple[int, int, bytes] | None:
        """(content_type, legacy_record_version, payload) of the next complete record."""
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if available < RECORD_HEADER:
            return None
        content_type, version, length = _HEADER.unpack_from(buf, pos)
        if content_type not in _KNOWN_TYPES:
            raise alerts.UnexpectedMessage(f"unknown record content type {content_type}")
        if version >> 8 != 3:
            # legacy_record_version is otherwise ignored (RFC 8446 §5.1), but a major
            # byte other than 3 is not TLS at all; OpenSSL answers it the same way.
            raise alerts.ProtocolVersion(f"record version 0x{version:04x}")
        limit = MAX_CIPHERTEXT if content_type == _APPLICATION_DATA else MAX_PLAINTEXT_RECORD_LENGTH
        if length > limit:
            raise alerts.RecordOverflow(f"record length {length} over {limit}")
        if length == 0 and content_type in _NON_EMPTY_TYPES:
            raise alerts.UnexpectedMessage("zero-length handshake or alert fragment")
        end = pos + RECORD_HEADER + length
        if end > len(buf):
            return None
        with memoryview(buf) as view:
            payload = bytes(view[pos + RECORD_HEADER : end])
        if end == len(buf):
            buf.clear()
            end = 0
        elif end >= _COMPACT_AT:
            del buf[:end]
            end = 0
        self._pos = end
        return content_type, version, payload


def encode_plaintext_records(
    content_type: int,
    data: bytes | memoryview,
    max_fragment: int = MAX_PLAINTEXT,
    *,
    legacy_version: int = LEGACY_VERSION,
) -> bytes:
    """``data`` as unprotected records of at most ``max_fragment`` bytes each.
    ``legacy_version`` is 0x0303 except in a client's first ClientHello (§5.1)."""
    if not 0 < max_fragment <= MAX_PLAINTEXT:
        raise ValueError(f"max_fragment {max_fragment} out of range")
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    for start in range(0, len(view), max_fragment):
        chunk = view[start : start + max_fragment]
        parts.append(encode_header(content_type, len(chunk), legacy_version))
        parts.append(chunk)
    return b"".join(parts)


def encode_protected_records(
    protection: RecordProtection,
    content_type: int,
    data: bytes | memoryview,
    max_fragment: int = MAX_PLAINTEXT,
) -> bytes:
    """``data`` sealed into as many records as it takes, each carrying at most
    ``max_fragment`` content bytes. Under an RFC 8449 record_size_limit L, pass
    L - 1: in TLS 1.3 the limit counts the inner content type byte."""
    if not 0 < max_fragment <= MAX_PLAINTEXT:
        raise ValueError(f"max_fragment {max_fragment} out of range")
    view = memoryview(data)
    return b"".join(
        protection.seal(content_type, view[start : start + max_fragment])
        for start in range(0, len(view), max_fragment)
    )
