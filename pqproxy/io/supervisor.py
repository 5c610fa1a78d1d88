"""From a validated ``Config`` to running listeners: one process, or a supervisor and workers.

Rules this module keeps:

- ``build_runtime`` is the one mapping from the typed configuration to what the I/O layer
  runs (``ListenerSettings``, ``HttpSettings``, one ``UpstreamPool`` per upstream). It loads
  every certificate, so a configuration that passes it can be served; SIGHUP runs it on the
  new configuration before anything is swapped.
- Signals in a worker (``run_worker``): SIGTERM/SIGINT drain (stop accepting, let in-flight
  requests and streams finish until ``drain_timeout``, then close), a second one closes at
  once; SIGHUP reloads. A reload that fails for any reason is refused with one log line and
  the old configuration keeps serving. Established connections keep the settings and the
  upstream pool they started with; new connections get the new ones.
- Workers (``run_supervisor``, ``workers >= 2``): a synchronous parent process forks the
  workers, each with its own event loop and its own SO_REUSEPORT listening socket on the same
  port, so the kernel spreads new connections over them. The parent reserves each port first
  (see ``_reserve``), prints the listening lines once every worker reported ready through a
  pipe, forwards SIGTERM/SIGHUP, and restarts a worker that dies unexpectedly.
- Every wait has a deadline: worker start-up (``STARTUP_TIMEOUT``), the drain
  (``drain_timeout``), the workers' exit after SIGTERM (``drain_timeout + EXIT_GRACE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import json
import logging
import logging.handlers
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from ..config import (
    Config,
    ConfigError,
    CryptoConfig,
    ListenerConfig,
    LoggingConfig,
    UpstreamConfig,
    format_duration,
    load_config,
)
from ..crypto.backends import BACKEND_MODULES
from ..crypto.certs import CertificateLoadError, load_certified_key
from ..crypto.client_auth import X509ClientVerifier
from ..crypto.instrumented import TimedProvider
from ..crypto.offload import (
    BatchSettings,
    BreakerSettings,
    OffloadConfigError,
    Offloader,
    OffloadSettings,
    build_offloader,
    create_provider,
)
from ..crypto.provider import BackendError, CertifiedKey, CryptoProvider
from ..crypto.selftest import SelfTestError, run_startup_self_tests
from ..metrics import (
    READY_CHECKS,
    ProxyMetrics,
    enable_multiprocess,
    mark_process_dead,
    multiprocess_gauge,
    render_multiprocess,
)
from ..relay.forwarding import ForwardingOptions
from ..relay.identity import IdentityHeaders
from ..tls.enums import HYBRID_GROUPS, NamedGroup
from ..tls.server import ClientAuth, ServerConfig
from .admin import (
    AdminRoutes,
    AdminServer,
    Readiness,
    ReadinessState,
    SelectAdminServer,
    bind_admin_socket,
    select_with_admin,
)
from .cert_watch import CertificateWatch, replace_certificates
from .http_proxy import HttpSettings
from .keylog import KEY_LOG_ENV, close_key_logs, open_key_log
from .listen_queue import ListenQueueMonitor, named, warn_backlog_capped
from .loop import ShutdownSignals, run
from .session_tickets import TicketKeyError, TicketMasters, listener_ticket_keys
from .telemetry import Telemetry
from .tls_server import ListenerSettings, TLSListener
from .upstream import HealthCheckSettings, PoolSettings, UpstreamPool

logger = logging.getLogger(__name__)

# A worker that has not reported ready in this long is broken (start-up loads a few
# certificates and binds sockets: well under a second when healthy).
STARTUP_TIMEOUT = 60.0
# After SIGTERM, workers get drain_timeout plus this for their own close (close_notify to
# every client, pools closed) before the parent kills them.
EXIT_GRACE = 15.0
# How often the parent looks for exited workers even without a SIGCHLD.
POLL_INTERVAL = 1.0
# A worker dying sooner than this after its start counts as a crash loop: its restarts are
# spaced out (doubling from RESTART_DELAY up to MAX_RESTART_DELAY) instead of spinning.
STABLE_UPTIME = 10.0
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
# The signals the supervisor handles; blocked around fork() so a new worker cannot be hit by
# one before it installed its own handlers.
SUPERVISOR_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
WORKER_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
SINGLE_PROCESS_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s pid=%(process)d %(name)s %(message)s"
LISTENING_PREFIX = "pqproxy listening on https://"
ADMIN_PREFIX = "pqproxy admin on http://"
# Linux prctl(2): deliver a signal to the worker when its parent dies.
_PR_SET_PDEATHSIG = 1


class ServeError(Exception):
    """What the configuration names cannot be served (a certificate, a port): one line."""


class ReloadRefused(ServeError):
    """A new configuration that cannot replace the running one without a restart."""


# -- logging ----------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log collectors parse without a pattern.

    A record may carry structured fields (``extra={"pqproxy_fields": {...}}``: the access log,
    connection ends, HTTP errors); they become top-level keys beside the fixed ones, which
    they never replace. With ``pqproxy_summary`` too, that short text is the message instead
    of the text line, which would only repeat the fields."""

    def format(self, record: logging.LogRecord) -> str:
        summary = getattr(record, "pqproxy_summary", None)
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": summary if isinstance(summary, str) else record.getMessage(),
        }
        fields = getattr(record, "pqproxy_fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                entry.setdefault(key, value)
        if record.exc_info and record.levelno <= logging.DEBUG:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _log_handler(destination: str) -> logging.Handler:
    if destination == "stderr":
        return logging.StreamHandler(sys.stderr)
    if destination == "stdout":
        return logging.StreamHandler(sys.stdout)
    # Reopened when logrotate moves the file away. Workers inherit the descriptor, opened
    # O_APPEND, and write each line with one write(2): their lines never interleave.
    try:
        return logging.handlers.WatchedFileHandler(destination, encoding="utf-8")
    except OSError as exc:
        raise ServeError(
            f"logging.destination: cannot open {destination}: {exc.strerror or exc}"
        ) from None


def setup_logging(config: LoggingConfig, level: str | None = None) -> None:
    """Root logging from the config (``level`` overrides it); every line names its pid, so
    the lines of several workers on one destination can be told apart. Raises ServeError
    when the destination file cannot be opened."""
    handler = _log_handler(config.destination)
    if config.format.value == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_LOG_FORMAT))
    logging.basicConfig(level=(level or config.level).upper(), handlers=[handler], force=True)
    logging.getLogger("pqproxy.access").disabled = not config.access_log


# -- the typed config mapped onto the I/O layer ---------------------------------------------


@dataclass
class Runtime:
    """What one process serves: the settings of each listener (in ``config.listeners``
    order) and the pools they share, by upstream name."""

    config: Config
    provider: CryptoProvider
    listeners: tuple[ListenerSettings, ...]
    pools: dict[str, UpstreamPool]
    offloader: Offloader | None = None
    # The session-ticket master secrets this configuration was built with; a reload keeps
    # them (pqproxy.io.session_tickets).
    ticket_masters: TicketMasters | None = None


