"""A tlsfuzzer/BoGo-style conformance campaign against ``ServerConnection`` (issue 12): every
probe is real bytes through the engine, from a byte-level TLS 1.3 client that can put any
message in any record at any point of the handshake, and each is checked against RFC 8446
(or, where the RFC leaves a choice, against what Go's crypto/tls and BoringSSL answer).

Probes are grouped as the RFC is: ClientHello (§4.1.2, §4.2, §9.2), HelloRetryRequest
(§4.1.4), records (§5), alerts (§6) and post-handshake messages (§4.6). Probes named
``..._defect`` found a difference from the RFC answer; the rest pin down behaviour that
already matched, so that a later change cannot lose it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.provider import CertifiedKey
from pqproxy.crypto.tickets import RotatingTicketKeys
from pqproxy.tls import server as server_module
from pqproxy.tls.codec import Buffer, split_extensions, u16, vec8, vec16
from pqproxy.tls.enums import AlertDescription as A
from pqproxy.tls.enums import ContentType, HandshakeType, NamedGroup
from pqproxy.tls.enums import ExtensionType as X
from pqproxy.tls.events import (
    ApplicationData,
    ConnectionTerminated,
    HandshakeComplete,
    KeyUpdated,
    PeerClosed,
)
from pqproxy.tls.key_schedule import (
    SUITES,
    KeySchedule,
    derive_secret,
    empty_hash,
    hkdf_expand_label,
    hrr_message_hash,
    next_traffic_secret,
)
from pqproxy.tls.messages import HELLO_RETRY_REQUEST_RANDOM, encode_finished, handshake_message
from pqproxy.tls.record import (
    MAX_CIPHERTEXT,
    MAX_INNER_PLAINTEXT,
    MAX_PLAINTEXT,
    RecordProtection,
    RecordReader,
    encode_header,
)
from pqproxy.tls.server import ServerConfig, resolve_inline
from tests.engine_harness import (
    CCS,
    P256_SHARE,
    X25519_SHARE,
    Extension,
    Run,
    alpn,
    assert_alert,
    assert_going_on,
    early_data,
    groups,
    hello,
    key_share,
    padding,
    pre_shared_key,
    psk_modes,
    records,
    sigalgs,
    sni,
    versions,
)

AES128 = SUITES[0x1301]
SHA256 = "sha256"
NOW = 1.0e9


def _clock() -> float:
    return NOW


@pytest.fixture(scope="module")
def certified(dev_certs_factory: Callable[[str], Any]) -> CertifiedKey:
    certs = dev_certs_factory("ecdsa-p256")
    return load_certified_key(certs.cert, certs.key)


@pytest.fixture(scope="module")
def config(certified: CertifiedKey) -> ServerConfig:
    return ServerConfig(certificates=(certified,))


@pytest.fixture(scope="module")
def ticket_config(certified: CertifiedKey) -> ServerConfig:
    return ServerConfig(
        certificates=(certified,),
        tickets=RotatingTicketKeys(os.urandom(32)),
        tickets_per_handshake=1,
    )


# --- a byte-level TLS 1.3 client -----------------------------------------------------------


class Client:
    """X25519 and TLS_AES_128_GCM_SHA256, written with the engine's own codecs and key
    schedule (the key schedule is proved against RFC 8448 in tests/vectors). It reads
    everything the server sends, so a probe can check the alert inside a protected record."""

    def __init__(self, config: ServerConfig, **kwargs: Any) -> None:
        self.run = Run(config, **kwargs)
        self._key = x25519.X25519PrivateKey.generate()
        self.share = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._reader = RecordReader()
        self._server_read: RecordProtection | None = None
        self._server_hs = b""
        self._server_app = b""
        self._hs_bytes = bytearray()
        self.transcript: list[bytes] = []
        self.schedule: KeySchedule | None = None
        self.psk: bytes | None = None
        self.client_hs = b""
        self.client_app = b""
        self.hs_write: RecordProtection | None = None
        self.app_write: RecordProtection | None = None
        self.server_hello: bytes | None = None
        self.retried = False
        self.server_finished = False
        self.alerts: list[tuple[int, int]] = []
        self.tickets: list[tuple[bytes, bytes]] = []  # (nonce, ticket)
        self.data = b""
        self.key_updates: list[int] = []

    # what the client sends

    def extensions(self, *, name: bytes = b"localhost") -> list[Extension]:
        return [
            sni(name),
            versions(),
            groups(NamedGroup.x25519),
            sigalgs(),
            key_share((NamedGroup.x25519, self.share)),
        ]

    def client_hello(
        self,
        extensions: list[Extension] | None = None,
        *,
        ticket: tuple[bytes, bytes] | None = None,
        **fields: Any,
    ) -> bytes:
        """A ClientHello; with ``ticket`` (identity, psk) it ends in a pre_shared_key with
        a binder computed over it (RFC 8446 §4.2.11.2)."""
        extensions = list(self.extensions() if extensions is None else extensions)
        if ticket is None:
            message = hello(extensions, **fields)
            self.transcript.append(message)
            return message
        identity, psk = ticket
        extensions.append(pre_shared_key([identity], age=0, binder=b"\x00"))
        message = hello(extensions, **fields)
        truncated = message[: -(2 + 1 + 32)]
        schedule = KeySchedule(AES128, psk=psk)
        binder_key = derive_secret(SHA256, schedule.early_secret, b"res binder", empty_hash(SHA256))
        binder = schedule.finished_verify_data(
            binder_key, hashlib.sha256(b"".join([*self.transcript, truncated])).digest()
        )
        message = truncated + vec16(vec8(binder))
        self.psk = psk
        self.transcript.append(message)
        return message

    def feed(self, *chunks: bytes) -> bytes:
        sent = self.run.feed(*chunks)
        self._absorb(sent)
        return sent

    def handshake(self, message: bytes | None = None, **kwargs: Any) -> None:
        """ClientHello (and CCS), then read the server's flight."""
        self.feed(records(message if message is not None else self.client_hello(**kwargs)))
        assert self.server_finished, self.run.terminated

    def finished(self) -> bytes:
        """The client Finished message for the transcript so far."""
        assert self.schedule is not None
        digest = hashlib.sha256(b"".join(self.transcript)).digest()
        return encode_finished(self.schedule.finished_verify_data(self.client_hs, digest))

    def seal_handshake_keys(self, content_type: int, data: bytes, pad: int = 0) -> bytes:
        assert self.hs_write is not None
        return self.hs_write.seal(content_type, data, pad)

    def seal(self, content_type: int, data: bytes, pad: int = 0) -> bytes:
        assert self.app_write is not None
        return self.app_write.seal(content_type, data, pad)

    def complete(self) -> None:
        """Send the client Finished; afterwards ``seal`` protects under the application key."""
        finished = self.finished()
        self.feed(self.seal_handshake_keys(ContentType.HANDSHAKE, finished))
        self.after_finished(finished)
        assert self.run.server.handshake_complete, self.run.terminated

    def after_finished(self, finished: bytes) -> None:
        self.transcript.append(finished)
        self.app_write = RecordProtection(AES128, self.client_app)

    def connect(self, **kwargs: Any) -> Client:
        self.handshake(**kwargs)
        self.complete()
        return self

    def update_sending_key(self) -> None:
        self.client_app = next_traffic_secret(AES128, self.client_app)
        self.app_write = RecordProtection(AES128, self.client_app)

    def resumption_ticket(self) -> tuple[bytes, bytes]:
        """(identity, psk) of the first NewSessionTicket (RFC 8446 §4.6.1)."""
        assert self.schedule is not None and self.tickets
        nonce, identity = self.tickets[0]
        rms = self.schedule.resumption_master_secret(
            hashlib.sha256(b"".join(self.transcript)).digest()
        )
        return identity, hkdf_expand_label(SHA256, rms, b"resumption", nonce, 32)

    # what the client reads

    def _absorb(self, data: bytes) -> None:
        self._reader.feed(data)
        while (record := self._reader.next_record()) is not None:
            content_type, _version, payload = record
            if content_type == ContentType.CHANGE_CIPHER_SPEC:
                continue
            if content_type == ContentType.APPLICATION_DATA:
                assert self._server_read is not None
                content_type, payload = self._server_read.open(
                    encode_header(content_type, len(payload)), payload
                )
            if content_type == ContentType.ALERT:
                self.alerts.append((payload[0], payload[1]))
            elif content_type == ContentType.APPLICATION_DATA:
                self.data += payload
            else:
                self._hs_bytes += payload
                self._messages()

    def _messages(self) -> None:
        buf = self._hs_bytes
        while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[1:4], "big"):
            length = int.from_bytes(buf[1:4], "big")
            message = bytes(buf[: 4 + length])
            del buf[: 4 + length]
            self._message(message)

    def _message(self, message: bytes) -> None:
        msg_type = message[0]
        if msg_type == HandshakeType.SERVER_HELLO:
            self._receive_server_hello(message)
        elif msg_type == HandshakeType.NEW_SESSION_TICKET:
            body = Buffer(message[4:])
            body.pull_bytes(8)
            nonce = body.pull_vector(1)
            self.tickets.append((nonce, body.pull_vector(2)))
        elif msg_type == HandshakeType.KEY_UPDATE:
            self.key_updates.append(message[4])
            self._server_app = next_traffic_secret(AES128, self._server_app)
            self._server_read = RecordProtection(AES128, self._server_app)
        else:
            self.transcript.append(message)
            if msg_type == HandshakeType.FINISHED:
                assert self.schedule is not None
                digest = hashlib.sha256(b"".join(self.transcript)).digest()
                self.client_app, self._server_app = self.schedule.application_secrets(digest)
                self._server_read = RecordProtection(AES128, self._server_app)
                self.server_finished = True

    def _receive_server_hello(self, message: bytes) -> None:
        body = Buffer(message[4:])
        body.pull_bytes(2)
        random = body.pull_bytes(32)
        body.pull_vector(1)
        body.pull_bytes(3)
        extensions = dict(split_extensions(body.pull_vector(2)))
        if random == HELLO_RETRY_REQUEST_RANDOM:
            # §4.4.1: the transcript restarts with message_hash(ClientHello1).
            self.transcript = [hrr_message_hash(SHA256, self.transcript[0]), message]
            self.retried = True
            return
        self.server_hello = message
        self.transcript.append(message)
        share = extensions[X.KEY_SHARE][4:]
        shared = self._key.exchange(x25519.X25519PublicKey.from_public_bytes(share))
        self.schedule = KeySchedule(
            AES128, psk=self.psk if X.PRE_SHARED_KEY in extensions else None
        )
        digest = hashlib.sha256(b"".join(self.transcript)).digest()
        self.client_hs, self._server_hs = self.schedule.handshake_secrets(shared, digest)
        self._server_read = RecordProtection(AES128, self._server_hs)
        self.hs_write = RecordProtection(AES128, self.client_hs)

    # what the probes check

    def assert_alert(self, alert: A) -> ConnectionTerminated:
        end = self.run.terminated
        assert end is not None, f"no alert; the engine went on: {self.run.server!r}"
        assert end.sent and end.alert == alert, end
        assert self.run.server.closed
        # The alert itself, read (and for a protected one, decrypted) off the wire.
        assert self.alerts and self.alerts[-1] == (2, alert), self.alerts
        return end

    def assert_going_on(self) -> None:
        assert_going_on(self.run)
        assert not self.alerts, self.alerts

    def events(self, kind: type) -> list[Any]:
        return [e for e in self.run.events if isinstance(e, kind)]


