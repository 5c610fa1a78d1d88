"""What a session ticket carries (sealed by a TicketProtector; this is the plaintext).

The resumption PSK, the cipher suite it belongs to, when it was made and for how
long it is good, the SNI and ALPN it was issued under, and the client identity a
certificate proved, so that a resumed connection keeps it, with what bounds that
identity's resumption (RFC 8446 §4.6.1): when its CertificateVerify was verified and when
its certificate stops being valid. Every ticket issued on a resumed connection carries the
same two times as the session it resumed, so chaining tickets never renews a proof.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..crypto.provider import PeerIdentity
from .alerts import TLSAlert
from .codec import Buffer, u16, vec8, vec16

# 2: auth_time and not_after with the identity. A ticket of another version does not
# open (a full handshake), so no session predating the limits is ever resumed.
_VERSION = 2


@dataclass(frozen=True, repr=False)
class SessionState:
    cipher_suite: int
    psk: bytes
    created: float
    lifetime: int
    server_name: str | None
    alpn: bytes | None
    identity: PeerIdentity | None
    # With an identity (and only then): Unix time of the CertificateVerify that proved it,
    # and the end of its certificate's validity.
    auth_time: float | None = None
    not_after: float | None = None

    def __post_init__(self) -> None:
        if (self.identity is None) != (self.auth_time is None or self.not_after is None):
            raise ValueError("auth_time and not_after go with an identity, and only with one")

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
        assert state.auth_time is not None and state.not_after is not None
        identity_bytes = (
            b"\x01"
            + vec16(identity.subject.encode())
            + _strings(identity.dns_names)
            + _strings(identity.uris)
            + _millis(state.auth_time)
            + _millis(state.not_after)
        )
    return b"".join(
        (
            bytes((_VERSION,)),
            u16(state.cipher_suite),
            _millis(state.created),
            state.lifetime.to_bytes(4, "big"),
            vec8(state.psk),
            _optional(state.server_name.encode() if state.server_name is not None else None),
            _optional(state.alpn),
            identity_bytes,
        )
    )


def _millis(seconds: float) -> bytes:
    # Whole milliseconds, rounded down: a time read back is never later than the one
    # written, so a limit computed from it is never longer.
    return int(seconds * 1000).to_bytes(8, "big")


def _pull_millis(buf: Buffer) -> float:
    return int.from_bytes(buf.pull_bytes(8), "big") / 1000.0


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
        created = _pull_millis(buf)
        lifetime = int.from_bytes(buf.pull_bytes(4), "big")
        psk = buf.pull_vector(1, minimum=32)
        server_name = _pull_optional(buf)
        alpn = _pull_optional(buf)
        identity: PeerIdentity | None = None
        auth_time: float | None = None
        not_after: float | None = None
        if buf.pull_uint8():
            subject = buf.pull_vector(2).decode()
            dns_names, uris = _pull_strings(buf), _pull_strings(buf)
            auth_time, not_after = _pull_millis(buf), _pull_millis(buf)
            identity = PeerIdentity(subject, dns_names, uris, not_after=not_after)
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
        auth_time=auth_time,
        not_after=not_after,
    )