def pool_settings(upstream: UpstreamConfig) -> PoolSettings:
    health = upstream.health_check
    passive = upstream.passive
    return PoolSettings(
        name=upstream.name,
        servers=tuple((server.host, server.port) for server in upstream.servers),
        balance=upstream.balance.value,
        connect_timeout=upstream.timeouts.connect,
        max_idle_per_server=upstream.keepalive.max_idle_per_server,
        idle_timeout=upstream.keepalive.idle_timeout,
        health_check=(
            HealthCheckSettings(
                path=health.path,
                interval=health.interval,
                timeout=health.timeout,
                healthy_threshold=health.healthy_threshold,
                unhealthy_threshold=health.unhealthy_threshold,
            )
            if health is not None
            else None
        ),
        # No passive section: never eject (max_fails 0 turns it off in the pool).
        max_fails=passive.max_fails if passive is not None else 0,
        ejection_time=passive.ejection_time if passive is not None else 10.0,
        retries=upstream.retries,
    )


def http_settings(listener: ListenerConfig, upstream: UpstreamConfig) -> HttpSettings:
    headers = listener.headers
    identity = listener.tls.client_auth.identity_headers
    return HttpSettings(
        header_read_timeout=listener.timeouts.header_read,
        idle_timeout=listener.timeouts.idle,
        upstream_read_timeout=upstream.timeouts.read,
        max_header_bytes=listener.limits.max_header_bytes,
        max_body_bytes=listener.limits.max_body_bytes,
        max_header_count=listener.limits.max_header_count,
        request_buffering=listener.limits.request_buffering,
        forwarding=ForwardingOptions(
            x_forwarded_for=headers.x_forwarded_for,
            x_forwarded_proto=headers.x_forwarded_proto,
            x_forwarded_host=headers.x_forwarded_host,
            via=headers.via,
            tls_info_prefix=headers.tls_info,
            identity_headers=IdentityHeaders(identity.subject, identity.uris, identity.dns),
            underscore_headers=headers.underscore_headers,
            forwarded_for=headers.forwarded_for,
        ),
        retries=upstream.retries,
    )


def server_config(
    listener: ListenerConfig,
    provider: CryptoProvider,
    offloader: Offloader | None = None,
    ticket_masters: TicketMasters | None = None,
) -> ServerConfig:
    """The listener's TLS configuration with its certificates and client CA bundle loaded
    (ServeError if one cannot be used, or the backend lacks a group). Each key is registered
    with ``offloader``: process mode needs the PEM to load it in its workers. Tickets are
    issued only with ``ticket_masters`` (the check before serving goes without).

    Several certificates make a dual-certificate listener: the engine takes, per handshake,
    the first one (in this order, those whose names match the SNI first) whose key can sign
    with a scheme in the client's signature_algorithms, so an ML-DSA chain listed before an
    ECDSA one goes to the clients that offer ML-DSA and the ECDSA one to the others."""
    tls = listener.tls
    missing = [NamedGroup(g).name for g in tls.groups if g not in provider.groups]
    if missing:
        raise ServeError(
            f"listener {listener.name}: backend {provider.name} lacks groups: {', '.join(missing)}"
        )
    certificates = []
    for cert in tls.certificates:
        try:
            certified = load_certified_key(cert.cert, cert.key)
        except CertificateLoadError as exc:
            raise ServeError(f"listener {listener.name}: {exc}") from None
        if cert.server_names is not None:
            certified = replace(certified, names=cert.server_names)
        if offloader is not None:
            try:
                offloader.register_signer(certified.signer, _pem_or_none(cert.key))
            except OffloadConfigError as exc:
                raise ServeError(f"listener {listener.name}: {cert.key}: {exc}") from None
        certificates.append(certified)
    client_auth = tls.client_auth
    ca_pem: bytes | None = None
    verifier: X509ClientVerifier | None = None
    if client_auth.mode is not ClientAuth.NONE and client_auth.ca is not None:
        try:
            ca_pem = client_auth.ca.read_bytes()
            verifier = X509ClientVerifier(ca_pem, max_chain_depth=client_auth.max_chain_depth)
        except OSError as exc:
            raise ServeError(
                f"listener {listener.name}: client CA bundle {client_auth.ca}: "
                f"{exc.strerror or exc}"
            ) from None
        except ValueError as exc:
            raise ServeError(f"listener {listener.name}: {client_auth.ca}: {exc}") from None
    tickets = (
        listener_ticket_keys(ticket_masters, listener, ca_pem)
        if ticket_masters is not None
        else None
    )
    try:
        return ServerConfig(
            certificates=tuple(certificates),
            groups=tls.groups,
            pq_policy=tls.pq_policy,
            cipher_suites=tls.cipher_suites,
            alpn_protocols=tls.alpn,
            client_auth=client_auth.mode,
            client_verifier=verifier,
            tickets=tickets,
            tickets_per_handshake=tls.tickets.per_handshake,
            ticket_lifetime=tls.tickets.lifetime,
            max_auth_age=client_auth.max_auth_age,
        )
    except ValueError as exc:
        raise ServeError(f"listener {listener.name}: {exc}") from None


def start_ticket_masters(config: Config) -> TicketMasters:
    """The ticket master secrets for ``config``, made once before any fork (ServeError)."""
    try:
        return TicketMasters.start(config)
    except TicketKeyError as exc:
        raise ServeError(str(exc)) from None


def _rotation_loader(offloader: Offloader | None) -> Callable[[Path, Path], CertifiedKey]:
    """How the certificate watch loads a rotated pair: as server_config() does, the key
    registered with the offloader (process mode signs with the PEM in its workers)."""

    def load(cert: Path, key: Path) -> CertifiedKey:
        try:
            before = key.read_bytes()
        except OSError as exc:
            raise CertificateLoadError(
                f"key file {key}: cannot read: {exc.strerror or exc}"
            ) from None
        certified = load_certified_key(cert, key)
        if offloader is not None:
            try:
                pem = _pem_or_none(key)
            except OSError as exc:
                raise CertificateLoadError(f"key file {key}: {exc.strerror or exc}") from None
            if pem is not None and pem != before:
                # The registered PEM and the loaded signer must be the same key; the watch
                # sees the new stamp and loads again at its next look.
                raise CertificateLoadError(f"key file {key}: changed while it was loaded")
            try:
                offloader.register_signer(certified.signer, pem)
            except OffloadConfigError as exc:
                raise CertificateLoadError(f"key file {key}: {exc}") from None
        return certified

    return load


def certificate_watch(
    config: Config, offloader: Offloader | None = None
) -> CertificateWatch | None:
    """The watch over ``config``'s certificate files, or None when ``cert_watch`` is off.
    Made before ``build_runtime`` loads the certificates, so a change in between is seen."""
    if config.cert_watch is None:
        return None
    return CertificateWatch.for_listeners(
        config.listeners, config.cert_watch.interval, load=_rotation_loader(offloader)
    )


def _pem_or_none(path: Path) -> bytes | None:
    """The key file's bytes when it is a PEM key (what a worker process can load), None for
    a key held elsewhere (a pkcs11: URI)."""
    data = path.read_bytes()
    return data if b"-----BEGIN" in data else None