def _connected(config: ServerConfig, **kwargs: Any) -> Client:
    return Client(config, **kwargs).connect()


def test_the_probe_client_completes_a_handshake_and_exchanges_data(config: ServerConfig) -> None:
    """The campaign's own client is a real TLS 1.3 client: without it no probe means much."""
    client = _connected(config)
    client.feed(client.seal(ContentType.APPLICATION_DATA, b"ping"))
    assert b"".join(e.data for e in client.events(ApplicationData)) == b"ping"
    client.run.server.send_data(b"pong")
    _answer(client)
    assert client.data == b"pong"
    client.assert_going_on()


def _answer(client: Client) -> None:
    """Let the client read what the engine queued outside ``feed`` (send_data, close)."""
    client.run.events += resolve_inline(client.run.server)
    sent = client.run.server.data_to_send()
    client.run.out += sent
    client._absorb(sent)


# --- ClientHello: versions (§4.2.1, Appendix D) ---------------------------------------------


def _tls12_extensions() -> list[Extension]:
    """What a TLS 1.2-only client sends: no supported_versions, no key_share."""
    return [sni(b"localhost"), groups(NamedGroup.x25519, NamedGroup.secp256r1), sigalgs()]


@pytest.mark.parametrize(
    "case",
    ["tls1.2 client", "tls1.2 client without extensions", "tls1.2 client with a key_share"],
)
def test_client_hello_without_supported_versions_is_protocol_version(
    config: ServerConfig, case: str
) -> None:
    run = Run(config)
    if case == "tls1.2 client":
        message = hello(_tls12_extensions())
    elif case == "tls1.2 client without extensions":
        body = u16(0x0303) + bytes(32) + b"\x00" + vec16(u16(0xC02B)) + b"\x01\x00"
        message = handshake_message(HandshakeType.CLIENT_HELLO, body)
    else:
        message = hello([*_tls12_extensions(), key_share((NamedGroup.x25519, X25519_SHARE))])
    run.feed(records(message))
    assert_alert(run, A.protocol_version)


@pytest.mark.parametrize("compression", [b"\x01\x00", b"\x00\x01", b"\x40\x00"])
def test_tls12_client_offering_compression_is_protocol_version_defect(
    config: ServerConfig, compression: bytes
) -> None:
    """§4.1.2: only a TLS 1.3 ClientHello with a method other than null is illegal_parameter;
    a TLS 1.2 ClientHello may carry other methods and is judged as TLS 1.2: a TLS 1.3-only
    server answers it protocol_version (Go: version negotiation before the 1.3 checks)."""
    body = (
        u16(0x0303)
        + bytes(32)
        + b"\x00"
        + vec16(u16(0xC02B))
        + vec8(compression)
        + vec16(b"".join(u16(t) + vec16(d) for t, d in _tls12_extensions()))
    )
    run = Run(config)
    run.feed(records(handshake_message(HandshakeType.CLIENT_HELLO, body)))
    assert_alert(run, A.protocol_version)


@pytest.mark.parametrize(
    "offered", [(0x0303, 0x0302), (0x7F1C,), (0x0305,), (0x0A0A, 0x0303)], ids=str
)
def test_supported_versions_without_tls13_is_protocol_version(
    config: ServerConfig, offered: tuple[int, ...]
) -> None:
    client = Client(config)
    extensions = [
        (X.SUPPORTED_VERSIONS, vec8(b"".join(u16(v) for v in offered)))
        if e[0] == X.SUPPORTED_VERSIONS
        else e
        for e in client.extensions()
    ]
    client.feed(records(client.client_hello(extensions)))
    client.assert_alert(A.protocol_version)


def test_supported_versions_with_grease_and_tls13_is_accepted(config: ServerConfig) -> None:
    client = Client(config)
    extensions = [
        (X.SUPPORTED_VERSIONS, vec8(u16(0x7A7A) + u16(0x0304) + u16(0x0303)))
        if e[0] == X.SUPPORTED_VERSIONS
        else e
        for e in client.extensions()
    ]
    client.connect(message=client.client_hello(extensions))
    client.assert_going_on()


# --- ClientHello: key shares and groups (§4.2.7, §4.2.8, §9.2) ------------------------------


def test_key_share_for_a_group_not_in_supported_groups_is_illegal_parameter(
    config: ServerConfig,
) -> None:
    client = Client(config)
    extensions = client.extensions()
    extensions.append(key_share((NamedGroup.x25519, client.share), (0x0017, P256_SHARE)))
    del extensions[4]
    client.feed(records(client.client_hello(extensions)))
    client.assert_alert(A.illegal_parameter)


def test_two_key_shares_for_one_group_are_illegal_parameter(config: ServerConfig) -> None:
    client = Client(config)
    extensions = client.extensions()
    extensions[4] = key_share((NamedGroup.x25519, client.share), (NamedGroup.x25519, X25519_SHARE))
    client.feed(records(client.client_hello(extensions)))
    client.assert_alert(A.illegal_parameter)


