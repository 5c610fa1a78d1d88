"""How a backend call is run: inline, on a thread pool, on a process pool, or batched.

The engine asks for crypto with an event (``KeyExchangeNeeded``, ``SignatureNeeded``,
``CertificateVerificationNeeded``) and never learns where it runs; this module decides. One
``Offloader`` per serving process owns the pools of the configured backend (and of its
fallback) and is shared by every listener.

Rules this module keeps:

- **Every job has a deadline** (``timeout``, counted from submission, so queueing counts):
  a backend call that stalls past it fails that one handshake with ``BackendTimeout``
  (internal_error), never hangs it. On a thread a stalled call cannot be interrupted (a
  thread cannot be killed; a token call is in C), so the job keeps its concurrency slot until
  the call really returns: a stalling backend fills its own slots and new jobs then time out
  waiting, instead of piling unbounded work onto a pool that is not moving. A worker process
  stalled in a call is killed instead, and replaced; the jobs it had not started go to the
  other workers.
- **Results come back on the event loop, never inside the submitting call**: ``done`` is
  called from a later loop iteration, so a caller may submit from within its own event
  handling without re-entering itself.
- **A failure is one handshake's**: the caller gets the exception (``fail_*``:
  internal_error, or illegal_parameter for ``InvalidKeyShare``), and it is counted, handed to
  the observer and logged with its reason (rate-limited: a dead backend under load must not
  write a line per handshake).
- **Fallback**: with a fallback backend, K consecutive key-exchange failures (errors or
  timeouts, not a peer's invalid share) open a circuit breaker: new handshakes' key exchanges
  go to the fallback's own pool (a stalled primary pool cannot block it), and every
  ``probe_interval`` a self-test round trip (the fallback plays client, the primary serves)
  checks the primary; the first round trip whose secrets agree switches back. Both switches
  are logged and reported to the observer. Signatures have no fallback: a key lives in one
  backend (a token keeps it inside); while the breaker is open, a signature whose key is not
  in the primary backend runs on the fallback's pool.
- **Client chain verifications** are not a backend's work but cryptography's path builder:
  they run on the loop in inline mode, and on an ``x509`` thread pool of their own (its own
  slots, the same timeout) in every other mode, process mode included (the verifier holds
  the trust anchors of this process). A chain that does not verify is the client's doing
  (``Outcome.REJECTED``), never a backend failure.
- **Process mode** rebuilds everything in the worker from picklable specs (``CryptoJob``):
  a ``KeyExchangeJob`` names the backend and the group, a ``SignJob`` carries the PEM key
  (``SignerKey``), which each worker loads once and caches. So process mode supports key
  exchange on backends a worker can create by name (openssl, liboqs) and signing with PEM
  keys registered with ``register_signer``; pkcs11 is refused at start-up, because a PKCS#11
  session belongs to the process that logged in.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import importlib
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final, Protocol, TypeVar

from ..tls.enums import SignatureScheme, group_name
from .backends import BACKEND_MODULES
from .provider import (
    BackendError,
    CertificateRejected,
    ClientCertificateVerifier,
    CryptoProvider,
    InvalidKeyShare,
    KxGroup,
    PeerIdentity,
    SharedSecret,
    Signer,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

KIND_KEY_EXCHANGE: Final = "key_exchange"
KIND_SIGNATURE: Final = "signature"
# A client certificate chain checked against the trust anchors (cryptography's X.509 path
# builder, not a backend): run on the "x509" runner.
KIND_CHAIN_VERIFICATION: Final = "chain_verification"
X509_RUNNER: Final = "x509"
# The breaker's synthetic round trip against the primary while the fallback serves.
KIND_PROBE: Final = "probe"

# Process pools start their workers with "spawn": a fresh interpreter inherits neither the
# parent's threads (fork() would copy a lock another thread holds, held forever) nor any
# library state (a loaded PKCS#11 module, an OpenSSL engine). The cost, about 0.2 s per
# worker, is paid once at start-up.
PROCESS_START_METHOD: Final = "spawn"
# Worker processes that have not come up and built their backend in this long are broken.
START_TIMEOUT: Final = 60.0
# close() waits this long for pool threads and processes; a call that never returns must not
# keep the proxy from exiting (the threads are daemons, the processes are terminated).
CLOSE_TIMEOUT: Final = 5.0
# Jobs sent ahead to one worker process; the others wait in the parent. Keeps a pipe far
# from full (a job is a few KiB at most), so that sending never blocks the event loop.
PIPELINE_DEPTH: Final = 4
# At most one failure line per (backend, kind) this often; the others are counted in it.
FAILURE_LOG_INTERVAL: Final = 1.0

# Backends that cannot run in a worker process, and why.
_NOT_PROCESS_SAFE: Final[Mapping[str, str]] = {
    "pkcs11": (
        "a PKCS#11 session belongs to the process that opened it and logged in (a token is "
        "not fork-safe, and every worker would log in on its own); use offload: thread"
    ),
}


class OffloadConfigError(ValueError):
    """An offload configuration that cannot work; the message says what to change."""


class BackendTimeout(BackendError):
    """A backend call did not finish within the offload timeout (internal_error)."""


# --- settings -------------------------------------------------------------------------------


class OffloadMode(StrEnum):
    INLINE = "inline"  # on the event loop thread: no hand-off cost, but it blocks the loop
    THREAD = "thread"  # a pool of threads: for backends that release the GIL or wait (tokens)
    PROCESS = "process"  # a pool of processes: CPU parallelism beyond one GIL
    BATCH = "batch"  # concurrent requests gathered into one backend call (GPU, FPGA)


@dataclass(frozen=True, slots=True)
class BatchSettings:
    max_items: int = 32  # a batch is run as soon as it holds this many requests
    max_delay: float = 200e-6  # ... or this long after its first request (seconds)

    def __post_init__(self) -> None:
        if self.max_items < 1:
            raise ValueError(f"batch max_items must be at least 1, not {self.max_items}")
        if not self.max_delay >= 0:
            raise ValueError(f"batch max_delay must not be negative, not {self.max_delay}")


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failures: int = 5  # consecutive key-exchange failures that switch to the fallback
    probe_interval: float = 5.0  # seconds between round trips against the primary

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise ValueError(f"breaker failures must be at least 1, not {self.failures}")
        if not self.probe_interval > 0:
            raise ValueError(f"breaker probe_interval must be positive, not {self.probe_interval}")


@dataclass(frozen=True, slots=True)
class OffloadSettings:
    """How one backend's calls run. ``backend`` and ``fallback`` are backend names (keys of
    ``BACKEND_MODULES``; a dotted module path also works, for out-of-tree backends)."""

    backend: str = "openssl"
    mode: OffloadMode = OffloadMode.INLINE
    workers: int = 4  # threads or processes (thread, process and batch modes)
    concurrency: int = 64  # jobs in flight per backend; more wait for a slot
    timeout: float = 2.0  # per job, from submission to result
    batch: BatchSettings = field(default_factory=BatchSettings)
    fallback: str | None = None
    breaker: BreakerSettings = field(default_factory=BreakerSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", OffloadMode(self.mode))
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {self.workers}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {self.concurrency}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, not {self.timeout}")
        if self.fallback is not None and self.fallback == self.backend:
            raise ValueError(f"fallback must be another backend than {self.backend}")


# --- the observer ---------------------------------------------------------------------------


class Outcome(StrEnum):
    OK = "ok"
    # The peer's input was invalid (InvalidKeyShare, illegal_parameter; a client chain that
    # did not verify): not the backend's fault, so it never counts towards the breaker.
    REJECTED = "rejected"
    ERROR = "error"
    TIMEOUT = "timeout"


class OffloadObserver(Protocol):
    """Where the figures go (the metrics module connects Prometheus here). Called on the
    event loop thread; an exception raised here is logged and otherwise ignored."""

    def on_job(
        self,
        *,
        kind: str,
        backend: str,
        label: str,
        queue_seconds: float,
        service_seconds: float,
        outcome: Outcome,
        batch_size: int,
    ) -> None:
        """One finished job. ``kind``: key_exchange, signature or probe; ``label``: the
        group or signature scheme name; ``queue_seconds``: submission until the backend
        call started (slot wait, pool queue, batch gathering, IPC); ``service_seconds``:
        the backend call (for a batch, the whole batch's call)."""
        ...

    def on_batch(self, *, kind: str, backend: str, size: int) -> None:
        """One batch handed to the backend, with its number of requests."""
        ...

    def on_switch(self, *, primary: str, fallback: str, to_fallback: bool, reason: str) -> None:
        """The breaker switched new handshakes to the fallback (``to_fallback``) or back."""
        ...


class NullObserver:
    """Discards everything; subclass it to implement only some of the callbacks."""

    def on_job(
        self,
        *,
        kind: str,
        backend: str,
        label: str,
        queue_seconds: float,
        service_seconds: float,
        outcome: Outcome,
        batch_size: int,
    ) -> None:
        pass

    def on_batch(self, *, kind: str, backend: str, size: int) -> None:
        pass

    def on_switch(self, *, primary: str, fallback: str, to_fallback: bool, reason: str) -> None:
        pass


@dataclass(frozen=True, slots=True)
class JobRecord:
    kind: str
    backend: str
    label: str
    queue_seconds: float
    service_seconds: float
    outcome: Outcome
    batch_size: int


@dataclass(frozen=True, slots=True)
class SwitchRecord:
    primary: str
    fallback: str
    to_fallback: bool
    reason: str


class RecordingObserver(NullObserver):
    """Keeps what it is told in memory: the last ``keep`` jobs, outcome counts, the batch
    size histogram and every switch. For tests, benchmarks and ``pqproxy backends``."""

    def __init__(self, keep: int = 100_000) -> None:
        self.jobs: collections.deque[JobRecord] = collections.deque(maxlen=keep)
        self.outcomes: collections.Counter[tuple[str, str, Outcome]] = collections.Counter()
        # (kind, backend) -> batch size -> number of batches of that size
        self.batch_sizes: dict[tuple[str, str], collections.Counter[int]] = {}
        self.switches: list[SwitchRecord] = []

    def on_job(
        self,
        *,
        kind: str,
        backend: str,
        label: str,
        queue_seconds: float,
        service_seconds: float,
        outcome: Outcome,
        batch_size: int,
    ) -> None:
        self.jobs.append(
            JobRecord(kind, backend, label, queue_seconds, service_seconds, outcome, batch_size)
        )
        self.outcomes[(kind, backend, outcome)] += 1

    def on_batch(self, *, kind: str, backend: str, size: int) -> None:
        self.batch_sizes.setdefault((kind, backend), collections.Counter())[size] += 1

    def on_switch(self, *, primary: str, fallback: str, to_fallback: bool, reason: str) -> None:
        self.switches.append(SwitchRecord(primary, fallback, to_fallback, reason))

    def count(self, kind: str, outcome: Outcome, backend: str | None = None) -> int:
        return sum(
            n
            for (k, b, o), n in self.outcomes.items()
            if k == kind and o == outcome and (backend is None or b == backend)
        )


# --- batch calls a backend may offer ----------------------------------------------------------


class BatchKxGroup(KxGroup, Protocol):
    """A group whose backend takes many client shares in one call (a GPU or FPGA engine).
    One result per share, in order: the pair, or the exception for that share alone."""

    def server_exchange_batch(
        self, client_shares: Sequence[bytes]
    ) -> Sequence[tuple[bytes, SharedSecret] | BaseException]: ...


class BatchSigner(Signer, Protocol):
    """A signer that signs many messages under one scheme in one call."""

    def sign_batch(
        self, scheme: int, messages: Sequence[bytes]
    ) -> Sequence[bytes | BaseException]: ...


# --- process mode: picklable job specs and the worker side --------------------------------


@dataclass(frozen=True, slots=True, repr=False)
class SignerKey:
    """A private key a worker process can load for itself. Sent with every signing job
    (a few hundred bytes to a few KiB); a worker loads it once and caches it by ``key_id``."""

    pem: bytes
    password: bytes | None = None
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(self.pem)
        digest.update(b"\0" + (self.password or b""))
        object.__setattr__(self, "key_id", digest.hexdigest())

    @classmethod
    def from_file(cls, path: str, password: bytes | None = None) -> SignerKey:
        with open(path, "rb") as f:
            return cls(f.read(), password)

    def __repr__(self) -> str:
        return f"<SignerKey {self.key_id[:12]}>"


@dataclass(frozen=True, slots=True, repr=False)
class KeyExchangeJob:
    """The server's key exchange for ``group`` on the backend named ``backend``."""

    backend: str
    group: int
    share: bytes

    def __repr__(self) -> str:
        return f"<KeyExchangeJob {self.backend} {group_name(self.group)}>"


@dataclass(frozen=True, slots=True, repr=False)
class SignJob:
    key: SignerKey
    scheme: int
    message: bytes

    def __repr__(self) -> str:
        return f"<SignJob {self.key!r} {self.scheme:#06x}>"


CryptoJob = KeyExchangeJob | SignJob


@dataclass(frozen=True, slots=True)
class JobResult:
    """What a worker sends back: the value or the error, and when (``time.monotonic``,
    which on Linux is one clock for every process) the call started and ended."""

    value: Any
    error: BaseException | None
    started: float
    finished: float


def create_provider(backend: str) -> CryptoProvider:
    """The provider of the backend named ``backend``, created the way the configuration
    names it; BackendError says why it cannot be (library missing, self-reported reason)."""
    module_name = BACKEND_MODULES.get(backend)
    if module_name is None:
        if "." not in backend:
            raise OffloadConfigError(
                f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_MODULES)}"
            )
        module_name = backend
    module: Any = importlib.import_module(module_name)
    reason = module.unavailable_reason()
    if reason is not None:
        raise BackendError(f"backend {backend} unavailable: {reason}")
    provider: CryptoProvider = module.create_provider()
    return provider


