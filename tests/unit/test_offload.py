"""The offload layer's own rules, with backends the tests control.

The groups here do real X25519 (the openssl backend's) behind a control the test holds: a
gate that keeps a call inside the backend until the test opens it, and a mode that makes the
call fail, reject the share, or answer a wrong secret. They are the fault; the component under
test is the Offloader. Every wait is bounded (``asyncio.timeout``), nothing sleeps in place of
synchronisation: the tests wait for what they need to see (a call entering the backend, an
observer callback).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest

from pqproxy.crypto import offload
from pqproxy.crypto.backends import openssl
from pqproxy.crypto.offload import (
    BackendTimeout,
    BatchSettings,
    BreakerSettings,
    KeyExchangeJob,
    OffloadConfigError,
    Offloader,
    OffloadMode,
    OffloadSettings,
    Outcome,
    RecordingObserver,
    SignerKey,
    SignJob,
    build_offloader,
    run_job,
)
from pqproxy.crypto.provider import (
    BackendError,
    ClientKeyExchange,
    CryptoProvider,
    InvalidKeyShare,
    KxGroup,
    SharedSecret,
)
from pqproxy.tls.enums import NamedGroup, SignatureScheme

X25519 = int(NamedGroup.x25519)
WAIT = 10.0
ASYNC_MODES = [OffloadMode.INLINE, OffloadMode.THREAD, OffloadMode.BATCH]


class ControlledGroup:
    """X25519 with a control: ``mode`` ok / fail / invalid / lie (a wrong secret), and a
    ``gate`` a call waits at (open by default) while the test holds it closed."""

    def __init__(self) -> None:
        self._inner = openssl.classical_groups()["x25519"]
        self.mode = "ok"
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self.entered = threading.Condition(self._lock)
        self.batch_calls: list[int] = []

    @property
    def group(self) -> int:
        return X25519

    @property
    def backend(self) -> str:
        return "controlled"

    @property
    def client_share_length(self) -> int:
        return 32

    @property
    def server_share_length(self) -> int:
        return 32

    def wait_entered(self, count: int, timeout: float = WAIT) -> bool:
        """Block until ``count`` calls are inside the backend at once (for a worker thread)."""
        with self.entered:
            return self.entered.wait_for(lambda: self.active >= count, timeout)

    def server_exchange(self, client_share: bytes) -> tuple[bytes, SharedSecret]:
        with self._lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.entered.notify_all()
        try:
            if not self.gate.wait(WAIT * 3):
                raise BackendError("controlled: gate never opened")
            if self.mode == "fail":
                raise BackendError("controlled: injected failure")
            if self.mode == "invalid":
                raise InvalidKeyShare("controlled: bad share")
            share, secret = self._inner.server_exchange(client_share)
            if self.mode == "lie":
                return share, SharedSecret(bytes(32))
            return share, secret
        finally:
            with self._lock:
                self.active -= 1

    def start(self) -> ClientKeyExchange:
        return self._inner.start()


class BatchingGroup(ControlledGroup):
    """Offers the batch call a GPU-style backend would, and records each call's size; a
    share of all-0xff bytes is refused alone (its own exception in the result list)."""

    def server_exchange_batch(
        self, client_shares: list[bytes]
    ) -> list[tuple[bytes, SharedSecret] | BaseException]:
        self.batch_calls.append(len(client_shares))
        results: list[tuple[bytes, SharedSecret] | BaseException] = []
        for share in client_shares:
            if share == b"\xff" * 32:
                results.append(InvalidKeyShare("refused in the batch"))
            else:
                results.append(self._inner.server_exchange(share))
        return results


class Provider:
    def __init__(self, name: str, groups: Mapping[int, KxGroup]) -> None:
        self._name = name
        self._groups = dict(groups)

    @property
    def name(self) -> str:
        return self._name

    @property
    def groups(self) -> Mapping[int, KxGroup]:
        return self._groups


class SwitchWatcher(RecordingObserver):
    """Records, and lets a test await the next switch."""

    def __init__(self) -> None:
        super().__init__()
        self.switched = asyncio.Event()

    def on_switch(self, *, primary: str, fallback: str, to_fallback: bool, reason: str) -> None:
        super().on_switch(
            primary=primary, fallback=fallback, to_fallback=to_fallback, reason=reason
        )
        self.switched.set()


@pytest.fixture
def group() -> Iterator[ControlledGroup]:
    g = ControlledGroup()
    yield g
    g.gate.set()  # never leave a worker thread waiting


def settings(mode: OffloadMode = OffloadMode.THREAD, **overrides: Any) -> OffloadSettings:
    values: dict[str, Any] = {"backend": "controlled", "mode": mode, "workers": 4, "timeout": 2.0}
    values.update(overrides)
    return OffloadSettings(**values)


@asynccontextmanager
async def running(
    config: OffloadSettings,
    provider: CryptoProvider,
    fallback: CryptoProvider | None = None,
    observer: RecordingObserver | None = None,
) -> AsyncIterator[Offloader]:
    offloader = build_offloader(config, provider, fallback, observer)
    await offloader.start()
    try:
        yield offloader
    finally:
        await offloader.close()


async def exchange(offloader: Offloader, group: KxGroup) -> tuple[ClientKeyExchange, Any]:
    """One key exchange; the result, or the exception it ended with."""
    client = group.start()
    try:
        return client, await offloader.key_exchange(X25519, group, client.share)
    except Exception as exc:
        return client, exc


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"workers": 0}, "workers must be at least 1"),
        ({"concurrency": 0}, "concurrency must be at least 1"),
        ({"timeout": 0}, "timeout must be positive"),
        ({"fallback": "controlled"}, "fallback must be another backend"),
        ({"mode": "gpu"}, "'gpu' is not a valid OffloadMode"),
    ],
)
def test_settings_are_checked(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings(**overrides)


def test_batch_and_breaker_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_items must be at least 1"):
        BatchSettings(max_items=0)
    with pytest.raises(ValueError, match="max_delay must not be negative"):
        BatchSettings(max_delay=-1e-6)
    with pytest.raises(ValueError, match="failures must be at least 1"):
        BreakerSettings(failures=0)
    with pytest.raises(ValueError, match="probe_interval must be positive"):
        BreakerSettings(probe_interval=0)


@pytest.mark.parametrize("role", ["backend", "fallback"])
def test_process_mode_refuses_pkcs11(role: str) -> None:
    provider = openssl.OpenSSLProvider()
    if role == "backend":
        config = OffloadSettings(backend="pkcs11", mode=OffloadMode.PROCESS)
        fallback = None
    else:
        config = OffloadSettings(backend="openssl", mode=OffloadMode.PROCESS, fallback="pkcs11")
        fallback = openssl.OpenSSLProvider()
    with pytest.raises(OffloadConfigError) as error:
        build_offloader(config, provider, fallback)
    assert "offload process cannot run the pkcs11 backend" in str(error.value)
    assert "offload: thread" in str(error.value)


def test_fallback_must_exist_and_cover_the_groups(group: ControlledGroup) -> None:
    primary = openssl.OpenSSLProvider()
    with pytest.raises(OffloadConfigError, match="fallback openssl is configured but no provider"):
        build_offloader(OffloadSettings(backend="liboqs", fallback="openssl"), primary)
    narrow = Provider("narrow", {X25519: group})
    with pytest.raises(OffloadConfigError, match="fallback narrow lacks groups of openssl: "):
        build_offloader(OffloadSettings(backend="openssl", fallback="narrow"), primary, narrow)


def test_process_mode_needs_a_pem_key_for_each_signer() -> None:
    offloader = build_offloader(
        OffloadSettings(mode=OffloadMode.PROCESS), openssl.OpenSSLProvider()
    )
    signer = openssl.load_signer(_pem_key())
    with pytest.raises(OffloadConfigError, match="only PEM keys can be loaded by worker"):
        offloader.register_signer(signer, None)
    offloader.register_signer(signer, _pem_key())  # accepted


def test_unknown_backend_name_is_refused() -> None:
    with pytest.raises(OffloadConfigError, match="unknown backend 'gpu'; expected one of"):
        offload.create_provider("gpu")


def _pem_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.derive_private_key(7, ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --- results, order, accounting ------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ASYNC_MODES)
async def test_results_come_back_later_on_the_loop(
    group: ControlledGroup, mode: OffloadMode
) -> None:
    observer = RecordingObserver()
    provider = Provider("controlled", {X25519: group})
    async with running(settings(mode), provider, observer=observer) as offloader:
        client = group.start()
        answered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        submitted = False

        def done(result: Any) -> None:
            # Never from inside submit_*: the caller may be in the middle of its own handler.
            answered.set_result((submitted, result, threading.current_thread()))

        offloader.submit_key_exchange(X25519, group, client.share, done)
        submitted = True
        async with asyncio.timeout(WAIT):
            was_submitted, result, thread = await answered
    assert was_submitted is True
    assert thread is threading.current_thread()
    share, secret = result
    assert client.complete(share) == secret
    assert observer.count("key_exchange", Outcome.OK, "controlled") == 1
    (record,) = observer.jobs
    assert record.label == "x25519" and record.batch_size == 1
    assert record.queue_seconds >= 0 and record.service_seconds >= 0


@pytest.mark.asyncio
async def test_signatures_run_and_verify() -> None:
    signer = openssl.load_signer(_pem_key())
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    observer = RecordingObserver()
    async with running(
        settings(backend="openssl"), openssl.OpenSSLProvider(), observer=observer
    ) as o:
        async with asyncio.timeout(WAIT):
            signature = await o.sign(signer, scheme, b"message")
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    public_key = load_pem_private_key(_pem_key(), None).public_key()
    openssl.verify_signature(public_key, scheme, b"message", signature)
    assert observer.count("signature", Outcome.OK) == 1
    assert observer.jobs[0].label == "ecdsa_secp256r1_sha256"


@pytest.mark.asyncio
async def test_service_time_is_the_backend_call_and_queue_time_the_wait(
    group: ControlledGroup,
) -> None:
    observer = RecordingObserver()
    provider = Provider("controlled", {X25519: group})
    config = settings(concurrency=1)
    async with running(config, provider, observer=observer) as offloader:
        group.gate.clear()
        first = asyncio.ensure_future(exchange(offloader, group))
        second = asyncio.ensure_future(exchange(offloader, group))
        async with asyncio.timeout(WAIT):
            assert await asyncio.to_thread(group.wait_entered, 1)
            held = time.monotonic()
            await asyncio.sleep(0.05)  # the backend call's duration, not a synchronisation
            group.gate.set()
            await asyncio.gather(first, second)
        held = time.monotonic() - held
    by_order = list(observer.jobs)
    assert [r.outcome for r in by_order] == [Outcome.OK, Outcome.OK]
    # The first call was held in the backend; the second waited for the only slot meanwhile.
    assert by_order[0].service_seconds >= 0.05
    assert by_order[1].queue_seconds >= 0.05
    assert by_order[1].service_seconds < held


# --- limits and timeouts --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_concurrency_limit_queues_the_rest(group: ControlledGroup) -> None:
    provider = Provider("controlled", {X25519: group})
    async with running(settings(concurrency=2, workers=8), provider) as offloader:
        group.gate.clear()
        tasks = [asyncio.ensure_future(exchange(offloader, group)) for _ in range(5)]
        async with asyncio.timeout(WAIT):
            await asyncio.sleep(0)  # let the five tasks submit
            assert await asyncio.to_thread(group.wait_entered, 2)
            assert offloader.in_flight == 5
            assert offloader.waiting == 3
            group.gate.set()
            results = await asyncio.gather(*tasks)
    assert all(not isinstance(result, BaseException) for _, result in results)
    assert group.max_active == 2
    assert group.calls == 5


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [OffloadMode.THREAD, OffloadMode.BATCH])
async def test_a_stalled_call_times_out_and_keeps_its_slot(
    group: ControlledGroup, mode: OffloadMode
) -> None:
    observer = RecordingObserver()
    provider = Provider("controlled", {X25519: group})
    config = settings(mode, concurrency=1, timeout=0.2, batch=BatchSettings(max_items=1))
    async with running(config, provider, observer=observer) as offloader:
        group.gate.clear()
        async with asyncio.timeout(WAIT):
            started = time.monotonic()
            _, stalled = await exchange(offloader, group)
            assert isinstance(stalled, BackendTimeout)
            assert "timed out after 0.2s" in str(stalled)
            assert time.monotonic() - started < 2.0
            # The stalled call still holds the only slot: the next job waits and times out
            # too, without ever reaching the backend.
            _, queued = await exchange(offloader, group)
            assert isinstance(queued, BackendTimeout)
            assert group.calls == 1
            group.gate.set()
            client, result = await exchange(offloader, group)
    assert not isinstance(result, BaseException)
    assert client.complete(result[0]) == result[1]
    assert observer.count("key_exchange", Outcome.TIMEOUT) == 2
    assert observer.count("key_exchange", Outcome.OK) == 1


def test_inline_call_slower_than_the_timeout_fails(group: ControlledGroup) -> None:
    """Inline cannot interrupt a call; one that took longer than the timeout is answered as
    a timeout all the same, so a slow backend fails (and trips the breaker) in every mode."""

    class Slow(ControlledGroup):
        def server_exchange(self, client_share: bytes) -> tuple[bytes, SharedSecret]:
            time.sleep(0.15)  # the fault: a backend call that takes 150 ms
            return super().server_exchange(client_share)

    slow = Slow()
    observer = RecordingObserver()

    async def main() -> None:
        config = settings(OffloadMode.INLINE, timeout=0.05)
        async with running(config, Provider("controlled", {X25519: slow}), observer=observer) as o:
            assert o.inline
            with pytest.raises(BackendTimeout, match="took .* over the 0.05s timeout"):
                o.run_inline_key_exchange(X25519, slow, slow.start().share)

    asyncio.run(main())
    assert observer.count("key_exchange", Outcome.TIMEOUT) == 1


@pytest.mark.asyncio
async def test_close_answers_pending_jobs_and_does_not_wait_for_a_stalled_call(
    group: ControlledGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offload, "CLOSE_TIMEOUT", 0.2)
    provider = Provider("controlled", {X25519: group})
    offloader = build_offloader(settings(timeout=30.0), provider)
    await offloader.start()
    group.gate.clear()
    pending = asyncio.ensure_future(exchange(offloader, group))
    async with asyncio.timeout(WAIT):
        assert await asyncio.to_thread(group.wait_entered, 1)
        started = time.monotonic()
        await offloader.close()
        closed_in = time.monotonic() - started
        _, result = await pending
    group.gate.set()
    assert isinstance(result, BackendError) and "offload closed" in str(result)
    assert closed_in < 3.0
    # After close, a request is answered with an error, never left waiting.
    _, late = await exchange(offloader, group)
    assert isinstance(late, BackendError) and "offload closed" in str(late)


# --- failures and the breaker -----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ASYNC_MODES)
async def test_failures_are_counted_and_logged_with_the_reason(
    group: ControlledGroup,
    mode: OffloadMode,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(offload, "FAILURE_LOG_INTERVAL", 60.0)
    observer = RecordingObserver()
    provider = Provider("controlled", {X25519: group})
    group.mode = "fail"
    with caplog.at_level(logging.WARNING, logger="pqproxy.crypto.offload"):
        async with running(settings(mode), provider, observer=observer) as offloader:
            async with asyncio.timeout(WAIT):
                results = [await exchange(offloader, group) for _ in range(3)]
    assert all(isinstance(r, BackendError) for _, r in results)
    assert observer.count("key_exchange", Outcome.ERROR) == 3
    assert offloader.counts[("key_exchange", "controlled", Outcome.ERROR)] == 3
    lines = [r.getMessage() for r in caplog.records]
    # One line for the first failure; the next ones within the interval are counted, not
    # written (a dead backend under load must not write a line per handshake).
    assert len(lines) == 1
    assert "crypto backend controlled: key exchange x25519 failed" in lines[0]
    assert "BackendError: controlled: injected failure" in lines[0]


@pytest.mark.asyncio
async def test_breaker_counts_consecutive_backend_failures_only(group: ControlledGroup) -> None:
    observer = SwitchWatcher()
    primary = Provider("controlled", {X25519: group})
    fallback = Provider("openssl", {X25519: openssl.classical_groups()["x25519"]})
    config = settings(fallback="openssl", breaker=BreakerSettings(failures=3, probe_interval=60))
    async with running(config, primary, fallback, observer) as offloader:
        async with asyncio.timeout(WAIT):
            for mode in ["fail", "fail", "ok", "fail", "fail", "invalid"]:
                group.mode = mode
                await exchange(offloader, group)
            # Two failures, a success, two failures, a peer's bad share: never 3 in a row.
            assert not offloader.breaker_open
            group.mode = "fail"
            await exchange(offloader, group)
            assert offloader.breaker_open
            assert offloader.active_backend == "openssl"
            calls = group.calls
            client, result = await exchange(offloader, group)
    # The next handshake's key exchange ran on the fallback's own group.
    assert group.calls == calls
    assert client.complete(result[0]) == result[1]
    assert observer.count("key_exchange", Outcome.OK, "openssl") == 1
    (switch,) = observer.switches
    assert switch.to_fallback and switch.primary == "controlled" and switch.fallback == "openssl"
    assert "3 consecutive key exchange failures" in switch.reason


@pytest.mark.asyncio
async def test_probe_switches_back_only_when_the_round_trip_agrees(
    group: ControlledGroup, caplog: pytest.LogCaptureFixture
) -> None:
    observer = SwitchWatcher()
    primary = Provider("controlled", {X25519: group})
    fallback = Provider("openssl", {X25519: openssl.classical_groups()["x25519"]})
    config = settings(fallback="openssl", breaker=BreakerSettings(failures=1, probe_interval=0.02))
    with caplog.at_level(logging.INFO, logger="pqproxy.crypto.offload"):
        async with running(config, primary, fallback, observer) as offloader:
            async with asyncio.timeout(WAIT):
                group.mode = "fail"
                await exchange(offloader, group)
                assert offloader.breaker_open
                observer.switched.clear()
                # A primary that answers, but with the wrong secret, is not recovered.
                group.mode = "lie"
                probes = group.calls
                while group.calls < probes + 3:
                    await asyncio.to_thread(_wait_calls, group, group.calls + 1)
                assert offloader.breaker_open
                group.mode = "ok"
                await observer.switched.wait()
            assert not offloader.breaker_open
            assert offloader.active_backend == "controlled"
    assert [s.to_fallback for s in observer.switches] == [True, False]
    assert observer.switches[1].reason == "probe x25519 round trip ok"
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "switching new handshakes from controlled to fallback openssl" in m for m in messages
    )
    assert any("the round trip gives different secrets" in m for m in messages)
    assert any("controlled recovered (probe x25519 round trip ok)" in m for m in messages)


def _wait_calls(group: ControlledGroup, count: int) -> None:
    with group.entered:
        group.entered.wait_for(lambda: group.calls >= count, WAIT)


# --- batching -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_batch_gathers_up_to_max_items(group: ControlledGroup) -> None:
    observer = RecordingObserver()
    provider = Provider("controlled", {X25519: group})
    # A long delay: only max_items can have flushed these.
    config = settings(OffloadMode.BATCH, batch=BatchSettings(max_items=4, max_delay=30.0))
    async with running(config, provider, observer=observer) as offloader:
        async with asyncio.timeout(WAIT):
            results = await asyncio.gather(*(exchange(offloader, group) for _ in range(8)))
    assert all(client.complete(r[0]) == r[1] for client, r in results)
    assert observer.batch_sizes[("key_exchange", "controlled")] == {4: 2}
    assert {r.batch_size for r in observer.jobs} == {4}


@pytest.mark.asyncio
async def test_batch_flushes_after_max_delay_and_uses_the_batch_call() -> None:
    group = BatchingGroup()
    observer = RecordingObserver()
    provider = Provider("controlled", {X25519: group})
    config = settings(OffloadMode.BATCH, batch=BatchSettings(max_items=100, max_delay=0.01))
    async with running(config, provider, observer=observer) as offloader:
        clients = [group.start() for _ in range(5)]
        shares = [c.share for c in clients] + [b"\xff" * 32]
        async with asyncio.timeout(WAIT):
            results = await asyncio.gather(
                *(offloader.key_exchange(X25519, group, s) for s in shares),
                return_exceptions=True,
            )
    # One backend call for all six; the share it refused failed alone.
    assert group.batch_calls == [6]
    assert group.calls == 0
    assert isinstance(results[-1], InvalidKeyShare)
    for client, result in zip(clients, results[:-1], strict=True):
        assert not isinstance(result, BaseException)
        assert client.complete(result[0]) == result[1]
    assert observer.count("key_exchange", Outcome.REJECTED) == 1
    assert observer.batch_sizes[("key_exchange", "controlled")] == {6: 1}


# --- process mode: the job specs ------------------------------------------------------------


def test_job_specs_pickle_and_run_in_a_worker() -> None:
    """``run_job`` is what a worker process runs; here it runs in this process, after a
    pickle round trip of the spec, as the pool would send it."""
    offload.build_worker_providers(("openssl",))
    client = openssl.classical_groups()["x25519"].start()
    job = pickle.loads(pickle.dumps(KeyExchangeJob("openssl", X25519, client.share)))
    result = pickle.loads(pickle.dumps(run_job(job)))
    assert result.error is None
    share, secret = result.value
    assert client.complete(share) == secret
    assert result.started <= result.finished

    key = SignerKey(_pem_key())
    assert repr(key) == f"<SignerKey {key.key_id[:12]}>"  # never the key itself
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    signed = run_job(pickle.loads(pickle.dumps(SignJob(key, scheme, b"m"))))
    assert signed.error is None
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    openssl.verify_signature(
        load_pem_private_key(_pem_key(), None).public_key(), scheme, b"m", signed.value
    )


def test_worker_errors_travel_back_as_the_classes_the_engine_tells_apart() -> None:
    offload.build_worker_providers(("openssl",))
    bad = run_job(KeyExchangeJob("openssl", X25519, b"\x00" * 31))
    assert isinstance(bad.error, InvalidKeyShare)
    missing = run_job(KeyExchangeJob("liboqs-not-initialised", X25519, b"\x00" * 32))
    assert isinstance(missing.error, BackendError)
    assert "not initialised in this worker" in str(missing.error)
    garbage = run_job(SignJob(SignerKey(b"not a key"), 0x0403, b"m"))
    assert isinstance(garbage.error, BackendError)
    assert "cannot load signing key" in str(garbage.error)
    pickle.loads(pickle.dumps(garbage))
