"""Just enough DER (X.690) to read and write the few structures cryptography does not expose.

Which ones: the parameters of an id-RSASSA-PSS SubjectPublicKeyInfo (cryptography re-encodes
such a key as rsaEncryption and drops them), the ML-DSA private key CHOICE of RFC 9881 §6
inside PKCS#8, and the hand-built RSA-PSS development certificate. Everything here is
definite-length DER with single-byte tags, which is all those structures use; anything else
is a ``DerError`` (a ValueError), never an IndexError.
"""

from __future__ import annotations

from typing import Final, NamedTuple

SEQUENCE: Final = 0x30
INTEGER: Final = 0x02
BIT_STRING: Final = 0x03
OCTET_STRING: Final = 0x04
NULL: Final = 0x05
OID: Final = 0x06


def context(number: int, *, constructed: bool = True) -> int:
    """The tag of ``[number]`` (EXPLICIT tags are constructed, IMPLICIT primitive ones not)."""
    return 0x80 | (0x20 if constructed else 0) | number


class DerError(ValueError):
    """The bytes are not the DER this module reads."""


class Element(NamedTuple):
    tag: int
    value: bytes  # the contents octets
    encoded: bytes  # the whole TLV


def read(data: bytes, offset: int = 0) -> tuple[Element, int]:
    """The element starting at ``offset`` and the offset just past it."""
    if offset + 2 > len(data):
        raise DerError("truncated element")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise DerError("multi-byte tags are not used here")
    first = data[offset + 1]
    start = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        # 0x80 is BER's indefinite length; more than 4 length octets is not a file of ours.
        if count == 0 or count > 4 or start + count > len(data):
            raise DerError("bad length")
        length = int.from_bytes(data[start : start + count], "big")
        if length < 0x80 or data[start] == 0:
            raise DerError("length not in its shortest form")
        start += count
    end = start + length
    if end > len(data):
        raise DerError("truncated element")
    return Element(tag, data[start:end], data[offset:end]), end


def read_one(data: bytes, tag: int) -> Element:
    """``data`` is exactly one element with ``tag``."""
    element, end = read(data)
    if element.tag != tag:
        raise DerError(f"expected tag 0x{tag:02x}, got 0x{element.tag:02x}")
    if end != len(data):
        raise DerError("trailing bytes after the element")
    return element


def children(value: bytes) -> list[Element]:
    """The elements of a constructed value (a SEQUENCE's contents), in order."""
    found: list[Element] = []
    offset = 0
    while offset < len(value):
        element, offset = read(value, offset)
        found.append(element)
    return found


def decode_oid(value: bytes) -> str:
    """Dotted form of an OBJECT IDENTIFIER's contents octets."""
    if not value or value[-1] & 0x80:
        raise DerError("bad object identifier")
    arcs: list[int] = []
    current = 0
    for byte in value:
        if current == 0 and byte == 0x80:
            raise DerError("object identifier arc not in its shortest form")
        current = (current << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(current)
            current = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


def decode_integer(value: bytes) -> int:
    if not value:
        raise DerError("empty integer")
    return int.from_bytes(value, "big", signed=True)


# -- writing ---------------------------------------------------------------------------------


def encode(tag: int, value: bytes) -> bytes:
    length = len(value)
    if length < 0x80:
        return bytes((tag, length)) + value
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(octets))) + octets + value


def sequence(*items: bytes) -> bytes:
    return encode(SEQUENCE, b"".join(items))


def encode_oid(dotted: str) -> bytes:
    arcs = [int(part) for part in dotted.split(".")]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return encode(OID, bytes(body))


def encode_integer(number: int) -> bytes:
    size = number.bit_length() // 8 + 1
    return encode(INTEGER, number.to_bytes(size, "big", signed=True))