def offload_settings(crypto: CryptoConfig) -> OffloadSettings:
    return OffloadSettings(
        backend=crypto.backend,
        mode=crypto.offload,
        workers=crypto.workers,
        concurrency=crypto.concurrency,
        timeout=crypto.timeout,
        batch=BatchSettings(crypto.batch.max_items, crypto.batch.max_delay),
        fallback=crypto.fallback,
        breaker=BreakerSettings(crypto.breaker.failures, crypto.breaker.probe_interval),
    )


def crypto_self_test(runtime: Runtime) -> None:
    """The start-up gate: every configured backend (known answers where it takes fixed
    randomness, cross-checks with another implementation, its own tests) and every
    certificate's key (signs, and verifies with its certificate). ServeError names every
    check that failed."""
    crypto = runtime.config.crypto
    provider = runtime.provider
    inner = provider.inner if isinstance(provider, TimedProvider) else provider
    keys = [c for listener in runtime.listeners for c in listener.server_config.certificates]
    backends = [crypto.backend] + ([crypto.fallback] if crypto.fallback else [])
    try:
        reports = run_startup_self_tests(backends, keys, providers={crypto.backend: inner})
    except SelfTestError as exc:
        raise ServeError(str(exc)) from None
    for report in reports:
        logger.info("self-test %s: %s", report.backend, report.summary())


def check_servable(
    config: Config, provider: CryptoProvider, ticket_masters: TicketMasters | None = None
) -> None:
    """Load every certificate, client CA bundle and ticket key file and check every group
    once, before any loop or fork, so that what cannot be served fails at once with one line
    (ServeError)."""
    masters = ticket_masters if ticket_masters is not None else start_ticket_masters(config)
    for listener in config.listeners:
        server_config(listener, provider, ticket_masters=masters)


def key_log_path(listener: ListenerConfig) -> tuple[str, str] | None:
    """(path, where it came from) of the listener's NSS key log, or None when it is off:
    ``tls.key_log_file``, else the SSLKEYLOGFILE environment variable."""
    if listener.tls.key_log_file is not None:
        return os.fspath(listener.tls.key_log_file), f"listeners.{listener.name}.tls.key_log_file"
    from_env = os.environ.get(KEY_LOG_ENV)
    if from_env:
        return from_env, KEY_LOG_ENV
    return None


def build_runtime(
    config: Config,
    provider: CryptoProvider,
    *,
    previous: Runtime | None = None,
    telemetry: Telemetry | None = None,
    offloader: Offloader | None = None,
    ticket_masters: TicketMasters | None = None,
) -> Runtime:
    """Map ``config`` onto listener settings and pools, loading every certificate and
    opening the key logs asked for.

    With ``previous``, a pool whose upstream section is unchanged is reused as it is (its
    health state and idle connections carry over); the others are new and not started yet.
    ``telemetry`` goes to every listener (None: nothing is counted).
    ``ticket_masters``: the session-ticket secrets (a worker gets its supervisor's); without,
    those of ``previous`` carry over (a reload), or new ones are made (one process).
    Raises ServeError with one line naming what cannot be used.
    """
    if ticket_masters is None and previous is not None:
        ticket_masters = previous.ticket_masters
    try:
        masters = (
            ticket_masters.for_config(config)
            if ticket_masters is not None
            else TicketMasters.start(config)
        )
    except TicketKeyError as exc:
        raise ServeError(str(exc)) from None
    pools: dict[str, UpstreamPool] = {}
    for upstream in config.upstreams:
        old = previous.pools.get(upstream.name) if previous is not None else None
        if (
            old is not None
            and previous is not None
            and not old.closed
            and _upstream_or_none(previous.config, upstream.name) == upstream
        ):
            pools[upstream.name] = old
            continue
        try:
            pools[upstream.name] = UpstreamPool(pool_settings(upstream))
        except ValueError as exc:
            raise ServeError(f"upstream {upstream.name}: {exc}") from None
    listeners = []
    for listener in config.listeners:
        upstream = config.upstream_for(listener)
        pool = pools[upstream.name]
        first = upstream.servers[0]
        key_log = None
        wanted = key_log_path(listener)
        if wanted is not None:
            try:
                key_log = open_key_log(*wanted)
            except OSError as exc:
                raise ServeError(
                    f"listener {listener.name}: cannot open the key log {wanted[0]} "
                    f"({wanted[1]}): {exc.strerror or exc}"
                ) from None
        try:
            settings = ListenerSettings(
                host=listener.listen.host,
                port=listener.listen.port,
                server_config=server_config(listener, provider, offloader, masters),
                provider=provider,
                # Unused while ``pool`` is set; the pool's first server, for what logs them.
                upstream_host=first.host,
                upstream_port=first.port,
                handshake_timeout=listener.timeouts.handshake,
                idle_timeout=listener.timeouts.idle,
                send_timeout=listener.timeouts.send,
                upstream_connect_timeout=upstream.timeouts.connect,
                max_connections=listener.limits.max_connections,
                backlog=listener.limits.backlog,
                mode=listener.mode.value,
                http=http_settings(listener, upstream) if listener.mode.value == "http" else None,
                pool=pool,
                telemetry=telemetry,
                key_log=key_log,
                offloader=offloader,
                allowed_identities=(
                    frozenset(listener.tls.client_auth.allow)
                    if listener.tls.client_auth.allow is not None
                    else None
                ),
            )
        except ValueError as exc:
            raise ServeError(f"listener {listener.name}: {exc}") from None
        listeners.append(settings)
    return Runtime(
        config=config,
        provider=provider,
        listeners=tuple(listeners),
        pools=pools,
        offloader=offloader,
        ticket_masters=masters,
    )


def _upstream_or_none(config: Config, name: str) -> UpstreamConfig | None:
    try:
        return config.upstream(name)
    except KeyError:
        return None


def check_reloadable(old: Config, new: Config) -> None:
    """What a reload cannot change without a restart: which listeners exist, their addresses
    (a bound socket stays where it is), the number of workers."""
    old_names = [listener.name for listener in old.listeners]
    new_names = [listener.name for listener in new.listeners]
    if sorted(old_names) != sorted(new_names):
        added = [n for n in new_names if n not in old_names]
        removed = [n for n in old_names if n not in new_names]
        parts = []
        if added:
            parts.append(f"added {', '.join(added)}")
        if removed:
            parts.append(f"removed {', '.join(removed)}")
        raise ReloadRefused(f"listeners {'; '.join(parts)}: that needs a restart")
    by_name = {listener.name: listener for listener in new.listeners}
    for listener in old.listeners:
        address = by_name[listener.name].listen
        if address != listener.listen:
            raise ReloadRefused(
                f"listener {listener.name}: listen address changed from {listener.listen} to "
                f"{address}; a reload keeps the bound socket, so that needs a restart"
            )
        backlog = by_name[listener.name].limits.backlog
        if backlog != listener.limits.backlog:
            raise ReloadRefused(
                f"listener {listener.name}: limits.backlog changed from "
                f"{listener.limits.backlog} to {backlog}; the listening sockets keep theirs, "
                "so that needs a restart"
            )
    # "auto" on both sides is no change, even if the CPUs it resolves to have: the running
    # workers stay as they are.
    if new.workers != old.workers and not (new.workers_auto and old.workers_auto):
        raise ReloadRefused(
            f"workers changed from {old.workers} to {new.workers}: that needs a restart"
        )
    if new.crypto != old.crypto:
        raise ReloadRefused("crypto changed: the backend and its worker pools need a restart")
    if new.admin != old.admin:
        raise ReloadRefused(
            f"admin changed from {old.admin or 'off'} to {new.admin or 'off'}: that needs a restart"
        )


