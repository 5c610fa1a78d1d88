"""What a ClientHello must be before the server acts on it (RFC 8446), sans-IO.

Pure functions over a parsed ``ClientHello`` (and the first one, after an HRR) and over
handshake message headers: each returns nothing or raises the RFC's ``TLSAlert``. The
state machine in ``server.py`` decides when they run; ``_fail`` there turns the alert into
wire bytes.
"""

from __future__ import annotations

from . import alerts
from .enums import TLS13_VERSION, HandshakeType
from .messages import ClientHello, retry_hello_change

# Appendix D.5: a ClientHello.legacy_version at or below SSL 3.0 aborts the handshake.
SSL3_VERSION = 0x0300

# A ClientHello with several PQ key shares is a few KiB, but a legal one can be far
# larger: its extensions block alone may hold 2^16 - 1 bytes (a maximal
# signature_algorithms list makes a 65,6xx-byte ClientHello), plus up to 2^16 - 2 bytes
# of cipher suites. 2^17 admits every ClientHello a real client sends and bounds what a
# client can make us buffer before it has proved anything.
MAX_CLIENT_HELLO = 1 << 17
# Every other message the client sends: Finished and KeyUpdate are tiny; client
# certificates with ML-DSA chains stay well below this.
MAX_HANDSHAKE_MESSAGE = 1 << 16

# RFC 8446 §5.1: "the ClientHello, EndOfEarlyData, ServerHello, Finished, and KeyUpdate
# messages can immediately precede a key change": the ones a client sends end their record.
ENDS_ITS_RECORD = frozenset(
    {
        HandshakeType.CLIENT_HELLO,
        HandshakeType.END_OF_EARLY_DATA,
        HandshakeType.FINISHED,
        HandshakeType.KEY_UPDATE,
    }
)


def handshake_name(msg_type: int) -> str:
    try:
        return HandshakeType(msg_type).name
    except ValueError:
        return f"handshake type {msg_type}"


# --- handshake message framing --------------------------------------------------------


def check_message_length(msg_type: int, length: int, expecting_client_hello: bool) -> None:
    """A handshake message's length, checked from its header before the body is buffered."""
    limit = (
        MAX_CLIENT_HELLO
        if msg_type == HandshakeType.CLIENT_HELLO and expecting_client_hello
        else MAX_HANDSHAKE_MESSAGE
    )
    if length > limit:
        # RFC 8446 §6.2: a length out of range is a decode_error. Refused from the
        # header, before the body is buffered.
        name = handshake_name(msg_type)
        raise alerts.DecodeError(f"{name} of {length} bytes, over the {limit} cap")


def check_ends_its_record(msg_type: int, more_in_record: bool) -> None:
    """A message that can precede a key change is the last of its record."""
    if more_in_record and msg_type in ENDS_ITS_RECORD:
        # RFC 8446 §5.1: these messages can immediately precede a key change, so they
        # end their record; checked before the message is acted on. A ClientHello
        # answered by an HRR is no exception (BoGo PartialSecondClientHelloAfterFirst).
        name = handshake_name(msg_type)
        raise alerts.UnexpectedMessage(f"{name} does not end its record")


# --- the ClientHello ------------------------------------------------------------------


def check_client_hello(hello: ClientHello, first: ClientHello | None) -> None:
    """The version, retry, compression and mandatory-extension rules, in the order that
    decides which alert a ClientHello breaking several of them gets. ``first`` is the
    ClientHello an HRR answered, None for the first one."""
    # Appendix D.5: a legacy_version of 0x0300 (SSL 3.0) or below is refused whatever
    # supported_versions says; above it, legacy_version is ignored (§4.2.1). picotls
    # draws the line at the same place.
    if hello.legacy_version <= SSL3_VERSION:
        raise alerts.ProtocolVersion(f"ClientHello.legacy_version 0x{hello.legacy_version:04x}")
    if first is not None:
        # §4.1.2: the second ClientHello is the first one again, but for the changes
        # an HRR allows; compared before anything in it is used.
        change = retry_hello_change(first, hello)
        if change is not None:
            raise alerts.IllegalParameter(f"second ClientHello: {change}")
    # RFC 8446 §4.2.1: without supported_versions the client is TLS 1.2 or older. The
    # version is settled first: every rule below is TLS 1.3's, and a TLS 1.2 ClientHello
    # that breaks one (compression, say) is refused for its version (§4.1.2, as Go does).
    if hello.supported_versions is None or TLS13_VERSION not in hello.supported_versions:
        raise alerts.ProtocolVersion("client does not offer TLS 1.3")
    # §4.1.2: a TLS 1.3 ClientHello carries exactly one "null" compression method.
    if hello.legacy_compression_methods != b"\x00":
        raise alerts.IllegalParameter("legacy_compression_methods is not [null]")
    check_mandatory_extensions(hello)


def check_mandatory_extensions(hello: ClientHello) -> None:
    """RFC 8446 §9.2 (missing_extension) and §4.2.9, for a TLS 1.3 ClientHello."""
    if hello.pre_shared_key is None:
        # Without a PSK the server authenticates with a certificate over (EC)DHE.
        if hello.signature_algorithms is None:
            raise alerts.MissingExtension("no signature_algorithms")
        if hello.supported_groups is None:
            raise alerts.MissingExtension("no supported_groups")
    elif hello.psk_key_exchange_modes is None:
        raise alerts.MissingExtension("pre_shared_key without psk_key_exchange_modes")
    if (hello.supported_groups is None) != (hello.key_shares is None):
        raise alerts.MissingExtension("supported_groups and key_share come together")
    if hello.supported_groups is None:
        # A well-formed PSK-only (psk_ke) offer: we resume only with a fresh key exchange
        # (psk_dhe_ke, §4.2.9), so there is no mode in common (Go's answer too).
        raise alerts.HandshakeFailure("no (EC)DHE offered; psk_ke is not supported")


def check_key_shares_offered(hello: ClientHello) -> None:
    """§4.2.8: every share must be for an offered group."""
    assert hello.supported_groups is not None and hello.key_shares is not None
    offered = set(hello.supported_groups)
    for share_group, _share in hello.key_shares:
        if share_group not in offered:
            raise alerts.IllegalParameter(f"key share for unoffered group 0x{share_group:04x}")


def check_retry_key_share(hello: ClientHello, hrr_group: int) -> bytes:
    """§4.1.2: the second ClientHello's one key share is for the group the HRR asked for;
    returns that share."""
    assert hello.key_shares is not None
    # RFC 8446 §4.1.2: the rest was compared with the first ClientHello
    # (retry_hello_change); the key share is the one the server asked for.
    if len(hello.key_shares) != 1 or hello.key_shares[0][0] != hrr_group:
        raise alerts.IllegalParameter("second ClientHello lacks the requested key share")
    return hello.key_shares[0][1]


__all__ = [
    "ENDS_ITS_RECORD",
    "MAX_CLIENT_HELLO",
    "MAX_HANDSHAKE_MESSAGE",
    "SSL3_VERSION",
    "check_client_hello",
    "check_ends_its_record",
    "check_key_shares_offered",
    "check_mandatory_extensions",
    "check_message_length",
    "check_retry_key_share",
    "handshake_name",
]
