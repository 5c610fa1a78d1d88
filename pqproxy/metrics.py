"""Every Prometheus metric pqproxy exports: names, help, labels, buckets, multiprocess modes.

Rules of this module:

- It defines; it does not decide. What a label value means and when a metric moves is the
  caller's business (``pqproxy/io/telemetry.py``); this module imports nothing of pqproxy, so
  any layer allowed to count (``io/``, never ``tls/``) can use it.
- Names follow Prometheus conventions: the ``pqproxy_`` prefix, base units (seconds, bytes),
  ``_total`` on counters (the client library appends it).
- Every label has a small, fixed set of values: enum names (groups, cipher suites, signature
  schemes, alerts), configured upstream addresses, HTTP status codes, backend names. Never a
  client-supplied string, never free text: a label is a time series per value.
- Buckets fit what they measure: sub-millisecond crypto (50 µs .. 1 s), handshakes that include
  a network round trip (250 µs .. 10 s), and requests or token streams that run for minutes
  (1 ms .. 600 s).
- One process, one ``ProxyMetrics`` with its own registry: tests and tools can build several
  without colliding in the global registry.
- With several worker processes, prometheus_client's multiprocess mode: each worker writes its
  values to memory-mapped files in a directory private to the supervisor, which reads them all
  for one scrape (``render_multiprocess``). Gauges say how workers combine (``livesum`` for
  connections; ``livemin`` for health and readiness: a server is healthy, a check passes, only
  when every live worker says so).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import values as _values
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.multiprocess import mark_process_dead as _mark_process_dead

PREFIX = "pqproxy_"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Backend calls and handshake phases: a hybrid encapsulation is ~100 µs, a P-384 signature
# ~1 ms, an HSM or a loaded pool can take far longer.
CRYPTO_BUCKETS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
# A whole handshake includes one client round trip and the client's own crypto.
HANDSHAKE_BUCKETS: tuple[float, ...] = (
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Requests and first bytes: an embedding answers in milliseconds, a long generation streams
# for minutes (the upstream read timeout defaults to 600 s).
REQUEST_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)

# pqproxy_tls_handshake_failures_total{reason}: the name of the alert pqproxy sent (an
# AlertDescription member name, e.g. "handshake_failure", "protocol_version"), or one of these.
FAILURE_REASONS: tuple[str, ...] = (
    "client_alert",  # the client sent an alert (it rejected our certificate, say)
    "client_closed",  # the client closed the connection mid-handshake
    "timeout",  # the handshake timeout passed
    "shutdown",  # pqproxy was stopping
    "internal_error",  # a bug or a backend failure in pqproxy
    "other",
)
# pqproxy_tls_client_certificates_total{result}: how a client's certificate chain fared. The
# refusals name the rule: three cheap checks before the path builder (chain_too_long,
# duplicate_certificate, self_issued_intermediate), else the alert sent for the chain.
CLIENT_CERTIFICATE_RESULTS: tuple[str, ...] = (
    "ok",
    "chain_too_long",
    "duplicate_certificate",
    "self_issued_intermediate",
    "bad_certificate",
    "unknown_ca",
    "certificate_expired",
    "unsupported_certificate",
    "error",  # the verification itself failed (a timeout, a bug): internal_error
    "other",
)
# pqproxy_tls_client_groups_offered_total{group}: a NamedGroup member name, or this for GREASE
# and code points pqproxy does not know.
OTHER_GROUP = "other"
# pqproxy_ready{check}
READY_CHECKS: tuple[str, ...] = ("listeners", "backend", "upstream")
# pqproxy_http_underscore_headers_total{action}: what happened to client header fields whose
# name holds "_" (dropped: removed, the request went on; rejected: the request got 400).
UNDERSCORE_ACTIONS: tuple[str, ...] = ("dropped", "rejected")
# pqproxy_http_upstream_retries_total{outcome}: a reused upstream connection closed before any
# byte of the response; the request went again on a fresh one (retried), or, its method not
# idempotent (RFC 9110 §9.2.2), was answered 502 (not_retried).
RETRY_OUTCOMES: tuple[str, ...] = ("retried", "not_retried")
# pqproxy_http_upstream_invalid_responses_total{reason}: responses refused with 502.
INVALID_RESPONSE_REASONS: tuple[str, ...] = ("head_too_large", "too_many_interim", "malformed")
# pqproxy_http_connection_errors_total{side}: requests ended by a socket error (a reset, a
# broken pipe) on the client or the upstream connection.
CONNECTION_ERROR_SIDES: tuple[str, ...] = ("client", "upstream")
# pqproxy_send_timeouts_total{mode}: connections aborted because the client took no bytes
# for timeouts.send, by listener mode.
SEND_TIMEOUT_MODES: tuple[str, ...] = ("http", "tcp")


class ProxyMetrics:
    """The metrics of one process, registered in ``registry`` (a new private one by default).

    Construct it only after ``enable_multiprocess`` in a worker of a multi-process server:
    the value storage is chosen when each metric (and each label child) is created.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        # --- TLS ---------------------------------------------------------------------------
        self.tls_handshakes = Counter(
            "pqproxy_tls_handshakes",
            "TLS handshakes by negotiated group and cipher suite (none before they were "
            "chosen), the server's signature scheme (psk on a resumed session, none on a "
            "failed handshake), key-exchange backend, HelloRetryRequest (true/false), "
            "resumption from a ticket (true/false) and result (ok, failed). Only connections "
            "that sent at least one byte count.",
            ("group", "cipher_suite", "signature", "backend", "hrr", "resumed", "result"),
            registry=r,
        )
        self.tls_handshake_duration = Histogram(
            "pqproxy_tls_handshake_duration_seconds",
            "Completed handshakes: from the first ClientHello byte to the client's verified "
            "Finished (includes one client round trip).",
            ("group", "backend"),
            buckets=HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.tls_key_exchange = Histogram(
            "pqproxy_tls_key_exchange_seconds",
            "Key-exchange phase of a handshake: from the engine asking for the server share to "
            "the result handed back.",
            ("group", "backend"),
            buckets=CRYPTO_BUCKETS,
            registry=r,
        )
        self.tls_sign = Histogram(
            "pqproxy_tls_sign_seconds",
            "CertificateVerify signing phase of a handshake, by signature scheme and backend.",
            ("scheme", "backend"),
            buckets=CRYPTO_BUCKETS,
            registry=r,
        )
        self.tls_alerts_sent = Counter(
            "pqproxy_tls_alerts_sent",
            "The alert that ended a connection, when pqproxy sent it (close_notify included).",
            ("alert",),
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "pqproxy_tls_handshake_failures",
            "Handshakes that did not complete, by reason: the alert pqproxy sent, or "
            + ", ".join(FAILURE_REASONS)
            + ".",
            ("reason",),
            registry=r,
        )
        self.tls_client_certificates = Counter(
            "pqproxy_tls_client_certificates",
            "Client certificate chains verified (mutual TLS), by result: ok, or why the chain "
            "was refused (" + ", ".join(CLIENT_CERTIFICATE_RESULTS[1:]) + ").",
            ("result",),
            registry=r,
        )
        self.tls_client_chain_verify = Histogram(
            "pqproxy_tls_client_chain_verify_seconds",
            "Client chain verification phase of a handshake: from the engine asking to the "
            "verdict handed back (queueing included, wherever it ran).",
            buckets=CRYPTO_BUCKETS,
            registry=r,
        )
        self.tls_client_groups_offered = Counter(
            "pqproxy_tls_client_groups_offered",
            "Key-exchange groups in clients' supported_groups, one count per group per "
            "handshake; GREASE and unknown code points are 'other'.",
            ("group",),
            registry=r,
        )
        self.tls_no_hybrid_offered = Counter(
            "pqproxy_tls_handshakes_no_hybrid_offered",
            "Handshakes from clients that offered no hybrid post-quantum group (they would be "
            "refused under pq_policy: require), by result (ok, failed).",
            ("result",),
            registry=r,
        )

        # --- crypto backends -----------------------------------------------------------------
        self.kem_operations = Counter(
            "pqproxy_kem_operations",
            "Key-exchange operations on a backend (every group seen as a KEM: the server's "
            "side is an encapsulation), by op (encapsulate, keygen, decapsulate) and result "
            "(ok, invalid_share, error).",
            ("backend", "op", "result"),
            registry=r,
        )
        self.kem_operation_duration = Histogram(
            "pqproxy_kem_operation_seconds",
            "Time of the backend call itself, wherever it ran.",
            ("backend", "op"),
            buckets=CRYPTO_BUCKETS,
            registry=r,
        )

        # --- connections and HTTP ------------------------------------------------------------
        self.connections_active = Gauge(
            "pqproxy_connections_active",
            "Client connections open now (admitted, not yet closed).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.connections = Counter(
            "pqproxy_connections",
            "Client connections by how they ended (closed, tls_alert, peer_eof, "
            "handshake_timeout, idle_timeout, upstream_failed, upstream_lost, over_capacity, "
            "shutdown, internal_error, forbidden).",
            ("result",),
            registry=r,
        )
        self.client_received_bytes = Counter(
            "pqproxy_client_received_bytes",
            "Bytes received from clients on the wire (TLS records).",
            registry=r,
        )
        self.client_sent_bytes = Counter(
            "pqproxy_client_sent_bytes",
            "Bytes sent to clients on the wire (TLS records).",
            registry=r,
        )
        self.http_requests = Counter(
            "pqproxy_http_requests",
            "HTTP requests by upstream server (none: never forwarded) and the status sent to "
            "the client (0: none was sent).",
            ("upstream", "status"),
            registry=r,
        )
        self.http_request_duration = Histogram(
            "pqproxy_http_request_duration_seconds",
            "From a request's head read to its response's last byte written.",
            ("upstream",),
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_first_byte = Histogram(
            "pqproxy_upstream_first_byte_seconds",
            "From a request's head read to the first response body byte from the upstream "
            "(time to first token for a stream; the response head for an empty body).",
            ("upstream",),
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.http_underscore_headers = Counter(
            "pqproxy_http_underscore_headers",
            "Client request header fields whose name holds an underscore, by action ("
            + ", ".join(UNDERSCORE_ACTIONS)
            + "): dropped before forwarding, or the request refused with 400.",
            ("action",),
            registry=r,
        )
        self.http_upstream_retries = Counter(
            "pqproxy_http_upstream_retries",
            "Requests whose reused upstream connection closed before any response byte, by "
            "outcome: retried on a fresh connection (idempotent method), or not_retried "
            "(answered 502: the upstream may have acted on it).",
            ("outcome",),
            registry=r,
        )
        self.http_upstream_invalid_responses = Counter(
            "pqproxy_http_upstream_invalid_responses",
            "Upstream responses refused with 502, by reason ("
            + ", ".join(INVALID_RESPONSE_REASONS)
            + ").",
            ("reason",),
            registry=r,
        )
        self.http_connection_errors = Counter(
            "pqproxy_http_connection_errors",
            "Requests ended by a socket error (reset, broken pipe) on the client or the "
            "upstream side.",
            ("side",),
            registry=r,
        )
        self.send_timeouts = Counter(
            "pqproxy_send_timeouts",
            "Connections aborted, client and upstream side, because the client took no bytes "
            "for timeouts.send, by listener mode (http, tcp).",
            ("mode",),
            registry=r,
        )
        # --- listen queues (see pqproxy.io.listen_queue) --------------------------------------
        self.listen_overflows = Counter(
            "pqproxy_listen_overflows",
            "Connection attempts the kernel dropped because a listening socket's accept queue "
            "was full (TcpExt ListenOverflows of /proc/net/netstat), since pqproxy started. "
            "Host-wide: the kernel counts every listening socket in this network namespace, "
            "pqproxy's and any other program's.",
            registry=r,
        )
        self.listen_drops = Counter(
            "pqproxy_listen_drops",
            "Connection attempts the kernel dropped at a listening socket for any reason, "
            "overflows included (TcpExt ListenDrops of /proc/net/netstat), since pqproxy "
            "started. Host-wide for this network namespace, as pqproxy_listen_overflows.",
            registry=r,
        )
        self.listen_queue_length = Gauge(
            "pqproxy_listen_queue_length",
            "Connections waiting in a listener's accept queue at the last sample (the "
            "fullest socket of any worker: each worker has its own queue).",
            ("listener",),
            multiprocess_mode="livemax",
            registry=r,
        )
        self.listen_backlog = Gauge(
            "pqproxy_listen_backlog",
            "The accept queue's limit per listening socket as the kernel applies it "
            "(limits.backlog, capped by net.core.somaxconn).",
            ("listener",),
            multiprocess_mode="livemax",
            registry=r,
        )
        self.upstream_healthy = Gauge(
            "pqproxy_upstream_healthy",
            "1 when the upstream server passes its health checks and is not ejected (in every "
            "worker), else 0.",
            ("upstream",),
            multiprocess_mode="livemin",
            registry=r,
        )
        self.ready = Gauge(
            "pqproxy_ready",
            "Readiness checks (listeners, backend, upstream): 1 when the check passes (in "
            "every serving worker), else 0.",
            ("check",),
            multiprocess_mode="livemin",
            registry=r,
        )

    def render(self) -> bytes:
        """This process's metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    def sample_names(self) -> set[str]:
        """Every sample name this set of metrics can expose (``_total``, ``_bucket``, ...)."""
        names: set[str] = set()
        for family in self.registry.collect():
            if family.type == "counter":
                names.update({family.name + "_total", family.name + "_created"})
            elif family.type == "histogram":
                names.update(
                    family.name + suffix for suffix in ("_bucket", "_count", "_sum", "_created")
                )
            else:
                names.add(family.name)
        return names


# --- several worker processes -----------------------------------------------------------------


def enable_multiprocess(directory: str) -> None:
    """Make every metric value created from now on (in this process and the ones it forks)
    live in memory-mapped files under ``directory``.

    prometheus_client picks its value storage from PROMETHEUS_MULTIPROC_DIR once, when it is
    first imported; pqproxy knows whether it runs workers only after reading its
    configuration, so the storage is switched here, before any value exists.
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    # prometheus_client leaves these helpers unannotated.
    _values.ValueClass = _values.MultiProcessValue()  # type: ignore[no-untyped-call]


def mark_process_dead(pid: int, directory: str) -> None:
    """A worker exited: drop its ``live*`` gauges (its counters and histograms stay, so
    totals never go backwards)."""
    _mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def _multiprocess_registry(directory: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


def render_multiprocess(directory: str) -> bytes:
    """Every worker's metrics, merged, in the Prometheus text format."""
    return generate_latest(_multiprocess_registry(directory))


def multiprocess_gauge(directory: str, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """(labels, value) of each series of gauge ``name``, merged over the workers as its
    multiprocess mode says."""
    for family in _multiprocess_registry(directory).collect():
        if family.name == name:
            for sample in family.samples:
                yield sample.labels, sample.value


__all__ = [
    "CONNECTION_ERROR_SIDES",
    "CONTENT_TYPE",
    "CRYPTO_BUCKETS",
    "FAILURE_REASONS",
    "HANDSHAKE_BUCKETS",
    "INVALID_RESPONSE_REASONS",
    "OTHER_GROUP",
    "PREFIX",
    "READY_CHECKS",
    "REQUEST_BUCKETS",
    "RETRY_OUTCOMES",
    "SEND_TIMEOUT_MODES",
    "UNDERSCORE_ACTIONS",
    "ProxyMetrics",
    "enable_multiprocess",
    "mark_process_dead",
    "multiprocess_gauge",
    "render_multiprocess",
]