def describe_config_error(exc: ConfigError) -> str:
    """A ConfigError on one line, every problem listed."""
    count = len(exc.problems)
    return f"{exc.source}: {count} problem{'s' if count != 1 else ''}: " + "; ".join(exc.problems)


def listening_line(listener: ListenerConfig, port: int, workers: int = 1) -> str:
    """The line scripts and tests wait for; the prefix ``pqproxy listening on https://`` and
    the ``(groups: `` right after the address are what they parse."""
    groups = ",".join(NamedGroup(g).name for g in _groups_for_policy(listener))
    host = f"[{listener.listen.host}]" if ":" in listener.listen.host else listener.listen.host
    extra = f", workers: {workers}" if workers > 1 else ""
    return (
        f"{LISTENING_PREFIX}{host}:{port} (groups: {groups}, "
        f"policy: {listener.tls.pq_policy.value}, mode: {listener.mode.value}{extra})"
    )


def _groups_for_policy(listener: ListenerConfig) -> tuple[int, ...]:
    # As ServerConfig.groups_for_policy, without loading the certificates a ServerConfig needs.
    groups = listener.tls.groups
    policy = listener.tls.pq_policy.value
    if policy == "require":
        return tuple(g for g in groups if g in HYBRID_GROUPS)
    if policy == "off":
        return tuple(g for g in groups if g not in HYBRID_GROUPS)
    return groups


def announce(line: str) -> None:
    # Straight to stderr, whatever the log level: scripts and tests wait for this line.
    print(line, file=sys.stderr, flush=True)


def admin_line(host: str, port: int) -> str:
    """The line that says where the admin endpoint is (tests parse the port after the host)."""
    shown = f"[{host}]" if ":" in host else host
    return f"{ADMIN_PREFIX}{shown}:{port} (/metrics, /healthz, /readyz)"


def run_self_test(provider: CryptoProvider) -> None:
    """The backend's own start-up self-test (known answers, round trips through every group,
    signatures); raises ServeError naming what failed. A provider that is not one of
    pqproxy's backends (a test's) has none to run."""
    inner = provider.inner if isinstance(provider, TimedProvider) else provider
    module_name = BACKEND_MODULES.get(inner.name)
    if module_name is None:
        return
    started = time.perf_counter()
    try:
        importlib.import_module(module_name).self_test()
    except BackendError as exc:
        raise ServeError(f"backend {inner.name} failed its self-test: {exc}") from None
    logger.info(
        "backend %s: self-test passed in %.1f ms",
        inner.name,
        (time.perf_counter() - started) * 1000.0,
    )


# -- one serving process ------------------------------------------------------------------------


def _default_provider() -> CryptoProvider:
    from ..crypto.backends.openssl import OpenSSLProvider

    return OpenSSLProvider()


