"""The contracts between the TLS engine and the crypto backends.

The engine only knows these protocols. A backend supplies primitives (KEMs,
classical key agreement, signers); ``hybrid.py`` composes them into the hybrid
groups; a ``CryptoProvider`` is what a listener hands to the engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class SharedSecret(bytes):
    """Key-exchange output. A bytes subclass so it flows into HKDF untouched,
    but its repr never shows the value."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<SharedSecret {len(self)} bytes>"

    __str__ = __repr__


class InvalidKeyShare(ValueError):
    """The peer's share is malformed or fails the primitive's own checks
    (wrong length, point not on the curve, ML-KEM modulus check, all-zero
    X25519 output). The engine answers it with illegal_parameter."""


def check_share_length(what: str, data: bytes, expected: int) -> None:
    """The length check every key share and KEM input gets before any primitive runs."""
    if len(data) != expected:
        raise InvalidKeyShare(f"{what}: expected {expected} bytes, got {len(data)}")


class BackendError(RuntimeError):
    """The backend itself failed (token removed, library error). The engine
    answers it with internal_error; the operator sees the reason in the log."""


@runtime_checkable
class ClientKeyExchange(Protocol):
    """The client half of a key exchange: a generated key pair waiting for the
    server's share."""

    @property
    def share(self) -> bytes: ...

    def complete(self, server_share: bytes) -> SharedSecret: ...


@runtime_checkable
class KxGroup(Protocol):
    """One TLS key-exchange group (classical, a bare KEM, or a hybrid)."""

    @property
    def group(self) -> int:
        """The NamedGroup code point."""
        ...

    @property
    def backend(self) -> str:
        """Name of the backend doing the work, for metrics and logs."""
        ...

    @property
    def client_share_length(self) -> int: ...

    @property
    def server_share_length(self) -> int: ...

    def server_exchange(self, client_share: bytes) -> tuple[bytes, SharedSecret]:
        """The server's one-shot operation: returns (server_share, secret).
        Raises InvalidKeyShare for a bad client share."""
        ...

    def start(self) -> ClientKeyExchange:
        """The client's operation: generate a key pair."""
        ...


@runtime_checkable
class KemDecapsulator(Protocol):
    @property
    def encapsulation_key(self) -> bytes: ...

    def decapsulate(self, ciphertext: bytes) -> SharedSecret: ...


@runtime_checkable
class Kem(Protocol):
    """A KEM such as ML-KEM-768 (FIPS 203). Return orders are normalised here:
    ``encapsulate`` returns (ciphertext, shared_secret) whatever the library does."""

    @property
    def name(self) -> str: ...

    @property
    def backend(self) -> str: ...

    @property
    def encapsulation_key_length(self) -> int: ...

    @property
    def ciphertext_length(self) -> int: ...

    def encapsulate(self, encapsulation_key: bytes) -> tuple[bytes, SharedSecret]: ...

    def generate(self) -> KemDecapsulator: ...


@runtime_checkable
class Signer(Protocol):
    """A private key held by some backend. ``schemes`` lists the TLS
    SignatureScheme code points it can produce, most preferred first."""

    @property
    def schemes(self) -> tuple[int, ...]: ...

    @property
    def backend(self) -> str: ...

    def sign(self, scheme: int, message: bytes) -> bytes: ...


@dataclass(frozen=True, repr=False)
class CertifiedKey:
    """A certificate chain (leaf first, DER, encoded once at start-up) and the
    signer for the leaf's key."""

    chain: tuple[bytes, ...]
    signer: Signer
    names: tuple[str, ...] = field(default=())

    def __repr__(self) -> str:
        schemes = [hex(s) for s in self.signer.schemes]
        return f"<CertifiedKey names={list(self.names)} schemes={schemes}>"


def matches_server_name(names: Iterable[str], server_name: str) -> bool:
    """Whether a certificate valid for ``names`` serves ``server_name``.

    Exact match, or a wildcard that stands for exactly the leftmost label
    (``*.example.com`` matches ``a.example.com``, not ``example.com`` nor
    ``a.b.example.com``; RFC 6125 §6.4.3). Case-insensitive; a trailing dot
    on the server name is ignored.
    """
    wanted = server_name.lower().rstrip(".")
    if not wanted:
        return False
    label, _, parent = wanted.partition(".")
    for name in names:
        candidate = name.lower()
        if candidate == wanted:
            return True
        if label and parent and candidate.startswith("*.") and candidate[2:] == parent:
            return True
    return False


class CryptoProvider(Protocol):
    """What a listener hands to the engine: its key-exchange groups by code point."""

    @property
    def name(self) -> str: ...

    @property
    def groups(self) -> Mapping[int, KxGroup]: ...


# --- client authentication and session tickets -------------------------------------------
# Implementations live in crypto/ (X.509 through cryptography's verifier, tickets under
# rotating AEAD keys). The engine calls verify_signature and the ticket protector itself;
# verify_chain is run by whoever answers its CertificateVerificationNeeded event.


@dataclass(frozen=True)
class PeerIdentity:
    """Who a verified client certificate says the client is."""

    subject: str
    dns_names: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    chain: tuple[bytes, ...] = field(default=(), repr=False)
    # Unix time at which the verified path stops being valid (its earliest notAfter, as a
    # rule the leaf's): a resumed session never carries the identity past it (RFC 8446
    # §4.6.1). How long the proof holds, not who the client is: not compared.
    not_after: float | None = field(default=None, compare=False)


class CertificateRejected(Exception):
    """A client certificate or its CertificateVerify failed. ``alert`` is the RFC 8446
    alert name to send (bad_certificate, unknown_ca, certificate_expired,
    unsupported_certificate, decrypt_error); ``reason`` is for the log only; ``check``
    names the rule that refused it, from a small fixed set (a metrics label): the alert
    name unless a more precise one applies (chain_too_long, duplicate_certificate,
    self_issued_intermediate)."""

    def __init__(self, alert: str, reason: str, check: str | None = None) -> None:
        super().__init__(reason)
        self.alert = alert
        self.reason = reason
        self.check = check if check is not None else alert


class ClientCertificateVerifier(Protocol):
    @property
    def signature_schemes(self) -> tuple[int, ...]:
        """Schemes accepted in the client's CertificateVerify, most preferred first."""
        ...

    def verify_chain(self, chain: tuple[bytes, ...], now: float) -> PeerIdentity:
        """Chain (leaf first, DER) to a trusted CA at time ``now`` (Unix seconds), with
        key usage and extended key usage clientAuth. Raises CertificateRejected. The
        engine asks for it with an event (CertificateVerificationNeeded), so it may run
        on any thread: it must not keep state between calls."""
        ...

    def verify_signature(self, leaf: bytes, scheme: int, message: bytes, signature: bytes) -> None:
        """The client's CertificateVerify. Raises CertificateRejected("decrypt_error", ...)."""
        ...


class TicketProtector(Protocol):
    """Seals session state into opaque tickets that any worker can open."""

    def seal(self, plaintext: bytes, now: float) -> bytes: ...

    def open(self, ticket: bytes, now: float) -> bytes | None:
        """The plaintext, or None for a ticket that is forged, damaged or sealed under a
        key that has rotated out."""
        ...
