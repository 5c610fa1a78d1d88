"""Every offload mode, on every installed backend, against independent clients.

pyOpenSSL (cryptography's OpenSSL) clients handshake with the engine through memory BIOs,
many at once on one event loop; the engine's KeyExchangeNeeded / SignatureNeeded requests are
answered by the Offloader, as the listener's ``_resolve_crypto`` does (tests/offload_driver.py).
A handshake only completes if the client verified the server's Finished and CertificateVerify,
so a completed one proves the offloaded key exchange and signature were right.

Fault injection uses tests/backends/faulty.py, a backend whose calls fail or stall on a switch
(a file, so process-mode workers obey it too): the clients must see internal_error alerts, the
fallback must take over after K failures and give way when the primary recovers, and no
handshake may hang (each is bounded by the driver's deadline, each test by asyncio.timeout).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.offload import (
    BatchSettings,
    BreakerSettings,
    Offloader,
    OffloadMode,
    OffloadSettings,
    Outcome,
    RecordingObserver,
    build_offloader,
    create_provider,
)
from pqproxy.crypto.provider import (
    CertifiedKey,
    ClientKeyExchange,
    CryptoProvider,
    KxGroup,
    SharedSecret,
    Signer,
)
from pqproxy.tls.enums import AlertDescription
from pqproxy.tls.server import ServerConfig
from tests.backends import faulty
from tests.conftest import DevCertFactory
from tests.offload_driver import Batch, run_handshakes

HANDSHAKES = 50
# Process pools spawn fresh interpreters: give start-up its own, longer bound.
START_WAIT = 120.0
RUN_WAIT = 120.0
MODES = list(OffloadMode)


def _mode_settings(backend: str, mode: OffloadMode, **overrides: Any) -> OffloadSettings:
    values: dict[str, Any] = {
        "backend": backend,
        "mode": mode,
        "workers": 2,
        # Long enough a window on a busy 2-core machine for concurrent requests to meet.
        "batch": BatchSettings(max_items=16, max_delay=0.002),
        "timeout": 10.0,
    }
    values.update(overrides)
    return OffloadSettings(**values)


@asynccontextmanager
async def started(offloader: Offloader) -> AsyncIterator[Offloader]:
    async with asyncio.timeout(START_WAIT):
        await offloader.start()
    try:
        yield offloader
    finally:
        await offloader.close()


def _certified(certs: Any) -> tuple[CertifiedKey, bytes]:
    return load_certified_key(certs.cert, certs.key), Path(certs.key).read_bytes()


async def _handshakes(
    offloader: Offloader, certified: CertifiedKey, provider: CryptoProvider, ca: Any, count: int
) -> Batch:
    config = ServerConfig(certificates=(certified,))
    async with asyncio.timeout(RUN_WAIT):
        return await run_handshakes(offloader, config, provider, ca, count)


# --- every mode completes concurrent handshakes ----------------------------------------------


class ForbiddenGroup:
    """A group that may describe itself and play client, but never serve in this process."""

    def __init__(self, inner: KxGroup) -> None:
        self._inner = inner
        self.group = inner.group
        self.backend = inner.backend
        self.client_share_length = inner.client_share_length
        self.server_share_length = inner.server_share_length

    def server_exchange(self, client_share: bytes) -> tuple[bytes, SharedSecret]:
        raise AssertionError(f"key exchange ran in the parent process {os.getpid()}")

    def start(self) -> ClientKeyExchange:
        return self._inner.start()


class ParentForbidden:
    def __init__(self, inner: CryptoProvider) -> None:
        self.name = inner.name
        self.groups: Mapping[int, KxGroup] = {
            code: ForbiddenGroup(group) for code, group in inner.groups.items()
        }


class ForbiddenSigner:
    def __init__(self, inner: Signer) -> None:
        self.schemes = inner.schemes
        self.backend = inner.backend

    def sign(self, scheme: int, message: bytes) -> bytes:
        raise AssertionError(f"signature made in the parent process {os.getpid()}")


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES, ids=[m.value for m in MODES])
async def test_mode_completes_concurrent_handshakes(
    backend: Any, provider: CryptoProvider, dev_certs_factory: DevCertFactory, mode: OffloadMode
) -> None:
    name = backend.NAME
    if mode is OffloadMode.PROCESS and name == "pkcs11":
        pytest.skip("pkcs11 is refused in process mode (tests/unit/test_offload.py)")
    certs = dev_certs_factory("ecdsa-p256")
    certified, key_pem = _certified(certs)
    if mode is OffloadMode.PROCESS:
        # This process's groups and signer refuse to work: every handshake that completes
        # was computed in a worker process, from the backend's name and the key's PEM.
        provider = ParentForbidden(provider)
        certified = CertifiedKey(certified.chain, ForbiddenSigner(certified.signer))
    observer = RecordingObserver()
    offloader = build_offloader(_mode_settings(name, mode), provider, observer=observer)
    offloader.register_signer(certified.signer, key_pem)
    async with started(offloader):
        batch = await _handshakes(offloader, certified, provider, certs.ca, HANDSHAKES)

    failed = [(o.client_error, o.terminated) for o in batch.outcomes if not o.ok]
    assert not failed, failed[:3]
    assert {o.client_group for o in batch.outcomes} == {"X25519MLKEM768"}
    assert observer.count("key_exchange", Outcome.OK, name) == HANDSHAKES
    assert observer.count("signature", Outcome.OK, name) == HANDSHAKES
    assert sum(observer.outcomes.values()) == 2 * HANDSHAKES
    if mode is not OffloadMode.INLINE:
        # The handshakes really were outstanding at the same time.
        assert batch.max_in_flight > 1
    if mode is OffloadMode.BATCH:
        sizes = observer.batch_sizes[("key_exchange", name)]
        assert sum(size * n for size, n in sizes.items()) == HANDSHAKES
        assert max(sizes) > 1, sizes  # it batched, not one call per request
    else:
        assert not observer.batch_sizes
        assert {r.batch_size for r in observer.jobs} == {1}


# --- fault injection ---------------------------------------------------------------------------


@pytest.fixture
def switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[faulty.FaultSwitch]:
    path = tmp_path / "fault-switch"
    monkeypatch.setenv(faulty.ENV_SWITCH, str(path))
    fault = faulty.FaultSwitch(path)
    fault.set("ok")
    yield fault
    fault.set("ok")  # release any call still stalled in a thread or a worker


def _internal_errors(batch: Batch) -> int:
    count = 0
    for outcome in batch.outcomes:
        assert outcome.client_error is not None, "the handshake should have failed"
        assert "internal error" in str(outcome.client_error)
        assert outcome.terminated is not None
        assert outcome.terminated.alert == AlertDescription.internal_error
        assert outcome.terminated.sent
        count += 1
    return count


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES, ids=[m.value for m in MODES])
async def test_failing_backend_gives_internal_error(
    switch: faulty.FaultSwitch, dev_certs_factory: DevCertFactory, mode: OffloadMode
) -> None:
    certs = dev_certs_factory("ecdsa-p256")
    certified, key_pem = _certified(certs)
    provider = create_provider(faulty.NAME)
    observer = RecordingObserver()
    offloader = build_offloader(_mode_settings(faulty.NAME, mode), provider, observer=observer)
    offloader.register_signer(certified.signer, key_pem)
    async with started(offloader):
        switch.set("fail")
        batch = await _handshakes(offloader, certified, provider, certs.ca, 5)
    assert _internal_errors(batch) == 5
    assert observer.count("key_exchange", Outcome.ERROR, faulty.NAME) == 5
    assert "injected failure in key exchange" in batch.outcomes[0].terminated.reason  # type: ignore[union-attr]


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES, ids=[m.value for m in MODES])
async def test_stalled_backend_times_out_with_internal_error(
    switch: faulty.FaultSwitch, dev_certs_factory: DevCertFactory, mode: OffloadMode
) -> None:
    certs = dev_certs_factory("ecdsa-p256")
    certified, key_pem = _certified(certs)
    provider = create_provider(faulty.NAME)
    observer = RecordingObserver()
    timeout = 0.3
    config = _mode_settings(faulty.NAME, mode, timeout=timeout)
    offloader = build_offloader(config, provider, observer=observer)
    offloader.register_signer(certified.signer, key_pem)
    release: threading.Timer | None = None
    count = 3
    async with started(offloader):
        switch.set("stall")
        if mode is OffloadMode.INLINE:
            # Inline blocks the loop, so nothing on it could end the stall: the fault lasts
            # a fixed 0.6 s, twice the timeout, and ends by itself; it catches the first
            # handshake only (the loop is blocked in it until then).
            release = threading.Timer(2 * timeout, switch.set, ("ok",))
            release.start()
            count = 1
        loop = asyncio.get_running_loop()
        began = loop.time()
        batch = await _handshakes(offloader, certified, provider, certs.ca, count)
        took = loop.time() - began
        switch.set("ok")
    if release is not None:
        release.join(RUN_WAIT)
    assert _internal_errors(batch) == count
    assert observer.count("key_exchange", Outcome.TIMEOUT, faulty.NAME) == count
    assert "timed out" in batch.outcomes[0].terminated.reason or "took" in (  # type: ignore[union-attr]
        batch.outcomes[0].terminated.reason  # type: ignore[union-attr]
    )
    # Bounded by the timeout (plus the inline fault's own length), never the stall's 30 s.
    assert took < 10.0


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [OffloadMode.INLINE, OffloadMode.THREAD, OffloadMode.BATCH])
async def test_failing_signature_gives_internal_error(
    switch: faulty.FaultSwitch, dev_certs_factory: DevCertFactory, mode: OffloadMode
) -> None:
    """The key exchange succeeds on openssl; the signature fails. (Not in process mode: there
    a worker loads the real key from its PEM, so a fault wrapped around it never runs.)"""
    certs = dev_certs_factory("ecdsa-p256")
    real = load_certified_key(certs.cert, certs.key)
    signer = faulty.FaultySigner(real.signer, switch)
    certified = CertifiedKey(real.chain, signer, real.names)
    provider = OpenSSLProvider()
    observer = RecordingObserver()
    offloader = build_offloader(_mode_settings("openssl", mode), provider, observer=observer)
    async with started(offloader):
        switch.set("fail")
        batch = await _handshakes(offloader, certified, provider, certs.ca, 3)
    assert _internal_errors(batch) == 3
    assert observer.count("key_exchange", Outcome.OK) == 3
    assert observer.count("signature", Outcome.ERROR) == 3


class SwitchWatcher(RecordingObserver):
    def __init__(self) -> None:
        super().__init__()
        self.switched = asyncio.Event()

    def on_switch(self, *, primary: str, fallback: str, to_fallback: bool, reason: str) -> None:
        super().on_switch(
            primary=primary, fallback=fallback, to_fallback=to_fallback, reason=reason
        )
        self.switched.set()


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES, ids=[m.value for m in MODES])
async def test_fallback_takes_over_and_gives_way_when_the_primary_recovers(
    switch: faulty.FaultSwitch,
    dev_certs_factory: DevCertFactory,
    mode: OffloadMode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    certs = dev_certs_factory("ecdsa-p256")
    certified, key_pem = _certified(certs)
    provider = create_provider(faulty.NAME)
    observer = SwitchWatcher()
    config = _mode_settings(
        faulty.NAME,
        mode,
        fallback="openssl",
        breaker=BreakerSettings(failures=3, probe_interval=0.05),
    )
    offloader = build_offloader(config, provider, OpenSSLProvider(), observer)
    offloader.register_signer(certified.signer, key_pem)

    def key_exchanges(backend: str) -> int:
        return observer.count("key_exchange", Outcome.OK, backend)

    with caplog.at_level(logging.WARNING, logger="pqproxy.crypto.offload"):
        async with started(offloader):
            healthy = await _handshakes(offloader, certified, provider, certs.ca, 4)
            assert all(o.ok for o in healthy.outcomes)
            assert key_exchanges(faulty.NAME) == 4 and key_exchanges("openssl") == 0

            switch.set("fail")
            observer.switched.clear()
            failing = await _handshakes(offloader, certified, provider, certs.ca, 3)
            assert _internal_errors(failing) == 3
            assert offloader.breaker_open and offloader.active_backend == "openssl"

            # While the primary still fails, new handshakes are served by the fallback.
            covered = await _handshakes(offloader, certified, provider, certs.ca, 5)
            assert all(o.ok for o in covered.outcomes)
            assert key_exchanges("openssl") == 5
            assert offloader.breaker_open

            observer.switched.clear()
            switch.set("ok")
            async with asyncio.timeout(RUN_WAIT):
                await observer.switched.wait()
            assert not offloader.breaker_open

            recovered = await _handshakes(offloader, certified, provider, certs.ca, 4)
            assert all(o.ok for o in recovered.outcomes)
            assert key_exchanges(faulty.NAME) == 8 and key_exchanges("openssl") == 5

    assert [s.to_fallback for s in observer.switches] == [True, False]
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        f"switching new handshakes from {faulty.NAME} to fallback openssl: "
        "3 consecutive key exchange failures" in m
        for m in messages
    )
    assert any(
        f"{faulty.NAME} recovered (probe X25519MLKEM768 round trip ok)" in m for m in messages
    )


# --- pkcs11: the token behind a thread pool -------------------------------------------------


@pytest.mark.asyncio
async def test_pkcs11_thread_mode_signs_and_derives_in_the_token(
    tmp_path: Path, dev_certs_factory: DevCertFactory
) -> None:
    """Thread mode is how a token is offloaded (process mode is refused): 50 concurrent
    SecP256r1MLKEM768 handshakes, each with its ECDH half and its CertificateVerify done
    inside SoftHSM2, as the token's own operation counters show."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from pqproxy.crypto.backends import pkcs11 as p11
    from tests.backends.softhsm import softhsm_token

    certs = dev_certs_factory("ecdsa-p256")
    with softhsm_token(tmp_path / "hsm") as hsm:
        key = load_pem_private_key(Path(certs.key).read_bytes(), None)
        hsm.import_key(key, "offload-ec", b"\x0f")
        uri = tmp_path / "key.uri"
        uri.write_text(hsm.uri("offload-ec") + "\n")
        provider = p11.create_provider(hsm.config(frozenset({"ecdh"})))
        try:
            token = provider.token
            certified = load_certified_key(certs.cert, uri, load_signer=token.signer_loader())
            assert certified.signer.backend == "pkcs11"
            ecdh, ecdsa = token.operations["CKM_ECDH1_DERIVE"], token.operations["CKM_ECDSA"]
            observer = RecordingObserver()
            config = _mode_settings("pkcs11", OffloadMode.THREAD, workers=4)
            offloader = build_offloader(config, provider, observer=observer)
            offloader.register_signer(certified.signer, None)  # fine outside process mode
            async with started(offloader):
                server_config = ServerConfig(certificates=(certified,))
                async with asyncio.timeout(RUN_WAIT):
                    batch = await run_handshakes(
                        offloader,
                        server_config,
                        provider,
                        certs.ca,
                        HANDSHAKES,
                        groups="SecP256r1MLKEM768",
                    )
            assert all(o.ok for o in batch.outcomes), [o.client_error for o in batch.outcomes]
            assert {o.client_group for o in batch.outcomes} == {"SecP256r1MLKEM768"}
            assert batch.max_in_flight > 1
            assert token.operations["CKM_ECDH1_DERIVE"] - ecdh == HANDSHAKES
            assert token.operations["CKM_ECDSA"] - ecdsa == HANDSHAKES
            assert observer.count("key_exchange", Outcome.OK, "pkcs11") == HANDSHAKES
            assert observer.count("signature", Outcome.OK, "pkcs11") == HANDSHAKES
        finally:
            provider.close()


