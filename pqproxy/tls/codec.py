"""Byte buffer for TLS structures (RFC 8446 §3): pull on the read side,
small push helpers on the write side.

Every length-prefixed block must be consumed exactly; anything else is a
decode_error, raised as a TLSAlert so that no parser ever lets an IndexError
or struct.error escape.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TypeVar

from .alerts import DecodeError

T = TypeVar("T")


class Buffer:
    __slots__ = ("_data", "_pos", "_end")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self._end = len(data)

    def eof(self) -> bool:
        return self._pos >= self._end

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def _take(self, n: int) -> int:
        start = self._pos
        if n > self._end - start:
            raise DecodeError(f"truncated: need {n} bytes, have {self._end - start}")
        self._pos = start + n
        return start

    def pull_uint8(self) -> int:
        pos = self._pos
        if pos >= self._end:
            raise DecodeError("truncated: need 1 byte")
        self._pos = pos + 1
        return self._data[pos]

    def pull_uint16(self) -> int:
        pos = self._pos
        if pos + 2 > self._end:
            raise DecodeError("truncated: need 2 bytes")
        self._pos = pos + 2
        data = self._data
        return (data[pos] << 8) | data[pos + 1]

    def pull_uint24(self) -> int:
        start = self._take(3)
        return int.from_bytes(self._data[start : start + 3], "big")

    def pull_bytes(self, n: int) -> bytes:
        start = self._take(n)
        return self._data[start : start + n]

    def pull_vector(self, length_size: int, minimum: int = 0, maximum: int | None = None) -> bytes:
        """An opaque<minimum..maximum> with a length_size-byte prefix."""
        pos, data = self._pos, self._data
        if pos + length_size > self._end:
            raise DecodeError(f"truncated: need a {length_size}-byte length")
        if length_size == 1:
            length = data[pos]
        elif length_size == 2:
            length = (data[pos] << 8) | data[pos + 1]
        else:
            length = int.from_bytes(data[pos : pos + length_size], "big")
        if length < minimum or (maximum is not None and length > maximum):
            raise DecodeError(f"vector length {length} outside {minimum}..{maximum}")
        start = pos + length_size
        end = start + length
        if end > self._end:
            raise DecodeError(f"truncated: vector of {length} bytes, have {self._end - start}")
        self._pos = end
        return data[start:end]

    def pull_list(
        self, length_size: int, pull_item: Callable[[Buffer], T], minimum: int = 0
    ) -> list[T]:
        """A length-prefixed list of items; the items must fill the block exactly."""
        block = Buffer(self.pull_vector(length_size, minimum))
        items: list[T] = []
        while not block.eof():
            items.append(pull_item(block))
        return items

    def expect_end(self, what: str) -> None:
        if self._pos != self._end:
            raise DecodeError(f"{self._end - self._pos} trailing bytes in {what}")


def split_extensions(block: bytes) -> list[tuple[int, bytes]]:
    """An extensions block as (type, body) pairs; the bodies must fill it exactly."""
    pairs: list[tuple[int, bytes]] = []
    pos, end = 0, len(block)
    while pos < end:
        if end - pos < 4:
            raise DecodeError("truncated extension header")
        ext_type = (block[pos] << 8) | block[pos + 1]
        start = pos + 4
        pos = start + ((block[pos + 2] << 8) | block[pos + 3])
        if pos > end:
            raise DecodeError(f"extension {ext_type} overruns its block")
        pairs.append((ext_type, block[start:pos]))
    return pairs


def pull_uint16_list(data: bytes, what: str, minimum_items: int = 1) -> tuple[int, ...]:
    """A block of uint16 values (groups, schemes, suites) without a per-item loop."""
    if len(data) % 2:
        raise DecodeError(f"odd length {len(data)} in {what}")
    if len(data) < 2 * minimum_items:
        raise DecodeError(f"empty {what}")
    return struct.unpack(f">{len(data) // 2}H", data)


def u8(value: int) -> bytes:
    return value.to_bytes(1, "big")


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def u24(value: int) -> bytes:
    return value.to_bytes(3, "big")


def vec8(data: bytes) -> bytes:
    return len(data).to_bytes(1, "big") + data


def vec16(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def vec24(data: bytes) -> bytes:
    return len(data).to_bytes(3, "big") + data


def uint16_list(values: tuple[int, ...] | list[int]) -> bytes:
    return b"".join(v.to_bytes(2, "big") for v in values)
