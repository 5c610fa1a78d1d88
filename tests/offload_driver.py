"""Handshakes between pyOpenSSL memory-BIO clients and the engine, with the engine's crypto
requests answered by an ``Offloader`` on the running event loop: what
``_ClientConnection._resolve_crypto`` does in the listener, without sockets.

Inline offloaders are answered synchronously (``run_inline_*``), the others through
``submit_*`` callbacks; a handshake waiting for its crypto awaits an event that the callback
sets, so many handshakes are in flight at once and the offloader sees them concurrently.
Every handshake is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL

from pqproxy.crypto.offload import Offloader
from pqproxy.tls.events import (
    ConnectionTerminated,
    Event,
    HandshakeComplete,
    KeyExchangeNeeded,
    SignatureNeeded,
)
from pqproxy.tls.server import ServerConfig, ServerConnection
from tests.peers import client_context, drain_bio, memory_client

HANDSHAKE_DEADLINE = 20.0


@dataclass
class Outcome:
    complete: HandshakeComplete | None = None
    terminated: ConnectionTerminated | None = None
    client_error: SSL.Error | None = None
    client_group: str | None = None
    events: list[Event] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.complete is not None and self.client_error is None


class _Pending:
    """The crypto request a handshake is waiting for."""

    def __init__(self) -> None:
        self.count = 0
        self.answered = asyncio.Event()


@dataclass
class Concurrency:
    """The most offloaded requests seen in flight at once (sampled at each submission)."""

    max_in_flight: int = 0

    def sample(self, offloader: Offloader) -> None:
        self.max_in_flight = max(self.max_in_flight, offloader.in_flight)


def _resolve(
    event: Event,
    server: ServerConnection,
    offloader: Offloader,
    pending: _Pending,
    concurrency: Concurrency,
) -> bool:
    """Answer one crypto request; True if it was one."""
    if isinstance(event, KeyExchangeNeeded):
        if offloader.inline:
            try:
                share, secret = offloader.run_inline_key_exchange(
                    event.group, event.exchange, event.client_share
                )
            except Exception as exc:
                server.fail_key_exchange(exc)
            else:
                server.complete_key_exchange(share, secret)
            return True

        def kx_done(result: Any) -> None:
            if isinstance(result, BaseException):
                server.fail_key_exchange(result)
            else:
                server.complete_key_exchange(*result)
            pending.count -= 1
            pending.answered.set()

        pending.count += 1
        offloader.submit_key_exchange(event.group, event.exchange, event.client_share, kx_done)
        concurrency.sample(offloader)
        return True
    if isinstance(event, SignatureNeeded):
        if offloader.inline:
            try:
                signature = offloader.run_inline_signature(
                    event.signer, event.scheme, event.message
                )
            except Exception as exc:
                server.fail_signature(exc)
            else:
                server.complete_signature(signature)
            return True

        def sig_done(result: Any) -> None:
            if isinstance(result, BaseException):
                server.fail_signature(result)
            else:
                server.complete_signature(result)
            pending.count -= 1
            pending.answered.set()

        pending.count += 1
        offloader.submit_signature(event.signer, event.scheme, event.message, sig_done)
        concurrency.sample(offloader)
        return True
    return False


async def offloaded_handshake(
    server: ServerConnection,
    client: SSL.Connection,
    offloader: Offloader,
    concurrency: Concurrency | None = None,
) -> Outcome:
    outcome = Outcome()
    pending = _Pending()
    concurrency = concurrency or Concurrency()
    client_done = False
    async with asyncio.timeout(HANDSHAKE_DEADLINE):
        while True:
            if not client_done:
                try:
                    client.do_handshake()
                    client_done = True
                    outcome.client_group = client.get_group_name()
                except SSL.WantReadError:
                    pass
                except SSL.Error as error:
                    outcome.client_error = error
                    client_done = True
            to_server = drain_bio(client)
            if to_server:
                server.receive_data(to_server)
            # Drain the engine: answering a request can produce the next one (the key
            # exchange's answer asks for the signature), so loop until it has nothing.
            while (event := server.next_event()) is not None:
                if _resolve(event, server, offloader, pending, concurrency):
                    continue
                outcome.events.append(event)
                if isinstance(event, HandshakeComplete):
                    outcome.complete = event
                elif isinstance(event, ConnectionTerminated):
                    outcome.terminated = event
            to_client = server.data_to_send()
            if to_client:
                client.bio_write(to_client)
            if client_done and (outcome.complete is not None or server.closed):
                return outcome
            if pending.count:
                pending.answered.clear()
                await pending.answered.wait()
                continue
            if not to_server and not to_client:
                if client_done or server.closed:
                    return outcome
            # Let the other handshakes take their turn: that is what puts many requests in
            # the offloader at once.
            await asyncio.sleep(0)


@dataclass
class Batch:
    outcomes: list[Outcome]
    max_in_flight: int


async def run_handshakes(
    offloader: Offloader,
    config: ServerConfig,
    provider: Any,
    ca: Any,
    count: int,
    groups: str = "X25519MLKEM768",
) -> Batch:
    """``count`` concurrent handshakes, each with its own client."""
    concurrency = Concurrency()

    async def one() -> Outcome:
        server = ServerConnection(config, provider, os.urandom)
        client = memory_client(client_context(ca, groups=groups))
        return await offloaded_handshake(server, client, offloader, concurrency)

    outcomes = await asyncio.gather(*(one() for _ in range(count)))
    return Batch(list(outcomes), concurrency.max_in_flight)