@dataclass
class _Server:
    """One process's listeners and pools, and what the signals do to them."""

    runtime: Runtime
    reload_config: Callable[[], Config]
    telemetry: Telemetry | None = None
    # Serve the admin endpoint here (one process); a worker leaves it to its supervisor.
    serve_admin: bool = True
    listeners: list[TLSListener] = field(default_factory=list)
    # Pools replaced by a reload: connections accepted before it still use them.
    retiring: set[asyncio.Task[None]] = field(default_factory=set)
    admin: AdminServer | None = None
    # Certificate rotation without a signal; None: off. Started once the listeners serve.
    cert_watch: CertificateWatch | None = None
    # Whether this process counts the kernel's host-wide listen overflow counters: one
    # process of a pqproxy does (the single one, or worker 0).
    count_listen_overflows: bool = True
    listen_monitor: ListenQueueMonitor | None = None
    readiness: ReadinessState = field(init=False)

    def __post_init__(self) -> None:
        self.readiness = ReadinessState(self.telemetry)

    @property
    def config(self) -> Config:
        return self.runtime.config

    async def start(self, sockets: Sequence[socket.socket] | None) -> None:
        # The admin endpoint first: /healthz answers and /readyz says why while the rest
        # starts (a slow backend self-test, say).
        await self._start_admin()
        crypto_self_test(self.runtime)
        if self.runtime.offloader is not None:
            try:
                await self.runtime.offloader.start()
            except (BackendError, OffloadConfigError) as exc:
                raise ServeError(f"crypto offload: {exc}") from None
            logger.info("crypto: %s", self.runtime.offloader.describe())
        self.readiness.backend(True)
        for pool in self.runtime.pools.values():
            await pool.start()
        self.readiness.watch(self._pools_in_use())
        for index, settings in enumerate(self.runtime.listeners):
            listener_config = self.config.listeners[index]
            listener = TLSListener(settings)
            try:
                await listener.start(sockets[index] if sockets is not None else None)
            except OSError as exc:
                raise ServeError(
                    f"cannot listen on {listener_config.listen}: {exc.strerror or exc}"
                ) from None
            self.listeners.append(listener)
            pool = self.runtime.pools[listener_config.upstream]
            logger.info(
                "listener %s on port %d: mode %s, upstream %s (%s)",
                listener_config.name,
                listener.port,
                listener_config.mode.value,
                pool.name,
                ", ".join(s.label for s in pool.servers),
            )
        self.listen_monitor = ListenQueueMonitor(
            named([listener.name for listener in self.config.listeners], self.listeners),
            self.telemetry,
            kernel_counters=self.count_listen_overflows,
        )
        self.listen_monitor.start()
        self.readiness.listeners(True)
        # Only now: a worker publishes its checks once it serves (see pqproxy.io.admin).
        self.readiness.start_publishing()
        if self.cert_watch is not None:
            self.cert_watch.start(self.swap_certificates)

    def swap_certificates(self, name: str, certificates: tuple[CertifiedKey, ...]) -> None:
        """New handshakes on listener ``name`` present ``certificates``; established
        connections keep the settings they were accepted with. Raises ValueError (the
        watcher then refuses the new set) when the listener's ServerConfig rejects them."""
        for index, listener_config in enumerate(self.config.listeners):
            if listener_config.name == name:
                listener = self.listeners[index]
                listener.settings = replace_certificates(listener.settings, certificates)
                # Kept in step, so that what the runtime says is what is served.
                self.runtime.listeners = tuple(item.settings for item in self.listeners)
                return
        raise ValueError(f"no listener named {name!r}")

    async def _start_admin(self) -> None:
        address = self.config.admin
        if not self.serve_admin or address is None or self.telemetry is None:
            return
        metrics = self.telemetry.metrics
        admin = AdminServer(
            AdminRoutes(metrics.render, self.readiness.readiness), address.host, address.port
        )
        try:
            await admin.start()
        except OSError as exc:
            raise ServeError(f"cannot listen on admin {address}: {exc.strerror or exc}") from None
        self.admin = admin
        announce(admin_line(address.host, admin.port))

    def _pools_in_use(self) -> dict[str, UpstreamPool]:
        used = {listener.upstream for listener in self.config.listeners}
        return {name: pool for name, pool in self.runtime.pools.items() if name in used}

    @property
    def active_connections(self) -> int:
        return sum(listener.active_connections for listener in self.listeners)

    async def reload(self) -> None:
        """SIGHUP: read the configuration again and swap it in, or refuse and keep the old."""
        old = self.runtime
        try:
            config = self.reload_config()
            check_reloadable(old.config, config)
            # Before the certificates are loaded: a rotation in between is then seen.
            cert_watch = certificate_watch(config, old.offloader)
            runtime = build_runtime(
                config,
                old.provider,
                previous=old,
                telemetry=self.telemetry,
                offloader=old.offloader,
            )
        except ConfigError as exc:
            logger.error("reload refused: %s", describe_config_error(exc))
            return
        except ServeError as exc:
            logger.error("reload refused: %s", exc)
            return
        except Exception as exc:
            # A reload must never take a serving process down.
            logger.error("reload refused: %s: %s", type(exc).__name__, exc)
            return
        for name, pool in runtime.pools.items():
            if old.pools.get(name) is not pool:
                try:
                    await pool.start()
                except Exception as exc:
                    logger.error("reload refused: pool %s: %s: %s", name, type(exc).__name__, exc)
                    await self._close_new_pools(runtime, old)
                    return
        loop = asyncio.get_running_loop()
        by_name = {listener.name: i for i, listener in enumerate(config.listeners)}
        for index, listener in enumerate(self.listeners):
            settings = runtime.listeners[by_name[old.config.listeners[index].name]]
            # New connections take the new settings; established ones keep the object they
            # were accepted with. The port is the bound one (the config may say 0).
            listener.settings = replace(settings, port=listener.port)
        # Keep self.listeners and the runtime in the same (old) order.
        runtime.listeners = tuple(listener.settings for listener in self.listeners)
        runtime.config = replace(
            config,
            listeners=tuple(config.listeners[by_name[lc.name]] for lc in old.config.listeners),
        )
        for name, pool in old.pools.items():
            if runtime.pools.get(name) is not pool:
                task = loop.create_task(self._retire(pool, config.drain_timeout))
                self.retiring.add(task)
                task.add_done_callback(self.retiring.discard)
        self.runtime = runtime
        self.readiness.watch(self._pools_in_use())
        # The new configuration may name other files or another interval.
        if self.cert_watch is not None:
            await self.cert_watch.close()
        self.cert_watch = cert_watch
        if cert_watch is not None:
            cert_watch.start(self.swap_certificates)
        logging.getLogger().setLevel(config.logging.level.upper())
        logging.getLogger("pqproxy.access").disabled = not config.logging.access_log
        if config.logging.destination != old.config.logging.destination:
            logger.warning(
                "logging.destination changed to %s: it takes effect at the next restart",
                config.logging.destination,
            )
        logger.info("reloaded configuration from %s", config.source)

    @staticmethod
    async def _close_new_pools(runtime: Runtime, old: Runtime) -> None:
        for name, pool in runtime.pools.items():
            if old.pools.get(name) is not pool:
                await pool.close()

    async def _retire(self, pool: UpstreamPool, after: float) -> None:
        # Closing a pool leaves the connections checked out of it alone (they close when
        # released), so a running stream is safe either way; waiting the drain timeout gives
        # keep-alive clients accepted before the reload time to finish with it.
        try:
            await asyncio.sleep(after)
        finally:
            await pool.close()
            logger.debug("pool %s of the previous configuration closed", pool.name)

    async def drain(self, signals: ShutdownSignals, sig: signal.Signals) -> None:
        """Stop accepting, let in-flight requests finish until the deadline; a second
        SIGTERM/SIGINT closes everything at once."""
        timeout = self.config.drain_timeout
        active = self.active_connections
        self.readiness.listeners(False, "draining: not accepting new connections")
        drain: asyncio.Future[list[None]] = asyncio.gather(
            *(listener.drain(timeout) for listener in self.listeners)
        )
        # One step of each drain closes its listening socket; logging after it means that
        # whoever reads "draining" can rely on new connections being refused.
        await asyncio.sleep(0)
        logger.info(
            "received %s: draining %d connections (deadline %s)",
            sig.name,
            active,
            format_duration(timeout) if timeout else "0s",
        )
        while not drain.done():
            next_signal = asyncio.ensure_future(signals.wait())
            waiting: set[asyncio.Future[Any]] = {drain, next_signal}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not next_signal.done():
                next_signal.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await next_signal
                continue
            again = next_signal.result()
            if again is signal.SIGHUP:
                logger.info("received SIGHUP while draining: not reloading")
                continue
            logger.info(
                "received %s again: closing %d connections now",
                again.name,
                self.active_connections,
            )
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            await asyncio.gather(*(listener.close() for listener in self.listeners))
            return
        error = drain.exception()
        if error is not None:
            logger.error("drain failed: %s: %s", type(error).__name__, error)
            await asyncio.gather(*(listener.close() for listener in self.listeners))

    async def close(self) -> None:
        """Close every listener (immediately) and every pool, retiring ones included, then
        the admin endpoint."""
        self.readiness.listeners(False, "shutting down")
        if self.listen_monitor is not None:
            await self.listen_monitor.close()
        if self.cert_watch is not None:
            await self.cert_watch.close()
        await asyncio.gather(*(listener.close() for listener in self.listeners))
        for task in list(self.retiring):
            task.cancel()
        if self.retiring:
            await asyncio.wait(self.retiring, timeout=EXIT_GRACE)
        await asyncio.gather(*(pool.close() for pool in self.runtime.pools.values()))
        if self.runtime.offloader is not None:
            await self.runtime.offloader.close()
        self.readiness.close()
        if self.admin is not None:
            await self.admin.close()
            self.admin = None