def test_key_shares_out_of_supported_groups_order_are_accepted(config: ServerConfig) -> None:
    """§4.2.8: shares SHOULD follow supported_groups order and servers MAY check; Go, BoringSSL
    and OpenSSL do not, and neither does pqproxy (a GREASE-reordering client still connects)."""
    client = Client(config)
    extensions = client.extensions()
    extensions[2] = groups(NamedGroup.x25519, NamedGroup.secp256r1)
    extensions[4] = key_share((NamedGroup.secp256r1, P256_SHARE), (NamedGroup.x25519, client.share))
    client.connect(message=client.client_hello(extensions))
    assert client.run.server.group == NamedGroup.x25519


def test_empty_key_share_list_with_a_supported_group_gets_a_hello_retry(
    config: ServerConfig,
) -> None:
    client = Client(config)
    extensions = client.extensions()
    extensions[4] = key_share()
    client.feed(records(client.client_hello(extensions)))
    assert client.retried
    client.assert_going_on()
    # CH2: the same, with the share the HRR asked for.
    extensions[4] = key_share((NamedGroup.x25519, client.share))
    client.handshake(client.client_hello(extensions))
    client.complete()
    assert client.run.server.hello_retry


@pytest.mark.parametrize(
    ("case", "alert"),
    [
        ("no signature_algorithms", A.missing_extension),  # §9.2, §4.2.3
        ("no supported_groups", A.missing_extension),  # §9.2: key_share without it
        ("no key_share", A.missing_extension),  # §9.2: and vice versa
        ("no supported_groups nor key_share", A.missing_extension),
    ],
)
def test_mandatory_extensions_missing_without_psk(
    config: ServerConfig, case: str, alert: A
) -> None:
    client = Client(config)
    drop = {
        "no signature_algorithms": {X.SIGNATURE_ALGORITHMS},
        "no supported_groups": {X.SUPPORTED_GROUPS},
        "no key_share": {X.KEY_SHARE},
        "no supported_groups nor key_share": {X.SUPPORTED_GROUPS, X.KEY_SHARE},
    }[case]
    extensions = [e for e in client.extensions() if e[0] not in drop]
    client.feed(records(client.client_hello(extensions)))
    client.assert_alert(alert)


def test_no_signature_algorithms_with_a_psk_that_does_not_resume_is_missing_extension(
    ticket_config: ServerConfig,
) -> None:
    """§4.2.3: a server authenticating with a certificate and no signature_algorithms answers
    missing_extension, also when the PSK that excused its absence (§9.2) is not accepted."""
    client = Client(ticket_config, clock=_clock)
    extensions = [e for e in client.extensions() if e[0] != X.SIGNATURE_ALGORITHMS]
    message = client.client_hello([*extensions, psk_modes()], ticket=(b"unknown", os.urandom(32)))
    client.feed(records(message))
    client.assert_alert(A.missing_extension)


def test_no_signature_algorithms_with_a_psk_that_resumes_is_accepted_defect(
    ticket_config: ServerConfig,
) -> None:
    """§9.2: only a ClientHello without pre_shared_key must carry signature_algorithms; a PSK
    handshake signs nothing (§4.2.3), so a resuming client may leave it out (Go and BoringSSL
    resume it; pqproxy answered missing_extension)."""
    first = _connected(ticket_config, clock=_clock)
    ticket = first.resumption_ticket()
    client = Client(ticket_config, clock=_clock)
    extensions = [e for e in client.extensions() if e[0] != X.SIGNATURE_ALGORITHMS]
    client.handshake(client.client_hello([*extensions, psk_modes()], ticket=ticket))
    client.complete()
    done = client.events(HandshakeComplete)
    assert len(done) == 1 and done[0].resumed


def test_psk_only_key_exchange_is_handshake_failure_defect(ticket_config: ServerConfig) -> None:
    """A resuming client may leave out supported_groups and key_share (§9.2) to ask for psk_ke;
    pqproxy accepts only psk_dhe_ke (§4.2.9), so there is no mode in common: handshake_failure
    (Go's answer), not missing_extension, which would say the ClientHello was malformed."""
    first = _connected(ticket_config, clock=_clock)
    ticket = first.resumption_ticket()
    client = Client(ticket_config, clock=_clock)
    extensions = [sni(b"localhost"), versions(), sigalgs(), (X.PSK_KEY_EXCHANGE_MODES, b"\x01\x00")]
    client.feed(records(client.client_hello(extensions, ticket=ticket)))
    client.assert_alert(A.handshake_failure)


def test_psk_ke_mode_only_with_groups_falls_back_to_a_full_handshake(
    ticket_config: ServerConfig,
) -> None:
    first = _connected(ticket_config, clock=_clock)
    ticket = first.resumption_ticket()
    client = Client(ticket_config, clock=_clock)
    extensions = [*client.extensions(), (X.PSK_KEY_EXCHANGE_MODES, b"\x01\x00")]
    client.handshake(client.client_hello(extensions, ticket=ticket))
    client.complete()
    assert not client.events(HandshakeComplete)[0].resumed


@pytest.mark.parametrize(
    ("share", "group"),
    [
        (bytes(32), NamedGroup.x25519),  # low-order point: all-zero shared secret (§7.4.2)
        (b"\x01" + bytes(31), NamedGroup.x25519),
        (b"\x04" + bytes(64), NamedGroup.secp256r1),  # not on the curve
        (b"\x02" + P256_SHARE[1:33], NamedGroup.secp256r1),  # compressed (§4.2.8.2: only 4)
    ],
    ids=["x25519 zero", "x25519 order 1", "p256 off curve", "p256 compressed"],
)
def test_invalid_key_share_is_illegal_parameter(
    certified: CertifiedKey, share: bytes, group: int
) -> None:
    run = Run(ServerConfig(certificates=(certified,), groups=(group,)))
    extensions = [
        sni(b"localhost"),
        versions(),
        groups(group),
        sigalgs(),
        key_share((group, share)),
    ]
    run.feed(records(hello(extensions)))
    assert_alert(run, A.illegal_parameter)


@pytest.mark.parametrize("length", [31, 33])
def test_key_share_of_the_wrong_length_is_illegal_parameter(
    config: ServerConfig, length: int
) -> None:
    run = Run(config)
    extensions = [
        sni(b"localhost"),
        versions(),
        groups(NamedGroup.x25519),
        sigalgs(),
        key_share((NamedGroup.x25519, os.urandom(length))),
    ]
    run.feed(records(hello(extensions)))
    assert_alert(run, A.illegal_parameter)


@pytest.mark.parametrize(
    ("extension", "alert"),
    [
        (groups(0x0A0A, 0x0100), A.handshake_failure),  # no group in common
        (sigalgs(0x0201, 0x0A0A), A.handshake_failure),  # no scheme for any certificate
    ],
    ids=["groups", "signature_algorithms"],
)
def test_nothing_in_common_is_handshake_failure(
    config: ServerConfig, extension: Extension, alert: A
) -> None:
    client = Client(config)
    extensions = [extension if e[0] == extension[0] else e for e in client.extensions()]
    if extension[0] == X.SUPPORTED_GROUPS:
        extensions = [key_share() if e[0] == X.KEY_SHARE else e for e in extensions]
    client.feed(records(client.client_hello(extensions)))
    client.assert_alert(alert)


# --- ClientHello: pre_shared_key (§4.2.9, §4.2.11) ---------------------------------------


def test_pre_shared_key_not_last_is_illegal_parameter(config: ServerConfig) -> None:
    client = Client(config)
    extensions = [*client.extensions(), psk_modes(), pre_shared_key([b"t"]), padding(3)]
    client.feed(records(client.client_hello(extensions)))
    client.assert_alert(A.illegal_parameter)


def test_pre_shared_key_without_psk_key_exchange_modes_is_missing_extension(
    config: ServerConfig,
) -> None:
    client = Client(config)
    client.feed(records(client.client_hello([*client.extensions(), pre_shared_key([b"t"])])))
    client.assert_alert(A.missing_extension)


