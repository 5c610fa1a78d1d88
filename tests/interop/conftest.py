"""A real pqproxy listener on a real socket, in front of the real demo
upstream, for independent TLS clients (pyOpenSSL, Node.js, Chromium, stdlib ssl).

The listener runs on its own event loop in a background thread, so blocking
clients and subprocess peers can talk to it from the test thread. What the
server saw arrives on thread-safe queues; tests wait on them with timeouts.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.demo_upstream import serve_demo_upstream
from pqproxy.io.tls_server import ConnectionClosed, ListenerSettings, TLSListener
from pqproxy.tls.events import HandshakeComplete
from pqproxy.tls.server import ServerConfig
from tests.inprocess import LoopThread

WAIT = 20.0


@dataclass
class RunningProxy:
    port: int
    handshakes: queue.Queue[HandshakeComplete] = field(default_factory=queue.Queue)
    closed: queue.Queue[ConnectionClosed] = field(default_factory=queue.Queue)

    def next_handshake(self) -> HandshakeComplete:
        return self.handshakes.get(timeout=WAIT)

    def next_close(self) -> ConnectionClosed:
        return self.closed.get(timeout=WAIT)


ProxyFactory = Callable[..., RunningProxy]


@pytest.fixture
def proxy_factory(dev_certs_factory: Callable[[str], Any]) -> Iterator[ProxyFactory]:
    loop_thread = LoopThread()
    cleanups: list[Any] = []

    async def start(config: ServerConfig, proxy: RunningProxy) -> None:
        upstream = await serve_demo_upstream("127.0.0.1", 0, token_interval=0.0)
        upstream_port = upstream.sockets[0].getsockname()[1]
        settings = ListenerSettings(
            host="127.0.0.1",
            port=0,
            server_config=config,
            provider=OpenSSLProvider(),
            upstream_host="127.0.0.1",
            upstream_port=upstream_port,
        )
        listener = TLSListener(
            settings,
            on_handshake=lambda event, _peer: proxy.handshakes.put(event),
            on_terminated=proxy.closed.put,
        )
        await listener.start()
        proxy.port = listener.port

        async def stop() -> None:
            await listener.close(grace=1.0)
            upstream.close()
            await upstream.wait_closed()

        cleanups.append(stop)

    def factory(key_type: str = "ecdsa-p256", **config: Any) -> RunningProxy:
        certs = dev_certs_factory(key_type)
        server_config = ServerConfig(
            certificates=(load_certified_key(certs.cert, certs.key),), **config
        )
        proxy = RunningProxy(port=0)
        loop_thread.run(start(server_config, proxy))
        return proxy

    yield factory
    for stop in cleanups:
        loop_thread.run(stop())
    loop_thread.stop()