async def run_worker(
    source: Path | Config,
    *,
    provider: CryptoProvider | None = None,
    reload: Callable[[], Config] | None = None,
    sockets: Sequence[socket.socket] | None = None,
    on_ready: Callable[[Sequence[TLSListener]], None] | None = None,
    signals: Sequence[signal.Signals] = SINGLE_PROCESS_SIGNALS,
    serve_admin: bool = True,
    ticket_masters: TicketMasters | None = None,
    count_listen_overflows: bool = True,
) -> None:
    """Serve ``source`` until SIGTERM/SIGINT, reloading on SIGHUP.

    ``source`` is a config file (loaded here; SIGHUP reads it again) or a ``Config`` (SIGHUP
    then re-reads its certificate files). ``reload`` replaces how SIGHUP gets the new config
    (the command line passes one that re-applies its flags). ``sockets``: one bound socket
    per listener (a worker's SO_REUSEPORT sockets); without, each listener binds its address.
    ``on_ready`` runs once every listener accepts; by default it prints the listening lines.
    Metrics are collected when the configuration has an admin endpoint; ``serve_admin``
    False leaves serving it to a supervisor (a worker). ``ticket_masters``: the session-ticket
    secrets a supervisor made before forking (None: made here). ``count_listen_overflows``:
    whether this process counts the kernel's host-wide listen counters (a supervisor lets
    worker 0 do it; see pqproxy.io.listen_queue).
    Raises ConfigError or ServeError when the configuration cannot be served.
    """
    if isinstance(source, Config):
        config = source
        reload_config = reload or (lambda: config)
    else:
        path = source
        config = load_config(path)
        reload_config = reload or (lambda: load_config(path))
    if sockets is not None and len(sockets) != len(config.listeners):
        raise ValueError("run_worker: one socket per listener")
    crypto = config.crypto
    try:
        # Created here, in the serving process (a worker, after the fork): a token session
        # or a pool belongs to the process that made it.
        provider = provider or create_provider(crypto.backend)
        fallback = create_provider(crypto.fallback) if crypto.fallback else None
    except (BackendError, OffloadConfigError) as exc:
        raise ServeError(f"crypto: {exc}") from None
    telemetry = Telemetry(ProxyMetrics()) if config.admin is not None else None
    if telemetry is not None:
        provider = TimedProvider(provider, telemetry.kem_observer)
        if fallback is not None:
            fallback = TimedProvider(fallback, telemetry.kem_observer)
    try:
        offloader = build_offloader(offload_settings(crypto), provider, fallback)
    except OffloadConfigError as exc:
        raise ServeError(f"crypto: {exc}") from None
    # Before build_runtime loads the certificates (see pqproxy.io.cert_watch).
    cert_watch = certificate_watch(config, offloader)
    server = _Server(
        build_runtime(
            config,
            provider,
            telemetry=telemetry,
            offloader=offloader,
            ticket_masters=ticket_masters,
        ),
        reload_config,
        telemetry=telemetry,
        serve_admin=serve_admin,
        cert_watch=cert_watch,
        count_listen_overflows=count_listen_overflows,
    )
    if sockets is None:
        # One process: said here, once. A supervisor says it before it forks.
        warn_backlog_capped(config)
    with ShutdownSignals(signals) as caught:
        try:
            await server.start(sockets)
            if on_ready is not None:
                on_ready(server.listeners)
            else:
                for listener_config, listener in zip(
                    config.listeners, server.listeners, strict=True
                ):
                    announce(listening_line(listener_config, listener.port))
            while True:
                sig = await caught.wait()
                if sig is signal.SIGHUP:
                    await server.reload()
                    continue
                await server.drain(caught, sig)
                break
        finally:
            await server.close()
            close_key_logs()
    logger.info("stopped")


# -- workers ------------------------------------------------------------------------------------


def _bind_reuseport(family: int, address: tuple[Any, ...]) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT, not listening yet."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # As asyncio binds: 0.0.0.0 and :: are separate sockets (the config's collision
            # check assumes it).
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class _Bind:
    """Where one listener's workers bind: family and address with the concrete port."""

    family: int
    address: tuple[Any, ...]  # (host, port) or, for IPv6, (host, port, flowinfo, scope_id)


