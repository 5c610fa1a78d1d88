"""The TLS 1.3 key schedule (RFC 8446 §7): HKDF-Expand-Label, Derive-Secret, the
early -> handshake -> master stages, traffic keys and key updates.

Pure functions over bytes plus one small stateful ``KeySchedule``. Nothing here
knows about records, sockets or backends; the shared secret arrives as bytes from
whichever key exchange the engine ran.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import cache

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

__all__ = [
    "SUITES",
    "KeySchedule",
    "SuiteParams",
    "derive_secret",
    "empty_hash",
    "hash_len",
    "hash_transcript",
    "hkdf_expand_label",
    "hkdf_extract",
    "hrr_message_hash",
    "next_traffic_secret",
    "traffic_keys",
]

# RFC 8446 §7.1: every label is prefixed with this before it goes into HkdfLabel.
_LABEL_PREFIX = b"tls13 "
# HkdfLabel.label is opaque<7..255>, HkdfLabel.context is opaque<0..255>.
_MAX_LABEL = 255 - len(_LABEL_PREFIX)
_MAX_CONTEXT = 255
# RFC 8446 §4.4.1: the type of the synthetic handshake message that replaces
# ClientHello1 in the transcript after a HelloRetryRequest.
_MESSAGE_HASH = 254


@dataclass(frozen=True)
class SuiteParams:
    """What a TLS 1.3 cipher suite fixes: the transcript/HKDF hash and the AEAD."""

    suite: int
    hash_name: str
    hash_len: int
    key_len: int
    aead: type[AESGCM] | type[ChaCha20Poly1305]
    iv_len: int = 12
    # Both TLS 1.3 AEADs (RFC 8446 §5.3, RFC 5116, RFC 8439) have a 16-byte tag.
    tag_len: int = 16


SUITES: dict[int, SuiteParams] = {
    0x1301: SuiteParams(0x1301, "sha256", 32, 16, AESGCM),
    0x1302: SuiteParams(0x1302, "sha384", 48, 32, AESGCM),
    0x1303: SuiteParams(0x1303, "sha256", 32, 32, ChaCha20Poly1305),
}


@cache
def hash_len(hash_name: str) -> int:
    return hashlib.new(hash_name).digest_size


@cache
def empty_hash(hash_name: str) -> bytes:
    """Transcript-Hash("") — the context of every "derived" step (RFC 8446 §7.1)."""
    return hashlib.new(hash_name, b"").digest()


def hash_transcript(hash_name: str, *messages: bytes) -> bytes:
    """Transcript-Hash of the concatenated handshake messages (RFC 8446 §4.4.1)."""
    h = hashlib.new(hash_name)
    for message in messages:
        h.update(message)
    return h.digest()


def hkdf_extract(hash_name: str, salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract (RFC 5869 §2.2). An empty salt means HashLen zero bytes."""
    return hmac.digest(salt or bytes(hash_len(hash_name)), ikm, hash_name)


