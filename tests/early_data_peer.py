"""An OpenSSL client that holds a 0-RTT ticket: the ticket comes from another OpenSSL server
(pyOpenSSL, max_early_data set) for the same name, as from the server pqproxy replaced or a
neighbour behind the same load balancer. pqproxy cannot open it, so it must reject the
early data (RFC 8446 §4.2.10) and still complete a 1-RTT handshake.

pyOpenSSL has no early-data API; the two calls it lacks go through ``OpenSSL._util.lib``.
"""

from __future__ import annotations

from pathlib import Path

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from tests.peers import client_context, drain_bio

# What the other server lets a client send before its Finished (one full record).
OTHER_SERVER_MAX_EARLY_DATA = 16384


def early_data_client_context(ca: Path, groups: str | None = None) -> SSL.Context:
    ctx = client_context(ca, groups=groups)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    return ctx


def ticket_from_other_server(
    ctx: SSL.Context, cert: Path, key: Path, server_name: bytes = b"localhost"
) -> SSL.Session:
    """A session ticket allowing 0-RTT, from an OpenSSL server (memory BIOs) for ``server_name``."""
    server_ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    server_ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    server_ctx.use_certificate_chain_file(str(cert))
    server_ctx.use_privatekey_file(str(key))
    if _lib.SSL_CTX_set_max_early_data(server_ctx._context, OTHER_SERVER_MAX_EARLY_DATA) != 1:
        raise RuntimeError("SSL_CTX_set_max_early_data failed")
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(ctx, None)
    client.set_connect_state()
    client.set_tlsext_host_name(server_name)
    done = {id(client): False, id(server): False}
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
                done[id(side)] = True
            except SSL.WantReadError:
                pass
        to_server = drain_bio(client)
        if to_server:
            server.bio_write(to_server)
        to_client = drain_bio(server)
        if to_client:
            client.bio_write(to_client)
        if all(done.values()) and not to_server and not to_client:
            break
    else:
        raise RuntimeError("handshake with the other server did not finish")
    # The tickets follow the server's handshake; the client takes them in when it reads.
    server.sendall(b"ticket")
    client.bio_write(drain_bio(server))
    if client.recv(100) != b"ticket":
        raise RuntimeError("no application data from the other server")
    session = client.get_session()
    if session is None:
        raise RuntimeError("the other server issued no ticket")
    if _lib.SSL_SESSION_get_max_early_data(session._session) == 0:
        raise RuntimeError("the other server's ticket does not allow early data")
    client.shutdown()
    return session


def write_early_data(conn: SSL.Connection, data: bytes) -> int:
    """SSL_write_early_data: starts the handshake (ClientHello with early_data and the PSK)
    and sends ``data`` as 0-RTT application data. Returns the bytes written."""
    written = _ffi.new("size_t *")
    if _lib.SSL_write_early_data(conn._ssl, data, len(data), written) != 1:
        code = _lib.SSL_get_error(conn._ssl, 0)
        raise RuntimeError(f"SSL_write_early_data failed (SSL_get_error {code})")
    return int(written[0])
