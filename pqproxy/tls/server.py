"""The TLS 1.3 server state machine (RFC 8446), sans-IO.

Bytes go in through ``receive_data``, events come out of ``next_event`` and
bytes to write out of ``data_to_send``. The engine owns no socket, clock or
global randomness. Expensive crypto is an event (KeyExchangeNeeded,
SignatureNeeded, CertificateVerificationNeeded) that the caller resolves wherever
it likes and hands back.

The flight follows RFC 8446 §2:

    ClientHello  -->  [HelloRetryRequest --> ClientHello]
                 <--  ServerHello, {EncryptedExtensions, Certificate,
                      CertificateVerify, Finished}
    {Finished}   -->
    [Application Data] <-> [Application Data]

Every TLSAlert raised anywhere below is turned into wire bytes in ``_fail``,
and nowhere else.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum, auto
from typing import Any

from ..crypto.provider import (
    BackendError,
    CertificateRejected,
    CertifiedKey,
    ClientCertificateVerifier,
    CryptoProvider,
    InvalidKeyShare,
    PeerIdentity,
    TicketProtector,
    matches_server_name,
)
from . import alerts
from .enums import (
    HYBRID_GROUPS,
    AlertDescription,
    AlertLevel,
    CipherSuite,
    ContentType,
    HandshakeType,
    NamedGroup,
)
from .events import (
    ApplicationData,
    CertificateVerificationNeeded,
    ConnectionTerminated,
    Event,
    HandshakeComplete,
    KeyExchangeNeeded,
    KeyUpdated,
    PeerClosed,
    SignatureNeeded,
)
from .hello_checks import (
    check_client_hello,
    check_ends_its_record,
    check_key_shares_offered,
    check_message_length,
    check_retry_key_share,
    handshake_name,
)
from .key_schedule import (
    SUITES,
    KeySchedule,
    SuiteParams,
    derive_secret,
    empty_hash,
    hkdf_expand_label,
    next_traffic_secret,
)
from .messages import (
    HELLO_RETRY_REQUEST_RANDOM,
    ClientHello,
    certificate_verify_input,
    client_certificate_verify_input,
    encode_certificate,
    encode_certificate_request,
    encode_certificate_verify,
    encode_encrypted_extensions,
    encode_finished,
    encode_key_update,
    encode_new_session_ticket,
    encode_server_hello,
    handshake_message,
    pull_certificate,
    pull_certificate_verify,
    pull_client_hello,
)
from .record import (
    MAX_CIPHERTEXT,
    MAX_PLAINTEXT,
    RECORD_HEADER,
    RecordProtection,
    RecordReader,
    encode_header,
    encode_plaintext_records,
    encode_protected_records,
)
from .session import SessionState, decode_session_state, encode_session_state

# --- limits, each with its reason ---------------------------------------------

# The ClientHello's own limits (MAX_CLIENT_HELLO, MAX_HANDSHAKE_MESSAGE) live with its
# checks in hello_checks.py.
# A real client completes its handshake in a handful of records; this bounds the work a
# peer can cause with records that carry no handshake bytes (CCS, alerts, skipped 0-RTT)
# before it has authenticated.
MAX_RECORDS_BEFORE_HANDSHAKE_DONE = 1024
# RFC 8446 §5.1 lets a handshake message be split down to one byte a record (tlsfuzzer and
# BoGo send 1-byte records); every message is capped in size, and this caps the work per
# record: 16 KiB of handshake messages in 1-byte records (a ClientHello with several PQ key
# shares and a client certificate chain) costs the engine a few tens of milliseconds.
MAX_HANDSHAKE_RECORDS_BEFORE_DONE = 16 * 1024
# RFC 8446 §5.1 allows zero-length application data records (and §6.1 has user_canceled
# dropped), but each costs an AEAD open for nothing: a peer sending only those is cut off
# after a run of this many, as BoringSSL (kMaxEmptyRecords, 32) and Go (16) do. Any record
# with content starts the count again.
MAX_CONSECUTIVE_EMPTY_RECORDS = 32
# RFC 8446 §4.2.10: rejected 0-RTT data is skipped up to a bound of our choosing.
MAX_SKIPPED_EARLY_DATA = 1 << 16
# While crypto is being computed the client may still send its CCS and the 0-RTT
# records we are going to skip (up to MAX_SKIPPED_EARLY_DATA, §4.2.10), all in the
# transport read that carried its ClientHello; two maximal records more cover their
# headers (at most MAX_RECORDS_BEFORE_HANDSHAKE_DONE of them) and one still arriving.
MAX_BUFFERED_WHILE_WAITING = MAX_SKIPPED_EARLY_DATA + 2 * (RECORD_HEADER + MAX_CIPHERTEXT)
# RFC 8446 §5.5: AES-GCM is safe for about 2^24.5 full records per key; rotate
# our sending key well before that.
KEY_UPDATE_AFTER_RECORDS = 1 << 23
# Records are processed as soon as they are fed, so the reader holds one partial
# record plus one transport read; transports hand over at most a few hundred KiB.
MAX_RECEIVE_BUFFER = 1 << 20
# RFC 8449: TLS 1.3 counts the inner content type, so the largest limit is 2^14 + 1.
OUR_RECORD_SIZE_LIMIT = MAX_PLAINTEXT + 1

# RFC 8446 §4.6.1: a ticket lives at most seven days.
MAX_TICKET_LIFETIME = 7 * 24 * 3600
# NewSessionTicket messages per full handshake; a few let a client open parallel
# connections without reusing one ticket.
MAX_TICKETS_PER_HANDSHAKE = 8
# RFC 8446 §4.6.1: a resumed session keeps the client certificate's identity, so how long
# ago that certificate was last proved (its CertificateVerify) is bounded: a day by default
# (what a client re-proves on its first connection of the day), never more than a ticket's
# own seven-day limit.
DEFAULT_MAX_AUTH_AGE = 24 * 3600
MAX_AUTH_AGE = MAX_TICKET_LIFETIME

DEFAULT_GROUPS: tuple[int, ...] = (
    NamedGroup.X25519MLKEM768,
    NamedGroup.x25519,
    NamedGroup.SecP256r1MLKEM768,
    NamedGroup.secp256r1,
    NamedGroup.SecP384r1MLKEM1024,
    NamedGroup.secp384r1,
)
DEFAULT_CIPHER_SUITES: tuple[int, ...] = (
    CipherSuite.TLS_AES_128_GCM_SHA256,
    CipherSuite.TLS_AES_256_GCM_SHA384,
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256,
)


class PqPolicy(StrEnum):
    """How a listener treats hybrid post-quantum groups.

    prefer:  the server's order decides; a missing share for the chosen group
             costs an HRR.
    require: only hybrid groups; a client with none is refused.
    off:     hybrid groups are never negotiated (a classical baseline).
    """

    PREFER = "prefer"
    REQUIRE = "require"
    OFF = "off"


class ClientAuth(StrEnum):
    NONE = "none"
    OPTIONAL = "optional"
    REQUIRE = "require"


@dataclass(frozen=True)
class ServerConfig:
    certificates: tuple[CertifiedKey, ...]
    groups: tuple[int, ...] = DEFAULT_GROUPS
    pq_policy: PqPolicy = PqPolicy.PREFER
    cipher_suites: tuple[int, ...] = DEFAULT_CIPHER_SUITES
    alpn_protocols: tuple[str, ...] = ()
    # RFC 8446 §4.2.7: a server may tell the client its groups so the client
    # can send the right share (e.g. the hybrid) next time. None: not sent.
    advertised_groups: tuple[int, ...] | None = None
    # Mutual TLS: CertificateRequest and verification of the client's chain.
    client_auth: ClientAuth = ClientAuth.NONE
    client_verifier: ClientCertificateVerifier | None = None
    # Resumption: tickets are issued and accepted only with a protector. Only
    # psk_dhe_ke is ever accepted, so a resumed session still runs a fresh (hybrid)
    # key exchange; there is no 0-RTT.
    tickets: TicketProtector | None = None
    tickets_per_handshake: int = 2
    ticket_lifetime: int = 7200
    # Seconds since the client's last CertificateVerify after which its identity is no
    # longer resumed (a full handshake proves the certificate again). §4.6.1.
    max_auth_age: int = DEFAULT_MAX_AUTH_AGE
    _certificate_messages: dict[int, bytes] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _alpn_bytes: tuple[bytes, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        if not self.certificates:
            raise ValueError("a server needs at least one certificate")
        if not self.groups:
            raise ValueError("a server needs at least one key-exchange group")
        for suite in self.cipher_suites:
            if suite not in SUITES:
                raise ValueError(f"unsupported cipher suite 0x{suite:04x}")
        if self.client_auth is not ClientAuth.NONE and self.client_verifier is None:
            raise ValueError(f"client_auth {self.client_auth.value} needs a client verifier")
        if not 0 <= self.tickets_per_handshake <= MAX_TICKETS_PER_HANDSHAKE:
            raise ValueError(f"tickets_per_handshake must be 0..{MAX_TICKETS_PER_HANDSHAKE}")
        if not 0 < self.ticket_lifetime <= MAX_TICKET_LIFETIME:
            raise ValueError(f"ticket_lifetime must be 1..{MAX_TICKET_LIFETIME} seconds")
        if not 0 < self.max_auth_age <= MAX_AUTH_AGE:
            raise ValueError(f"max_auth_age must be 1..{MAX_AUTH_AGE} seconds (7 days)")
        # The Certificate message never changes per handshake: encode it once.
        for index, certified in enumerate(self.certificates):
            self._certificate_messages[index] = encode_certificate(certified.chain)
        object.__setattr__(
            self, "_alpn_bytes", tuple(p.encode("ascii") for p in self.alpn_protocols)
        )

    def groups_for_policy(self) -> tuple[int, ...]:
        if self.pq_policy is PqPolicy.REQUIRE:
            return tuple(g for g in self.groups if g in HYBRID_GROUPS)
        if self.pq_policy is PqPolicy.OFF:
            return tuple(g for g in self.groups if g not in HYBRID_GROUPS)
        return self.groups


TICKET_CLOCK_SKEW = 60.0
PSK_DHE_KE = 1


class _State(Enum):
    EXPECT_CLIENT_HELLO = auto()
    WAIT_KEY_EXCHANGE = auto()
    EXPECT_SECOND_CLIENT_HELLO = auto()
    WAIT_SIGNATURE = auto()
    EXPECT_CLIENT_CERTIFICATE = auto()
    WAIT_CERTIFICATE_VERIFICATION = auto()
    EXPECT_CLIENT_CERTIFICATE_VERIFY = auto()
    EXPECT_FINISHED = auto()
    CONNECTED = auto()
    CLOSED = auto()


class ServerConnection:
    def __init__(
        self,
        config: ServerConfig,
        provider: CryptoProvider,
        random_bytes: Callable[[int], bytes],
        clock: Callable[[], float] | None = None,
        key_log: Callable[[str, bytes, bytes], None] | None = None,
    ) -> None:
        if clock is None and (config.tickets is not None or config.client_verifier is not None):
            raise ValueError("tickets and client certificates need a clock")
        self._config = config
        self._clock = clock
        # NSS key-log hook (label, client_random, secret); None costs nothing.
        self._key_log = key_log
        self._provider = provider
        self._random_bytes = random_bytes
        self._state = _State.EXPECT_CLIENT_HELLO
        self._reader = RecordReader(MAX_RECEIVE_BUFFER)
        self._events: deque[Event] = deque()
        self._out = bytearray()
        self._hs_buffer = bytearray()
        self._read: RecordProtection | None = None
        self._write: RecordProtection | None = None
        self._read_secret = b""
        self._write_secret = b""
        self._records_before_done = 0
        self._handshake_records = 0
        # Consecutive records that carried nothing (empty application data, user_canceled).
        self._empty_records = 0
        self._skip_early_data = False
        self._skipped_early_bytes = 0
        self._sent_ccs = False
        self._received_ccs = False
        self._peer_closed = False
        self._sent_close = False
        self._max_fragment = MAX_PLAINTEXT
        # Negotiated parameters.
        self._params: SuiteParams | None = None
        self._transcript: Any = None
        self._schedule: KeySchedule | None = None
        self._client_hello: ClientHello | None = None
        self._hrr_group: int | None = None
        self._offered_groups: tuple[int, ...] | None = None
        self._group: int | None = None
        self._certified_index = 0
        self._scheme = 0
        self._alpn: bytes | None = None
        self._client_hs_secret = b""
        self._client_app_secret = b""
        self._pending_flight = b""
        self._resumed: SessionState | None = None
        self._selected_psk: int | None = None
        self._psk = b""
        self._peer_identity: PeerIdentity | None = None
        self._client_certificate: tuple[bytes, ...] = ()
        self._request_client_certificate = False
        # When the client's CertificateVerify verified (this handshake's, or the one the
        # resumed session goes back to); None without a client certificate.
        self._auth_time: float | None = None
        # RFC 8446 §4.6.3: the client asked for a KeyUpdate; one is sent before our next
        # application data, however many requests arrive meanwhile.
        self._key_update_owed = False

    def __repr__(self) -> str:
        return f"<ServerConnection state={self._state.name}>"

    # --- public API -----------------------------------------------------------

    @property
    def handshake_complete(self) -> bool:
        return self._state is _State.CONNECTED

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def group(self) -> int | None:
        return self._group

    @property
    def cipher_suite(self) -> int | None:
        return self._params.suite if self._params else None

    @property
    def alpn_protocol(self) -> str | None:
        return self._alpn.decode("ascii") if self._alpn is not None else None

    @property
    def server_name(self) -> str | None:
        return self._client_hello.server_name if self._client_hello else None

    @property
    def offered_groups(self) -> tuple[int, ...] | None:
        """The first ClientHello's supported_groups once it parsed, also when the handshake
        then failed (metrics: which clients a pq_policy would refuse); None before."""
        return self._offered_groups

    @property
    def hello_retry(self) -> bool:
        """Whether a HelloRetryRequest was sent."""
        return self._hrr_group is not None

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the socket; ``b""`` means the peer closed the transport."""
        if self._state is _State.CLOSED:
            return
        if not data:
            self._state = _State.CLOSED
            reason = (
                "peer closed the connection" if self._peer_closed else "eof before close_notify"
            )
            self._events.append(ConnectionTerminated(None, sent=False, reason=reason))
            return
        if self._state is _State.EXPECT_CLIENT_HELLO and not self._reader.pending:
            if data[0] & 0x80 and not self._records_before_done + self._handshake_records:
                # An SSLv2-format ClientHello (its 2-byte length has the high bit set) cannot
                # offer TLS 1.3; Go answers it protocol_version too, not unexpected_message.
                self._fail(alerts.ProtocolVersion("SSLv2-format ClientHello"))
                return
        if self._peer_closed:
            # RFC 8446 §6.1: "Any data received after a closure alert has been received MUST
            # be ignored": not read, not buffered, never answered with an alert.
            return
        try:
            self._reader.feed(data)
            self._process_records()
        except alerts.TLSAlert as alert:
            self._fail(alert)

    def next_event(self) -> Event | None:
        if not self._events:
            return None
        event = self._events.popleft()
        if isinstance(event, ApplicationData) and self._events:
            # Hand consecutive records out as one chunk: fewer writes upstream.
            chunks = [event.data]
            while self._events and isinstance(following := self._events[0], ApplicationData):
                self._events.popleft()
                chunks.append(following.data)
            if len(chunks) > 1:
                return ApplicationData(b"".join(chunks))
        return event

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def complete_key_exchange(self, server_share: bytes, shared_secret: bytes) -> None:
        if self._state is not _State.WAIT_KEY_EXCHANGE:
            if self._state is _State.CLOSED:
                return
            raise RuntimeError("no key exchange is pending")
        try:
            self._send_server_flight(server_share, shared_secret)
        except alerts.TLSAlert as alert:
            self._fail(alert)

    def fail_key_exchange(self, error: BaseException) -> None:
        if self._state is _State.CLOSED:
            return
        if isinstance(error, InvalidKeyShare):
            self._fail(alerts.IllegalParameter(f"invalid key share: {error}"))
        else:
            self._fail(alerts.InternalError(f"key exchange failed: {_describe(error)}"))

    def complete_signature(self, signature: bytes) -> None:
        if self._state is not _State.WAIT_SIGNATURE:
            if self._state is _State.CLOSED:
                return
            raise RuntimeError("no signature is pending")
        try:
            self._finish_server_flight(signature)
            self._process_records()
        except alerts.TLSAlert as alert:
            self._fail(alert)

    def fail_signature(self, error: BaseException) -> None:
        if self._state is not _State.CLOSED:
            self._fail(alerts.InternalError(f"signing failed: {_describe(error)}"))

    def complete_certificate_verification(self, identity: PeerIdentity) -> None:
        """The client's chain verified (``CertificateVerificationNeeded``): who it is."""
        if self._state is not _State.WAIT_CERTIFICATE_VERIFICATION:
            if self._state is _State.CLOSED:
                return
            raise RuntimeError("no certificate verification is pending")
        self._peer_identity = identity
        self._state = _State.EXPECT_CLIENT_CERTIFICATE_VERIFY
        try:
            # The CertificateVerify (and Finished) may have come in the Certificate's record.
            self._receive_handshake_bytes(b"")
            self._process_records()
        except alerts.TLSAlert as alert:
            self._fail(alert)

    def fail_certificate_verification(self, error: BaseException) -> None:
        """The chain did not verify: CertificateRejected carries its alert (RFC 8446 §6.2);
        anything else is our failure, internal_error."""
        if self._state is _State.CLOSED:
            return
        if isinstance(error, CertificateRejected):
            self._fail(alerts.alert_named(error.alert, error.reason))
        else:
            self._fail(alerts.InternalError(f"certificate verification failed: {_describe(error)}"))

    def send_data(self, data: bytes) -> None:
        if self._state is not _State.CONNECTED or self._sent_close:
            raise RuntimeError("cannot send application data now")
        self._seal(ContentType.APPLICATION_DATA, data)

    def update_keys(self, request_peer_update: bool = False) -> None:
        """Send a KeyUpdate (RFC 8446 §4.6.3) and rotate our sending key."""
        if self._state is not _State.CONNECTED or self._sent_close:
            raise RuntimeError("cannot update keys now")
        self._send_key_update(request_peer_update)

    def close(self) -> None:
        """Send close_notify. The connection may still receive until the peer closes."""
        if self._state is _State.CLOSED or self._sent_close:
            return
        self._sent_close = True
        self._send_alert(AlertDescription.close_notify, AlertLevel.WARNING)
        if self._peer_closed or self._state is not _State.CONNECTED:
            self._state = _State.CLOSED
            self._events.append(ConnectionTerminated(None, sent=True, reason="closed"))

    # --- records --------------------------------------------------------------

    def _process_records(self) -> None:
        # Records after the peer's close_notify in the same read are ignored too (§6.1).
        while self._state is not _State.CLOSED and not self._peer_closed:
            if self._state in _WAITING_FOR_CRYPTO:
                # Leave input buffered until the crypto result is back.
                if self._reader.pending > MAX_BUFFERED_WHILE_WAITING:
                    raise alerts.UnexpectedMessage("peer sent too much data during handshake")
                return
            record = self._reader.next_record()
            if record is None:
                return
            content_type, version, payload = record
            if self._state is not _State.CONNECTED:
                self._count_record_before_done(content_type)
            if content_type == ContentType.CHANGE_CIPHER_SPEC:
                self._receive_change_cipher_spec(payload)
                continue
            if self._read is None:
                if content_type == ContentType.APPLICATION_DATA and self._skip_early_data:
                    self._skip_early_record(len(payload))
                    continue
                if content_type == ContentType.APPLICATION_DATA:
                    raise alerts.UnexpectedMessage("encrypted record before keys were agreed")
                self._dispatch(content_type, payload)
                continue
            if content_type == ContentType.ALERT and self._state in _AWAITING_CLIENT_FLIGHT:
                # A client that could not process our ServerHello answers in
                # plaintext; accept it so the operator sees the real reason.
                self._dispatch(content_type, payload)
                continue
            if content_type != ContentType.APPLICATION_DATA:
                raise alerts.UnexpectedMessage(f"plaintext record of type {content_type}")
            try:
                # §5.2: the additional data is the header as received; legacy_record_version
                # is otherwise ignored (§5.1), so a 0x0301 header still opens (as in Go).
                inner_type, plaintext = self._read.open(
                    encode_header(content_type, len(payload), version), payload
                )
            except alerts.BadRecordMac:
                if self._skip_early_data:
                    self._skip_early_record(len(payload))
                    continue
                raise
            self._skip_early_data = False
            self._dispatch(inner_type, plaintext)

    def _count_record_before_done(self, content_type: int) -> None:
        # A protected record's type is known only once it opens; those are counted as
        # non-handshake records, which is what skipped 0-RTT is and a client flight is
        # a few of.
        if content_type == ContentType.HANDSHAKE:
            self._handshake_records += 1
            if self._handshake_records > MAX_HANDSHAKE_RECORDS_BEFORE_DONE:
                raise alerts.UnexpectedMessage("too many handshake fragments before completion")
            return
        self._records_before_done += 1
        if self._records_before_done > MAX_RECORDS_BEFORE_HANDSHAKE_DONE:
            raise alerts.UnexpectedMessage("too many records before handshake completion")

    def _skip_early_record(self, length: int) -> None:
        self._skipped_early_bytes += length
        if self._skipped_early_bytes > MAX_SKIPPED_EARLY_DATA:
            raise alerts.UnexpectedMessage("too much rejected early data")

    def _receive_change_cipher_spec(self, payload: bytes) -> None:
        # RFC 8446 §5: a single 0x01 between the first ClientHello and the
        # client's Finished is dropped; anything else is unexpected_message.
        if payload != b"\x01":
            raise alerts.UnexpectedMessage("malformed change_cipher_spec")
        if self._state in (_State.EXPECT_CLIENT_HELLO, _State.CONNECTED):
            raise alerts.UnexpectedMessage("change_cipher_spec outside the handshake")
        if self._hs_buffer:
            # §5.1: a handshake message's fragments are not interleaved with any other
            # record type.
            raise alerts.UnexpectedMessage("change_cipher_spec inside a handshake message")
        if self._received_ccs:
            # Middlebox compatibility mode (Appendix D.4) has the client send one CCS,
            # after its first ClientHello or before its second flight; a second one is no
            # client's doing. OpenSSL and BoringSSL refuse it the same way.
            raise alerts.UnexpectedMessage("second change_cipher_spec")
        self._received_ccs = True

    def _count_empty_record(self) -> None:
        self._empty_records += 1
        if self._empty_records > MAX_CONSECUTIVE_EMPTY_RECORDS:
            raise alerts.UnexpectedMessage(
                f"more than {MAX_CONSECUTIVE_EMPTY_RECORDS} records in a row without content"
            )

    def _dispatch(self, content_type: int, payload: bytes) -> None:
        if content_type == ContentType.HANDSHAKE:
            if not payload:
                raise alerts.UnexpectedMessage("empty handshake record")
            self._empty_records = 0
            self._receive_handshake_bytes(payload)
        elif content_type == ContentType.APPLICATION_DATA:
            if self._state is not _State.CONNECTED:
                raise alerts.UnexpectedMessage("application data before the handshake finished")
            if self._hs_buffer:
                raise alerts.UnexpectedMessage("application data inside a handshake message")
            if not payload:
                self._count_empty_record()  # §5.1: allowed, but not without end
                return
            self._empty_records = 0
            self._events.append(ApplicationData(payload))
        elif content_type == ContentType.ALERT:
            self._receive_alert(payload)
        else:
            raise alerts.UnexpectedMessage(f"unexpected content type {content_type}")

    def _receive_alert(self, payload: bytes) -> None:
        if len(payload) != 2:
            raise alerts.DecodeError("alert record is not two bytes")
        description = payload[1]
        if self._hs_buffer:
            raise alerts.UnexpectedMessage("alert inside a handshake message")
        if description == AlertDescription.close_notify:
            if self._state is not _State.CONNECTED:
                self._terminated_by_peer(
                    AlertDescription.close_notify, "close_notify mid-handshake"
                )
                return
            self._peer_closed = True
            self._events.append(PeerClosed())
            if self._sent_close:
                self._state = _State.CLOSED
                self._events.append(ConnectionTerminated(None, sent=False, reason="closed"))
            return
        if description == AlertDescription.user_canceled:
            # RFC 8446 §6.1: followed by close_notify. Dropped at any level, as Go, BoringSSL
            # and OpenSSL do (JDK sends it at fatal level), but counted like an empty record.
            self._count_empty_record()
            return
        try:
            alert = AlertDescription(description)
        except ValueError:
            alert = AlertDescription.internal_error
        self._terminated_by_peer(alert, f"peer sent alert {description}")

    def _terminated_by_peer(self, alert: AlertDescription, reason: str) -> None:
        self._state = _State.CLOSED
        self._events.append(ConnectionTerminated(alert, sent=False, reason=reason))

    def _receive_handshake_bytes(self, payload: bytes) -> None:
        buffer = self._hs_buffer
        buffer += payload
        # While the client's chain is being verified, the rest of its flight waits here
        # (it may share the Certificate's record: no key change comes between them).
        while len(buffer) >= 4 and self._state not in _HOLD_HANDSHAKE_MESSAGES:
            length = int.from_bytes(buffer[1:4], "big")
            check_message_length(buffer[0], length, self._state in _EXPECT_CLIENT_HELLO)
            if len(buffer) < 4 + length:
                return
            message = bytes(buffer[: 4 + length])
            del buffer[: 4 + length]
            check_ends_its_record(message[0], bool(buffer))
            self._handle_handshake(message[0], message)

    def _handle_handshake(self, msg_type: int, message: bytes) -> None:
        state = self._state
        if state is _State.EXPECT_CLIENT_HELLO and msg_type == HandshakeType.CLIENT_HELLO:
            self._receive_client_hello(message)
        elif state is _State.EXPECT_SECOND_CLIENT_HELLO and msg_type == HandshakeType.CLIENT_HELLO:
            self._receive_client_hello(message)
        elif state is _State.EXPECT_FINISHED and msg_type == HandshakeType.FINISHED:
            self._receive_finished(message)
        elif state is _State.EXPECT_CLIENT_CERTIFICATE and msg_type == HandshakeType.CERTIFICATE:
            self._receive_client_certificate(message)
        elif (
            state is _State.EXPECT_CLIENT_CERTIFICATE_VERIFY
            and msg_type == HandshakeType.CERTIFICATE_VERIFY
        ):
            self._receive_client_certificate_verify(message)
        elif state is _State.CONNECTED and msg_type == HandshakeType.KEY_UPDATE:
            self._receive_key_update(message)
        else:
            name = handshake_name(msg_type)
            raise alerts.UnexpectedMessage(f"{name} in state {state.name}")

    # --- ClientHello ----------------------------------------------------------

    def _receive_client_hello(self, message: bytes) -> None:
        hello = pull_client_hello(message[4:])
        first = self._client_hello is None
        check_client_hello(hello, self._client_hello)
        assert hello.supported_groups is not None and hello.key_shares is not None
        if first:
            self._offered_groups = hello.supported_groups
        check_key_shares_offered(hello)

        if first:
            params = self._choose_cipher_suite(hello)
            self._params = params
            self._transcript = hashlib.new(params.hash_name)
            self._transcript.update(message)
            self._skip_early_data = hello.early_data
            if hello.signature_algorithms is not None:
                # Chosen now, so that a client we cannot serve learns it before an HRR; a
                # client without signature_algorithms may still resume (§9.2): see below.
                self._choose_certificate(hello)
            self._alpn = self._choose_alpn(hello)
            if hello.record_size_limit is not None:
                self._max_fragment = min(MAX_PLAINTEXT, hello.record_size_limit - 1)
            group, share = self._choose_group(hello)
            self._client_hello = hello
            if share is None:
                self._send_hello_retry_request(hello, group, message)
                return
            self._accept_psk(hello, message, hashlib.new(params.hash_name))
        else:
            group, share = self._check_second_client_hello(hello)
            # After an HRR the binder covers message_hash(CH1), the HRR and CH2.
            self._accept_psk(hello, message, self._transcript.copy())
            self._transcript.update(message)
            self._client_hello = hello
        if self._resumed is None and hello.signature_algorithms is None:
            # §4.2.3: a server authenticating with a certificate needs the client's schemes;
            # the PSK that excused their absence (§9.2) was not accepted.
            raise alerts.MissingExtension("no signature_algorithms and no PSK accepted")
        self._start_key_exchange(group, share)

    def _accept_psk(self, hello: ClientHello, message: bytes, binder_transcript: Any) -> None:
        """Resume from a ticket when one opens and fits; otherwise a full handshake.
        Only psk_dhe_ke is accepted (§4.2.9), so the key exchange always runs."""
        offered, tickets, clock = hello.pre_shared_key, self._config.tickets, self._clock
        params = self._params
        if offered is None or tickets is None or clock is None or params is None:
            return
        if PSK_DHE_KE not in (hello.psk_key_exchange_modes or ()):
            return
        now = clock()
        for index, (identity, _obfuscated_age) in enumerate(offered.identities):
            plaintext = tickets.open(identity, now)
            state = decode_session_state(plaintext) if plaintext is not None else None
            if state is None or state.cipher_suite not in SUITES:
                continue
            # §4.2.11: a PSK is used only with a suite of the same hash; it must be
            # within its lifetime; and it stays with the name it was issued for.
            if SUITES[state.cipher_suite].hash_name != params.hash_name:
                continue
            if not state.created - TICKET_CLOCK_SKEW <= now <= state.created + state.lifetime:
                continue
            if state.server_name != hello.server_name:
                continue
            if not self._identity_resumable(state, now):
                continue  # a full handshake proves the certificate again (§4.6.1)
            binder_transcript.update(message[: len(message) - offered.binders_length])
            schedule = KeySchedule(params, psk=state.psk)
            binder_key = derive_secret(
                params.hash_name, schedule.early_secret, b"res binder", empty_hash(params.hash_name)
            )
            expected = schedule.finished_verify_data(binder_key, binder_transcript.digest())
            # §4.2.11 and §6.2: a binder that does not validate is a decrypt_error.
            if not hmac.compare_digest(expected, offered.binders[index]):
                raise alerts.DecryptError("PSK binder does not verify")
            self._resumed = state
            self._selected_psk = index
            self._schedule = schedule
            self._peer_identity = state.identity
            self._auth_time = state.auth_time
            return

    def _identity_resumable(self, state: SessionState, now: float) -> bool:
        """Whether the session's client identity may be resumed now. RFC 8446 §4.6.1: the
        lifetime of a resumed authentication takes into account the peer certificate's
        lifetime and the time since its CertificateVerify. A session outside those limits
        is not an error: the client gets a full handshake (and proves its certificate)."""
        client_auth = self._config.client_auth
        if state.identity is None:
            # A listener that now requires certificates has no use for a session without.
            return client_auth is not ClientAuth.REQUIRE
        if client_auth is ClientAuth.NONE:
            return False  # nothing here vouches for identities any more (Go does the same)
        if state.auth_time is None or state.not_after is None:
            return False
        return now <= state.not_after and now - state.auth_time <= self._config.max_auth_age

    def _choose_cipher_suite(self, hello: ClientHello) -> SuiteParams:
        offered = set(hello.cipher_suites)
        for suite in self._config.cipher_suites:
            if suite in offered:
                return SUITES[suite]
        raise alerts.HandshakeFailure("no shared cipher suite")

    def _choose_group(self, hello: ClientHello) -> tuple[int, bytes | None]:
        assert hello.supported_groups is not None and hello.key_shares is not None
        offered = set(hello.supported_groups)
        available = self._provider.groups
        candidates = [
            g for g in self._config.groups_for_policy() if g in offered and g in available
        ]
        if not candidates:
            if self._config.pq_policy is PqPolicy.REQUIRE:
                raise alerts.HandshakeFailure("client offers no hybrid group (pq_policy: require)")
            raise alerts.HandshakeFailure("no shared key-exchange group")
        chosen = candidates[0]
        for share_group, share in hello.key_shares:
            if share_group == chosen:
                return chosen, share
        return chosen, None

    def _choose_certificate(self, hello: ClientHello) -> None:
        assert hello.signature_algorithms is not None
        client_schemes = set(hello.signature_algorithms)
        certificates = self._config.certificates
        order = list(range(len(certificates)))
        if hello.server_name is not None:
            named = [
                i for i in order if matches_server_name(certificates[i].names, hello.server_name)
            ]
            order = named + [i for i in order if i not in named]
        for index in order:
            for scheme in certificates[index].signer.schemes:
                if scheme in client_schemes:
                    self._certified_index = index
                    self._scheme = scheme
                    return
        raise alerts.HandshakeFailure("no certificate for the client's signature_algorithms")

    def _choose_alpn(self, hello: ClientHello) -> bytes | None:
        ours = self._config._alpn_bytes
        if hello.alpn_protocols is None or not ours:
            return None
        theirs = set(hello.alpn_protocols)
        for protocol in ours:
            if protocol in theirs:
                return protocol
        raise alerts.NoApplicationProtocol("no common application protocol")  # RFC 7301 §3.2

    def _send_hello_retry_request(self, hello: ClientHello, group: int, ch1: bytes) -> None:
        assert self._params is not None
        # RFC 8446 §4.4.1: the transcript restarts with a hash of ClientHello1.
        digest = self._transcript.digest()
        self._transcript = hashlib.new(self._params.hash_name)
        self._transcript.update(handshake_message(HandshakeType.MESSAGE_HASH, digest))
        hrr = encode_server_hello(
            HELLO_RETRY_REQUEST_RANDOM, hello.legacy_session_id, self._params.suite, group, None
        )
        self._transcript.update(hrr)
        self._hrr_group = group
        self._out += encode_plaintext_records(ContentType.HANDSHAKE, hrr)
        self._send_compat_ccs(hello)
        self._state = _State.EXPECT_SECOND_CLIENT_HELLO

    def _check_second_client_hello(self, hello: ClientHello) -> tuple[int, bytes]:
        assert self._params is not None and self._hrr_group is not None
        share = check_retry_key_share(hello, self._hrr_group)
        self._skip_early_data = False
        return self._hrr_group, share

    def _send_compat_ccs(self, hello: ClientHello) -> None:
        # RFC 8446 §D.4: middlebox compatibility mode is signalled by a
        # non-empty legacy_session_id; answer with one CCS after our first message.
        if hello.legacy_session_id and not self._sent_ccs:
            self._sent_ccs = True
            self._out += b"\x14\x03\x03\x00\x01\x01"

    def _start_key_exchange(self, group: int, share: bytes) -> None:
        exchange = self._provider.groups[group]
        if len(share) != exchange.client_share_length:
            raise alerts.IllegalParameter(
                f"key share for 0x{group:04x} is {len(share)} bytes, "
                f"expected {exchange.client_share_length}"
            )
        self._group = group
        self._state = _State.WAIT_KEY_EXCHANGE
        self._events.append(KeyExchangeNeeded(group, share, exchange))

    # --- server flight --------------------------------------------------------

    def _send_server_flight(self, server_share: bytes, shared_secret: bytes) -> None:
        params, hello, group = self._params, self._client_hello, self._group
        assert params is not None and hello is not None and group is not None
        if len(server_share) != self._provider.groups[group].server_share_length:
            raise alerts.InternalError("backend returned a server share of the wrong length")
        server_hello = encode_server_hello(
            self._random_bytes(32),
            hello.legacy_session_id,
            params.suite,
            group,
            server_share,
            self._selected_psk,
        )
        transcript = self._transcript
        transcript.update(server_hello)
        schedule = self._schedule or KeySchedule(params)
        self._schedule = schedule
        client_hs, server_hs = schedule.handshake_secrets(shared_secret, transcript.digest())
        self._log_secret("CLIENT_HANDSHAKE_TRAFFIC_SECRET", client_hs)
        self._log_secret("SERVER_HANDSHAKE_TRAFFIC_SECRET", server_hs)
        self._out += encode_plaintext_records(ContentType.HANDSHAKE, server_hello)
        self._send_compat_ccs(hello)
        self._write = RecordProtection(params, server_hs)
        self._read = RecordProtection(params, client_hs)
        self._client_hs_secret = client_hs
        self._write_secret = server_hs

        encrypted_extensions = encode_encrypted_extensions(
            self._config.advertised_groups,
            OUR_RECORD_SIZE_LIMIT if hello.record_size_limit is not None else None,
            hello.server_name is not None,
            self._alpn,
        )
        transcript.update(encrypted_extensions)
        if self._resumed is not None:
            # §4.3.2 and §4.4: a PSK handshake authenticates with the PSK, so no
            # CertificateRequest, Certificate or CertificateVerify.
            self._pending_flight = encrypted_extensions
            self._finish_server_flight(None)
            return
        flight = [encrypted_extensions]
        verifier = self._config.client_verifier
        if self._config.client_auth is not ClientAuth.NONE and verifier is not None:
            request = encode_certificate_request(verifier.signature_schemes)
            transcript.update(request)
            flight.append(request)
            self._request_client_certificate = True
        certificate = self._config._certificate_messages[self._certified_index]
        transcript.update(certificate)
        flight.append(certificate)
        self._pending_flight = b"".join(flight)
        self._state = _State.WAIT_SIGNATURE
        self._events.append(
            SignatureNeeded(
                self._scheme,
                certificate_verify_input(transcript.digest()),
                self._config.certificates[self._certified_index].signer,
            )
        )

    def _finish_server_flight(self, signature: bytes | None) -> None:
        params, schedule = self._params, self._schedule
        assert params is not None and schedule is not None and self._write is not None
        transcript = self._transcript
        flight = self._pending_flight
        if signature is not None:
            certificate_verify = encode_certificate_verify(self._scheme, signature)
            transcript.update(certificate_verify)
            flight += certificate_verify
        finished = encode_finished(
            schedule.finished_verify_data(self._write_secret, transcript.digest())
        )
        transcript.update(finished)
        flight += finished
        self._pending_flight = b""
        self._out += encode_protected_records(
            self._write, ContentType.HANDSHAKE, flight, self._max_fragment
        )
        client_app, server_app = schedule.application_secrets(transcript.digest())
        self._log_secret("CLIENT_TRAFFIC_SECRET_0", client_app)
        self._log_secret("SERVER_TRAFFIC_SECRET_0", server_app)
        if schedule.exporter_master_secret is not None:
            self._log_secret("EXPORTER_SECRET", schedule.exporter_master_secret)
        self._client_app_secret = client_app
        self._write = RecordProtection(params, server_app)
        self._write_secret = server_app
        self._state = (
            _State.EXPECT_CLIENT_CERTIFICATE
            if self._request_client_certificate
            else _State.EXPECT_FINISHED
        )

    def _receive_client_certificate(self, message: bytes) -> None:
        context, chain = pull_certificate(message[4:])
        # §4.4.2: in the main handshake the context echoes ours, which is empty.
        if context:
            raise alerts.IllegalParameter("certificate_request_context is not empty")
        self._transcript.update(message)
        if not chain:
            if self._config.client_auth is ClientAuth.REQUIRE:
                raise alerts.CertificateRequired("client sent no certificate")  # §4.4.2.4
            self._state = _State.EXPECT_FINISHED
            return
        verifier, clock = self._config.client_verifier, self._clock
        assert verifier is not None and clock is not None
        # Path building can cost milliseconds (more for a crafted chain): it is crypto the
        # caller runs wherever it likes, like a signature, and hands back to
        # complete_certificate_verification.
        self._client_certificate = chain
        self._state = _State.WAIT_CERTIFICATE_VERIFICATION
        self._events.append(CertificateVerificationNeeded(chain, clock(), verifier))

    def _receive_client_certificate_verify(self, message: bytes) -> None:
        scheme, signature = pull_certificate_verify(message[4:])
        verifier = self._config.client_verifier
        assert verifier is not None
        # §4.4.3: the scheme must be one the CertificateRequest offered.
        if scheme not in verifier.signature_schemes:
            raise alerts.IllegalParameter(f"client signed with unoffered scheme 0x{scheme:04x}")
        content = client_certificate_verify_input(self._transcript.digest())
        try:
            verifier.verify_signature(self._client_certificate[0], scheme, content, signature)
        except CertificateRejected as rejected:
            raise alerts.alert_named(rejected.alert, rejected.reason) from None
        assert self._clock is not None
        self._auth_time = self._clock()
        self._transcript.update(message)
        self._state = _State.EXPECT_FINISHED

    def _receive_finished(self, message: bytes) -> None:
        params, hello, schedule = self._params, self._client_hello, self._schedule
        assert params is not None and hello is not None and self._group is not None
        assert schedule is not None
        verify_data = message[4:]
        if len(verify_data) != params.hash_len:
            raise alerts.DecodeError("Finished of the wrong length")
        expected = schedule.finished_verify_data(self._client_hs_secret, self._transcript.digest())
        if not hmac.compare_digest(verify_data, expected):
            raise alerts.DecryptError("client Finished does not verify")  # §4.4.4
        if self._hs_buffer:
            raise alerts.UnexpectedMessage("data after Finished in the same record")
        self._transcript.update(message)
        self._read = RecordProtection(params, self._client_app_secret)
        self._read_secret = self._client_app_secret
        self._client_app_secret = b""
        self._client_hs_secret = b""
        self._state = _State.CONNECTED
        self._events.append(
            HandshakeComplete(
                group=self._group,
                cipher_suite=params.suite,
                signature_scheme=self._scheme if self._resumed is None else 0,
                alpn_protocol=self.alpn_protocol,
                server_name=hello.server_name,
                hello_retry=self._hrr_group is not None,
                offered_groups=hello.supported_groups or (),
                resumed=self._resumed is not None,
                peer_identity=self._peer_identity,
            )
        )
        self._send_tickets()

    def _send_tickets(self) -> None:
        config, clock = self._config, self._clock
        tickets, count = config.tickets, config.tickets_per_handshake
        params, schedule, hello = self._params, self._schedule, self._client_hello
        if tickets is None or clock is None or count == 0:
            return
        assert params is not None and schedule is not None and hello is not None
        now = clock()
        lifetime = config.ticket_lifetime
        identity, auth_time = self._peer_identity, self._auth_time
        not_after: float | None = None
        if identity is not None:
            # A resumed session's tickets keep the authentication it goes back to (§4.6.1),
            # and live no longer than it may be resumed: the certificate's end, or
            # max_auth_age after its CertificateVerify.
            assert auth_time is not None
            not_after = self._resumed.not_after if self._resumed is not None else identity.not_after
            if not_after is None:
                return  # a verifier that cannot say when the certificate ends: no tickets
            usable = min(not_after, auth_time + config.max_auth_age) - now
            lifetime = min(lifetime, math.floor(usable))
            if lifetime <= 0:
                return
        resumption = schedule.resumption_master_secret(self._transcript.digest())
        for index in range(count):
            # §4.6.1: each ticket's PSK is derived with its own nonce.
            nonce = bytes((index,))
            psk = hkdf_expand_label(
                params.hash_name, resumption, b"resumption", nonce, params.hash_len
            )
            state = SessionState(
                cipher_suite=params.suite,
                psk=psk,
                created=now,
                lifetime=lifetime,
                server_name=hello.server_name,
                alpn=self._alpn,
                identity=identity,
                auth_time=auth_time,
                not_after=not_after,
            )
            ticket = tickets.seal(encode_session_state(state), now)
            age_add = int.from_bytes(self._random_bytes(4), "big")
            self._seal(
                ContentType.HANDSHAKE,
                encode_new_session_ticket(lifetime, age_add, nonce, ticket),
            )

    def _log_secret(self, label: str, secret: bytes) -> None:
        if self._key_log is not None and self._client_hello is not None:
            self._key_log(label, self._client_hello.random, secret)

    # --- post-handshake -------------------------------------------------------

    def _receive_key_update(self, message: bytes) -> None:
        params = self._params
        assert params is not None
        body = message[4:]
        if len(body) != 1:
            raise alerts.DecodeError("KeyUpdate of the wrong length")
        if body[0] not in (0, 1):
            raise alerts.IllegalParameter("KeyUpdate request_update out of range")  # §4.6.3
        if self._hs_buffer:
            raise alerts.UnexpectedMessage("data after KeyUpdate in the same record")
        self._read_secret = next_traffic_secret(params, self._read_secret)
        self._read = RecordProtection(params, self._read_secret)
        requested = body[0] == 1
        # §4.6.3: the answer is one KeyUpdate(update_not_requested) "before sending its next
        # Application Data record". It is owed, not sent now: a client that sends requests
        # and never reads must not make us queue one record per request, and any number of
        # requests before our next data are answered by that one update.
        owed = requested and not self._sent_close
        if owed:
            self._key_update_owed = True
        self._events.append(KeyUpdated(update_requested=requested, we_updated=owed))

    def _send_key_update(self, request_peer_update: bool) -> None:
        params, write = self._params, self._write
        assert params is not None and write is not None
        self._out += write.seal(ContentType.HANDSHAKE, encode_key_update(request_peer_update))
        self._write_secret = next_traffic_secret(params, self._write_secret)
        self._write = RecordProtection(params, self._write_secret)
        # Any KeyUpdate of ours after the client's request answers it.
        self._key_update_owed = False

    def _seal(self, content_type: int, data: bytes) -> None:
        write = self._write
        assert write is not None
        if write.seq >= KEY_UPDATE_AFTER_RECORDS or (
            self._key_update_owed and content_type == ContentType.APPLICATION_DATA
        ):
            self._send_key_update(False)
            write = self._write
            assert write is not None
        self._out += encode_protected_records(write, content_type, data, self._max_fragment)

    # --- alerts ---------------------------------------------------------------

    def _send_alert(self, description: AlertDescription, level: AlertLevel) -> None:
        payload = bytes((level, description))
        if self._write is not None:
            self._out += self._write.seal(ContentType.ALERT, payload)
        else:
            self._out += encode_plaintext_records(ContentType.ALERT, payload)

    def _fail(self, alert: alerts.TLSAlert) -> None:
        """The one place an alert becomes wire bytes and the connection closes."""
        if self._state is _State.CLOSED:
            return
        self._send_alert(alert.description, AlertLevel.FATAL)
        self._state = _State.CLOSED
        self._events.append(ConnectionTerminated(alert.description, sent=True, reason=alert.reason))


