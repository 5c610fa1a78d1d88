"""What moves the metrics: the I/O layer's events turned into counts and times.

``Telemetry`` wraps one ``ProxyMetrics`` (one per process) and is shared by every listener,
connection and HTTP session of that process. It decides label values (enum names, a small
fixed set of failure reasons, configured upstream addresses) so that no label ever holds a
client-chosen string.

The hot path stays cheap: label children are bound once and kept in dicts keyed by the raw
values (``labels()`` validates and locks on every call; a dict lookup does not), the
per-group children of ``client_groups_offered`` are bound at start, and bytes are counted
per read or write, never per byte.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..crypto.instrumented import Observer
from ..metrics import (
    CLIENT_CERTIFICATE_RESULTS,
    CONNECTION_ERROR_SIDES,
    INVALID_RESPONSE_REASONS,
    OTHER_GROUP,
    READY_CHECKS,
    RETRY_OUTCOMES,
    SEND_TIMEOUT_MODES,
    UNDERSCORE_ACTIONS,
    ProxyMetrics,
)
from ..tls.enums import HYBRID_GROUPS, AlertDescription, CipherSuite, NamedGroup, SignatureScheme

_BOOL = {True: "true", False: "false"}
_NONE = "none"
# The signature label of a resumed handshake: it authenticated with the ticket's PSK.
_PSK = "psk"


def _name(enum_cls: Any, value: int | None) -> str:
    if value is None:
        return _NONE
    try:
        return str(enum_cls(value).name)
    except ValueError:
        # Only values pqproxy itself negotiated reach here, so the set stays bounded.
        return f"0x{value:04x}"


class Telemetry:
    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics
        m = metrics
        self._offered = {int(g): m.tls_client_groups_offered.labels(g.name) for g in NamedGroup}
        self._offered_other = m.tls_client_groups_offered.labels(OTHER_GROUP)
        self._no_hybrid = {r: m.tls_no_hybrid_offered.labels(r) for r in ("ok", "failed")}
        self._handshakes: dict[
            tuple[int | None, int | None, int | None, str, bool, bool, str], Any
        ] = {}
        self._handshake_duration: dict[tuple[int, str], Any] = {}
        self._key_exchange: dict[tuple[int, str], Any] = {}
        self._sign: dict[tuple[int, str], Any] = {}
        self._client_certificates = {
            r: m.tls_client_certificates.labels(r) for r in CLIENT_CERTIFICATE_RESULTS
        }
        self._kem_ops: dict[tuple[str, str, str], Any] = {}
        self._kem_duration: dict[tuple[str, str], Any] = {}
        self._alerts: dict[AlertDescription, Any] = {}
        self._failures: dict[str, Any] = {}
        self._connections: dict[str, Any] = {}
        self._requests: dict[tuple[str, int], Any] = {}
        self._request_duration: dict[str, Any] = {}
        self._first_byte: dict[str, Any] = {}
        # Bound on first use: in a worker, a gauge child exists (at 0) from its creation,
        # and a readiness check must not read as failed before the worker publishes it.
        self._ready: dict[str, Any] = {}
        # Bound at start: each label has a handful of fixed values.
        self._underscore = {a: m.http_underscore_headers.labels(a) for a in UNDERSCORE_ACTIONS}
        self._retries = {o: m.http_upstream_retries.labels(o) for o in RETRY_OUTCOMES}
        self._invalid = {
            r: m.http_upstream_invalid_responses.labels(r) for r in INVALID_RESPONSE_REASONS
        }
        self._conn_errors = {s: m.http_connection_errors.labels(s) for s in CONNECTION_ERROR_SIDES}
        self._send_timeouts = {mode: m.send_timeouts.labels(mode) for mode in SEND_TIMEOUT_MODES}
        self.connections_active = m.connections_active
        self.received_bytes = m.client_received_bytes
        self.sent_bytes = m.client_sent_bytes

    # --- TLS ---------------------------------------------------------------------------------

    def handshake(
        self,
        *,
        group: int | None,
        cipher_suite: int | None,
        backend: str,
        hrr: bool,
        ok: bool,
        offered_groups: Iterable[int] | None,
        seconds: float | None = None,
        failure_reason: str | None = None,
        signature: int | None = None,
        resumed: bool = False,
    ) -> None:
        """One handshake attempt, finished either way. ``offered_groups`` is None when no
        ClientHello was parsed; ``signature`` is the scheme of our CertificateVerify (None:
        none was made, on a failure or a resumed session)."""
        result = "ok" if ok else "failed"
        key = (group, cipher_suite, signature, backend, hrr, resumed, result)
        child = self._handshakes.get(key)
        if child is None:
            child = self._handshakes[key] = self.metrics.tls_handshakes.labels(
                _name(NamedGroup, group),
                _name(CipherSuite, cipher_suite),
                _PSK if resumed else _name(SignatureScheme, signature),
                backend,
                _BOOL[hrr],
                _BOOL[resumed],
                result,
            )
        child.inc()
        if ok and group is not None and seconds is not None:
            duration_key = (group, backend)
            histogram = self._handshake_duration.get(duration_key)
            if histogram is None:
                histogram = self._handshake_duration[duration_key] = (
                    self.metrics.tls_handshake_duration.labels(_name(NamedGroup, group), backend)
                )
            histogram.observe(seconds)
        if failure_reason is not None:
            failure = self._failures.get(failure_reason)
            if failure is None:
                failure = self._failures[failure_reason] = (
                    self.metrics.tls_handshake_failures.labels(failure_reason)
                )
            failure.inc()
        if offered_groups is not None:
            hybrid = False
            for code in set(offered_groups):
                self._offered.get(code, self._offered_other).inc()
                hybrid = hybrid or code in HYBRID_GROUPS
            if not hybrid:
                self._no_hybrid[result].inc()

    def key_exchange(self, group: int, backend: str, seconds: float) -> None:
        key = (group, backend)
        child = self._key_exchange.get(key)
        if child is None:
            child = self._key_exchange[key] = self.metrics.tls_key_exchange.labels(
                _name(NamedGroup, group), backend
            )
        child.observe(seconds)

    def signed(self, scheme: int, backend: str, seconds: float) -> None:
        key = (scheme, backend)
        child = self._sign.get(key)
        if child is None:
            child = self._sign[key] = self.metrics.tls_sign.labels(
                _name(SignatureScheme, scheme), backend
            )
        child.observe(seconds)

    def client_chain_verified(self, result: str, seconds: float) -> None:
        """One client chain verification: ``result`` is ok, or the CertificateRejected check
        that refused it (anything outside CLIENT_CERTIFICATE_RESULTS counts as other)."""
        child = self._client_certificates.get(result)
        if child is None:
            child = self._client_certificates["other"]
        child.inc()
        self.metrics.tls_client_chain_verify.observe(seconds)

    def alert_sent(self, alert: AlertDescription) -> None:
        child = self._alerts.get(alert)
        if child is None:
            child = self._alerts[alert] = self.metrics.tls_alerts_sent.labels(alert.name)
        child.inc()

    # --- crypto backends -----------------------------------------------------------------------

    def kem_operation(self, backend: str, op: str, result: str, seconds: float) -> None:
        key = (backend, op, result)
        child = self._kem_ops.get(key)
        if child is None:
            child = self._kem_ops[key] = self.metrics.kem_operations.labels(backend, op, result)
        child.inc()
        duration_key = (backend, op)
        histogram = self._kem_duration.get(duration_key)
        if histogram is None:
            histogram = self._kem_duration[duration_key] = (
                self.metrics.kem_operation_duration.labels(backend, op)
            )
        histogram.observe(seconds)

    @property
    def kem_observer(self) -> Observer:
        return self.kem_operation

    # --- connections and HTTP ----------------------------------------------------------------

    def connection_closed(self, result: str) -> None:
        child = self._connections.get(result)
        if child is None:
            child = self._connections[result] = self.metrics.connections.labels(result)
        child.inc()

    def request(self, upstream: str, status: int, seconds: float, first_byte: float | None) -> None:
        key = (upstream, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.metrics.http_requests.labels(upstream, str(status))
        child.inc()
        duration = self._request_duration.get(upstream)
        if duration is None:
            duration = self._request_duration[upstream] = self.metrics.http_request_duration.labels(
                upstream
            )
        duration.observe(seconds)
        if first_byte is not None:
            histogram = self._first_byte.get(upstream)
            if histogram is None:
                histogram = self._first_byte[upstream] = self.metrics.upstream_first_byte.labels(
                    upstream
                )
            histogram.observe(first_byte)

    def underscore_headers(self, action: str, count: int = 1) -> None:
        """``action``: one of metrics.UNDERSCORE_ACTIONS (a KeyError otherwise)."""
        self._underscore[action].inc(count)

    def upstream_retry(self, outcome: str) -> None:
        self._retries[outcome].inc()

    def invalid_upstream_response(self, reason: str) -> None:
        self._invalid[reason].inc()

    def connection_error(self, side: str) -> None:
        self._conn_errors[side].inc()

    def send_timeout(self, mode: str) -> None:
        self._send_timeouts[mode].inc()

    def upstream_healthy(self, upstream: str, healthy: bool) -> None:
        self.metrics.upstream_healthy.labels(upstream).set(1 if healthy else 0)

    def ready(self, check: str, passed: bool) -> None:
        if check not in READY_CHECKS:
            raise ValueError(f"unknown readiness check {check!r}")
        child = self._ready.get(check)
        if child is None:
            child = self._ready[check] = self.metrics.ready.labels(check)
        child.set(1 if passed else 0)


__all__ = ["Telemetry"]