@pytest.mark.parametrize(("identities", "binders"), [(2, 1), (1, 2), (3, 2)])
def test_binder_count_other_than_identity_count_is_illegal_parameter(
    config: ServerConfig, identities: int, binders: int
) -> None:
    ids = b"".join(vec16(b"ticket %d" % i) + bytes(4) for i in range(identities))
    data = vec16(ids) + vec16(b"".join(vec8(bytes(32)) for _ in range(binders)))
    client = Client(config)
    client.feed(
        records(client.client_hello([*client.extensions(), psk_modes(), (X.PRE_SHARED_KEY, data)]))
    )
    client.assert_alert(A.illegal_parameter)


def test_a_binder_that_does_not_verify_is_decrypt_error(ticket_config: ServerConfig) -> None:
    first = _connected(ticket_config, clock=_clock)
    identity, _psk = first.resumption_ticket()
    client = Client(ticket_config, clock=_clock)
    message = client.client_hello(
        [*client.extensions(), psk_modes()], ticket=(identity, os.urandom(32))
    )
    client.feed(records(message))
    client.assert_alert(A.decrypt_error)


# --- ClientHello: encoding (§4.1.2, §4.2) ---------------------------------------------------


def test_unknown_extensions_are_ignored(config: ServerConfig) -> None:
    client = Client(config)
    unknown = [(0x0A0A, b""), (0xFFFF, b"\x00" * 7), (0x1234, os.urandom(300)), (48, b"\x00\x00")]
    client.connect(message=client.client_hello([*unknown[:2], *client.extensions(), *unknown[2:]]))
    client.assert_going_on()


# Each extension the engine parses, with one byte too many inside its extension_data.
TRAILING_BYTE: dict[str, Extension] = {
    "server_name": (X.SERVER_NAME, vec16(b"\x00" + vec16(b"localhost")) + b"\x00"),
    "server_name list": (X.SERVER_NAME, vec16(b"\x00" + vec16(b"localhost") + b"\x00")),
    "supported_versions": (X.SUPPORTED_VERSIONS, vec8(u16(0x0304)) + b"\x00"),
    "supported_versions odd": (X.SUPPORTED_VERSIONS, vec8(u16(0x0304) + b"\x03")),
    "supported_groups": (X.SUPPORTED_GROUPS, vec16(u16(0x001D)) + b"\x00"),
    "supported_groups odd": (X.SUPPORTED_GROUPS, vec16(u16(0x001D) + b"\x00")),
    "signature_algorithms": (X.SIGNATURE_ALGORITHMS, vec16(u16(0x0403)) + b"\x00"),
    "signature_algorithms_cert": (X.SIGNATURE_ALGORITHMS_CERT, vec16(u16(0x0403)) + b"\x00"),
    "key_share": (X.KEY_SHARE, vec16(u16(0x001D) + vec16(X25519_SHARE)) + b"\x00"),
    "key_share entry": (X.KEY_SHARE, vec16(u16(0x001D) + vec16(X25519_SHARE) + b"\x00")),
    "alpn": (X.ALPN, vec16(vec8(b"h2")) + b"\x00"),
    "alpn list": (X.ALPN, vec16(vec8(b"h2") + b"\x00")),
    "psk_key_exchange_modes": (X.PSK_KEY_EXCHANGE_MODES, b"\x01\x01\x00"),
    "cookie": (X.COOKIE, vec16(b"c") + b"\x00"),
    "record_size_limit": (X.RECORD_SIZE_LIMIT, u16(0x4001) + b"\x00"),
    "early_data": (X.EARLY_DATA, b"\x00"),
    "pre_shared_key": (
        X.PRE_SHARED_KEY,
        vec16(vec16(b"ticket") + bytes(4)) + vec16(vec8(bytes(32))) + b"\x00",
    ),
}


@pytest.mark.parametrize("name", list(TRAILING_BYTE))
def test_extension_with_trailing_bytes_is_decode_error(config: ServerConfig, name: str) -> None:
    client = Client(config)
    bad = TRAILING_BYTE[name]
    extensions = [e for e in client.extensions() if e[0] != bad[0]]
    if bad[0] == X.PRE_SHARED_KEY:
        extensions.append(psk_modes())
    client.feed(records(client.client_hello([*extensions, bad])))
    client.assert_alert(A.decode_error)


def _hello_with_extensions_block(block: bytes, after: bytes = b"") -> bytes:
    """A ClientHello whose extensions block is ``block`` as given (with its length)."""
    fixed = u16(0x0303) + bytes(32) + b"\x00" + vec16(u16(0x1301)) + b"\x01\x00"
    return handshake_message(HandshakeType.CLIENT_HELLO, fixed + block + after)


@pytest.mark.parametrize(
    "case", ["extension overruns the block", "byte after the extensions", "short header"]
)
def test_extensions_block_that_does_not_add_up_is_decode_error(
    config: ServerConfig, case: str
) -> None:
    good = b"".join(u16(t) + vec16(d) for t, d in Client(config).extensions())
    if case == "extension overruns the block":
        message = _hello_with_extensions_block(vec16(good + u16(0x1234) + u16(10) + b"abc"))
    elif case == "byte after the extensions":
        message = _hello_with_extensions_block(vec16(good), after=b"\x00")
    else:
        message = _hello_with_extensions_block(vec16(good + b"\x00\x0a\x00"))
    run = Run(config)
    run.feed(records(message))
    assert_alert(run, A.decode_error)


@pytest.mark.parametrize("compression", [b"\x01", b"\x00\x01", b"\x01\x00", bytes(2)])
def test_tls13_compression_methods_other_than_null_are_illegal_parameter(
    config: ServerConfig, compression: bytes
) -> None:
    client = Client(config)
    message = client.client_hello()
    # legacy_compression_methods sits after version, random, empty session id, one suite.
    at = 2 + 32 + 1 + 4
    body = message[4 : 4 + at] + vec8(compression) + message[4 + at + 2 :]
    client.run.feed(records(handshake_message(HandshakeType.CLIENT_HELLO, body)))
    assert_alert(client.run, A.illegal_parameter)


def test_empty_compression_methods_is_decode_error(config: ServerConfig) -> None:
    message = hello(Client(config).extensions())
    at = 2 + 32 + 1 + 4
    body = message[4 : 4 + at] + b"\x00" + message[4 + at + 2 :]
    run = Run(config)
    run.feed(records(handshake_message(HandshakeType.CLIENT_HELLO, body)))
    assert_alert(run, A.decode_error)


def test_session_id_over_32_bytes_is_decode_error(config: ServerConfig) -> None:
    run = Run(config)
    run.feed(records(hello(Client(config).extensions(), session_id=bytes(33))))
    assert_alert(run, A.decode_error)


def test_session_id_of_32_bytes_is_echoed_and_a_ccs_follows(config: ServerConfig) -> None:
    session_id = os.urandom(32)
    client = Client(config)
    client.handshake(client.client_hello(session_id=session_id))
    assert client.server_hello is not None and client.server_hello[4 + 2 + 32 + 1 :][:32] == (
        session_id
    )
    first = client.run.out
    assert first[5 + int.from_bytes(first[3:5], "big") :][:6] == CCS  # Appendix D.4
    client.feed(CCS)
    client.complete()


@pytest.mark.parametrize(
    ("suites_block", "alert"),
    [
        (b"", A.decode_error),  # cipher_suites<2..2^16-2>
        (b"\x13", A.decode_error),  # odd length
        (u16(0xC02B) + u16(0x0A0A), A.handshake_failure),  # nothing in common
    ],
    ids=["empty", "odd", "no tls1.3 suite"],
)
def test_cipher_suite_list(config: ServerConfig, suites_block: bytes, alert: A) -> None:
    message = hello(Client(config).extensions())
    body = message[4:]
    at = 2 + 32 + 1
    body = body[:at] + vec16(suites_block) + body[at + 4 :]
    run = Run(config)
    run.feed(records(handshake_message(HandshakeType.CLIENT_HELLO, body)))
    assert_alert(run, alert)


def test_cookie_we_never_sent_in_the_first_client_hello_is_ignored(config: ServerConfig) -> None:
    """§4.2.2: a server that never sent a cookie has nothing to check it against; Go and
    BoringSSL ignore one in the first ClientHello, and so does pqproxy. (A cookie added to the
    second ClientHello is a change §4.1.2 does not allow: test_engine_hardening, item 9.)"""
    client = Client(config)
    client.connect(
        message=client.client_hello([*client.extensions(), (X.COOKIE, vec16(b"c" * 40))])
    )
    client.assert_going_on()


