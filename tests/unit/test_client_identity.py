"""The client certificate's identity on its way upstream (pqproxy/relay/identity.py): header
values that are safe whatever the certificate says and still name the same DN, the identity
headers a client sends always removed, the allow list's matching rules; and a tcp listener
closing on a client that is not on its allow list before the upstream is dialled."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import h11
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from pqproxy.config import parse_config
from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.provider import PeerIdentity
from pqproxy.devcert import DevCertPaths
from pqproxy.io.supervisor import build_runtime
from pqproxy.io.tls_server import CloseKind, ConnectionClosed, TLSListener
from pqproxy.relay.forwarding import ClientTLSInfo, ForwardingOptions, upstream_request_headers
from pqproxy.relay.identity import (
    IdentityHeaders,
    describe_identity,
    escape_dn,
    identity_allowed,
    identity_label,
)
from pqproxy.tls.enums import CipherSuite, NamedGroup, SignatureScheme
from pqproxy.tls.events import HandshakeComplete
from tests.certs_factory import SPIFFE_CLIENT, bundle_pem, make_ca, make_client
from tests.mtls_peers import exchange, tls_context

IDENTITY = PeerIdentity(
    subject="CN=client,O=pqproxy tests",
    dns_names=("worker.example", "worker2.example"),
    uris=(SPIFFE_CLIENT, "spiffe://example.org/ns/default/sa/other"),
)


def _tls(identity: PeerIdentity | None) -> ClientTLSInfo:
    return ClientTLSInfo(
        "X25519MLKEM768", "TLS_AES_128_GCM_SHA256", False, "mldsa65", None, None, identity
    )


def forward(
    headers: list[tuple[bytes, bytes]],
    identity: PeerIdentity | None,
    names: IdentityHeaders = IdentityHeaders(),  # noqa: B008 - frozen
) -> list[tuple[bytes, bytes]]:
    out = upstream_request_headers(
        [(b"host", b"api.example"), *headers],
        client_ip="10.0.0.1",
        host=b"api.example",
        tls=_tls(identity),
        options=ForwardingOptions(identity_headers=names),
    )
    # h11 refuses an illegal field value on send: everything here must go through it.
    h11.Connection(h11.CLIENT).send(h11.Request(method="GET", target="/", headers=out))
    return out


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def test_identity_reaches_the_upstream_in_the_three_headers() -> None:
    out = forward([], IDENTITY)
    assert values(out, b"x-client-subject") == [b"CN=client,O=pqproxy tests"]
    assert values(out, b"x-client-uri") == [
        b"spiffe://example.org/ns/default/sa/client, spiffe://example.org/ns/default/sa/other"
    ]
    assert values(out, b"x-client-dns") == [b"worker.example, worker2.example"]


@pytest.mark.parametrize("identity", [IDENTITY, None], ids=["with-identity", "without"])
def test_forged_identity_headers_are_always_removed(identity: PeerIdentity | None) -> None:
    forged = [
        (b"X-Client-URI", b"spiffe://forged"),
        (b"x-client-uri", b"spiffe://forged-again"),
        (b"X-CLIENT-SUBJECT", b"CN=admin"),
        (b"x-client-dns", b"admin.internal"),
        # Naming our header in Connection must not make the proxy drop its own.
        (b"connection", b"x-client-uri"),
    ]
    out = forward(forged, identity)
    assert not any(b"forged" in v or b"admin" in v for _, v in out)
    if identity is None:
        assert not [n for n, _ in out if n.startswith(b"x-client-")]
    else:
        assert len(values(out, b"x-client-uri")) == 1


def test_configured_names_replace_the_defaults_and_null_sends_nothing() -> None:
    names = IdentityHeaders(subject=None, uris="X-Spiffe-Id", dns="X-Client-DNS")
    forged = [(b"x-spiffe-id", b"spiffe://forged"), (b"x-client-subject", b"CN=kept")]
    out = forward(forged, IDENTITY, names)
    assert values(out, b"x-spiffe-id")[0].startswith(b"spiffe://example.org/")
    # The subject header is not ours under this configuration: passed on as the client sent
    # it (the upstream was told to trust X-Spiffe-Id, not this one).
    assert values(out, b"x-client-subject") == [b"CN=kept"]
    assert b"x-client-uri" not in [n for n, _ in out]


def _hostile_name() -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ACME, Inc."),
            x509.NameAttribute(NameOID.COMMON_NAME, " café\r\nX-Admin: 1\x00 \x7f "),
        ]
    )


def test_a_hostile_subject_is_escaped_and_still_names_the_same_dn() -> None:
    name = _hostile_name()
    identity = PeerIdentity(subject=name.rfc4514_string())
    (value,) = values(forward([], identity), b"x-client-subject")
    assert all(0x20 <= b < 0x7F for b in value), value
    assert not value.startswith(b" ") and not value.endswith(b" ")
    assert b"\r" not in value and b"\n" not in value
    # RFC 4514 §2.4 escapes (\0d, \c3\a9): a parser reads back the DN the certificate holds.
    assert x509.Name.from_rfc4514_string(value.decode("ascii")) == name


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("CN=a", b"CN=a"),
        ("CN=caf\u00e9", b"CN=caf\\c3\\a9"),
        ("CN=a\\ ", b"CN=a\\20"),  # already-escaped trailing space: only the space changes
        ("CN=a\\\\ ", b"CN=a\\\\\\20"),  # an escaped backslash, then a bare space
        (" CN=a", b"\\20CN=a"),
        ("CN=\x00", b"CN=\\00"),
    ],
)
def test_escape_dn(subject: str, expected: bytes) -> None:
    assert escape_dn(subject) == expected


def test_uris_with_commas_or_spaces_are_percent_encoded() -> None:
    identity = PeerIdentity(subject="CN=x", uris=("spiffe://a/b,c", "urn:x y\r\n"))
    (value,) = values(forward([], identity), b"x-client-uri")
    assert value == b"spiffe://a/b%2Cc, urn:x%20y%0D%0A"


def test_log_forms_are_printable() -> None:
    identity = PeerIdentity(subject=_hostile_name().rfc4514_string(), uris=("urn:a b",))
    assert identity_label(identity) == "urn:a%20b"
    assert identity_label(PeerIdentity(subject="CN=a b")) == "CN=a%20b"
    assert identity_label(None) == "-"
    described = describe_identity(identity)
    assert described.isprintable() and "\r" not in described
    assert describe_identity(None) == "no client certificate"


@pytest.mark.parametrize(
    ("allow", "allowed"),
    [
        ({SPIFFE_CLIENT}, True),
        ({"spiffe://example.org/ns/default/sa/other"}, True),  # any of its URIs
        ({"WORKER.example"}, True),  # DNS names compare case-insensitively
        ({"CN=client,O=pqproxy tests"}, True),  # the RFC 4514 subject, exactly
        ({"cn=client,o=pqproxy tests"}, False),
        ({"spiffe://example.org/ns/default/sa"}, False),  # no prefix matching
        ({"SPIFFE://example.org/ns/default/sa/client"}, False),  # URIs exactly
        ({"client"}, False),  # the CN alone is not the subject
        (set(), False),
    ],
)
def test_allow_list_matching(allow: set[str], allowed: bool) -> None:
    assert identity_allowed(IDENTITY, frozenset(allow)) is allowed


def test_no_certificate_is_never_on_an_allow_list() -> None:
    assert identity_allowed(None, frozenset({"CN=client,O=pqproxy tests"})) is False


def test_tls_info_from_a_resumed_handshake_carries_the_identity() -> None:
    event = HandshakeComplete(
        group=NamedGroup.X25519MLKEM768,
        cipher_suite=CipherSuite.TLS_AES_128_GCM_SHA256,
        signature_scheme=SignatureScheme.mldsa65,
        alpn_protocol=None,
        server_name=None,
        hello_retry=False,
        resumed=False,
        peer_identity=IDENTITY,
    )
    assert ClientTLSInfo.from_handshake(event).identity == IDENTITY
    assert ClientTLSInfo.from_handshake(event).signature == "mldsa65"


# --- a tcp listener and its allow list, over real sockets --------------------------------------


@pytest.mark.asyncio
async def test_tcp_listener_closes_on_a_client_not_on_its_allow_list(
    tmp_path: Path, dev_certs: DevCertPaths
) -> None:
    connected: list[int] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.append(1)
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    upstream_port = server.sockets[0].getsockname()[1]
    client_ca = make_ca("ecdsa-p256")
    (tmp_path / "clients.pem").write_bytes(bundle_pem(client_ca))
    data: dict[str, Any] = {
        "admin": None,
        "listeners": [
            {
                "name": "raw",
                "listen": "127.0.0.1:0",
                "mode": "tcp",
                "upstream": "m",
                "tls": {
                    "certificates": [{"cert": str(dev_certs.cert), "key": str(dev_certs.key)}],
                    "client_auth": {
                        "mode": "require",
                        "ca": "clients.pem",
                        "allow": [SPIFFE_CLIENT],
                    },
                },
            }
        ],
        "upstreams": {
            "m": {"servers": [f"http://127.0.0.1:{upstream_port}"], "health_check": None}
        },
    }
    runtime = build_runtime(parse_config(data, tmp_path), OpenSSLProvider())
    closed: asyncio.Queue[ConnectionClosed] = asyncio.Queue()
    listener = TLSListener(runtime.listeners[0], on_terminated=closed.put_nowait)
    await listener.start()
    try:
        admitted = make_client(client_ca, "ecdsa-p256", uris=(SPIFFE_CLIENT,))
        refused = make_client(client_ca, "ecdsa-p256", uris=("spiffe://example.org/x",))
        for client, expect_echo in ((refused, False), (admitted, True)):
            ctx = tls_context(dev_certs.ca, tmp_path, client)
            done = await asyncio.to_thread(exchange, listener.port, ctx, b"ping")
            assert done.error is None
            assert done.response == (b"ping" if expect_echo else b"")
            end = await asyncio.wait_for(closed.get(), 10)
            if not expect_echo:
                assert end.kind is CloseKind.FORBIDDEN and end.handshake_complete
                assert "spiffe://example.org/x" in end.reason
                # The upstream was never dialled.
                assert connected == []
        assert connected == [1]
    finally:
        await listener.close(grace=1.0)
        server.close()
        await server.wait_closed()