# Per worker process: its providers (or why one could not be built) and loaded keys.
_WORKER_PROVIDERS: dict[str, CryptoProvider] = {}
_WORKER_ERRORS: dict[str, str] = {}
_WORKER_SIGNERS: dict[str, Signer] = {}


def _worker_main(conn: Connection, backends: tuple[str, ...]) -> None:
    """A worker process: build the backends, report, then answer jobs in order until the
    parent closes the pipe."""
    # The terminal's Ctrl-C reaches the whole process group; the parent decides, and
    # stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    build_worker_providers(backends)
    try:
        conn.send(_worker_status(backends))
        while True:
            job = conn.recv()
            conn.send(run_job(job))
    except (EOFError, OSError):
        return  # the parent is gone or closed the pipe: nothing left to answer


def build_worker_providers(backends: tuple[str, ...]) -> None:
    """A worker's providers, built once; errors are kept for the jobs to report."""
    for backend in backends:
        try:
            _WORKER_PROVIDERS[backend] = create_provider(backend)
        except Exception as exc:
            _WORKER_ERRORS[backend] = f"{type(exc).__name__}: {exc}"


def _worker_provider(backend: str) -> CryptoProvider:
    provider = _WORKER_PROVIDERS.get(backend)
    if provider is None:
        reason = _WORKER_ERRORS.get(backend, "not initialised in this worker")
        raise BackendError(f"offload worker: backend {backend}: {reason}")
    return provider