def test_duplicate_extension_is_illegal_parameter(config: ServerConfig) -> None:
    client = Client(config)
    client.feed(records(client.client_hello([*client.extensions(), alpn(b"h2"), alpn(b"h2")])))
    client.assert_alert(A.illegal_parameter)


def test_first_handshake_message_other_than_client_hello_is_unexpected(
    config: ServerConfig,
) -> None:
    for msg_type in (HandshakeType.FINISHED, HandshakeType.SERVER_HELLO, 0, 99):
        run = Run(config)
        run.feed(records(handshake_message(msg_type, bytes(32))))
        assert_alert(run, A.unexpected_message)


# --- HelloRetryRequest (§4.1.4, §4.1.2) ---------------------------------------------------


@pytest.fixture(scope="module")
def retry_config(certified: CertifiedKey) -> ServerConfig:
    # X25519 is the server's choice; a client whose one share is P-256 gets an HRR for it.
    return ServerConfig(certificates=(certified,), groups=(NamedGroup.x25519, NamedGroup.secp256r1))


def _retry_first(*extra: Extension) -> list[Extension]:
    return [
        sni(b"localhost"),
        versions(),
        groups(NamedGroup.secp256r1, NamedGroup.x25519, NamedGroup.secp384r1),
        sigalgs(),
        key_share((NamedGroup.secp256r1, P256_SHARE)),
        *extra,
    ]


def _with_share(extensions: list[Extension], share: Extension) -> list[Extension]:
    return [share if e[0] == X.KEY_SHARE else e for e in extensions if e[0] != X.EARLY_DATA]


def _hello_retries(out: bytes) -> int:
    """How many HelloRetryRequests are in the plaintext part of ``out``."""
    count, reader = 0, RecordReader()
    reader.feed(out)
    while (record := reader.next_record()) is not None:
        content_type, _version, payload = record
        if content_type == ContentType.HANDSHAKE and payload[0] == HandshakeType.SERVER_HELLO:
            count += payload[6 : 6 + 32] == HELLO_RETRY_REQUEST_RANDOM
    return count


def test_hello_retry_handshake_completes(retry_config: ServerConfig) -> None:
    client = Client(retry_config)
    first = _retry_first()
    client.feed(records(client.client_hello(first, session_id=bytes(32))), CCS)
    assert client.retried
    second = _with_share(first, key_share((NamedGroup.x25519, client.share)))
    client.handshake(client.client_hello(second, session_id=bytes(32)))
    client.complete()
    assert client.run.server.hello_retry and _hello_retries(client.run.out) == 1


@pytest.mark.parametrize(
    "case",
    [
        "share for another offered group",
        "empty key_share",
        "both shares",
        "identical to the first",
    ],
)
def test_second_client_hello_without_the_requested_share_never_gets_a_second_retry(
    retry_config: ServerConfig, case: str
) -> None:
    """§4.1.4: a second HRR is never sent; a CH2 without exactly the requested share is
    illegal_parameter (§4.2.8)."""
    client = Client(retry_config)
    first = _retry_first()
    client.feed(records(client.client_hello(first)))
    assert client.retried
    share = {
        "share for another offered group": key_share((NamedGroup.secp384r1, bytes(97))),
        "empty key_share": key_share(),
        "both shares": key_share(
            (NamedGroup.secp256r1, P256_SHARE), (NamedGroup.x25519, client.share)
        ),
        "identical to the first": key_share((NamedGroup.secp256r1, P256_SHARE)),
    }[case]
    client.feed(records(client.client_hello(_with_share(first, share))))
    client.assert_alert(A.illegal_parameter)
    assert _hello_retries(client.run.out) == 1


def test_second_client_hello_with_early_data_is_illegal_parameter(
    retry_config: ServerConfig,
) -> None:
    client = Client(retry_config)
    first = _retry_first(psk_modes(), early_data(), pre_shared_key([b"old ticket"]))
    client.feed(records(client.client_hello(first)))
    assert client.retried
    second = [
        key_share((NamedGroup.x25519, client.share)) if e[0] == X.KEY_SHARE else e for e in first
    ]
    client.feed(records(client.client_hello(second)))
    client.assert_alert(A.illegal_parameter)


def test_rejected_early_data_is_skipped_across_a_hello_retry(retry_config: ServerConfig) -> None:
    """§4.2.10: after an HRR the server skips the 0-RTT records the client sent with CH1."""
    client = Client(retry_config)
    first = _retry_first(psk_modes(), early_data(), pre_shared_key([b"old ticket"]))
    stranger = RecordProtection(AES128, os.urandom(32))
    client.feed(
        records(client.client_hello(first)),
        CCS,
        stranger.seal(ContentType.APPLICATION_DATA, b"GET / HTTP/1.1\r\n\r\n"),
    )
    assert client.retried
    client.assert_going_on()
    second = _with_share(first, key_share((NamedGroup.x25519, client.share)))
    client.handshake(client.client_hello(second))
    client.complete()


@pytest.mark.parametrize("split", ["whole second hello", "first bytes of it"])
def test_first_client_hello_must_end_its_record_defect(
    retry_config: ServerConfig, split: str
) -> None:
    """§5.1: a ClientHello can precede a key change, so it must end at a record boundary. A
    CH2 in the record of CH1 (sent before the HRR was seen) is unexpected_message, as in
    BoringSSL (PartialSecondClientHelloAfterFirst) and Botan; pqproxy read it as CH2."""
    client = Client(retry_config)
    first = _retry_first()
    ch1 = client.client_hello(first)
    ch2 = hello(_with_share(first, key_share((NamedGroup.x25519, client.share))))
    tail = ch2 if split == "whole second hello" else ch2[:40]
    client.feed(records(ch1 + tail))
    client.assert_alert(A.unexpected_message)


@pytest.mark.parametrize("protected", [False, True], ids=["plaintext", "under handshake keys"])
def test_client_hello_after_server_hello_is_unexpected(
    retry_config: ServerConfig, protected: bool
) -> None:
    client = Client(retry_config)
    first = _retry_first()
    client.feed(records(client.client_hello(first)))
    second = _with_share(first, key_share((NamedGroup.x25519, client.share)))
    client.handshake(client.client_hello(second))
    third = hello(second)
    if protected:
        client.feed(client.seal_handshake_keys(ContentType.HANDSHAKE, third))
    else:
        client.feed(records(third))
    client.assert_alert(A.unexpected_message)


def test_message_other_than_client_hello_after_hello_retry_is_unexpected(
    retry_config: ServerConfig,
) -> None:
    client = Client(retry_config)
    client.feed(records(client.client_hello(_retry_first())))
    client.feed(records(handshake_message(HandshakeType.FINISHED, bytes(32))))
    client.assert_alert(A.unexpected_message)


# --- records (§5) --------------------------------------------------------------------------


def _seal_raw(protection: RecordProtection, inner: bytes, version: int = 0x0303) -> bytes:
    """A protected record around any TLSInnerPlaintext (RecordProtection.seal refuses the
    oversized and malformed ones a probe needs), with any legacy_record_version."""
    header = encode_header(ContentType.APPLICATION_DATA, len(inner) + 16, version)
    record = header + protection._aead.encrypt(protection._nonce(), inner, header)
    protection.seq += 1
    return record


@pytest.mark.parametrize(
    "alert", [(1, A.close_notify), (1, A.user_canceled), (2, A.handshake_failure)], ids=str
)
def test_alert_between_fragments_of_a_client_hello_is_unexpected(
    config: ServerConfig, alert: tuple[int, int]
) -> None:
    """§5.1: handshake fragments are not interleaved with other record types. Go answers
    unexpected_message for any record type between them, a peer's fatal alert included."""
    message = Client(config).client_hello()
    run = Run(config)
    run.feed(records(message[:50]))
    run.feed(b"\x15\x03\x03\x00\x02" + bytes(alert), records(message[50:]))
    assert_alert(run, A.unexpected_message)


def test_alert_between_fragments_of_finished_is_unexpected(config: ServerConfig) -> None:
    client = Client(config)
    client.handshake()
    finished = client.finished()
    client.feed(
        client.seal_handshake_keys(ContentType.HANDSHAKE, finished[:10]),
        client.seal_handshake_keys(ContentType.ALERT, bytes((1, A.user_canceled))),
        client.seal_handshake_keys(ContentType.HANDSHAKE, finished[10:]),
    )
    client.assert_alert(A.unexpected_message)


