"""Mutual TLS against pyOpenSSL clients with certificates (ML-DSA, ECDSA, Ed25519,
RSA-PSS): CertificateRequest, the client's chain and CertificateVerify, each
failure's alert, and the identity carried into resumed sessions."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.client_auth import X509ClientVerifier
from pqproxy.crypto.provider import CertifiedKey
from pqproxy.crypto.tickets import RotatingTicketKeys
from pqproxy.tls.enums import AlertDescription
from pqproxy.tls.events import ConnectionTerminated, Event, HandshakeComplete
from pqproxy.tls.server import ClientAuth, ServerConfig, ServerConnection
from tests.certs_factory import SPIFFE_CLIENT, bundle_pem, make_ca, make_client
from tests.peers import client_context, memory_client, pump

PROVIDER = OpenSSLProvider()


@pytest.fixture(scope="module")
def certified(dev_certs: Any) -> CertifiedKey:
    return load_certified_key(dev_certs.cert, dev_certs.key)


def _server(
    certified: CertifiedKey, ca_pem: bytes, mode: ClientAuth, tickets: Any = None
) -> ServerConnection:
    config = ServerConfig(
        certificates=(certified,),
        client_auth=mode,
        client_verifier=X509ClientVerifier(ca_pem),
        tickets=tickets,
    )
    return ServerConnection(config, PROVIDER, os.urandom, clock=time.time)


def _context(dev_certs: Any, tmp_path: Path, issued: Any | None) -> SSL.Context:
    ctx = client_context(dev_certs.ca, groups="X25519MLKEM768")
    if issued is not None:
        chain, key = issued.write_pem_files(tmp_path, "client")
        ctx.use_certificate_chain_file(str(chain))
        ctx.use_privatekey_file(str(key))
    return ctx


def _client(dev_certs: Any, tmp_path: Path, issued: Any | None) -> SSL.Connection:
    return memory_client(_context(dev_certs, tmp_path, issued))


def _outcome(events: list[Event]) -> HandshakeComplete | ConnectionTerminated:
    for event in events:
        if isinstance(event, HandshakeComplete | ConnectionTerminated):
            return event
    raise AssertionError(f"no outcome in {events}")


@pytest.mark.parametrize("key_type", ["mldsa65", "mldsa44", "ecdsa-p256", "ed25519", "rsa2048"])
def test_client_certificate_is_verified_and_identity_reported(
    certified: CertifiedKey, dev_certs: Any, tmp_path: Path, key_type: str
) -> None:
    root = make_ca(key_type)
    client = make_client(root, key_type, uris=(SPIFFE_CLIENT,), dns_names=("worker.example",))
    server = _server(certified, bundle_pem(root), ClientAuth.REQUIRE)
    done = _outcome(pump(_client(dev_certs, tmp_path, client), server))
    assert isinstance(done, HandshakeComplete)
    assert done.peer_identity is not None
    assert done.peer_identity.uris == (SPIFFE_CLIENT,)
    assert done.peer_identity.dns_names == ("worker.example",)


@pytest.mark.parametrize(
    ("variant", "alert"),
    [
        ({"unknown_ca": True}, AlertDescription.unknown_ca),
        ({"expired": True}, AlertDescription.certificate_expired),
        ({"eku": "serverAuth"}, AlertDescription.bad_certificate),
    ],
    ids=["unknown-ca", "expired", "server-auth-only"],
)
def test_bad_client_certificates_get_their_alert(
    certified: CertifiedKey,
    dev_certs: Any,
    tmp_path: Path,
    variant: dict[str, Any],
    alert: AlertDescription,
) -> None:
    root = make_ca("mldsa65")
    client = make_client(root, "mldsa65", **variant)
    server = _server(certified, bundle_pem(root), ClientAuth.REQUIRE)
    connection = _client(dev_certs, tmp_path, client)
    end = _outcome(pump(connection, server))
    assert isinstance(end, ConnectionTerminated)
    assert (end.alert, end.sent) == (alert, True)
    # A TLS 1.3 client finishes its side first and meets the alert on its next read.
    with pytest.raises(SSL.Error, match=alert.name.replace("_", " ")):
        connection.recv(100)


def test_no_certificate_under_require_is_certificate_required(
    certified: CertifiedKey, dev_certs: Any, tmp_path: Path
) -> None:
    root = make_ca("ecdsa-p256")
    server = _server(certified, bundle_pem(root), ClientAuth.REQUIRE)
    connection = _client(dev_certs, tmp_path, None)
    end = _outcome(pump(connection, server))
    assert isinstance(end, ConnectionTerminated)
    assert end.alert == AlertDescription.certificate_required
    with pytest.raises(SSL.Error, match="certificate required"):
        connection.recv(100)


def test_no_certificate_under_optional_is_admitted_without_identity(
    certified: CertifiedKey, dev_certs: Any, tmp_path: Path
) -> None:
    root = make_ca("ecdsa-p256")
    server = _server(certified, bundle_pem(root), ClientAuth.OPTIONAL)
    done = _outcome(pump(_client(dev_certs, tmp_path, None), server))
    assert isinstance(done, HandshakeComplete) and done.peer_identity is None


def test_identity_survives_resumption(
    certified: CertifiedKey, dev_certs: Any, tmp_path: Path
) -> None:
    root = make_ca("mldsa65")
    client_cert = make_client(root, "mldsa65", uris=(SPIFFE_CLIENT,))
    tickets = RotatingTicketKeys(os.urandom(32))
    first_server = _server(certified, bundle_pem(root), ClientAuth.REQUIRE, tickets)
    ctx = _context(dev_certs, tmp_path, client_cert)
    client = memory_client(ctx)
    first = _outcome(pump(client, first_server))
    assert isinstance(first, HandshakeComplete)
    first_server.send_data(b"tickets first")
    client.bio_write(first_server.data_to_send())
    assert client.recv(100) == b"tickets first"
    session = client.get_session()
    assert session is not None
    client.shutdown()

    again = memory_client(ctx)
    again.set_session(session)
    second_server = _server(certified, bundle_pem(root), ClientAuth.REQUIRE, tickets)
    resumed = _outcome(pump(again, second_server))
    assert isinstance(resumed, HandshakeComplete)
    assert resumed.resumed is True
    assert resumed.peer_identity is not None
    assert resumed.peer_identity.uris == (SPIFFE_CLIENT,)
