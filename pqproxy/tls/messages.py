"""Handshake messages and extensions (RFC 8446 §4): parsers for what the
client sends, encoders for what the server sends.

Parsers raise TLSAlert subclasses only. Extension bodies must be consumed
exactly. Unknown and GREASE extensions, groups and schemes are kept as plain
integers and ignored by the selection logic (RFC 8701).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..logtext import printable
from .alerts import DecodeError, IllegalParameter
from .codec import (
    Buffer,
    pull_uint16_list,
    split_extensions,
    u16,
    u24,
    uint16_list,
    vec8,
    vec16,
    vec24,
)
from .enums import ExtensionType, HandshakeType

# RFC 8446 §4.1.3: the special ServerHello.random that marks a HelloRetryRequest.
HELLO_RETRY_REQUEST_RANDOM = bytes.fromhex(
    "CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C"
)

# RFC 8446 §4.4.3: the context string and prefix of the CertificateVerify input.
_CERTIFICATE_VERIFY_PREFIX = b" " * 64 + b"TLS 1.3, server CertificateVerify\x00"
_CLIENT_CERTIFICATE_VERIFY_PREFIX = b" " * 64 + b"TLS 1.3, client CertificateVerify\x00"


@dataclass(frozen=True, repr=False)
class OfferedPsks:
    """The pre_shared_key extension of a ClientHello (RFC 8446 §4.2.11).
    ``binders_length`` is the size of the binders list with its length prefix: the
    tail that Truncate(ClientHello) removes for the binder transcript."""

    identities: tuple[tuple[bytes, int], ...]
    binders: tuple[bytes, ...]
    binders_length: int


@dataclass(frozen=True, repr=False)
class ClientHello:
    random: bytes
    legacy_session_id: bytes
    cipher_suites: tuple[int, ...]
    # Every extension as received, (type, body) in wire order: RFC 8446 §4.1.2 compares
    # the second ClientHello with the first byte for byte, not field by field.
    extensions: tuple[tuple[int, bytes], ...]
    legacy_version: int = 0x0303
    # Judged by the server once the version is known (§4.1.2): a TLS 1.2 ClientHello may
    # offer other methods and is refused for its version, not for its compression.
    legacy_compression_methods: bytes = b"\x00"
    server_name: str | None = None
    supported_versions: tuple[int, ...] | None = None
    supported_groups: tuple[int, ...] | None = None
    key_shares: tuple[tuple[int, bytes], ...] | None = None
    signature_algorithms: tuple[int, ...] | None = None
    signature_algorithms_cert: tuple[int, ...] | None = None
    alpn_protocols: tuple[bytes, ...] | None = None
    psk_key_exchange_modes: tuple[int, ...] | None = None
    cookie: bytes | None = None
    record_size_limit: int | None = None
    pre_shared_key: OfferedPsks | None = None
    early_data: bool = False

    @property
    def extension_types(self) -> tuple[int, ...]:
        return tuple(ext_type for ext_type, _ in self.extensions)

    def __repr__(self) -> str:
        return (
            f"ClientHello(sni={self.server_name!r}, suites={self.cipher_suites}, "
            f"groups={self.supported_groups}, shares={[g for g, _ in self.key_shares or ()]})"
        )


def _pull_server_name(data: bytes) -> str | None:
    # RFC 6066 §3: a list of (name_type, name); only host_name (0) is defined,
    # and at most one name of each type may appear.
    buf = Buffer(data)
    block = Buffer(buf.pull_vector(2, minimum=1))
    buf.expect_end("server_name")
    host: str | None = None
    seen: set[int] = set()
    while not block.eof():
        name_type = block.pull_uint8()
        name = block.pull_vector(2, minimum=1)
        if name_type in seen:
            raise IllegalParameter("duplicate server_name type")
        seen.add(name_type)
        if name_type == 0:
            if not is_dns_host_name(name):
                # The name goes into a log line: escaped, and cut short.
                shown = printable(name[:64]) + ("..." if len(name) > 64 else "")
                raise IllegalParameter(f"server_name {shown} is not a DNS host name")
            host = name.decode("ascii").lower()
    return host


# RFC 6066 §3: HostName is "the fully qualified DNS hostname of the server", in ASCII,
# without a trailing dot, and never a literal IPv4 or IPv6 address. Labels are LDH (RFC 1123
# §2.1: letters, digits, hyphens, no hyphen at either end, 1..63 octets) and a name is at
# most 253 octets (255 on the wire, RFC 1035 §2.3.4). Underscores are accepted as rustls
# (pki-types DnsName) and Go accept them: real names (_acme-challenge, SRV-style service
# names, some intranet hosts) carry them. An all-numeric last label is refused as rustls
# does: no top-level domain is all digits (RFC 3696 §2), and this is what catches every
# IPv4 literal, including the short forms inet_aton reads ("127.1"); IPv6 literals fail on
# ':' and brackets.
_MAX_HOST_NAME = 253
_LABEL = re.compile(rb"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_ALL_DIGITS = re.compile(rb"[0-9]+")


def is_dns_host_name(name: bytes) -> bool:
    """Whether ``name`` is a HostName RFC 6066 §3 allows in server_name."""
    if not 0 < len(name) <= _MAX_HOST_NAME:
        return False
    labels = name.split(b".")
    if _ALL_DIGITS.fullmatch(labels[-1]):
        return False
    return all(_LABEL.fullmatch(label) for label in labels)


def _pull_key_shares(data: bytes) -> tuple[tuple[int, bytes], ...]:
    buf = Buffer(data)
    block = Buffer(buf.pull_vector(2))
    buf.expect_end("key_share")
    shares: list[tuple[int, bytes]] = []
    groups: set[int] = set()
    while not block.eof():
        group = block.pull_uint16()
        share = block.pull_vector(2, minimum=1)
        # RFC 8446 §4.2.8: clients MUST NOT offer two shares for one group.
        if group in groups:
            raise IllegalParameter(f"two key shares for group 0x{group:04x}")
        groups.add(group)
        shares.append((group, share))
    return tuple(shares)


def _pull_alpn(data: bytes) -> tuple[bytes, ...]:
    buf = Buffer(data)
    names = buf.pull_list(2, lambda b: b.pull_vector(1, minimum=1), minimum=2)
    buf.expect_end("application_layer_protocol_negotiation")
    return tuple(names)


def _inner_vector(data: bytes, length_size: int, what: str, minimum: int = 0) -> bytes:
    buf = Buffer(data)
    inner = buf.pull_vector(length_size, minimum)
    buf.expect_end(what)
    return inner


def pull_client_hello(body: bytes) -> ClientHello:
    """Parse a ClientHello body (without the 4-byte handshake header)."""
    buf = Buffer(body)
    # legacy_version: RFC 8446 §4.2.1 says supported_versions decides; the server still
    # refuses SSL 3.0 and below (Appendix D.5).
    legacy_version = buf.pull_uint16()
    random = buf.pull_bytes(32)
    session_id = buf.pull_vector(1, maximum=32)
    suites = pull_uint16_list(buf.pull_vector(2, minimum=2), "cipher_suites")
    compression = buf.pull_vector(1, minimum=1)
    fields: dict[str, object] = {}
    extensions: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    if not buf.eof():
        ext_block = buf.pull_vector(2)
        buf.expect_end("ClientHello")
        extensions = split_extensions(ext_block)
        for ext_type, ext_data in extensions:
            # RFC 8446 §4.2: no extension type may appear twice.
            if ext_type in seen:
                raise IllegalParameter(f"duplicate extension {ext_type}")
            # RFC 8446 §4.2.11: pre_shared_key MUST be the last extension.
            if _PRE_SHARED_KEY in seen:
                raise IllegalParameter("pre_shared_key is not the last extension")
            seen.add(ext_type)
            parser = _EXTENSION_PARSERS.get(ext_type)
            if parser is not None:
                fields[parser[0]] = parser[1](ext_data)
    return ClientHello(
        random=random,
        legacy_session_id=session_id,
        cipher_suites=suites,
        extensions=tuple(extensions),
        legacy_version=legacy_version,
        legacy_compression_methods=compression,
        **fields,  # type: ignore[arg-type]
    )


def _pull_psk_identity(buf: Buffer) -> tuple[bytes, int]:
    identity = buf.pull_vector(2, minimum=1)
    age = (buf.pull_uint16() << 16) | buf.pull_uint16()
    return identity, age


def _pull_offered_psks(data: bytes) -> OfferedPsks:
    buf = Buffer(data)
    identities = buf.pull_list(2, _pull_psk_identity, minimum=7)
    binders_start = len(data) - buf.remaining
    binders = buf.pull_list(2, lambda b: b.pull_vector(1, minimum=32), minimum=33)
    buf.expect_end("pre_shared_key")
    # §4.2.11: one binder per identity.
    if len(identities) != len(binders):
        raise IllegalParameter(f"{len(identities)} PSK identities but {len(binders)} binders")
    return OfferedPsks(tuple(identities), tuple(binders), len(data) - binders_start)


def _pull_record_size_limit(data: bytes) -> int:
    buf = Buffer(data)
    limit = buf.pull_uint16()
    buf.expect_end("record_size_limit")
    # RFC 8449 §4: a value below 64 is an illegal_parameter.
    if limit < 64:
        raise IllegalParameter(f"record_size_limit {limit} < 64")
    return limit


def _pull_early_data(data: bytes) -> bool:
    if data:
        raise DecodeError("early_data in ClientHello must be empty")
    return True


def _uint16s(what: str, length_size: int = 2) -> Callable[[bytes], tuple[int, ...]]:
    def pull(data: bytes) -> tuple[int, ...]:
        return pull_uint16_list(_inner_vector(data, length_size, what, minimum=2), what)

    return pull


# Extension type -> (ClientHello field, parser). A dict lookup per extension
# keeps the ClientHello walk cheap; anything not listed (padding, GREASE,
# unknown) is ignored (RFC 8446 §4.2, RFC 8701).
_EXTENSION_PARSERS: dict[int, tuple[str, Callable[[bytes], object]]] = {
    ExtensionType.SERVER_NAME: ("server_name", _pull_server_name),
    ExtensionType.SUPPORTED_VERSIONS: ("supported_versions", _uint16s("supported_versions", 1)),
    ExtensionType.SUPPORTED_GROUPS: ("supported_groups", _uint16s("supported_groups")),
    ExtensionType.KEY_SHARE: ("key_shares", _pull_key_shares),
    ExtensionType.SIGNATURE_ALGORITHMS: ("signature_algorithms", _uint16s("signature_algorithms")),
    ExtensionType.SIGNATURE_ALGORITHMS_CERT: (
        "signature_algorithms_cert",
        _uint16s("signature_algorithms_cert"),
    ),
    ExtensionType.ALPN: ("alpn_protocols", _pull_alpn),
    ExtensionType.PSK_KEY_EXCHANGE_MODES: (
        "psk_key_exchange_modes",
        lambda data: tuple(_inner_vector(data, 1, "psk_key_exchange_modes", minimum=1)),
    ),
    ExtensionType.COOKIE: ("cookie", lambda data: _inner_vector(data, 2, "cookie", minimum=1)),
    ExtensionType.RECORD_SIZE_LIMIT: ("record_size_limit", _pull_record_size_limit),
    ExtensionType.PRE_SHARED_KEY: ("pre_shared_key", _pull_offered_psks),
    ExtensionType.EARLY_DATA: ("early_data", _pull_early_data),
}
_EXTENSION_PARSERS = {int(k): v for k, v in _EXTENSION_PARSERS.items()}
_PRE_SHARED_KEY = int(ExtensionType.PRE_SHARED_KEY)
_KEY_SHARE = int(ExtensionType.KEY_SHARE)
_PADDING = int(ExtensionType.PADDING)
_EARLY_DATA = int(ExtensionType.EARLY_DATA)


def retry_hello_change(first: ClientHello, second: ClientHello) -> str | None:
    """What ``second`` (the ClientHello after our HelloRetryRequest) changed of ``first``
    beyond what RFC 8446 §4.1.2 allows, or None.

    The client must send "the same ClientHello without modification", except: key_share
    holds the one share the HRR asked for (checked by the caller), early_data is removed,
    a cookie is added if the HRR carried one (ours never does, so a cookie is an added
    extension), pre_shared_key has new ages and binders and may drop PSKs, and padding
    may come, go or change length. Everything else is compared as received, bytes and
    extension order, so that nothing the server chose from the first ClientHello (name,
    ALPN, certificate, suite, group) can be swapped under it.
    """
    for field_name in (
        "legacy_version",
        "random",
        "legacy_session_id",
        "cipher_suites",
        "legacy_compression_methods",
    ):
        if getattr(first, field_name) != getattr(second, field_name):
            return f"{field_name} changed"
    if second.early_data:
        return "early_data after HelloRetryRequest"  # §4.2.10
    before = [ext for ext in first.extensions if ext[0] not in (_PADDING, _EARLY_DATA)]
    after = [ext for ext in second.extensions if ext[0] != _PADDING]
    # pre_shared_key is the last extension of both (§4.2.11, checked by the parser).
    offered_before = first.pre_shared_key
    if before and before[-1][0] == _PRE_SHARED_KEY:
        before.pop()
    if after and after[-1][0] == _PRE_SHARED_KEY:
        after.pop()
        offered_after = second.pre_shared_key
        assert offered_after is not None
        if offered_before is None:
            return "pre_shared_key added"
        if not _is_subsequence(
            [identity for identity, _ in offered_after.identities],
            [identity for identity, _ in offered_before.identities],
        ):
            return "pre_shared_key identities changed"
    if [ext_type for ext_type, _ in before] != [ext_type for ext_type, _ in after]:
        return "extensions added, removed or reordered"
    for (ext_type, data_before), (_, data_after) in zip(before, after, strict=True):
        if ext_type != _KEY_SHARE and data_before != data_after:
            return f"extension {_extension_name(ext_type)} changed"
    return None


def _extension_name(ext_type: int) -> str:
    try:
        return ExtensionType(ext_type).name.lower()
    except ValueError:
        return str(ext_type)


def _is_subsequence(items: list[bytes], of: list[bytes]) -> bool:
    remaining = iter(of)
    return all(any(item == candidate for candidate in remaining) for item in items)


# --- encoders -----------------------------------------------------------------


def handshake_message(msg_type: int, body: bytes) -> bytes:
    return bytes((msg_type,)) + u24(len(body)) + body


def extension(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + vec16(data)


def encode_server_hello(
    random: bytes,
    session_id: bytes,
    cipher_suite: int,
    group: int,
    server_share: bytes | None,
    selected_psk: int | None = None,
) -> bytes:
    """ServerHello, or a HelloRetryRequest when ``server_share`` is None (RFC 8446 §4.1.3-4)."""
    if server_share is None:
        key_share = extension(ExtensionType.KEY_SHARE, u16(group))
    else:
        key_share = extension(ExtensionType.KEY_SHARE, u16(group) + vec16(server_share))
    if selected_psk is not None:
        key_share += extension(ExtensionType.PRE_SHARED_KEY, u16(selected_psk))
    extensions = key_share + extension(ExtensionType.SUPPORTED_VERSIONS, b"\x03\x04")
    body = b"".join(
        (b"\x03\x03", random, vec8(session_id), u16(cipher_suite), b"\x00", vec16(extensions))
    )
    return handshake_message(HandshakeType.SERVER_HELLO, body)


def encode_encrypted_extensions(
    advertised_groups: tuple[int, ...] | None,
    record_size_limit: int | None,
    acknowledge_server_name: bool,
    alpn_protocol: bytes | None,
) -> bytes:
    parts: list[bytes] = []
    if advertised_groups:
        parts.append(
            extension(ExtensionType.SUPPORTED_GROUPS, vec16(uint16_list(advertised_groups)))
        )
    if record_size_limit is not None:
        parts.append(extension(ExtensionType.RECORD_SIZE_LIMIT, u16(record_size_limit)))
    if acknowledge_server_name:
        # RFC 6066 §3: the server's server_name extension is empty.
        parts.append(extension(ExtensionType.SERVER_NAME, b""))
    if alpn_protocol is not None:
        parts.append(extension(ExtensionType.ALPN, vec16(vec8(alpn_protocol))))
    return handshake_message(HandshakeType.ENCRYPTED_EXTENSIONS, vec16(b"".join(parts)))


def encode_certificate(chain: tuple[bytes, ...], request_context: bytes = b"") -> bytes:
    entries = b"".join(vec24(cert) + b"\x00\x00" for cert in chain)
    return handshake_message(HandshakeType.CERTIFICATE, vec8(request_context) + vec24(entries))


def certificate_verify_input(transcript_hash: bytes) -> bytes:
    return _CERTIFICATE_VERIFY_PREFIX + transcript_hash


def client_certificate_verify_input(transcript_hash: bytes) -> bytes:
    return _CLIENT_CERTIFICATE_VERIFY_PREFIX + transcript_hash


def encode_certificate_request(signature_schemes: tuple[int, ...]) -> bytes:
    """An empty request context (§4.3.2: only post-handshake requests carry one) and the
    signature_algorithms extension the client must sign with."""
    extensions = extension(
        ExtensionType.SIGNATURE_ALGORITHMS, vec16(uint16_list(signature_schemes))
    )
    return handshake_message(HandshakeType.CERTIFICATE_REQUEST, b"\x00" + vec16(extensions))


def pull_certificate(body: bytes) -> tuple[bytes, tuple[bytes, ...]]:
    """(request_context, certificate chain as DER, leaf first); entry extensions ignored."""
    buf = Buffer(body)
    context = buf.pull_vector(1)
    entries = Buffer(buf.pull_vector(3))
    buf.expect_end("Certificate")
    chain: list[bytes] = []
    while not entries.eof():
        chain.append(entries.pull_vector(3, minimum=1))
        entries.pull_vector(2)
    return context, tuple(chain)


def pull_certificate_verify(body: bytes) -> tuple[int, bytes]:
    buf = Buffer(body)
    scheme = buf.pull_uint16()
    signature = buf.pull_vector(2, minimum=1)
    buf.expect_end("CertificateVerify")
    return scheme, signature


def encode_new_session_ticket(lifetime: int, age_add: int, nonce: bytes, ticket: bytes) -> bytes:
    body = b"".join(
        (lifetime.to_bytes(4, "big"), age_add.to_bytes(4, "big"), vec8(nonce), vec16(ticket))
    )
    return handshake_message(HandshakeType.NEW_SESSION_TICKET, body + b"\x00\x00")


def encode_certificate_verify(scheme: int, signature: bytes) -> bytes:
    return handshake_message(HandshakeType.CERTIFICATE_VERIFY, u16(scheme) + vec16(signature))


def encode_finished(verify_data: bytes) -> bytes:
    return handshake_message(HandshakeType.FINISHED, verify_data)


def encode_key_update(update_requested: bool) -> bytes:
    return handshake_message(HandshakeType.KEY_UPDATE, b"\x01" if update_requested else b"\x00")