def test_application_data_between_fragments_of_a_key_update_is_unexpected(
    config: ServerConfig,
) -> None:
    client = _connected(config)
    key_update = handshake_message(HandshakeType.KEY_UPDATE, b"\x00")
    client.feed(
        client.seal(ContentType.HANDSHAKE, key_update[:2]),
        client.seal(ContentType.APPLICATION_DATA, b"data"),
    )
    client.assert_alert(A.unexpected_message)


@pytest.mark.parametrize("length", [1, 3, 4])
@pytest.mark.parametrize("stage", ["plaintext", "handshake keys", "application keys"])
def test_alert_record_of_the_wrong_length_is_decode_error(
    config: ServerConfig, length: int, stage: str
) -> None:
    """§5.1: an alert record holds exactly one 2-byte alert, never coalesced or fragmented;
    anything else does not decode (§6: decode_error, BoringSSL's answer)."""
    payload = bytes((1, A.user_canceled, 1, A.user_canceled))[:length]
    client = Client(config)
    if stage == "plaintext":
        client.feed(records(client.client_hello()), b"\x15\x03\x03" + u16(length) + payload)
    elif stage == "handshake keys":
        client.handshake()
        client.feed(client.seal_handshake_keys(ContentType.ALERT, payload))
    else:
        client.connect()
        client.feed(client.seal(ContentType.ALERT, payload))
    client.assert_alert(A.decode_error)


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("description", [255, 1, A.bad_certificate])
def test_error_alert_at_any_level_ends_the_connection(
    config: ServerConfig, level: int, description: int
) -> None:
    """§6: TLS 1.3 has no warning alerts but close_notify and user_canceled; every other
    alert, unknown ones included, is an error whatever its level. The peer's alert is not
    answered (Go, BoringSSL), and nothing it sends afterwards is read."""
    client = _connected(config)
    client.feed(client.seal(ContentType.ALERT, bytes((level, description))))
    end = client.run.terminated
    assert end is not None and not end.sent and client.run.server.closed
    client.feed(client.seal(ContentType.APPLICATION_DATA, b"after"))
    assert not client.events(ApplicationData) and not client.alerts


def test_user_canceled_then_close_notify_closes(config: ServerConfig) -> None:
    client = _connected(config)
    client.feed(client.seal(ContentType.ALERT, bytes((1, A.user_canceled))))
    client.assert_going_on()
    client.feed(client.seal(ContentType.ALERT, bytes((1, A.close_notify))))
    assert len(client.events(PeerClosed)) == 1
    client.run.server.close()
    _answer(client)
    assert client.alerts == [(1, A.close_notify)]
    assert client.run.server.closed and client.run.terminated is not None


def test_user_canceled_during_the_handshake_then_close_notify_ends_it(
    config: ServerConfig,
) -> None:
    client = Client(config)
    client.handshake()
    client.feed(client.seal_handshake_keys(ContentType.ALERT, bytes((1, A.user_canceled))))
    client.assert_going_on()
    client.feed(client.seal_handshake_keys(ContentType.ALERT, bytes((1, A.close_notify))))
    end = client.run.terminated
    assert end is not None and end.alert == A.close_notify and not end.sent


@pytest.mark.parametrize("content", [b"early", b""], ids=["data", "empty"])
def test_application_data_before_client_finished_is_unexpected(
    config: ServerConfig, content: bytes
) -> None:
    client = Client(config)
    client.handshake()
    client.feed(client.seal_handshake_keys(ContentType.APPLICATION_DATA, content))
    client.assert_alert(A.unexpected_message)


def test_application_data_record_before_server_hello_is_unexpected(config: ServerConfig) -> None:
    run = Run(config)
    run.feed(b"\x17\x03\x03\x00\x20" + bytes(32))
    assert_alert(run, A.unexpected_message)


@pytest.mark.parametrize("stage", ["before Finished", "after Finished"])
def test_plaintext_handshake_record_after_keys_changed_is_unexpected(
    config: ServerConfig, stage: str
) -> None:
    client = Client(config)
    client.handshake()
    if stage == "before Finished":
        client.feed(records(client.finished()))
    else:
        client.complete()
        client.feed(records(handshake_message(HandshakeType.KEY_UPDATE, b"\x00")))
    client.assert_alert(A.unexpected_message)


def test_records_after_close_notify_are_ignored_defect(config: ServerConfig) -> None:
    """§6.1: "Any data received after a closure alert has been received MUST be ignored."
    pqproxy read on: a second close_notify was a second PeerClosed, a KeyUpdate rotated keys,
    and bytes that did not decrypt were answered with bad_record_mac."""
    client = _connected(config)
    client.feed(client.seal(ContentType.ALERT, bytes((1, A.close_notify))))
    assert len(client.events(PeerClosed)) == 1
    client.feed(
        client.seal(ContentType.APPLICATION_DATA, b"ignored"),
        client.seal(ContentType.ALERT, bytes((1, A.close_notify))),
        client.seal(ContentType.HANDSHAKE, handshake_message(HandshakeType.KEY_UPDATE, b"\x01")),
        client.seal(ContentType.ALERT, bytes((2, A.internal_error))),
        b"\x17\x03\x03\x00\x20" + bytes(32),
        b"not even a record",
    )
    assert len(client.events(PeerClosed)) == 1
    assert not client.events(ApplicationData) and not client.events(KeyUpdated)
    assert client.run.terminated is None and not client.alerts
    # We may still send (half-close), then close; EOF afterwards is the end.
    client.run.server.send_data(b"last words")
    client.run.server.close()
    _answer(client)
    assert client.data == b"last words" and client.alerts == [(1, A.close_notify)]
    assert client.run.server.closed


def test_zero_length_application_data_records_are_allowed(config: ServerConfig) -> None:
    """§5.1: zero-length application data fragments MAY be sent (traffic analysis)."""
    client = _connected(config)
    client.feed(
        *(client.seal(ContentType.APPLICATION_DATA, b"") for _ in range(5)),
        client.seal(ContentType.APPLICATION_DATA, b"data"),
        client.seal(ContentType.APPLICATION_DATA, b""),
    )
    assert b"".join(e.data for e in client.events(ApplicationData)) == b"data"
    client.assert_going_on()


def test_consecutive_empty_records_are_bounded_defect(config: ServerConfig) -> None:
    """A peer that sends nothing but empty records (or ignored user_canceled alerts) makes
    us decrypt for nothing: after a run of them the connection ends with unexpected_message,
    as Go (16, "too many ignored records") and BoringSSL (32, kMaxEmptyRecords) do. Any record
    with content resets the count."""
    limit = server_module.MAX_CONSECUTIVE_EMPTY_RECORDS
    client = _connected(config)
    empty = [
        client.seal(ContentType.APPLICATION_DATA, b"", pad=100 if i % 3 == 0 else 0)
        if i % 2
        else client.seal(ContentType.ALERT, bytes((1, A.user_canceled)))
        for i in range(limit)
    ]
    client.feed(*empty, client.seal(ContentType.APPLICATION_DATA, b"x"))
    client.feed(*(client.seal(ContentType.APPLICATION_DATA, b"") for _ in range(limit)))
    client.assert_going_on()
    client.feed(client.seal(ContentType.APPLICATION_DATA, b""))
    client.assert_alert(A.unexpected_message)


