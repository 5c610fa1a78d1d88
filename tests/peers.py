"""pyOpenSSL as the independent TLS peer (cryptography's bundled OpenSSL 4.0).

Tests only: pqproxy itself never imports pyOpenSSL.
"""

from __future__ import annotations

from pathlib import Path

from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from pqproxy.tls.events import Event, HandshakeComplete
from pqproxy.tls.server import ServerConnection, resolve_inline

SUITE_NAMES = {
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
}

# OpenSSL's names for the groups pqproxy speaks.
OPENSSL_GROUP_NAMES = {
    0x11EC: "X25519MLKEM768",
    0x11EB: "SecP256r1MLKEM768",
    0x11ED: "SecP384r1MLKEM1024",
    0x001D: "X25519",
    0x0017: "P-256",
    0x0018: "P-384",
}
# What SSL_get0_group_name reports for each.
OPENSSL_REPORTED_NAMES = {
    0x11EC: "X25519MLKEM768",
    0x11EB: "SecP256r1MLKEM768",
    0x11ED: "SecP384r1MLKEM1024",
    0x001D: "x25519",
    0x0017: "secp256r1",
    0x0018: "secp384r1",
}


def client_context(
    ca: Path | None = None,
    groups: str | None = None,
    ciphersuites: str | None = None,
    sigalgs: str | None = None,
    alpn: list[bytes] | None = None,
) -> SSL.Context:
    """A TLS 1.3-only client context. ``groups`` uses OpenSSL's group-list
    syntax: "X25519MLKEM768:*X25519" offers both and sends a share only for X25519."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    if ca is not None:
        ctx.load_verify_locations(str(ca))
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    if groups is not None:
        if _lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) != 1:
            raise ValueError(f"OpenSSL rejected group list {groups!r}")
    if ciphersuites is not None:
        ctx.set_tls13_ciphersuites(ciphersuites.encode())
    if sigalgs is not None:
        if _lib.SSL_CTX_set1_sigalgs_list(ctx._context, sigalgs.encode()) != 1:
            raise ValueError(f"OpenSSL rejected sigalgs {sigalgs!r}")
    if alpn is not None:
        ctx.set_alpn_protos(alpn)
    return ctx


def memory_client(ctx: SSL.Context, server_name: bytes | None = b"localhost") -> SSL.Connection:
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    if server_name is not None:
        conn.set_tlsext_host_name(server_name)
    return conn


def pump(
    client: SSL.Connection,
    server: ServerConnection,
    client_errors: list[SSL.Error] | None = None,
    max_rounds: int = 20,
) -> list[Event]:
    """Run a handshake between a memory-BIO pyOpenSSL client and the engine.

    Returns the engine's non-crypto events; the client's own failure goes to
    ``client_errors``. Stops when both sides are done or nothing moves any
    more (bounded rounds, never a hang)."""
    events: list[Event] = []
    client_done = False
    for _ in range(max_rounds):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except SSL.WantReadError:
                pass
            except SSL.Error as error:
                if client_errors is None:
                    raise
                client_errors.append(error)
                client_done = True
        to_server = _drain_bio(client)
        if to_server:
            server.receive_data(to_server)
            events += resolve_inline(server)
        to_client = server.data_to_send()
        if to_client:
            client.bio_write(to_client)
        if client_done and any(isinstance(e, HandshakeComplete) for e in events):
            return events
        if not to_server and not to_client and (client_done or server.closed):
            return events
    return events


def _drain_bio(client: SSL.Connection) -> bytes:
    chunks = []
    while True:
        try:
            chunk = client.bio_read(65536)
        except SSL.WantReadError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def drain_bio(client: SSL.Connection) -> bytes:
    return _drain_bio(client)