def _reserve(listener: ListenerConfig) -> tuple[socket.socket, _Bind]:
    """Bind (never listen on) the listener's address with SO_REUSEPORT in the parent.

    Why: with port 0 the workers must agree on one concrete port, and this picks it; the
    bound socket also keeps the port ours while workers come and go (a restart cannot lose it
    to another program), and a port already taken fails here, once, before any fork. A
    socket that is bound but not listening is not in the kernel's SO_REUSEPORT accept group,
    so it never receives a connection.
    """
    try:
        infos = socket.getaddrinfo(
            listener.listen.host,
            listener.listen.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {listener.listen}: {exc.strerror}") from None
    family, _type, _proto, _name, address = infos[0]
    try:
        sock = _bind_reuseport(family, address)
    except OSError as exc:
        raise ServeError(f"cannot listen on {listener.listen}: {exc.strerror or exc}") from None
    bound: int = sock.getsockname()[1]
    return sock, _Bind(family, (address[0], bound, *address[2:]))


def _set_parent_death_signal(parent: int) -> None:
    """Linux: SIGTERM this worker when the supervisor dies (even by SIGKILL), so workers are
    never left serving an orphaned port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        # The parent died before prctl took effect.
        os.kill(os.getpid(), signal.SIGTERM)


def _exit_status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


@dataclass
class _Worker:
    slot: int
    pid: int
    ready_fd: int | None
    started: float
    ready: bool = False
    buffer: bytes = b""
    stopping: bool = False


@dataclass
class _Slot:
    failures: int = 0
    restart_at: float | None = None


class _Supervisor:
    def __init__(
        self,
        config: Config,
        reload_config: Callable[[], Config],
        provider: CryptoProvider,
        use_uvloop: bool,
        ticket_masters: TicketMasters,
    ) -> None:
        self.config = config
        self.reload_config = reload_config
        self.provider = provider
        # Made before the first fork, so every worker holds the same secrets and opens the
        # others' tickets; a reload updates them here as each worker does for itself.
        self.ticket_masters = ticket_masters
        self.use_uvloop = use_uvloop
        self.count = config.workers
        self.reserved: list[socket.socket] = []
        self.binds: list[_Bind] = []
        self.workers: dict[int, _Worker] = {}
        self.slots = [_Slot() for _ in range(self.count)]
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(self.wakeup_w, False)
        self.stopping = False
        self.stop_signals = 0
        self.stop_deadline = 0.0
        # Set when start-up failed: the reason, raised once the workers are gone.
        self.failure: str | None = None
        self._saved_handlers: dict[signal.Signals, Any] = {}
        # The admin endpoint, served here from the select loop; the workers' metric files.
        self.admin: SelectAdminServer | None = None
        self.metrics_dir: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self._start_admin()
            for listener in self.config.listeners:
                sock, bind = _reserve(listener)
                self.reserved.append(sock)
                self.binds.append(bind)
            self._install_signals()
            for slot in range(self.count):
                self._spawn(slot)
            if not self._wait_ready():
                return self._shutdown_loop()
            for listener, bind in zip(self.config.listeners, self.binds, strict=True):
                announce(listening_line(listener, bind.address[1], self.count))
            logger.info(
                "supervisor: %d workers ready (pids %s)",
                self.count,
                ",".join(str(pid) for pid in sorted(self.workers)),
            )
            self._main_loop()
            return self._shutdown_loop()
        finally:
            self._cleanup()

    def _start_admin(self) -> None:
        """Before any fork: the private directory the workers write their metrics to (each
        worker's values live in files named by its pid), and the admin socket."""
        address = self.config.admin
        if address is None:
            return
        self.metrics_dir = tempfile.mkdtemp(prefix="pqproxy-metrics-")
        enable_multiprocess(self.metrics_dir)
        logger.info("supervisor: workers write their metrics to %s", self.metrics_dir)
        metrics_dir = self.metrics_dir
        try:
            sock = bind_admin_socket(address.host, address.port)
        except OSError as exc:
            raise ServeError(f"cannot listen on admin {address}: {exc.strerror or exc}") from None
        self.admin = SelectAdminServer(
            AdminRoutes(lambda: render_multiprocess(metrics_dir), self._readiness), sock
        )
        announce(admin_line(address.host, self.admin.port))

    def _readiness(self) -> Readiness:
        """Ready when at least one worker serves and every check passes in every worker
        that published its checks (pqproxy_ready is livemin over the live workers)."""
        if self.stopping:
            return Readiness(False, "shutting down")
        serving = sum(1 for w in self.workers.values() if w.ready)
        if serving == 0 or self.metrics_dir is None:
            return Readiness(False, "listeners not bound: no worker is serving yet")
        checks = {
            labels.get("check", ""): value
            for labels, value in multiprocess_gauge(self.metrics_dir, "pqproxy_ready")
        }
        for check in READY_CHECKS:
            if checks.get(check, 0.0) >= 1.0:
                continue
            if check == "listeners":
                return Readiness(False, "listeners not bound in every worker")
            if check == "backend":
                return Readiness(False, "backend self-test not passed in every worker")
            down = sorted(
                labels.get("upstream", "?")
                for labels, value in multiprocess_gauge(
                    self.metrics_dir, "pqproxy_upstream_healthy"
                )
                if value < 1.0
            )
            return Readiness(
                False, "no healthy upstream" + (f" ({', '.join(down)} down)" if down else "")
            )
        return Readiness(True, f"{serving} of {self.count} workers serving")

    def _install_signals(self) -> None:
        for sig in SUPERVISOR_SIGNALS:
            self._saved_handlers[sig] = signal.signal(sig, _ignore_handler)
        # The handlers do nothing: the C-level handler writes the signal number to this pipe,
        # which select() watches beside the workers' ready pipes.
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)

    def _cleanup(self) -> None:
        if self._saved_handlers:
            signal.set_wakeup_fd(-1)
            for sig, handler in self._saved_handlers.items():
                signal.signal(sig, handler)
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(worker.pid, 0)
            self._close_ready(worker)
        for sock in self.reserved:
            sock.close()
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            self.metrics_dir = None

    # -- workers -------------------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        ready_r, ready_w = os.pipe()
        # Anything buffered would be written twice, once by each process.
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(ready_r)
            os.close(ready_w)
            logger.error("supervisor: cannot start worker %d: %s", slot, exc.strerror or exc)
            self.slots[slot].restart_at = time.monotonic() + MAX_RESTART_DELAY
            return
        if pid == 0:
            os.close(ready_r)
            self._in_child(parent, ready_w, slot)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        self.workers[pid] = _Worker(slot, pid, ready_r, time.monotonic())
        self.slots[slot].restart_at = None
        logger.info("supervisor: worker %d started, pid=%d", slot, pid)

    def _in_child(self, parent: int, ready_w: int, slot: int) -> NoReturn:
        code = 1
        try:
            # Still blocked: reset what the parent installed before anything can arrive.
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            # Ctrl-C reaches the whole process group; the parent turns it into SIGTERM.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGCHLD))
            os.close(self.wakeup_r)
            os.close(self.wakeup_w)
            for worker in self.workers.values():
                self._close_ready(worker)
            for sock in self.reserved:
                sock.close()
            if self.admin is not None:
                self.admin.close_in_child()
            _set_parent_death_signal(parent)
            code = _worker_process(
                self.config,
                self.reload_config,
                self.provider,
                self.binds,
                ready_w,
                self.use_uvloop,
                self.ticket_masters,
                # The kernel's listen counters are host-wide: one worker counts them.
                count_listen_overflows=slot == 0,
            )
        except BaseException as exc:
            with contextlib.suppress(Exception):
                logger.error("worker failed: %s: %s", type(exc).__name__, exc)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _close_ready(self, worker: _Worker) -> None:
        if worker.ready_fd is not None:
            os.close(worker.ready_fd)
            worker.ready_fd = None

    def _read_ready(self, worker: _Worker) -> str | None:
        """A complete message from the worker's ready pipe: "ready", "error ...", or None."""
        assert worker.ready_fd is not None
        try:
            data = os.read(worker.ready_fd, 4096)
        except BlockingIOError:
            return None
        if not data:
            self._close_ready(worker)
            return None if worker.ready else "error exited before it was ready"
        worker.buffer += data
        if b"\n" not in worker.buffer:
            return None
        line, _, worker.buffer = worker.buffer.partition(b"\n")
        return line.decode("utf-8", "replace")

    def _reap(self) -> list[tuple[_Worker, int]]:
        exited = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self.workers.pop(pid, None)
            if worker is not None:
                exited.append((worker, status))
                if self.metrics_dir is not None:
                    # Its live gauges (connections, health, readiness) go; its counts stay.
                    mark_process_dead(pid, self.metrics_dir)
        return exited

    def _signals_received(self, readable: Sequence[int]) -> list[signal.Signals]:
        if self.wakeup_r not in readable:
            return []
        received = []
        with contextlib.suppress(BlockingIOError):
            for number in os.read(self.wakeup_r, 1024):
                with contextlib.suppress(ValueError):
                    received.append(signal.Signals(number))
        return received

    def _select(self, timeout: float) -> list[int]:
        """Wait for a signal, a worker's message or the timeout; admin requests that arrive
        meanwhile are answered here too."""
        fds = [self.wakeup_r] + [
            w.ready_fd for w in self.workers.values() if w.ready_fd is not None
        ]
        return select_with_admin(self.admin, fds, timeout)

    def _wait_ready(self) -> bool:
        """Until every worker reported ready: True, or False (after logging why) when one
        failed, the deadline passed or SIGTERM/SIGINT arrived; the caller then stops them."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not all(w.ready for w in self.workers.values()) or len(self.workers) < self.count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"workers not ready after {STARTUP_TIMEOUT:g}s")
                return False
            readable = self._select(min(remaining, POLL_INTERVAL))
            for sig in self._signals_received(readable):
                if sig in (signal.SIGTERM, signal.SIGINT):
                    logger.info("supervisor: received %s during start-up", sig.name)
                    self._begin_stop(sig)
                    return False
            for worker in list(self.workers.values()):
                if worker.ready_fd in readable:
                    message = self._read_ready(worker)
                    if message == "ready":
                        worker.ready = True
                    elif message is not None:
                        self._fail(f"worker pid={worker.pid}: {message.removeprefix('error ')}")
                        return False
            for worker, status in self._reap():
                self._close_ready(worker)
                self._fail(f"worker pid={worker.pid} {_exit_status(status)} during start-up")
                return False
        return True

    def _fail(self, reason: str) -> None:
        # Not logged here: the command line prints it as its one error line.
        self.failure = reason
        self._begin_stop(signal.SIGTERM, quiet=True)

    def _main_loop(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            due = [s.restart_at for s in self.slots if s.restart_at is not None]
            timeout = min([POLL_INTERVAL, *(t - now for t in due)])
            readable = self._select(timeout)
            for sig in self._signals_received(readable):
                if sig in (signal.SIGTERM, signal.SIGINT):
                    self._begin_stop(sig)
                elif sig is signal.SIGHUP:
                    self._reload()
            for worker in list(self.workers.values()):
                if worker.ready_fd is not None and worker.ready_fd in readable:
                    message = self._read_ready(worker)
                    if message == "ready":
                        worker.ready = True
                        logger.info("supervisor: worker %d ready, pid=%d", worker.slot, worker.pid)
                    elif message is not None:
                        logger.error(
                            "supervisor: worker pid=%d: %s",
                            worker.pid,
                            message.removeprefix("error "),
                        )
            for worker, status in self._reap():
                self._close_ready(worker)
                if self.stopping:
                    continue
                slot = self.slots[worker.slot]
                uptime = time.monotonic() - worker.started
                slot.failures = slot.failures + 1 if uptime < STABLE_UPTIME else 0
                delay = (
                    min(RESTART_DELAY * 2 ** (slot.failures - 1), MAX_RESTART_DELAY)
                    if slot.failures
                    else 0.0
                )
                logger.error(
                    "supervisor: worker %d (pid=%d) %s unexpectedly after %.1fs; restarting it%s",
                    worker.slot,
                    worker.pid,
                    _exit_status(status),
                    uptime,
                    f" in {delay:g}s" if delay else "",
                )
                slot.restart_at = time.monotonic() + delay
            if self.stopping:
                break
            now = time.monotonic()
            for index, slot in enumerate(self.slots):
                if slot.restart_at is not None and slot.restart_at <= now:
                    self._spawn(index)

    def _reload(self) -> None:
        """SIGHUP: validate the new configuration here first (so a bad one is refused in one
        line, not once per worker), keep it for workers started later, and pass the signal on;
        each worker then reloads by itself."""
        try:
            config = self.reload_config()
            check_reloadable(self.config, config)
            try:
                masters = self.ticket_masters.for_config(config)
            except TicketKeyError as exc:
                raise ServeError(str(exc)) from None
            check_servable(config, self.provider, masters)
        except ConfigError as exc:
            logger.error("reload refused: %s", describe_config_error(exc))
            return
        except ServeError as exc:
            logger.error("reload refused: %s", exc)
            return
        except Exception as exc:
            logger.error("reload refused: %s: %s", type(exc).__name__, exc)
            return
        self.config = config
        self.ticket_masters = masters
        logger.info("supervisor: reloading %d workers from %s", len(self.workers), config.source)
        self._signal_workers(signal.SIGHUP)

    def _signal_workers(self, sig: signal.Signals) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, sig)

    def _begin_stop(self, sig: signal.Signals, *, quiet: bool = False) -> None:
        if self.stopping:
            # A second SIGTERM/SIGINT: the workers close their connections at once.
            logger.info("supervisor: received %s again: workers close now", sig.name)
            self.stop_signals += 1
            self._signal_workers(signal.SIGTERM)
            return
        self.stopping = True
        self.stop_signals = 1
        self.stop_deadline = time.monotonic() + self.config.drain_timeout + EXIT_GRACE
        if not quiet:
            logger.info(
                "supervisor: received %s: stopping %d workers (drain deadline %s)",
                sig.name,
                len(self.workers),
                format_duration(self.config.drain_timeout) if self.config.drain_timeout else "0s",
            )
        self._signal_workers(signal.SIGTERM)

    def _shutdown_loop(self) -> int:
        """After SIGTERM was passed on: wait for every worker to exit, until the deadline."""
        status_ok = self.failure is None
        while self.workers:
            remaining = self.stop_deadline - time.monotonic()
            if remaining <= 0:
                logger.error(
                    "supervisor: %d workers still running %gs after SIGTERM; killing them",
                    len(self.workers),
                    self.config.drain_timeout + EXIT_GRACE,
                )
                for worker in self.workers.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
                for worker in list(self.workers.values()):
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(worker.pid, 0)
                    self._close_ready(worker)
                self.workers.clear()
                return 1
            readable = self._select(min(remaining, POLL_INTERVAL))
            for sig in self._signals_received(readable):
                if sig in (signal.SIGTERM, signal.SIGINT):
                    self._begin_stop(sig)
            for worker in list(self.workers.values()):
                if worker.ready_fd is not None and worker.ready_fd in readable:
                    self._read_ready(worker)
            for worker, status in self._reap():
                self._close_ready(worker)
                code = os.waitstatus_to_exitcode(status)
                if code == -signal.SIGTERM and self.stop_signals > 1:
                    # A second SIGTERM means "close now": a worker that was between its
                    # own shutdown and exit when it arrived dies of it, as asked.
                    logger.info("supervisor: worker pid=%d %s", worker.pid, _exit_status(status))
                elif code != 0:
                    status_ok = False
                    logger.error("supervisor: worker pid=%d %s", worker.pid, _exit_status(status))
                else:
                    logger.info("supervisor: worker pid=%d exited", worker.pid)
        if self.failure is not None:
            raise ServeError(self.failure)
        logger.info("supervisor: all workers exited")
        return 0 if status_ok else 1


def _ignore_handler(signum: int, frame: object) -> None:
    """The supervisor's Python-level handler: the wakeup pipe carries the signal."""


def _worker_process(
    config: Config,
    reload_config: Callable[[], Config],
    provider: CryptoProvider,
    binds: Sequence[_Bind],
    ready_w: int,
    use_uvloop: bool,
    ticket_masters: TicketMasters,
    *,
    count_listen_overflows: bool = False,
) -> int:
    """The body of a forked worker: its own sockets on the shared ports, its own loop."""

    def report(message: str) -> None:
        with contextlib.suppress(OSError):
            os.write(ready_w, message.encode("utf-8", "replace") + b"\n")
            os.close(ready_w)

    reported = False

    def on_ready(_listeners: Sequence[TLSListener]) -> None:
        nonlocal reported
        reported = True
        report("ready")

    sockets: list[socket.socket] = []
    try:
        for listener, bind in zip(config.listeners, binds, strict=True):
            try:
                sockets.append(_bind_reuseport(bind.family, bind.address))
            except OSError as exc:
                raise ServeError(
                    f"cannot listen on {listener.listen}: {exc.strerror or exc}"
                ) from None
        run(
            run_worker(
                config,
                # Not the parent's provider: each worker makes its own from the config
                # (``provider`` serves the parent's checks only).
                reload=reload_config,
                sockets=sockets,
                on_ready=on_ready,
                signals=WORKER_SIGNALS,
                serve_admin=False,
                ticket_masters=ticket_masters,
                count_listen_overflows=count_listen_overflows,
            ),
            use_uvloop=use_uvloop,
        )
    except (ServeError, ConfigError) as exc:
        message = describe_config_error(exc) if isinstance(exc, ConfigError) else str(exc)
        if reported:
            logger.error("worker failed: %s", message)
        else:
            report(f"error {message}")
        return 1
    finally:
        for sock in sockets:
            sock.close()
    return 0


def run_supervisor(
    config: Config,
    *,
    reload: Callable[[], Config] | None = None,
    provider: CryptoProvider | None = None,
    use_uvloop: bool = True,
) -> int:
    """Serve ``config`` with ``config.workers`` worker processes; the exit status.

    Every certificate is loaded once here first, so a configuration that cannot be served
    fails before any fork (ServeError); so are the session-ticket master secrets, which every
    worker inherits. Raises ServeError too when a worker cannot start.
    """
    if provider is None:
        try:
            provider = create_provider(config.crypto.backend)
        except (BackendError, OffloadConfigError) as exc:
            raise ServeError(f"crypto: {exc}") from None
    masters = start_ticket_masters(config)
    check_servable(config, provider, masters)
    warn_backlog_capped(config)
    reload_config = reload or (lambda: config)
    return _Supervisor(config, reload_config, provider, use_uvloop, masters).run()