@pytest.mark.parametrize(
    ("inner", "alert"),
    [
        (b"\x17" + bytes(300), None),  # application data, no content: allowed
        (b"ab\x17" + bytes(MAX_INNER_PLAINTEXT - 3), None),  # maximal padding
        (bytes(MAX_PLAINTEXT) + b"\x17", None),  # maximal content
        (bytes(500), A.unexpected_message),  # §5.4: no non-zero byte, no content type
        (b"\x16" + bytes(10), A.unexpected_message),  # §5.4: empty handshake
        (b"\x15" + bytes(10), A.unexpected_message),  # §5.4: empty alert
        (b"\x01\x14", A.unexpected_message),  # change_cipher_spec is never protected
        (b"x\x18", A.unexpected_message),  # unknown inner type (heartbeat)
        (b"x\x00\x00\x63\x00", A.unexpected_message),
        (bytes(MAX_PLAINTEXT + 1) + b"\x17", A.record_overflow),  # §5.4: over 2^14 + 1
        (b"x\x17" + bytes(MAX_INNER_PLAINTEXT - 1), A.record_overflow),  # padding counts
        (b"x\x17" + bytes(MAX_CIPHERTEXT - 16 - 2), A.record_overflow),  # 2^14 + 256 on wire
    ],
    ids=[
        "padding only",
        "maximal padding",
        "2^14 content",
        "all zeros",
        "empty handshake",
        "empty alert",
        "inner ccs",
        "inner 24",
        "inner 99",
        "2^14+1 content",
        "2^14+2 with padding",
        "2^14+256 ciphertext",
    ],
)
def test_protected_record_inner_plaintext(
    config: ServerConfig, inner: bytes, alert: A | None
) -> None:
    client = _connected(config)
    assert client.app_write is not None
    record = _seal_raw(client.app_write, inner)
    assert len(record) - 5 <= MAX_CIPHERTEXT
    client.feed(record, client.seal(ContentType.APPLICATION_DATA, b"after"))
    if alert is None:
        client.assert_going_on()
        content = inner.rstrip(b"\x00")[:-1]
        assert b"".join(e.data for e in client.events(ApplicationData)) == content + b"after"
    else:
        client.assert_alert(alert)


def test_ciphertext_over_2_14_plus_256_is_record_overflow_from_its_header(
    config: ServerConfig,
) -> None:
    client = _connected(config)
    client.feed(b"\x17\x03\x03" + u16(MAX_CIPHERTEXT + 1))
    client.assert_alert(A.record_overflow)


def test_plaintext_record_over_2_14_is_record_overflow(config: ServerConfig) -> None:
    run = Run(config)
    run.feed(b"\x16\x03\x01" + u16(MAX_PLAINTEXT + 1))
    assert_alert(run, A.record_overflow)


@pytest.mark.parametrize("content_type", [0, 24, 0x80, 0xFF])
def test_unknown_record_content_type_is_unexpected(config: ServerConfig, content_type: int) -> None:
    client = _connected(config)
    client.feed(bytes((content_type, 3, 3, 0, 5)) + b"hello")
    client.assert_alert(A.unexpected_message)


def test_record_that_does_not_authenticate_is_bad_record_mac(config: ServerConfig) -> None:
    client = _connected(config)
    record = bytearray(client.seal(ContentType.APPLICATION_DATA, b"data"))
    record[-1] ^= 1
    client.feed(bytes(record))
    client.assert_alert(A.bad_record_mac)


@pytest.mark.parametrize("version", [0x0301, 0x0302, 0x0304, 0x03FF])
@pytest.mark.parametrize("stage", ["handshake keys", "application keys"])
def test_protected_record_with_another_legacy_record_version_is_read_defect(
    config: ServerConfig, version: int, stage: str
) -> None:
    """§5.1: legacy_record_version "MUST be ignored for all purposes", and §5.2 makes the
    header as received the AEAD's additional data. pqproxy rebuilt the header with 0x0303,
    so such a record failed authentication (bad_record_mac); Go reads it."""
    client = Client(config)
    client.handshake()
    if stage == "handshake keys":
        finished = client.finished()
        assert client.hs_write is not None
        client.feed(_seal_raw(client.hs_write, finished + b"\x16", version))
        client.after_finished(finished)
        assert client.run.server.handshake_complete
    else:
        client.complete()
        assert client.app_write is not None
        client.feed(_seal_raw(client.app_write, b"data\x17", version))
        assert b"".join(e.data for e in client.events(ApplicationData)) == b"data"
    client.assert_going_on()


# --- KeyUpdate and the record boundary before a key change (§4.6.3, §5.1) ---------------


@pytest.mark.parametrize(
    ("body", "alert"),
    [
        (b"\x02", A.illegal_parameter),
        (b"\xff", A.illegal_parameter),
        (b"", A.decode_error),
        (b"\x00\x00", A.decode_error),
    ],
    ids=["request 2", "request 255", "empty", "two bytes"],
)
def test_malformed_key_update(config: ServerConfig, body: bytes, alert: A) -> None:
    client = _connected(config)
    client.feed(
        client.seal(ContentType.HANDSHAKE, handshake_message(HandshakeType.KEY_UPDATE, body))
    )
    client.assert_alert(alert)


def test_key_update_before_finished_is_unexpected(config: ServerConfig) -> None:
    client = Client(config)
    client.handshake()
    key_update = handshake_message(HandshakeType.KEY_UPDATE, b"\x00")
    client.feed(client.seal_handshake_keys(ContentType.HANDSHAKE, key_update))
    client.assert_alert(A.unexpected_message)


@pytest.mark.parametrize(
    "after", ["a second KeyUpdate", "a fragment of a message", "a ClientHello"]
)
def test_key_update_must_end_its_record(config: ServerConfig, after: str) -> None:
    client = _connected(config)
    key_update = handshake_message(HandshakeType.KEY_UPDATE, b"\x00")
    tail = {
        "a second KeyUpdate": key_update,
        "a fragment of a message": key_update[:2],
        "a ClientHello": Client(config).client_hello(),
    }[after]
    client.feed(client.seal(ContentType.HANDSHAKE, key_update + tail))
    client.assert_alert(A.unexpected_message)


def test_key_update_fragmented_over_records_is_read_and_the_new_key_used(
    config: ServerConfig,
) -> None:
    client = _connected(config)
    key_update = handshake_message(HandshakeType.KEY_UPDATE, b"\x01")
    client.feed(
        client.seal(ContentType.HANDSHAKE, key_update[:1]),
        client.seal(ContentType.HANDSHAKE, key_update[1:3]),
        client.seal(ContentType.HANDSHAKE, key_update[3:]),
    )
    client.update_sending_key()
    client.feed(client.seal(ContentType.APPLICATION_DATA, b"new key"))
    assert b"".join(e.data for e in client.events(ApplicationData)) == b"new key"
    # §4.6.3: the requested update comes before the server's next application data.
    client.run.server.send_data(b"answer")
    _answer(client)
    assert client.key_updates == [0] and client.data == b"answer"
    client.assert_going_on()


@pytest.mark.parametrize("after", ["KeyUpdate", "a fragment"])
def test_finished_must_end_its_record(config: ServerConfig, after: str) -> None:
    client = Client(config)
    client.handshake()
    key_update = handshake_message(HandshakeType.KEY_UPDATE, b"\x00")
    tail = key_update if after == "KeyUpdate" else key_update[:3]
    client.feed(client.seal_handshake_keys(ContentType.HANDSHAKE, client.finished() + tail))
    client.assert_alert(A.unexpected_message)


def test_finished_fragmented_over_records_completes(config: ServerConfig) -> None:
    client = Client(config)
    client.handshake()
    finished = client.finished()
    client.feed(
        *(
            client.seal_handshake_keys(ContentType.HANDSHAKE, finished[i : i + 7])
            for i in range(0, len(finished), 7)
        )
    )
    client.after_finished(finished)
    assert client.run.server.handshake_complete
    client.feed(client.seal(ContentType.APPLICATION_DATA, b"ok"))
    assert client.events(ApplicationData)


def test_client_hello_followed_by_more_in_its_record_is_unexpected(config: ServerConfig) -> None:
    client = Client(config)
    message = client.client_hello()
    client.feed(records(message + handshake_message(HandshakeType.FINISHED, bytes(32))))
    client.assert_alert(A.unexpected_message)


# --- post-handshake (§4.6) and messages a server never receives ---------------------------