def _worker_status(backends: tuple[str, ...]) -> str | None:
    """For start-up: why this worker cannot serve, or None."""
    problems = [f"{b}: {_WORKER_ERRORS[b]}" for b in backends if b in _WORKER_ERRORS]
    missing = [b for b in backends if b not in _WORKER_PROVIDERS and b not in _WORKER_ERRORS]
    problems += [f"{b}: not initialised" for b in missing]
    return "; ".join(problems) or None


def _worker_signer(key: SignerKey) -> Signer:
    signer = _WORKER_SIGNERS.get(key.key_id)
    if signer is None:
        from .backends.openssl import load_signer

        try:
            signer = load_signer(key.pem, key.password)
        except ValueError as exc:
            raise BackendError(f"offload worker: cannot load signing key: {exc}") from None
        _WORKER_SIGNERS[key.key_id] = signer
    return signer


def _picklable(error: BaseException) -> BaseException:
    # The classes a caller tells apart travel as they are; anything else becomes a
    # BackendError with its type and message, so that an exception a backend library defines
    # (maybe unpicklable) cannot break the result pipe.
    if type(error) in (BackendError, BackendTimeout, InvalidKeyShare, ValueError):
        return error
    return BackendError(f"{type(error).__name__}: {error}")


def run_job(job: CryptoJob) -> JobResult:
    """The one entry point of a worker process: run ``job`` on this process's own backend."""
    started = time.monotonic()
    value: Any = None
    error: BaseException | None = None
    try:
        if isinstance(job, KeyExchangeJob):
            exchange = _worker_provider(job.backend).groups.get(job.group)
            if exchange is None:
                raise BackendError(f"backend {job.backend} has no group {group_name(job.group)}")
            share, secret = exchange.server_exchange(job.share)
            value = (share, bytes(secret))
        else:
            value = _worker_signer(job.key).sign(job.scheme, job.message)
    except Exception as exc:
        error = _picklable(exc)
    return JobResult(value, error, started, time.monotonic())


# --- small machinery ---------------------------------------------------------------------------


def _deliver(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """From any thread: run ``callback(*args)`` on the loop."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass  # the loop is closed: nobody waits for this result any more


async def _off_loop(call: Callable[[], T], timeout: float, what: str) -> T:
    """Run a blocking call (pool start-up or shutdown) on a daemon thread, waiting at most
    ``timeout``: a daemon, so a call that never returns cannot block the interpreter's exit
    the way a thread of the default executor would."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = call()
        except BaseException as exc:
            _deliver(loop, settle, None, exc)
        else:
            _deliver(loop, settle, result, None)

    threading.Thread(target=run, name=f"pqproxy-offload-{what}", daemon=True).start()
    return await asyncio.wait_for(future, timeout)


class _ThreadPool:
    """Daemon worker threads fed from one queue. Not ``ThreadPoolExecutor``: its threads
    are joined at interpreter exit, so a single backend call that never returns would keep
    the proxy from exiting; these are daemons and ``close`` waits for them only so long."""

    def __init__(self, name: str, workers: int) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, call: Callable[[], None]) -> None:
        self._queue.put(call)

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            try:
                call()
            except BaseException as exc:  # the calls report their own errors; last resort
                logger.error("offload thread: %s: %s", type(exc).__name__, exc)

    def close(self, timeout: float) -> int:
        """Stop the threads; how many are still busy (in a call) after ``timeout``."""
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(thread.is_alive() for thread in self._threads)


