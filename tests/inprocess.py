"""A real pqproxy listener on its own event loop in a background thread, for tests whose
clients block (pyOpenSSL sockets, subprocess peers, the openai client)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.demo_upstream import serve_demo_upstream
from pqproxy.devcert import DevCertPaths
from pqproxy.io.http_proxy import HttpSettings
from pqproxy.io.tls_server import ListenerSettings, TLSListener
from pqproxy.io.upstream import PoolSettings, UpstreamPool
from pqproxy.tls.events import HandshakeComplete
from pqproxy.tls.server import ServerConfig

WAIT = 20.0


def local_listener_settings(
    dev_certs: DevCertPaths, upstream_port: int, **overrides: Any
) -> ListenerSettings:
    """A listener on 127.0.0.1 (a free port) with the dev certificate and the OpenSSL
    backend, forwarding to ``upstream_port`` on 127.0.0.1; ``overrides`` are the rest."""
    return ListenerSettings(
        host="127.0.0.1",
        port=0,
        server_config=ServerConfig(
            certificates=(load_certified_key(dev_certs.cert, dev_certs.key),)
        ),
        provider=OpenSSLProvider(),
        upstream_host="127.0.0.1",
        upstream_port=upstream_port,
        **overrides,
    )


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=WAIT)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=WAIT)
        self.loop.close()


@contextmanager
def http_proxy_in_thread(
    certs: DevCertPaths,
    on_handshake: Callable[[HandshakeComplete], None],
    *,
    tokens: int,
    token_interval: float,
) -> Iterator[int]:
    """pqproxy in http mode (a one-server pool) before the demo upstream; yields its port."""
    loop_thread = LoopThread()
    started: dict[str, Any] = {}

    async def start() -> int:
        upstream = await serve_demo_upstream(
            "127.0.0.1", 0, tokens=tokens, token_interval=token_interval
        )
        started["upstream"] = upstream
        upstream_port: int = upstream.sockets[0].getsockname()[1]
        pool = UpstreamPool(
            PoolSettings(name="demo", servers=(("127.0.0.1", upstream_port),), health_check=None)
        )
        started["pool"] = pool
        await pool.start()
        settings = ListenerSettings(
            host="127.0.0.1",
            port=0,
            server_config=ServerConfig(certificates=(load_certified_key(certs.cert, certs.key),)),
            provider=OpenSSLProvider(),
            upstream_host="127.0.0.1",
            upstream_port=upstream_port,
            mode="http",
            http=HttpSettings(),
            pool=pool,
        )
        listener = TLSListener(settings, on_handshake=lambda event, _peer: on_handshake(event))
        started["listener"] = listener
        await listener.start()
        return listener.port

    async def stop() -> None:
        if "listener" in started:
            await started["listener"].close(grace=1.0)
        if "pool" in started:
            await started["pool"].close()
        if "upstream" in started:
            started["upstream"].close()
            await asyncio.wait_for(started["upstream"].wait_closed(), WAIT)

    try:
        yield loop_thread.run(start())
    finally:
        loop_thread.run(stop())
        loop_thread.stop()