@pytest.mark.asyncio
async def test_process_mode_stops_a_stalled_worker_and_starts_another(
    switch: faulty.FaultSwitch,
    dev_certs_factory: DevCertFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A thread stuck in a call can only be waited for; a process can be stopped. The stalled
    worker is killed when its call times out, a new one takes its place, and handshakes
    waiting meanwhile are served by it."""
    certs = dev_certs_factory("ecdsa-p256")
    certified, key_pem = _certified(certs)
    provider = create_provider(faulty.NAME)
    observer = RecordingObserver()
    # The handshakes after the stall wait for the new worker within this timeout: a spawned
    # interpreter may take a second or two to start on a loaded 2-core machine.
    config = _mode_settings(faulty.NAME, OffloadMode.PROCESS, workers=1, timeout=4.0)
    offloader = build_offloader(config, provider, observer=observer)
    offloader.register_signer(certified.signer, key_pem)
    with caplog.at_level(logging.WARNING, logger="pqproxy.crypto.offload"):
        async with started(offloader):
            switch.set("stall")
            stalled = await _handshakes(offloader, certified, provider, certs.ca, 1)
            assert _internal_errors(stalled) == 1
            # The worker was stopped when the call timed out, before the alert went out, so
            # ending the fault now cannot be what frees the pool: the new worker does.
            switch.set("ok")
            served = await _handshakes(offloader, certified, provider, certs.ca, 3)
            assert all(o.ok for o in served.outcomes)
    messages = [r.getMessage() for r in caplog.records]
    assert any("stalled in a call for" in m and "stopping it" in m for m in messages)
    assert any("exited (exit code -9) in a call; starting a new one" in m for m in messages)
    assert observer.count("key_exchange", Outcome.TIMEOUT) == 1
    assert observer.count("key_exchange", Outcome.OK) == 3