def hkdf_expand_label(
    hash_name: str, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    """HKDF-Expand-Label (RFC 8446 §7.1); ``label`` is given without "tls13 "."""
    if len(label) > _MAX_LABEL or len(context) > _MAX_CONTEXT:
        raise ValueError("HKDF label or context too long")
    size = hash_len(hash_name)
    if not 0 < length <= 255 * size:
        raise ValueError(f"HKDF-Expand length {length} out of range")
    full_label = _LABEL_PREFIX + label
    info = b"".join(
        (
            length.to_bytes(2, "big"),
            bytes((len(full_label),)),
            full_label,
            bytes((len(context),)),
            context,
        )
    )
    if length <= size:
        # Every key, IV and secret in TLS 1.3 fits in one HKDF block: T(1) alone.
        return hmac.digest(secret, info + b"\x01", hash_name)[:length]
    blocks = []
    block = b""
    for counter in range(1, -(-length // size) + 1):
        block = hmac.digest(secret, block + info + bytes((counter,)), hash_name)
        blocks.append(block)
    return b"".join(blocks)[:length]


def derive_secret(hash_name: str, secret: bytes, label: bytes, transcript_hash: bytes) -> bytes:
    """Derive-Secret (RFC 8446 §7.1), taking the transcript hash already computed:
    the engine keeps a running hash, so hashing the messages again here would waste work."""
    return hkdf_expand_label(hash_name, secret, label, transcript_hash, hash_len(hash_name))


def next_traffic_secret(params: SuiteParams, secret: bytes) -> bytes:
    """application_traffic_secret_N+1 (RFC 8446 §7.2), for KeyUpdate."""
    return hkdf_expand_label(params.hash_name, secret, b"traffic upd", b"", params.hash_len)


def traffic_keys(params: SuiteParams, secret: bytes) -> tuple[bytes, bytes]:
    """(write_key, write_iv) for one direction (RFC 8446 §7.3)."""
    key = hkdf_expand_label(params.hash_name, secret, b"key", b"", params.key_len)
    iv = hkdf_expand_label(params.hash_name, secret, b"iv", b"", params.iv_len)
    return key, iv


def hrr_message_hash(hash_name: str, client_hello1: bytes) -> bytes:
    """The synthetic ``message_hash`` handshake message that stands for ClientHello1
    in the transcript once the server has sent a HelloRetryRequest (RFC 8446 §4.4.1)."""
    digest = hashlib.new(hash_name, client_hello1).digest()
    return bytes((_MESSAGE_HASH, 0, 0, len(digest))) + digest


@cache
def _no_psk_early_secrets(hash_name: str) -> tuple[bytes, bytes]:
    """Without a PSK the early secret and its "derived" child are constants
    (RFC 8446 §7.1); compute them once per hash instead of per handshake."""
    early = hkdf_extract(hash_name, b"", bytes(hash_len(hash_name)))
    return early, derive_secret(hash_name, early, b"derived", empty_hash(hash_name))


class KeySchedule:
    """One connection's walk down RFC 8446 §7.1: early secret at construction, then
    ``handshake_secrets`` once the key exchange is done, then ``application_secrets``
    once the server Finished is in the transcript. Each stage needs the one before;
    calling them out of order is a bug in the caller and raises ``RuntimeError``.

    The secrets are attributes because the engine needs them (Finished keys,
    exporters, tickets); ``repr`` never shows them.
    """

    __slots__ = (
        "params",
        "early_secret",
        "_early_derived",
        "handshake_secret",
        "master_secret",
        "exporter_master_secret",
    )

    def __init__(self, params: SuiteParams, psk: bytes | None = None) -> None:
        self.params = params
        if psk is None:
            self.early_secret, self._early_derived = _no_psk_early_secrets(params.hash_name)
        else:
            self.early_secret = hkdf_extract(params.hash_name, b"", psk)
            self._early_derived = self._derived(self.early_secret)
        self.handshake_secret: bytes | None = None
        self.master_secret: bytes | None = None
        self.exporter_master_secret: bytes | None = None

    def __repr__(self) -> str:
        stage = (
            "application"
            if self.master_secret is not None
            else "handshake"
            if self.handshake_secret is not None
            else "early"
        )
        return f"<KeySchedule suite=0x{self.params.suite:04x} stage={stage}>"

    def _derived(self, secret: bytes) -> bytes:
        name = self.params.hash_name
        return derive_secret(name, secret, b"derived", empty_hash(name))

    def handshake_secrets(self, shared_secret: bytes, hello_hash: bytes) -> tuple[bytes, bytes]:
        """(client_handshake_traffic_secret, server_handshake_traffic_secret);
        ``hello_hash`` is Transcript-Hash(ClientHello..ServerHello)."""
        if self.handshake_secret is not None:
            raise RuntimeError("handshake secrets already derived")
        name = self.params.hash_name
        hs = hkdf_extract(name, self._early_derived, shared_secret)
        self.handshake_secret = hs
        return (
            derive_secret(name, hs, b"c hs traffic", hello_hash),
            derive_secret(name, hs, b"s hs traffic", hello_hash),
        )

    def application_secrets(self, server_finished_hash: bytes) -> tuple[bytes, bytes]:
        """(client_application_traffic_secret_0, server_application_traffic_secret_0);
        ``server_finished_hash`` is Transcript-Hash(ClientHello..server Finished).
        Also sets ``master_secret`` and ``exporter_master_secret``."""
        if self.handshake_secret is None:
            raise RuntimeError("application secrets need the handshake secret first")
        if self.master_secret is not None:
            raise RuntimeError("application secrets already derived")
        name = self.params.hash_name
        master = hkdf_extract(
            name, self._derived(self.handshake_secret), bytes(self.params.hash_len)
        )
        self.master_secret = master
        self.exporter_master_secret = derive_secret(
            name, master, b"exp master", server_finished_hash
        )
        return (
            derive_secret(name, master, b"c ap traffic", server_finished_hash),
            derive_secret(name, master, b"s ap traffic", server_finished_hash),
        )

    def resumption_master_secret(self, client_finished_hash: bytes) -> bytes:
        """``client_finished_hash`` is Transcript-Hash(ClientHello..client Finished)."""
        if self.master_secret is None:
            raise RuntimeError("resumption master secret needs the master secret first")
        return derive_secret(
            self.params.hash_name, self.master_secret, b"res master", client_finished_hash
        )

    def finished_verify_data(self, base_secret: bytes, transcript_hash: bytes) -> bytes:
        """Finished.verify_data (RFC 8446 §4.4.4); ``base_secret`` is the sender's
        handshake traffic secret. Compare received values with ``hmac.compare_digest``."""
        name = self.params.hash_name
        finished_key = hkdf_expand_label(name, base_secret, b"finished", b"", self.params.hash_len)
        return hmac.digest(finished_key, transcript_hash, name)