def _call(run: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return run(), None
    except BaseException as exc:  # noqa: B036 - delivered to the handshake, never swallowed
        return None, exc


# --- operations and jobs -------------------------------------------------------------------------


class _KxOp:
    """A server key exchange (or a probe, which is one)."""

    __slots__ = ("kind", "group", "exchange", "share")

    def __init__(self, kind: str, group: int, exchange: KxGroup, share: bytes) -> None:
        self.kind = kind
        self.group = group
        self.exchange = exchange
        self.share = share

    def run(self) -> tuple[bytes, SharedSecret]:
        return self.exchange.server_exchange(self.share)

    def batch_key(self) -> tuple[Any, ...]:
        # One backend call serves one group: the provider's group objects are long-lived.
        return (KIND_KEY_EXCHANGE, id(self.exchange))

    def spec(self, backend: str, keys: Mapping[Signer, SignerKey]) -> CryptoJob:
        return KeyExchangeJob(backend, self.group, self.share)

    @staticmethod
    def from_worker(value: Any) -> tuple[bytes, SharedSecret]:
        share, secret = value
        return share, SharedSecret(secret)

    @staticmethod
    def run_batch(ops: Sequence[_KxOp]) -> list[tuple[Any, BaseException | None]]:
        batch_call = getattr(ops[0].exchange, "server_exchange_batch", None)
        if batch_call is None:
            # No batch call: a loop, one error per request.
            return [_call(op.run) for op in ops]
        results, error = _call(lambda: list(batch_call([op.share for op in ops])))
        return _spread(results, error, len(ops))


class _SignOp:
    __slots__ = ("signer", "scheme", "message")
    kind = KIND_SIGNATURE

    def __init__(self, signer: Signer, scheme: int, message: bytes) -> None:
        self.signer = signer
        self.scheme = scheme
        self.message = message

    def run(self) -> bytes:
        return self.signer.sign(self.scheme, self.message)

    def batch_key(self) -> tuple[Any, ...]:
        return (KIND_SIGNATURE, id(self.signer), self.scheme)

    def spec(self, backend: str, keys: Mapping[Signer, SignerKey]) -> CryptoJob:
        key = keys.get(self.signer)
        if key is None:
            raise BackendError(
                f"process offload: no PEM key registered for {self.signer!r} "
                "(register_signer at start-up; a key outside this process cannot be used)"
            )
        return SignJob(key, self.scheme, self.message)

    @staticmethod
    def from_worker(value: Any) -> bytes:
        return bytes(value)

    @staticmethod
    def run_batch(ops: Sequence[_SignOp]) -> list[tuple[Any, BaseException | None]]:
        signer, scheme = ops[0].signer, ops[0].scheme
        batch_call = getattr(signer, "sign_batch", None)
        if batch_call is None:
            return [_call(op.run) for op in ops]
        results, error = _call(lambda: list(batch_call(scheme, [op.message for op in ops])))
        return _spread(results, error, len(ops))


def _spread(
    results: list[Any] | None, error: BaseException | None, count: int
) -> list[tuple[Any, BaseException | None]]:
    """A batch call's answer as one (value, error) per request."""
    if error is None and results is not None and len(results) != count:
        error = BackendError(f"batch call returned {len(results)} results for {count} requests")
    if error is not None or results is None:
        return [(None, error)] * count
    return [(None, r) if isinstance(r, BaseException) else (r, None) for r in results]


class _ChainOp:
    """A client chain verification. Always run on threads (the ``x509`` runner), never in a
    worker process: the verifier is an object of this process, and what it costs is bounded
    by its own cheap refusals before the path builder."""

    __slots__ = ("verifier", "chain", "now")
    kind = KIND_CHAIN_VERIFICATION

    def __init__(
        self, verifier: ClientCertificateVerifier, chain: tuple[bytes, ...], now: float
    ) -> None:
        self.verifier = verifier
        self.chain = chain
        self.now = now

    def run(self) -> PeerIdentity:
        return self.verifier.verify_chain(self.chain, self.now)

    def batch_key(self) -> tuple[Any, ...]:
        return (KIND_CHAIN_VERIFICATION,)

    def spec(self, backend: str, keys: Mapping[Signer, SignerKey]) -> CryptoJob:
        raise BackendError("chain verifications do not run in worker processes")

    @staticmethod
    def from_worker(value: Any) -> PeerIdentity:
        raise BackendError("chain verifications do not run in worker processes")

    @staticmethod
    def run_batch(ops: Sequence[_ChainOp]) -> list[tuple[Any, BaseException | None]]:
        return [_call(op.run) for op in ops]


_Op = _KxOp | _SignOp | _ChainOp
Done = Callable[[Any], None]


class _Job:
    """One request from submission to result. Touched on the loop thread only."""

    __slots__ = (
        "runner",
        "op",
        "label",
        "submitted",
        "done",
        "timer",
        "finished",
        "holds_slot",
    )

    def __init__(self, runner: _Runner, op: _Op, label: str, submitted: float, done: Done) -> None:
        self.runner = runner
        self.op = op
        self.label = label
        self.submitted = submitted
        self.done = done
        self.timer: asyncio.TimerHandle | None = None
        self.finished = False  # the caller has its answer (result, error or timeout)
        self.holds_slot = False


class _Slots:
    """A per-backend concurrency limit with a FIFO of waiting jobs, callback-style (no task
    per waiting request). A job that times out while waiting leaves the queue at once."""

    def __init__(self, limit: int, dispatch: Callable[[_Job], None]) -> None:
        self._free = limit
        self._dispatch = dispatch
        self._waiting: collections.OrderedDict[_Job, None] = collections.OrderedDict()

    def acquire(self, job: _Job) -> None:
        if self._free > 0:
            self._free -= 1
            job.holds_slot = True
            self._dispatch(job)
        else:
            self._waiting[job] = None

    def forget(self, job: _Job) -> None:
        self._waiting.pop(job, None)

    def release(self) -> None:
        while self._waiting:
            job, _ = self._waiting.popitem(last=False)
            if not job.finished:
                job.holds_slot = True
                self._dispatch(job)
                return
        self._free += 1

    @property
    def waiting(self) -> int:
        return len(self._waiting)


# --- runners: where one backend's calls execute -----------------------------------------------


class _Runner:
    """One backend in one mode. ``complete`` is the offloader's result callback."""

    def __init__(
        self,
        backend: str,
        provider: CryptoProvider,
        settings: OffloadSettings,
        complete: Callable[[_Job, Any, BaseException | None, float, float, int], None],
    ) -> None:
        self.backend = backend
        self.provider = provider
        self.settings = settings
        self.complete = complete
        self.slots = _Slots(settings.concurrency, self.dispatch)
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    async def close(self) -> None:
        pass

    def dispatch(self, job: _Job) -> None:
        raise NotImplementedError

    def job_timed_out(self, job: _Job) -> None:
        """The caller has been answered with a timeout; a runner that can free what the job
        holds does it here."""

    def _fail_soon(self, job: _Job, error: BaseException) -> None:
        assert self.loop is not None
        now = time.monotonic()
        self.loop.call_soon(self.complete, job, None, error, now, now, 1)


class _InlineRunner(_Runner):
    def dispatch(self, job: _Job) -> None:
        assert self.loop is not None
        started = time.monotonic()
        value, error = _call(job.op.run)
        self.loop.call_soon(self.complete, job, value, error, started, time.monotonic(), 1)


class _ThreadRunner(_Runner):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._pool: _ThreadPool | None = None

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        await super().start(loop)
        self._pool = _ThreadPool(f"pqproxy-{self.backend}", self.settings.workers)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            busy = await _off_loop(lambda: pool.close(CLOSE_TIMEOUT), CLOSE_TIMEOUT + 1, "close")
            if busy:
                logger.warning(
                    "offload %s: %d threads still inside a backend call at close",
                    self.backend,
                    busy,
                )

    def dispatch(self, job: _Job) -> None:
        loop, pool = self.loop, self._pool
        assert loop is not None
        if pool is None:
            self._fail_soon(job, BackendError(f"offload {self.backend}: closed"))
            return
        run = job.op.run

        def work() -> None:
            started = time.monotonic()
            value, error = _call(run)
            _deliver(loop, self.complete, job, value, error, started, time.monotonic(), 1)

        pool.submit(work)


class _BatchRunner(_ThreadRunner):
    """Gathers jobs per (kind, group or signer) until ``max_items`` or ``max_delay``, then
    runs them as one backend call (or a loop) on a pool thread."""

    def __init__(self, *args: Any, observer: OffloadObserver) -> None:
        super().__init__(*args)
        self._observer = observer
        self._pending: dict[tuple[Any, ...], list[_Job]] = {}
        self._timers: dict[tuple[Any, ...], asyncio.Handle] = {}

    def dispatch(self, job: _Job) -> None:
        assert self.loop is not None
        key = job.op.batch_key()
        items = self._pending.setdefault(key, [])
        items.append(job)
        batch = self.settings.batch
        if len(items) >= batch.max_items:
            self._flush(key)
        elif len(items) == 1:
            # A zero delay still gathers what arrives in this loop iteration.
            if batch.max_delay > 0:
                self._timers[key] = self.loop.call_later(batch.max_delay, self._flush, key)
            else:
                self._timers[key] = self.loop.call_soon(self._flush, key)

    def _flush(self, key: tuple[Any, ...]) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        jobs = self._pending.pop(key, [])
        live = [job for job in jobs if not job.finished]
        now = time.monotonic()
        for job in jobs:
            if job.finished:  # timed out while gathering: give its slot back
                self.complete(job, None, BackendTimeout("timed out"), now, now, 1)
        if not live:
            return
        loop, pool = self.loop, self._pool
        assert loop is not None
        if pool is None:
            for job in live:
                self._fail_soon(job, BackendError(f"offload {self.backend}: closed"))
            return
        try:
            self._observer.on_batch(kind=live[0].op.kind, backend=self.backend, size=len(live))
        except Exception as exc:
            logger.error("offload observer on_batch failed: %s: %s", type(exc).__name__, exc)
        ops = [job.op for job in live]
        run_batch = ops[0].run_batch

        def work() -> None:
            started = time.monotonic()
            results = run_batch(ops)  # type: ignore[arg-type]
            _deliver(loop, self._deliver_batch, live, results, started, time.monotonic())

        pool.submit(work)

    def _deliver_batch(
        self,
        jobs: list[_Job],
        results: list[tuple[Any, BaseException | None]],
        started: float,
        finished: float,
    ) -> None:
        for job, (value, error) in zip(jobs, results, strict=True):
            self.complete(job, value, error, started, finished, len(jobs))

    async def close(self) -> None:
        for key in list(self._pending):
            self._flush(key)
        await super().close()


class _Worker:
    """One worker process and the jobs sent to it, in order: a worker answers one job at a
    time, so the answers come back in the order the jobs went out."""

    __slots__ = ("process", "conn", "outstanding", "head_since")

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.outstanding: collections.deque[tuple[_Job, CryptoJob]] = collections.deque()
        self.head_since = 0.0  # when the job at the head of ``outstanding`` started


class _ProcessRunner(_Runner):
    """Worker processes, each with a pipe the event loop reads directly (``add_reader``).
    Not ``multiprocessing.Pool``: its handler threads, locks and queues cost about four
    times the CPU per job of a plain pipe (measured here: 100 against 27 µs), which is as
    much as a key exchange; and a Pool cannot stop one stalled worker, which this does."""

    def __init__(self, *args: Any, keys: Mapping[Signer, SignerKey]) -> None:
        super().__init__(*args)
        self._keys = keys
        self._workers: list[_Worker] = []  # in service
        self._retired: list[_Worker] = []  # out of service, not yet exited
        # Jobs no worker has room for yet (each has at most PIPELINE_DEPTH in its pipe).
        self._backlog: collections.deque[tuple[_Job, CryptoJob]] = collections.deque()
        self._replacing: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- workers --

    def _spawn(self, count: int) -> list[_Worker]:
        """Start ``count`` workers and wait until each has built its backend (blocking: runs
        on a helper thread)."""
        context = multiprocessing.get_context(PROCESS_START_METHOD)
        started: list[_Worker] = []
        try:
            for _ in range(count):
                parent, child = context.Pipe()
                process = context.Process(
                    target=_worker_main,
                    args=(child, (self.backend,)),
                    name=f"pqproxy-offload-{self.backend}",
                    daemon=True,  # never outlives this process
                )
                process.start()
                child.close()
                started.append(_Worker(process, parent))
            deadline = time.monotonic() + START_TIMEOUT
            for worker in started:
                if not worker.conn.poll(max(0.0, deadline - time.monotonic())):
                    raise BackendError(
                        f"process offload: a worker did not start within {START_TIMEOUT:g}s"
                    )
                try:
                    status = worker.conn.recv()
                except EOFError:
                    raise BackendError(
                        f"process offload: a worker exited during start-up "
                        f"(exit code {worker.process.exitcode})"
                    ) from None
                if status is not None:
                    raise BackendError(f"process offload: a worker cannot serve: {status}")
        except BaseException:
            _stop_workers(started, 1.0)
            raise
        return started

    def _attach(self, worker: _Worker) -> None:
        loop = self.loop
        assert loop is not None
        self._workers.append(worker)
        loop.add_reader(worker.conn.fileno(), self._on_answers, worker)
        loop.add_reader(worker.process.sentinel, self._on_exit, worker)
        self._feed(worker)

    def _retire(self, worker: _Worker) -> None:
        """Take a worker out of service: it gets no new job, the jobs it has not started go
        back to the front of the backlog for the others, and a new worker is started."""
        if worker not in self._workers:
            return
        assert self.loop is not None
        self._workers.remove(worker)
        self._retired.append(worker)
        self.loop.remove_reader(worker.conn.fileno())
        head = [worker.outstanding.popleft()] if worker.outstanding else []
        self._backlog.extendleft(reversed(worker.outstanding))
        worker.outstanding = collections.deque(head)
        if not self._closed:
            task = self.loop.create_task(self._replace())
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)
        for other in self._workers:
            self._feed(other)

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        await super().start(loop)
        count = self.settings.workers
        for worker in await _off_loop(lambda: self._spawn(count), START_TIMEOUT + 5, "start"):
            self._attach(worker)

    async def close(self) -> None:
        self._closed = True
        loop = self.loop
        for task in list(self._replacing):
            task.cancel()
        workers = self._workers + self._retired
        self._workers, self._retired = [], []
        backlog = list(self._backlog)
        self._backlog.clear()
        if loop is not None:
            for worker in workers:
                loop.remove_reader(worker.conn.fileno())
                loop.remove_reader(worker.process.sentinel)
        now = time.monotonic()
        for job, _ in backlog:
            self.complete(job, None, BackendError("offload closed"), now, now, 1)
        if workers:
            await _off_loop(
                lambda: _stop_workers(workers, CLOSE_TIMEOUT), 2 * CLOSE_TIMEOUT + 5, "close"
            )

    # -- jobs --

    def dispatch(self, job: _Job) -> None:
        try:
            spec = job.op.spec(self.backend, self._keys)
        except BackendError as exc:
            self._fail_soon(job, exc)
            return
        if not self._workers:
            if self._replacing:  # a new worker is on its way: wait for it (or the timeout)
                self._backlog.append((job, spec))
            else:
                self._fail_soon(job, BackendError(f"offload {self.backend}: no worker process"))
            return
        worker = min(self._workers, key=lambda w: len(w.outstanding))
        if len(worker.outstanding) < PIPELINE_DEPTH:
            self._send(worker, job, spec)
        else:
            self._backlog.append((job, spec))

    def _send(self, worker: _Worker, job: _Job, spec: CryptoJob) -> None:
        if not worker.outstanding:
            worker.head_since = time.monotonic()
        worker.outstanding.append((job, spec))
        try:
            worker.conn.send(spec)
        except OSError:
            # The worker is gone (its sentinel will say how); this job goes to another.
            worker.outstanding.pop()
            self._backlog.appendleft((job, spec))
            self._retire(worker)

    def _feed(self, worker: _Worker) -> None:
        while self._backlog and len(worker.outstanding) < PIPELINE_DEPTH:
            job, spec = self._backlog.popleft()
            if job.finished:  # timed out while waiting here: give its slot back
                now = time.monotonic()
                self.complete(job, None, BackendTimeout("timed out"), now, now, 1)
                continue
            self._send(worker, job, spec)
            if worker not in self._workers:
                return

    def _on_answers(self, worker: _Worker) -> None:
        try:
            while worker.outstanding and worker.conn.poll():
                result: JobResult = worker.conn.recv()
                job, _ = worker.outstanding.popleft()
                worker.head_since = time.monotonic()
                value = job.op.from_worker(result.value) if result.error is None else None
                self.complete(job, value, result.error, result.started, result.finished, 1)
        except (EOFError, OSError):
            self._retire(worker)  # gone: its sentinel answers the job it was in
            return
        if worker in self._workers:
            self._feed(worker)

    def _on_exit(self, worker: _Worker) -> None:
        self._retire(worker)
        assert self.loop is not None
        self.loop.remove_reader(worker.process.sentinel)
        if worker in self._retired:
            self._retired.remove(worker)
        # The sentinel is readable once the process has ended, but exitcode is only set once it
        # is reaped: reap first (a short join, never a hang), then read the code, so the log
        # names the real exit code and not None.
        worker.process.join(1.0)
        code = worker.process.exitcode
        logger.error(
            "offload %s: worker pid=%s exited (exit code %s) in a call%s",
            self.backend,
            worker.process.pid,
            code,
            "" if self._closed else "; starting a new one",
        )
        now = time.monotonic()
        error = BackendError(f"offload worker exited (exit code {code})")
        while worker.outstanding:  # the job it was in, if any
            job, _ = worker.outstanding.popleft()
            self.complete(job, None, error, now, now, 1)
        worker.conn.close()

    async def _replace(self) -> None:
        try:
            (worker,) = await _off_loop(lambda: self._spawn(1), START_TIMEOUT + 5, "respawn")
        except Exception as exc:
            logger.error("offload %s: no new worker: %s", self.backend, _describe_error(exc))
            now = time.monotonic()
            if not self._workers and not self._replacing - {asyncio.current_task()}:
                # Nobody will ever take the backlog: answer it now.
                while self._backlog:
                    job, _ = self._backlog.popleft()
                    self.complete(job, None, BackendError("offload: no worker"), now, now, 1)
            return
        if self._closed:
            _stop_workers([worker], 1.0)
            return
        self._attach(worker)

    def job_timed_out(self, job: _Job) -> None:
        for entry in self._backlog:
            if entry[0] is job:
                self._backlog.remove(entry)
                now = time.monotonic()
                self.complete(job, None, BackendTimeout("timed out"), now, now, 1)
                return
        now = time.monotonic()
        for worker in self._workers:
            # Only a worker whose current call is the one that timed out, and that has been
            # in it for half the timeout or more: a stall, not a queue. A process can be
            # stopped (a thread cannot), and a new one takes its place.
            if worker.outstanding and worker.outstanding[0][0] is job:
                if now - worker.head_since >= self.settings.timeout / 2:
                    logger.warning(
                        "offload %s: worker pid=%s stalled in a call for %.3gs; stopping it",
                        self.backend,
                        worker.process.pid,
                        now - worker.head_since,
                    )
                    worker.process.kill()
                    self._retire(worker)
                return


