"""Events that ServerConnection hands out through ``next_event()``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..crypto.provider import ClientCertificateVerifier, KxGroup, PeerIdentity, Signer
from .enums import AlertDescription


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True, repr=False)
class KeyExchangeNeeded(Event):
    """Run ``exchange.server_exchange(client_share)`` anywhere (inline, on a
    pool, on a token) and hand the result to ``complete_key_exchange``; pass an
    exception to ``fail_key_exchange`` instead."""

    group: int
    client_share: bytes
    exchange: KxGroup

    def __repr__(self) -> str:
        return f"KeyExchangeNeeded(group=0x{self.group:04x}, share={len(self.client_share)} bytes)"


@dataclass(frozen=True, repr=False)
class SignatureNeeded(Event):
    """Sign ``message`` with ``signer`` under ``scheme`` and hand the signature
    to ``complete_signature`` (or an exception to ``fail_signature``)."""

    scheme: int
    message: bytes
    signer: Signer

    def __repr__(self) -> str:
        return f"SignatureNeeded(scheme=0x{self.scheme:04x}, message={len(self.message)} bytes)"


@dataclass(frozen=True, repr=False)
class CertificateVerificationNeeded(Event):
    """Validate the client's certificate ``chain`` (leaf first, DER) at time ``now`` with
    ``verifier.verify_chain`` anywhere (inline, on a pool: path building can cost
    milliseconds) and hand the identity to ``complete_certificate_verification``; pass the
    exception (CertificateRejected names its alert) to ``fail_certificate_verification``."""

    chain: tuple[bytes, ...]
    now: float
    verifier: ClientCertificateVerifier

    def __repr__(self) -> str:
        size = sum(len(c) for c in self.chain)
        return f"CertificateVerificationNeeded({len(self.chain)} certificates, {size} bytes)"


@dataclass(frozen=True)
class HandshakeComplete(Event):
    """The client's Finished verified. Everything a log line or an upstream
    header needs about how the client connected."""

    group: int
    cipher_suite: int
    signature_scheme: int
    alpn_protocol: str | None
    server_name: str | None
    hello_retry: bool
    offered_groups: tuple[int, ...] = field(default=())
    # Resumed from a ticket (still with a fresh key exchange: psk_dhe_ke only).
    resumed: bool = False
    # The client certificate's identity (mutual TLS), also carried across resumption.
    peer_identity: PeerIdentity | None = None


@dataclass(frozen=True, repr=False)
class ApplicationData(Event):
    data: bytes

    def __repr__(self) -> str:
        return f"ApplicationData({len(self.data)} bytes)"


@dataclass(frozen=True)
class KeyUpdated(Event):
    """The client rotated its sending key. ``we_updated``: it asked us to rotate ours, and we
    do, with one KeyUpdate before our next application data (RFC 8446 §4.6.3; any number of
    requests before it share that one answer)."""

    update_requested: bool
    we_updated: bool


@dataclass(frozen=True)
class PeerClosed(Event):
    """The client sent close_notify: no more data will come from it. The
    connection may still send (TLS 1.3 close is a half-close, RFC 8446 §6.1)."""


@dataclass(frozen=True)
class ConnectionTerminated(Event):
    """The connection is closed for good. ``alert`` is the alert sent
    (``sent=True``) or received (``sent=False``), or None for a bare EOF.
    ``reason`` is for logs only."""

    alert: AlertDescription | None
    sent: bool
    reason: str
