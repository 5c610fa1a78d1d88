"""Hand-built ClientHellos for bad-input and fuzz tests (byte-level, so a
test can break exactly one rule)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pqproxy.tls.codec import u16, uint16_list, vec8, vec16
from pqproxy.tls.enums import ExtensionType

DEFAULT_SIGALGS = (0x0403, 0x0804, 0x0807)


@dataclass
class HelloSpec:
    groups: tuple[int, ...] = (0x001D,)
    shares: tuple[tuple[int, bytes], ...] = ((0x001D, b"\x09" + bytes(31)),)
    suites: tuple[int, ...] = (0x1301,)
    versions: tuple[int, ...] | None = (0x0304,)
    sigalgs: tuple[int, ...] | None = DEFAULT_SIGALGS
    session_id: bytes = b""
    compression: bytes = b"\x00"
    server_name: bytes | None = b"localhost"
    extra: list[tuple[int, bytes]] = field(default_factory=list)


def extension(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + vec16(data)


def client_hello_body(spec: HelloSpec) -> bytes:
    exts = []
    if spec.server_name is not None:
        exts.append(extension(ExtensionType.SERVER_NAME, vec16(b"\x00" + vec16(spec.server_name))))
    if spec.versions is not None:
        exts.append(extension(ExtensionType.SUPPORTED_VERSIONS, vec8(uint16_list(spec.versions))))
    exts.append(extension(ExtensionType.SUPPORTED_GROUPS, vec16(uint16_list(spec.groups))))
    if spec.sigalgs is not None:
        exts.append(extension(ExtensionType.SIGNATURE_ALGORITHMS, vec16(uint16_list(spec.sigalgs))))
    shares = b"".join(u16(g) + vec16(s) for g, s in spec.shares)
    exts.append(extension(ExtensionType.KEY_SHARE, vec16(shares)))
    exts += [extension(t, d) for t, d in spec.extra]
    return b"".join(
        (
            b"\x03\x03",
            bytes(range(32)),
            vec8(spec.session_id),
            vec16(uint16_list(spec.suites)),
            vec8(spec.compression),
            vec16(b"".join(exts)),
        )
    )


def handshake(msg_type: int, body: bytes) -> bytes:
    return bytes((msg_type,)) + len(body).to_bytes(3, "big") + body


def record(content_type: int, payload: bytes, version: bytes = b"\x03\x01") -> bytes:
    return bytes((content_type,)) + version + len(payload).to_bytes(2, "big") + payload


def client_hello_record(spec: HelloSpec | None = None) -> bytes:
    return record(22, handshake(1, client_hello_body(spec or HelloSpec())))