POST_HANDSHAKE_MESSAGES: dict[str, bytes] = {
    "ClientHello": hello(
        [
            sni(b"localhost"),
            versions(),
            groups(0x001D),
            sigalgs(),
            key_share((0x001D, X25519_SHARE)),
        ]
    ),
    "ServerHello": handshake_message(HandshakeType.SERVER_HELLO, bytes(40)),
    "NewSessionTicket": handshake_message(
        HandshakeType.NEW_SESSION_TICKET, bytes(8) + vec8(b"\x00") + vec16(b"t") + b"\x00\x00"
    ),
    "EndOfEarlyData": handshake_message(HandshakeType.END_OF_EARLY_DATA, b""),
    "EncryptedExtensions": handshake_message(HandshakeType.ENCRYPTED_EXTENSIONS, b"\x00\x00"),
    "Certificate": handshake_message(HandshakeType.CERTIFICATE, b"\x00\x00\x00\x00"),
    "CertificateRequest": handshake_message(HandshakeType.CERTIFICATE_REQUEST, b"\x00\x00\x00"),
    "CertificateVerify": handshake_message(
        HandshakeType.CERTIFICATE_VERIFY, u16(0x0403) + vec16(b"sig")
    ),
    "Finished": handshake_message(HandshakeType.FINISHED, bytes(32)),
    "HelloRequest": handshake_message(0, b""),
    "message_hash": handshake_message(HandshakeType.MESSAGE_HASH, bytes(32)),
    "unknown type 99": handshake_message(99, b"abc"),
}


@pytest.mark.parametrize("name", list(POST_HANDSHAKE_MESSAGES))
def test_handshake_message_after_the_handshake_is_unexpected(
    config: ServerConfig, name: str
) -> None:
    """§4.6: after the handshake a client sends only KeyUpdate (and a Certificate flight
    when asked, which pqproxy never does)."""
    client = _connected(config)
    client.feed(client.seal(ContentType.HANDSHAKE, POST_HANDSHAKE_MESSAGES[name]))
    client.assert_alert(A.unexpected_message)


@pytest.mark.parametrize(
    "name",
    ["Certificate", "CertificateVerify", "EndOfEarlyData", "NewSessionTicket", "ClientHello"],
)
def test_message_other_than_finished_before_the_clients_finished_is_unexpected(
    config: ServerConfig, name: str
) -> None:
    """§4.4.2: no Certificate without a CertificateRequest; §4.5: no EndOfEarlyData unless the
    server accepted 0-RTT."""
    client = Client(config)
    client.handshake()
    client.feed(client.seal_handshake_keys(ContentType.HANDSHAKE, POST_HANDSHAKE_MESSAGES[name]))
    client.assert_alert(A.unexpected_message)


def test_end_of_early_data_after_rejected_0rtt_is_unexpected(config: ServerConfig) -> None:
    client = Client(config)
    extensions = [*client.extensions(), psk_modes(), early_data(), pre_shared_key([b"old"])]
    stranger = RecordProtection(AES128, os.urandom(32))
    client.feed(
        records(client.client_hello(extensions)),
        stranger.seal(ContentType.APPLICATION_DATA, b"0-rtt"),
        stranger.seal(ContentType.HANDSHAKE, POST_HANDSHAKE_MESSAGES["EndOfEarlyData"]),
    )
    assert client.server_finished
    client.assert_going_on()
    client.feed(
        client.seal_handshake_keys(ContentType.HANDSHAKE, POST_HANDSHAKE_MESSAGES["EndOfEarlyData"])
    )
    client.assert_alert(A.unexpected_message)


# --- found while reading tlsfuzzer's and BoGo's expectations -------------------------------


@pytest.mark.parametrize("tag_byte", [-1, -16])
def test_maximal_ciphertext_with_a_bad_tag_is_record_overflow_defect(
    config: ServerConfig, tag_byte: int
) -> None:
    """A 2^14 + 256 byte ciphertext under a 16-byte tag can only decrypt to more than the
    2^14 + 1 bytes §5.4 allows: tlsfuzzer (test-tls13-record-layer-limits, "too big
    ciphertext ... fuzzed tag") expects record_overflow from its length, whatever the tag
    says. pqproxy decrypted first and answered bad_record_mac. (Go and BoringSSL decrypt
    first too; refusing before the AEAD work is cheaper and loses nothing.)"""
    client = _connected(config)
    assert client.app_write is not None
    record = bytearray(_seal_raw(client.app_write, b"x\x17" + bytes(MAX_CIPHERTEXT - 16 - 2)))
    assert len(record) == 5 + MAX_CIPHERTEXT
    record[tag_byte] ^= 0x40
    client.feed(bytes(record))
    client.assert_alert(A.record_overflow)


@pytest.mark.parametrize(
    ("body", "alert"),
    [
        (b"", A.decode_error),
        (bytes(31), A.decode_error),
        (bytes(33), A.decode_error),
        (bytes(2**14 - 36), A.decode_error),  # tlsfuzzer: Finished padded to a 2^14 record
        (bytes(32), A.decrypt_error),  # right length, wrong verify_data (§4.4.4)
    ],
    ids=["empty", "31", "33", "2^14 record", "wrong"],
)
def test_client_finished_that_does_not_verify(config: ServerConfig, body: bytes, alert: A) -> None:
    client = Client(config)
    client.handshake()
    message = handshake_message(HandshakeType.FINISHED, body)
    client.feed(client.seal_handshake_keys(ContentType.HANDSHAKE, message))
    client.assert_alert(alert)


@pytest.mark.parametrize("pad", [0, 2, 30])
@pytest.mark.parametrize("stage", ["handshake keys", "application keys"])
def test_empty_alert_record_is_unexpected(config: ServerConfig, stage: str, pad: int) -> None:
    """§5.1, §5.4: a zero-length alert must not be sent; tlsfuzzer test-tls13-empty-alert
    expects unexpected_message, padded or not."""
    client = Client(config)
    client.handshake()
    if stage == "handshake keys":
        assert client.hs_write is not None
        record = _seal_raw(client.hs_write, b"\x15" + bytes(pad))
    else:
        client.complete()
        assert client.app_write is not None
        record = _seal_raw(client.app_write, b"\x15" + bytes(pad))
    client.feed(record)
    client.assert_alert(A.unexpected_message)


def test_plaintext_empty_alert_is_unexpected(config: ServerConfig) -> None:
    run = Run(config)
    run.feed(b"\x15\x03\x03\x00\x00")
    assert_alert(run, A.unexpected_message)


@pytest.mark.parametrize("extra", [0, 1000, 3000], ids=["small", "pq-sized", "large"])
def test_client_hello_in_one_byte_records_completes_defect(
    config: ServerConfig, extra: int
) -> None:
    """§5.1 lets handshake messages be fragmented down to one byte a record; tlsfuzzer
    ("medium, maximum fragmentation": a 1 KiB padding extension in 1-byte records) and BoGo
    (MaxHandshakeRecordLength: 1) do it. pqproxy counted every fragment against its cap of
    records before the handshake completes (1024), so a ClientHello of the size a browser
    with an ML-KEM share sends (1.2-1.8 KB) could not be sent that way."""
    client = Client(config)
    message = client.client_hello([*client.extensions(), padding(extra)])
    client.feed(records(message, 1))
    assert client.server_finished, client.run.terminated
    finished = client.finished()
    client.feed(
        *(
            client.seal_handshake_keys(ContentType.HANDSHAKE, finished[i : i + 1])
            for i in range(len(finished))
        )
    )
    client.after_finished(finished)
    assert client.run.server.handshake_complete


def test_handshake_fragments_are_still_bounded(config: ServerConfig) -> None:
    """The fragments of the messages before the handshake completes stay bounded (work per
    record, not per byte): one-byte records for more than that many bytes are refused."""
    limit = server_module.MAX_HANDSHAKE_RECORDS_BEFORE_DONE
    client = Client(config)
    message = client.client_hello([*client.extensions(), padding(limit)])
    wire = records(message, 1)
    client.feed(*(wire[i : i + 6 * 4096] for i in range(0, len(wire), 6 * 4096)))
    client.assert_alert(A.unexpected_message)


@pytest.mark.parametrize(
    "first", [b"\x80\x2e\x01\x03\x01", b"\x80\xff\x01\x03\x03", b"\xc0\x10\x01\x00\x02"]
)
def test_sslv2_format_client_hello_is_protocol_version_defect(
    config: ServerConfig, first: bytes
) -> None:
    """An SSLv2-format ClientHello (high bit of the first byte set) can never offer TLS 1.3;
    Go answers protocol_version ("unsupported SSLv2 handshake received"). pqproxy read the
    first byte as a content type and answered unexpected_message."""
    run = Run(config)
    run.feed(first + bytes(40))
    assert_alert(run, A.protocol_version)
