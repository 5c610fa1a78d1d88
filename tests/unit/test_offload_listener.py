"""The listener's crypto seam (``_ClientConnection._resolve_crypto``) with an Offloader: real
sockets, a real echo upstream, stdlib ssl clients (the system OpenSSL, an independent
implementation), many at once; and a failing backend's handshakes end in internal_error."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.offload import (
    Offloader,
    OffloadMode,
    OffloadSettings,
    Outcome,
    RecordingObserver,
    build_offloader,
    create_provider,
)
from pqproxy.crypto.provider import CryptoProvider
from pqproxy.devcert import DevCertPaths
from pqproxy.io.tls_server import ConnectionClosed, ListenerSettings, TLSListener
from pqproxy.tls.enums import AlertDescription
from pqproxy.tls.server import ServerConfig
from tests.backends import faulty

WAIT = 30.0
CONNECTIONS = 50


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@pytest_asyncio.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


class Closed:
    """What on_terminated reported, and an event to wait for the first report."""

    def __init__(self) -> None:
        self.summaries: list[ConnectionClosed] = []
        self.any = asyncio.Event()

    def __call__(self, summary: ConnectionClosed) -> None:
        self.summaries.append(summary)
        self.any.set()


async def _listener(
    certs: DevCertPaths, provider: CryptoProvider, offloader: Offloader, upstream: int
) -> tuple[TLSListener, Closed]:
    certified = load_certified_key(certs.cert, certs.key)
    offloader.register_signer(certified.signer, Path(certs.key).read_bytes())
    closed = Closed()
    settings = ListenerSettings(
        host="127.0.0.1",
        port=0,
        server_config=ServerConfig(certificates=(certified,)),
        provider=provider,
        upstream_host="127.0.0.1",
        upstream_port=upstream,
        offloader=offloader,
    )
    listener = TLSListener(settings, on_terminated=closed)
    await listener.start()
    return listener, closed


def _client(certs: DevCertPaths) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


async def _round_trip(port: int, ctx: ssl.SSLContext, message: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    try:
        writer.write(message)
        return await reader.readexactly(len(message))
    finally:
        writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", list(OffloadMode), ids=[m.value for m in OffloadMode])
async def test_listener_resolves_crypto_through_the_offloader(
    dev_certs: DevCertPaths, echo_port: int, mode: OffloadMode
) -> None:
    provider = create_provider("openssl")
    observer = RecordingObserver()
    offloader = build_offloader(
        OffloadSettings(backend="openssl", mode=mode, workers=2), provider, observer=observer
    )
    async with asyncio.timeout(WAIT):
        await offloader.start()
        listener, _ = await _listener(dev_certs, provider, offloader, echo_port)
        try:
            ctx = _client(dev_certs)
            messages = [f"message {i}".encode() for i in range(CONNECTIONS)]
            echoed = await asyncio.gather(*(_round_trip(listener.port, ctx, m) for m in messages))
        finally:
            await listener.close(grace=1.0)
            await offloader.close()
    assert echoed == messages
    assert observer.count("key_exchange", Outcome.OK) == CONNECTIONS
    assert observer.count("signature", Outcome.OK) == CONNECTIONS


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [OffloadMode.INLINE, OffloadMode.THREAD, OffloadMode.PROCESS])
async def test_failing_backend_alerts_internal_error(
    dev_certs: DevCertPaths,
    echo_port: int,
    mode: OffloadMode,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(faulty.ENV_SWITCH, str(tmp_path / "switch"))
    faulty.FaultSwitch(tmp_path / "switch").set("fail")
    provider = create_provider(faulty.NAME)
    offloader = build_offloader(OffloadSettings(backend=faulty.NAME, mode=mode), provider)
    async with asyncio.timeout(WAIT):
        await offloader.start()
        listener, closed = await _listener(dev_certs, provider, offloader, echo_port)
        try:
            with pytest.raises(ssl.SSLError, match="TLSV1_ALERT_INTERNAL_ERROR"):
                await _round_trip(listener.port, _client(dev_certs), b"x")
            await closed.any.wait()  # connection_lost may come after the client's error
        finally:
            await listener.close(grace=1.0)
            await offloader.close()
    summary = closed.summaries[0]
    assert summary.alert == AlertDescription.internal_error and summary.alert_sent
    assert "injected failure in key exchange" in summary.reason
