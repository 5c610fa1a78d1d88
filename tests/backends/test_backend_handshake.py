"""A whole TLS 1.3 handshake on each backend: the engine with the backend's
provider against pyOpenSSL (cryptography's OpenSSL) through memory BIOs, for
every hybrid group, then application data both ways. The Finished messages
only verify if both sides derived the same secrets, so a completed handshake
proves the backend's shares and secrets interoperate with OpenSSL's."""

from __future__ import annotations

import os
from typing import Any

import pytest

from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.provider import CryptoProvider
from pqproxy.tls.events import ApplicationData, HandshakeComplete
from pqproxy.tls.server import ServerConfig, ServerConnection, resolve_inline
from tests.conftest import DevCertFactory
from tests.peers import (
    OPENSSL_GROUP_NAMES,
    OPENSSL_REPORTED_NAMES,
    client_context,
    drain_bio,
    memory_client,
    pump,
)

HYBRIDS = [0x11EC, 0x11EB, 0x11ED]


@pytest.mark.parametrize("group", HYBRIDS, ids=OPENSSL_REPORTED_NAMES.get)
def test_hybrid_handshake_with_openssl(
    backend: Any, provider: CryptoProvider, dev_certs_factory: DevCertFactory, group: int
) -> None:
    if group not in provider.groups:
        pytest.skip(f"{provider.name} does not offer group {group:#06x}")
    # A backend that supplies ML-KEM does the ML-KEM half itself, not a fallback.
    kems = getattr(backend, "kems", None)
    if kems is not None and kems():
        assert backend.NAME in provider.groups[group].backend.split("+")
    certs = dev_certs_factory("ecdsa-p256")
    config = ServerConfig(certificates=(load_certified_key(certs.cert, certs.key),))
    server = ServerConnection(config, provider, os.urandom)
    client = memory_client(client_context(certs.ca, groups=OPENSSL_GROUP_NAMES[group]))

    done = [e for e in pump(client, server) if isinstance(e, HandshakeComplete)]
    assert len(done) == 1
    assert done[0].group == group and done[0].hello_retry is False
    assert client.get_group_name() == OPENSSL_REPORTED_NAMES[group]

    client.sendall(b"ping")
    server.receive_data(drain_bio(client))
    received = [e.data for e in resolve_inline(server) if isinstance(e, ApplicationData)]
    assert b"".join(received) == b"ping"
    server.send_data(b"pong")
    client.bio_write(server.data_to_send())
    assert client.recv(16) == b"pong"
