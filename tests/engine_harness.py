"""Byte-level ClientHellos with any extensions in any order, and a harness that feeds one
``ServerConnection`` and keeps everything it said: for the engine hardening tests and their
fuzzing (issue 12)."""

from __future__ import annotations

import os
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.tls.codec import u16, uint16_list, vec8, vec16
from pqproxy.tls.enums import AlertDescription as A
from pqproxy.tls.enums import ExtensionType as X
from pqproxy.tls.enums import NamedGroup
from pqproxy.tls.events import ConnectionTerminated, Event
from pqproxy.tls.key_schedule import SUITES
from pqproxy.tls.record import MAX_PLAINTEXT, encode_plaintext_records
from pqproxy.tls.server import ServerConfig, ServerConnection, resolve_inline

PROVIDER = OpenSSLProvider()
AES128 = SUITES[0x1301]
CCS = b"\x14\x03\x03\x00\x01\x01"
SIGALGS = (0x0403, 0x0804, 0x0807)
X25519_SHARE = (
    x25519.X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
)
Extension = tuple[int, bytes]


# --- ClientHello building blocks (byte level, any order) ---------------------------------


def sni(name: bytes) -> Extension:
    return X.SERVER_NAME, vec16(b"\x00" + vec16(name))


def versions() -> Extension:
    return X.SUPPORTED_VERSIONS, vec8(u16(0x0304))


def groups(*values: int) -> Extension:
    return X.SUPPORTED_GROUPS, vec16(uint16_list(values))


def sigalgs(*schemes: int) -> Extension:
    return X.SIGNATURE_ALGORITHMS, vec16(uint16_list(schemes or SIGALGS))


def key_share(*shares: tuple[int, bytes]) -> Extension:
    return X.KEY_SHARE, vec16(b"".join(u16(group) + vec16(share) for group, share in shares))


def alpn(*protocols: bytes) -> Extension:
    return X.ALPN, vec16(b"".join(vec8(p) for p in protocols))


def padding(length: int) -> Extension:
    return X.PADDING, bytes(length)


def early_data() -> Extension:
    return X.EARLY_DATA, b""


def psk_modes() -> Extension:
    return X.PSK_KEY_EXCHANGE_MODES, b"\x01\x01"


def pre_shared_key(identities: list[bytes], age: int = 1, binder: bytes = b"\x55") -> Extension:
    ids = b"".join(vec16(i) + age.to_bytes(4, "big") for i in identities)
    binders = b"".join(vec8(binder * 32) for _ in identities)
    return X.PRE_SHARED_KEY, vec16(ids) + vec16(binders)


def hello(
    extensions: list[Extension],
    *,
    random: bytes = bytes(range(32)),
    session_id: bytes = b"",
    suites: tuple[int, ...] = (0x1301,),
    legacy_version: int = 0x0303,
) -> bytes:
    """A ClientHello handshake message (4-byte header included)."""
    body = b"".join(
        (
            u16(legacy_version),
            random,
            vec8(session_id),
            vec16(uint16_list(suites)),
            b"\x01\x00",
            vec16(b"".join(u16(t) + vec16(d) for t, d in extensions)),
        )
    )
    return b"\x01" + len(body).to_bytes(3, "big") + body


def minimal(name: bytes | None = b"localhost") -> list[Extension]:
    base = [versions(), groups(NamedGroup.x25519), sigalgs(), key_share((0x001D, X25519_SHARE))]
    return ([sni(name)] if name is not None else []) + base


def records(message: bytes, fragment: int = MAX_PLAINTEXT) -> bytes:
    return encode_plaintext_records(22, message, fragment, legacy_version=0x0301)


P256_SHARE = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
)


# --- engine harness -----------------------------------------------------------------------


class Run:
    """One engine fed chunk by chunk; every event and every byte it sent, collected."""

    def __init__(self, config: ServerConfig, **kwargs: Any) -> None:
        self.server = ServerConnection(config, PROVIDER, os.urandom, **kwargs)
        self.events: list[Event] = []
        self.out = b""

    def feed(self, *chunks: bytes) -> bytes:
        sent = b""
        for chunk in chunks:
            self.server.receive_data(chunk)
            self.events += resolve_inline(self.server)
            sent += self.server.data_to_send()
        self.out += sent
        return sent

    @property
    def terminated(self) -> ConnectionTerminated | None:
        ends = [e for e in self.events if isinstance(e, ConnectionTerminated)]
        assert len(ends) <= 1, ends
        return ends[0] if ends else None


def assert_alert(run: Run, alert: A) -> ConnectionTerminated:
    end = run.terminated
    assert end is not None, f"no alert; the engine went on: {run.server!r}"
    assert end.sent and end.alert == alert, end
    assert run.server.closed
    if run.out.startswith(b"\x15") or run.server.cipher_suite is None:
        assert run.out.endswith(b"\x15\x03\x03\x00\x02\x02" + bytes((alert,)))
    return end


def assert_going_on(run: Run) -> None:
    assert run.terminated is None, run.terminated
    assert not run.server.closed


def server_hello_random(sent: bytes) -> bytes:
    """The random of the (first) ServerHello in ``sent``; HRR_RANDOM for a retry."""
    assert sent[:1] == b"\x16" and sent[5] == 2, sent[:16].hex()
    return sent[5 + 4 + 2 : 5 + 4 + 2 + 32]