def _stop_workers(workers: Sequence[_Worker], timeout: float) -> None:
    """End workers (blocking): close their pipes (a worker exits when it reads EOF), then
    SIGTERM the ones still running (one stuck in a call), then SIGKILL; ``timeout`` bounds
    each of the first two waits, for all of them together."""
    for worker in workers:
        worker.conn.close()
    for signal_them in (None, BaseProcess.terminate, BaseProcess.kill):
        alive = [w.process for w in workers if w.process.is_alive()]
        if not alive:
            return
        if signal_them is not None:
            for process in alive:
                signal_them(process)
        deadline = time.monotonic() + (timeout if signal_them is not BaseProcess.kill else 1.0)
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))


# --- the offloader ------------------------------------------------------------------------------


def _describe_error(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def _outcome(error: BaseException | None) -> Outcome:
    if error is None:
        return Outcome.OK
    if isinstance(error, InvalidKeyShare | CertificateRejected):
        return Outcome.REJECTED
    if isinstance(error, BackendTimeout):
        return Outcome.TIMEOUT
    return Outcome.ERROR


# The observer's label of a chain verification (one value: what varies is the outcome).
_CHAIN_LABEL: Final = "client_chain"


def _scheme_name(scheme: int) -> str:
    try:
        return SignatureScheme(scheme).name
    except ValueError:
        return f"0x{scheme:04x}"


class _FailureLog:
    """One warning per (backend, kind) per FAILURE_LOG_INTERVAL, with the count of the
    failures it stands for."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: collections.Counter[tuple[str, str]] = collections.Counter()

    def failed(self, backend: str, kind: str, label: str, outcome: Outcome, reason: str) -> None:
        key = (backend, kind)
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) < FAILURE_LOG_INTERVAL:
            self._suppressed[key] += 1
            return
        more = self._suppressed.pop(key, 0)
        self._last[key] = now
        logger.warning(
            "crypto backend %s: %s %s %s: %s%s",
            backend,
            kind.replace("_", " "),
            label,
            "timed out" if outcome is Outcome.TIMEOUT else "failed",
            reason,
            f" ({more} more failures since the last report)" if more else "",
        )


class Offloader:
    """Runs the engine's crypto requests for one backend (and its fallback).

    ``submit_key_exchange`` / ``submit_signature`` take a ``done`` callback, called later on
    the loop with the result or the exception to hand to ``fail_*`` (no task per request);
    ``key_exchange`` / ``sign`` are the same as coroutines. With ``inline`` True the caller
    may instead call ``run_inline_*`` synchronously. ``start()`` before use (it creates the
    pools; process mode fails here if a worker cannot build the backend), ``close()`` at the
    end (every pending request is answered with an error, pools are stopped with bounded
    waits)."""

    def __init__(
        self,
        settings: OffloadSettings,
        provider: CryptoProvider,
        *,
        fallback_provider: CryptoProvider | None = None,
        observer: OffloadObserver | None = None,
    ) -> None:
        _check(settings, provider, fallback_provider)
        self.settings = settings
        self._observer: OffloadObserver = observer or NullObserver()
        self._keys: dict[Signer, SignerKey] = {}
        self._primary = self._runner(settings.backend, provider)
        self._fallback: _Runner | None = None
        if fallback_provider is not None:
            assert settings.fallback is not None
            self._fallback = self._runner(settings.fallback, fallback_provider)
        # Client chain verifications: on the loop in inline mode, else on threads of their
        # own (also in process and batch modes), with their own concurrency slots, so that
        # a flood of client certificates cannot hold the slots key exchanges need.
        x509_runner = _InlineRunner if settings.mode is OffloadMode.INLINE else _ThreadRunner
        self._x509: _Runner = x509_runner(X509_RUNNER, provider, settings, self._complete)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._live: set[_Job] = set()
        self._failures_log = _FailureLog()
        # The breaker (only with a fallback).
        self._open = False
        self._consecutive_failures = 0
        self._last_failed_group: int | None = None
        self._probe_timer: asyncio.TimerHandle | None = None
        self.counts: collections.Counter[tuple[str, str, Outcome]] = collections.Counter()

    def _runner(self, backend: str, provider: CryptoProvider) -> _Runner:
        args = (backend, provider, self.settings, self._complete)
        mode = self.settings.mode
        if mode is OffloadMode.INLINE:
            return _InlineRunner(*args)
        if mode is OffloadMode.THREAD:
            return _ThreadRunner(*args)
        if mode is OffloadMode.BATCH:
            return _BatchRunner(*args, observer=self._observer)
        return _ProcessRunner(*args, keys=self._keys)

    # -- state -----------------------------------------------------------------------------

    @property
    def inline(self) -> bool:
        """True when requests run on the loop thread: the caller may use ``run_inline_*``."""
        return self.settings.mode is OffloadMode.INLINE

    @property
    def breaker_open(self) -> bool:
        return self._open

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet answered (waiting for a slot or running)."""
        return len(self._live)

    @property
    def waiting(self) -> int:
        """Requests waiting for a concurrency slot (a queue-depth gauge)."""
        fallback = self._fallback.slots.waiting if self._fallback is not None else 0
        return self._primary.slots.waiting + fallback + self._x509.slots.waiting

    @property
    def active_backend(self) -> str:
        """The backend new handshakes' key exchanges go to."""
        if self._open and self._fallback is not None:
            return self._fallback.backend
        return self._primary.backend

    def describe(self) -> str:
        s = self.settings
        parts = [f"backend {s.backend}", f"offload {s.mode.value}"]
        if s.mode is not OffloadMode.INLINE:
            parts.append(f"{s.workers} workers")
        if s.mode is OffloadMode.BATCH:
            parts.append(
                f"batches of up to {s.batch.max_items} within {s.batch.max_delay * 1e6:g}us"
            )
        parts += [f"concurrency {s.concurrency}", f"timeout {s.timeout:g}s"]
        if s.fallback is not None:
            parts.append(
                f"fallback {s.fallback} after {s.breaker.failures} failures "
                f"(probe every {s.breaker.probe_interval:g}s)"
            )
        return ", ".join(parts)

    def register_signer(
        self, signer: Signer, key_pem: bytes | None, password: bytes | None = None
    ) -> None:
        """Tell the offloader where a certificate's key comes from. Process mode needs the
        PEM (its workers load the key themselves); a key that is not a PEM file (a pkcs11:
        URI, ``key_pem`` None) is refused there with OffloadConfigError. Other modes keep
        nothing: the signer object itself is used."""
        if self.settings.mode is not OffloadMode.PROCESS:
            return
        if key_pem is None:
            raise OffloadConfigError(
                f"offload process cannot sign with a key held by the {signer.backend} backend "
                "(only PEM keys can be loaded by worker processes); use offload: thread"
            )
        self._keys[signer] = SignerKey(key_pem, password)

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("offloader already started")
        self._loop = asyncio.get_running_loop()
        started: list[_Runner] = []
        try:
            for runner in (self._primary, self._fallback, self._x509):
                if runner is not None:
                    await runner.start(self._loop)
                    started.append(runner)
        except BaseException:
            for runner in started:
                await runner.close()
            self._closed = True
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        for job in list(self._live):
            self._finish(job, None, BackendError("offload closed"), 0.0, 0.0, 1)
        for runner in (self._primary, self._fallback, self._x509):
            if runner is not None:
                try:
                    await runner.close()
                except Exception as exc:
                    logger.error(
                        "offload %s: close failed: %s: %s",
                        runner.backend,
                        type(exc).__name__,
                        exc,
                    )

    # -- requests ----------------------------------------------------------------------------

    def submit_key_exchange(self, group: int, exchange: KxGroup, share: bytes, done: Done) -> None:
        """``done((server_share, secret))`` or ``done(exception)``, later, on the loop."""
        runner, target = self._route_key_exchange(group, exchange)
        self._submit(
            runner, _KxOp(KIND_KEY_EXCHANGE, group, target, share), group_name(group), done
        )

    def submit_signature(self, signer: Signer, scheme: int, message: bytes, done: Done) -> None:
        """``done(signature)`` or ``done(exception)``, later, on the loop."""
        self._submit(
            self._route_signature(signer),
            _SignOp(signer, scheme, message),
            _scheme_name(scheme),
            done,
        )

    def submit_chain_verification(
        self,
        verifier: ClientCertificateVerifier,
        chain: tuple[bytes, ...],
        now: float,
        done: Done,
    ) -> None:
        """``done(identity)`` or ``done(exception)`` (CertificateRejected for a chain that
        does not verify), later, on the loop. Runs on the ``x509`` threads."""
        self._submit(self._x509, _ChainOp(verifier, chain, now), _CHAIN_LABEL, done)

    async def key_exchange(
        self, group: int, exchange: KxGroup, share: bytes
    ) -> tuple[bytes, SharedSecret]:
        future: asyncio.Future[tuple[bytes, SharedSecret]] = self._require_loop().create_future()
        self.submit_key_exchange(group, exchange, share, functools.partial(_settle, future))
        return await future

    async def sign(self, signer: Signer, scheme: int, message: bytes) -> bytes:
        future: asyncio.Future[bytes] = self._require_loop().create_future()
        self.submit_signature(signer, scheme, message, functools.partial(_settle, future))
        return await future

    async def verify_chain(
        self, verifier: ClientCertificateVerifier, chain: tuple[bytes, ...], now: float
    ) -> PeerIdentity:
        future: asyncio.Future[PeerIdentity] = self._require_loop().create_future()
        self.submit_chain_verification(verifier, chain, now, functools.partial(_settle, future))
        return await future

    def run_inline_key_exchange(
        self, group: int, exchange: KxGroup, share: bytes
    ) -> tuple[bytes, SharedSecret]:
        """Inline mode: the key exchange now, on this thread, with the same accounting,
        breaker and fallback as the other modes. Raises what ``fail_key_exchange`` takes."""
        runner, target = self._route_key_exchange(group, exchange)
        op = _KxOp(KIND_KEY_EXCHANGE, group, target, share)
        result: tuple[bytes, SharedSecret] = self._run_inline(runner, op, group_name(group))
        return result

    def run_inline_signature(self, signer: Signer, scheme: int, message: bytes) -> bytes:
        op = _SignOp(signer, scheme, message)
        result: bytes = self._run_inline(self._route_signature(signer), op, _scheme_name(scheme))
        return result

    def run_inline_chain_verification(
        self, verifier: ClientCertificateVerifier, chain: tuple[bytes, ...], now: float
    ) -> PeerIdentity:
        """Inline mode: the chain verification now, on this thread, accounted as the other
        modes do. Raises what ``fail_certificate_verification`` takes."""
        op = _ChainOp(verifier, chain, now)
        result: PeerIdentity = self._run_inline(self._x509, op, _CHAIN_LABEL)
        return result

    # -- internals -------------------------------------------------------------------------------

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("offloader not started")
        return self._loop

    def _route_key_exchange(self, group: int, exchange: KxGroup) -> tuple[_Runner, KxGroup]:
        fallback = self._fallback
        if self._open and fallback is not None:
            # The fallback's own group for the same code point: same share lengths, its
            # own implementation.
            target = fallback.provider.groups.get(group)
            if target is not None:
                return fallback, target
        return self._primary, exchange

    def _route_signature(self, signer: Signer) -> _Runner:
        fallback = self._fallback
        # A key in the primary backend can only be used there; any other key need not wait
        # behind the primary's stalled pool while the breaker is open.
        if self._open and fallback is not None and signer.backend != self._primary.backend:
            return fallback
        return self._primary

    def _submit(self, runner: _Runner, op: _Op, label: str, done: Done) -> None:
        loop = self._require_loop()
        job = _Job(runner, op, label, time.monotonic(), done)
        if self._closed:
            job.finished = True
            loop.call_soon(done, BackendError("offload closed"))
            return
        self._live.add(job)
        job.timer = loop.call_later(self.settings.timeout, self._timeout, job)
        runner.slots.acquire(job)

    def _run_inline(self, runner: _Runner, op: _Op, label: str) -> Any:
        # start() first here too: the breaker's probes run on the loop's timers.
        self._require_loop()
        started = time.monotonic()
        value, error = _call(op.run)
        finished = time.monotonic()
        if error is None and finished - started > self.settings.timeout:
            # The loop was blocked longer than a job may take: the answer is discarded so
            # that a slow backend fails its handshakes (and trips the breaker) in inline mode
            # exactly as it would in the other modes.
            error = BackendTimeout(
                f"{runner.backend} backend: {op.kind.replace('_', ' ')} took "
                f"{finished - started:.3g}s, over the {self.settings.timeout:g}s timeout"
            )
        self._account(runner, op, label, 0.0, finished - started, error, 1)
        if error is not None:
            raise error
        return value

    def _timeout(self, job: _Job) -> None:
        if job.finished:
            return
        job.timer = None
        job.runner.slots.forget(job)
        error = BackendTimeout(
            f"{job.runner.backend} backend: {job.op.kind.replace('_', ' ')} timed out after "
            f"{self.settings.timeout:g}s"
        )
        waited = time.monotonic() - job.submitted
        self._finish(job, None, error, waited, 0.0, 1)
        job.runner.job_timed_out(job)

    def _complete(
        self,
        job: _Job,
        value: Any,
        error: BaseException | None,
        started: float,
        finished: float,
        batch_size: int,
    ) -> None:
        """A runner's answer for ``job`` (on the loop). Gives the slot back, then answers the
        caller unless a timeout or close() already did."""
        if job.holds_slot:
            job.holds_slot = False
            job.runner.slots.release()
        if job.finished:
            if error is None:
                logger.debug(
                    "offload %s: %s %s answered %.3fs after its timeout",
                    job.runner.backend,
                    job.op.kind,
                    job.label,
                    time.monotonic() - job.submitted - self.settings.timeout,
                )
            return
        self._finish(
            job, value, error, max(0.0, started - job.submitted), finished - started, batch_size
        )

    def _finish(
        self,
        job: _Job,
        value: Any,
        error: BaseException | None,
        queue_seconds: float,
        service_seconds: float,
        batch_size: int,
    ) -> None:
        job.finished = True
        self._live.discard(job)
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        self._account(
            job.runner, job.op, job.label, queue_seconds, service_seconds, error, batch_size
        )
        result = error if error is not None else value
        try:
            job.done(result)
        except Exception as exc:
            logger.error("offload: result callback failed: %s: %s", type(exc).__name__, exc)

    def _account(
        self,
        runner: _Runner,
        op: _Op,
        label: str,
        queue_seconds: float,
        service_seconds: float,
        error: BaseException | None,
        batch_size: int,
    ) -> None:
        outcome = _outcome(error)
        kind = op.kind
        self.counts[(kind, runner.backend, outcome)] += 1
        try:
            self._observer.on_job(
                kind=kind,
                backend=runner.backend,
                label=label,
                queue_seconds=queue_seconds,
                service_seconds=service_seconds,
                outcome=outcome,
                batch_size=batch_size,
            )
        except Exception as exc:
            logger.error("offload observer on_job failed: %s: %s", type(exc).__name__, exc)
        if error is not None and outcome is not Outcome.REJECTED and kind != KIND_PROBE:
            self._failures_log.failed(runner.backend, kind, label, outcome, _describe_error(error))
        if kind == KIND_KEY_EXCHANGE and runner is self._primary and self._fallback is not None:
            assert isinstance(op, _KxOp)
            self._breaker_record(outcome, op.group, error)

    # -- the breaker ---------------------------------------------------------------------------

    def _breaker_record(self, outcome: Outcome, group: int, error: BaseException | None) -> None:
        if outcome is Outcome.REJECTED or self._open:
            return
        if outcome is Outcome.OK:
            self._consecutive_failures = 0
            return
        self._consecutive_failures += 1
        self._last_failed_group = group
        if self._consecutive_failures >= self.settings.breaker.failures:
            assert error is not None
            self._switch(
                True,
                f"{self._consecutive_failures} consecutive key exchange failures "
                f"(last: {_describe_error(error)})",
            )

    def _switch(self, to_fallback: bool, reason: str) -> None:
        assert self._fallback is not None
        primary, fallback = self._primary.backend, self._fallback.backend
        self._open = to_fallback
        self._consecutive_failures = 0
        if to_fallback:
            logger.warning(
                "crypto: switching new handshakes from %s to fallback %s: %s; probing %s every %gs",
                primary,
                fallback,
                reason,
                primary,
                self.settings.breaker.probe_interval,
            )
            self._schedule_probe()
        else:
            logger.warning(
                "crypto: %s recovered (%s); switching new handshakes back from fallback %s",
                primary,
                reason,
                fallback,
            )
        try:
            self._observer.on_switch(
                primary=primary, fallback=fallback, to_fallback=to_fallback, reason=reason
            )
        except Exception as exc:
            logger.error("offload observer on_switch failed: %s: %s", type(exc).__name__, exc)

    def _schedule_probe(self) -> None:
        if self._closed or self._loop is None:
            return
        self._probe_timer = self._loop.call_later(self.settings.breaker.probe_interval, self._probe)

    def _probe(self) -> None:
        """A self-test round trip against the primary: the fallback generates a client key
        share, the primary answers it (as a real handshake would, through the primary's
        slots and timeout), and the fallback's client must derive the same secret."""
        self._probe_timer = None
        fallback = self._fallback
        if self._closed or not self._open or fallback is None:
            return
        groups = self._primary.provider.groups
        group = self._last_failed_group
        if group is None or group not in groups or group not in fallback.provider.groups:
            group = next(g for g in groups if g in fallback.provider.groups)
        try:
            client = fallback.provider.groups[group].start()
        except Exception as exc:
            logger.error("crypto: probe key generation failed: %s", _describe_error(exc))
            self._schedule_probe()
            return
        op = _KxOp(KIND_PROBE, group, groups[group], client.share)
        label = group_name(group)

        def answered(result: Any) -> None:
            if self._closed or not self._open:
                return
            if isinstance(result, BaseException):
                logger.info(
                    "crypto: probe of %s (%s) failed: %s; still on fallback %s",
                    self._primary.backend,
                    label,
                    _describe_error(result),
                    fallback.backend,
                )
                self._schedule_probe()
                return
            share, secret = result
            try:
                agreed = client.complete(share) == secret
            except Exception as exc:
                agreed = False
                logger.info("crypto: probe client rejected the answer: %s", _describe_error(exc))
            if not agreed:
                logger.warning(
                    "crypto: probe of %s (%s): the round trip gives different secrets; "
                    "still on fallback %s",
                    self._primary.backend,
                    label,
                    fallback.backend,
                )
                self._schedule_probe()
                return
            self._switch(False, f"probe {label} round trip ok")

        self._submit(self._primary, op, label, answered)


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():
        return  # the caller gave up (cancelled); the job itself is accounted for
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _check(
    settings: OffloadSettings,
    provider: CryptoProvider,
    fallback_provider: CryptoProvider | None,
) -> None:
    if settings.mode is OffloadMode.PROCESS:
        for name in (settings.backend, settings.fallback):
            why = _NOT_PROCESS_SAFE.get(name or "")
            if why is not None:
                raise OffloadConfigError(f"offload process cannot run the {name} backend: {why}")
    if settings.fallback is not None and fallback_provider is None:
        raise OffloadConfigError(
            f"fallback {settings.fallback} is configured but no provider was created for it"
        )
    if fallback_provider is not None:
        if settings.fallback is None:
            raise OffloadConfigError("a fallback provider needs settings.fallback (its name)")
        missing = [group_name(g) for g in provider.groups if g not in fallback_provider.groups]
        if missing:
            raise OffloadConfigError(
                f"fallback {settings.fallback} lacks groups of {settings.backend}: "
                f"{', '.join(missing)}"
            )


def build_offloader(
    settings: OffloadSettings,
    provider: CryptoProvider,
    fallback_provider: CryptoProvider | None = None,
    observer: OffloadObserver | None = None,
) -> Offloader:
    """The offloader for ``settings`` (not started). OffloadConfigError for a combination
    that cannot work: process mode with pkcs11, a fallback without a provider or lacking
    one of the primary's groups."""
    return Offloader(settings, provider, fallback_provider=fallback_provider, observer=observer)


__all__ = [
    "BackendTimeout",
    "BatchKxGroup",
    "BatchSettings",
    "BatchSigner",
    "BreakerSettings",
    "CryptoJob",
    "JobRecord",
    "JobResult",
    "KeyExchangeJob",
    "NullObserver",
    "OffloadConfigError",
    "OffloadMode",
    "OffloadObserver",
    "OffloadSettings",
    "Offloader",
    "Outcome",
    "RecordingObserver",
    "SignJob",
    "SignerKey",
    "SwitchRecord",
    "build_offloader",
    "create_provider",
    "run_job",
]