# States in which a ClientHello may come, and may be up to MAX_CLIENT_HELLO bytes.
_EXPECT_CLIENT_HELLO = frozenset({_State.EXPECT_CLIENT_HELLO, _State.EXPECT_SECOND_CLIENT_HELLO})

# Crypto the engine asked for and is waiting for: received records stay unread meanwhile.
_WAITING_FOR_CRYPTO = frozenset(
    {_State.WAIT_KEY_EXCHANGE, _State.WAIT_SIGNATURE, _State.WAIT_CERTIFICATE_VERIFICATION}
)
_HOLD_HANDSHAKE_MESSAGES = frozenset({_State.CLOSED, _State.WAIT_CERTIFICATE_VERIFICATION})

_AWAITING_CLIENT_FLIGHT = frozenset(
    {
        _State.EXPECT_CLIENT_CERTIFICATE,
        _State.EXPECT_CLIENT_CERTIFICATE_VERIFY,
        _State.EXPECT_FINISHED,
    }
)


def _describe(error: BaseException) -> str:
    # Library messages go to the log only, never on the wire; keep them short.
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def resolve_inline(connection: ServerConnection) -> list[Event]:
    """Drain events, resolving key exchanges, signatures and client chain verifications on
    the spot; return the rest.

    For callers that do not care where crypto runs (tests, simple tools)."""
    others: list[Event] = []
    while True:
        event = connection.next_event()
        if event is None:
            return others
        if isinstance(event, KeyExchangeNeeded):
            try:
                share, secret = event.exchange.server_exchange(event.client_share)
            except (InvalidKeyShare, BackendError, ValueError) as error:
                connection.fail_key_exchange(error)
            else:
                connection.complete_key_exchange(share, secret)
        elif isinstance(event, SignatureNeeded):
            try:
                signature = event.signer.sign(event.scheme, event.message)
            except (BackendError, ValueError) as error:
                connection.fail_signature(error)
            else:
                connection.complete_signature(signature)
        elif isinstance(event, CertificateVerificationNeeded):
            try:
                identity = event.verifier.verify_chain(event.chain, event.now)
            except (CertificateRejected, BackendError, ValueError) as error:
                connection.fail_certificate_verification(error)
            else:
                connection.complete_certificate_verification(identity)
        else:
            others.append(event)


__all__ = [
    "DEFAULT_CIPHER_SUITES",
    "DEFAULT_GROUPS",
    "PqPolicy",
    "ServerConfig",
    "ServerConnection",
    "resolve_inline",
]
