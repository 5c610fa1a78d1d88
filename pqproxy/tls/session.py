"""What a session ticket carries (sealed by a TicketProtector; this is the plaintext).

The resumption PSK, the cipher suite it belongs to, when it was made and for how
long it is good, the SNI and ALPN it was issued under, and the client identity a
certificate proved, so that a resumed connection keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..crypto.provider import PeerIdentity
from .alerts import TLSAlert
from .codec import Buffer, u16, vec8, vec16

_VERSION = 1


@dataclass(frozen=True, repr=False)
class SessionState:
    cipher_suite: int
    psk: bytes
    created: float
    lifetime: int
    server_name: str | None
    alpn: bytes | None
    identity: PeerIdentity | None

    def __repr__(self) -> str:
        return f"<SessionState suite=0x{self.cipher_suite:04x} sni={self.server_name!r}>"


def _optional(data: bytes | None) -> bytes:
    return b"\x00" if data is None else b"\x01" + vec16(data)


def _strings(values: tuple[str, ...]) -> bytes:
    return vec16(b"".join(vec16(v.encode()) for v in values))


def encode_session_state(state: SessionState) -> bytes:
    identity = state.identity
    if identity is None:
        identity_bytes = b"\x00"
    else:
        identity_bytes = (
            b"\x01"
            + vec16(identity.subject.encode())
            + _strings(identity.dns_names)
            + _strings(identity.uris)
        )
    return b"".join(
        (
            bytes((_VERSION,)),
            u16(state.cipher_suite),
            int(state.created * 1000).to_bytes(8, "big"),
            state.lifetime.to_bytes(4, "big"),
            vec8(state.psk),
            _optional(state.server_name.encode() if state.server_name is not None else None),
            _optional(state.alpn),
            identity_bytes,
        )
    )


def _pull_optional(buf: Buffer) -> bytes | None:
    return buf.pull_vector(2) if buf.pull_uint8() else None


def _pull_strings(buf: Buffer) -> tuple[str, ...]:
    return tuple(v.decode() for v in buf.pull_list(2, lambda b: b.pull_vector(2)))


def decode_session_state(data: bytes) -> SessionState | None:
    """None for anything malformed: a ticket we cannot read is simply not resumed."""
    try:
        buf = Buffer(data)
        if buf.pull_uint8() != _VERSION:
            return None
        suite = buf.pull_uint16()
        created = int.from_bytes(buf.pull_bytes(8), "big") / 1000.0
        lifetime = int.from_bytes(buf.pull_bytes(4), "big")
        psk = buf.pull_vector(1, minimum=32)
        server_name = _pull_optional(buf)
        alpn = _pull_optional(buf)
        identity: PeerIdentity | None = None
        if buf.pull_uint8():
            subject = buf.pull_vector(2).decode()
            identity = PeerIdentity(subject, _pull_strings(buf), _pull_strings(buf))
        buf.expect_end("session state")
    except (TLSAlert, UnicodeDecodeError):
        return None
    return SessionState(
        cipher_suite=suite,
        psk=psk,
        created=created,
        lifetime=lifetime,
        server_name=server_name.decode() if server_name is not None else None,
        alpn=alpn,
        identity=identity,
    )
