"""The metric definitions (pqproxy/metrics.py), what moves them (pqproxy/io/telemetry.py and
the provider seam in pqproxy/crypto/instrumented.py), and the Grafana dashboard that reads
them: every name, label set and bucket range as documented, label values from small fixed
sets, and a dashboard that parses and asks only for metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.instrumented import TimedKxGroup, TimedProvider
from pqproxy.crypto.provider import InvalidKeyShare
from pqproxy.devcert import DevCertPaths
from pqproxy.io.telemetry import Telemetry
from pqproxy.io.tls_server import CloseKind, ConnectionClosed, handshake_failure_reason
from pqproxy.metrics import (
    CRYPTO_BUCKETS,
    FAILURE_REASONS,
    HANDSHAKE_BUCKETS,
    REQUEST_BUCKETS,
    ProxyMetrics,
)
from pqproxy.tls.enums import AlertDescription, NamedGroup, SignatureScheme
from pqproxy.tls.events import HandshakeComplete
from pqproxy.tls.server import ServerConfig, ServerConnection
from tests.peers import client_context, memory_client, pump

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "deploy" / "grafana-dashboard.json"

# (attribute, family name, type, labels): the issue's list, plus what it leaves to us
# (the no-hybrid counter, bytes in and out, readiness).
EXPECTED: list[tuple[str, str, str, tuple[str, ...]]] = [
    (
        "tls_handshakes",
        "pqproxy_tls_handshakes",
        "counter",
        ("group", "cipher_suite", "signature", "backend", "hrr", "resumed", "result"),
    ),
    (
        "tls_handshake_duration",
        "pqproxy_tls_handshake_duration_seconds",
        "histogram",
        ("group", "backend"),
    ),
    ("tls_key_exchange", "pqproxy_tls_key_exchange_seconds", "histogram", ("group", "backend")),
    ("tls_sign", "pqproxy_tls_sign_seconds", "histogram", ("scheme", "backend")),
    ("tls_alerts_sent", "pqproxy_tls_alerts_sent", "counter", ("alert",)),
    ("tls_handshake_failures", "pqproxy_tls_handshake_failures", "counter", ("reason",)),
    ("tls_client_certificates", "pqproxy_tls_client_certificates", "counter", ("result",)),
    ("tls_client_chain_verify", "pqproxy_tls_client_chain_verify_seconds", "histogram", ()),
    ("tls_client_groups_offered", "pqproxy_tls_client_groups_offered", "counter", ("group",)),
    ("tls_no_hybrid_offered", "pqproxy_tls_handshakes_no_hybrid_offered", "counter", ("result",)),
    ("kem_operations", "pqproxy_kem_operations", "counter", ("backend", "op", "result")),
    ("kem_operation_duration", "pqproxy_kem_operation_seconds", "histogram", ("backend", "op")),
    ("connections_active", "pqproxy_connections_active", "gauge", ()),
    ("connections", "pqproxy_connections", "counter", ("result",)),
    ("client_received_bytes", "pqproxy_client_received_bytes", "counter", ()),
    ("client_sent_bytes", "pqproxy_client_sent_bytes", "counter", ()),
    ("http_requests", "pqproxy_http_requests", "counter", ("upstream", "status")),
    (
        "http_request_duration",
        "pqproxy_http_request_duration_seconds",
        "histogram",
        ("upstream",),
    ),
    ("upstream_first_byte", "pqproxy_upstream_first_byte_seconds", "histogram", ("upstream",)),
    # Issue 13: underscore headers, retries, refused responses, socket errors, send timeouts.
    ("http_underscore_headers", "pqproxy_http_underscore_headers", "counter", ("action",)),
    ("http_upstream_retries", "pqproxy_http_upstream_retries", "counter", ("outcome",)),
    (
        "http_upstream_invalid_responses",
        "pqproxy_http_upstream_invalid_responses",
        "counter",
        ("reason",),
    ),
    ("http_connection_errors", "pqproxy_http_connection_errors", "counter", ("side",)),
    ("send_timeouts", "pqproxy_send_timeouts", "counter", ("mode",)),
    ("listen_overflows", "pqproxy_listen_overflows", "counter", ()),
    ("listen_drops", "pqproxy_listen_drops", "counter", ()),
    ("listen_queue_length", "pqproxy_listen_queue_length", "gauge", ("listener",)),
    ("listen_backlog", "pqproxy_listen_backlog", "gauge", ("listener",)),
    ("upstream_healthy", "pqproxy_upstream_healthy", "gauge", ("upstream",)),
    ("ready", "pqproxy_ready", "gauge", ("check",)),
]


def families(metrics: ProxyMetrics) -> dict[str, Any]:
    """The families as a scraper reads them: rendered, then parsed by prometheus_client."""
    parsed = text_string_to_metric_families(metrics.render().decode("utf-8"))
    # The text format has no type for a counter's or histogram's _created: the parser reads
    # those as gauges of their own.
    return {family.name: family for family in parsed if not family.name.endswith("_created")}


def value(metrics: ProxyMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_names_types_and_labels_are_as_documented() -> None:
    metrics = ProxyMetrics()
    for attribute, _name, kind, labels in EXPECTED:
        metric = getattr(metrics, attribute)
        # labels() refuses a label set other than the one the metric was defined with.
        child = metric.labels(**{label: "x" for label in labels}) if labels else metric
        if kind == "histogram":
            child.observe(0.001)
        elif kind == "gauge":
            child.set(1)
        else:
            child.inc()
    found = families(metrics)
    assert {name: family.type for name, family in found.items()} == {
        name: kind for _attribute, name, kind, _labels in EXPECTED
    }
    for _attribute, name, _kind, labels in EXPECTED:
        sample_labels = {k for s in found[name].samples for k in s.labels if k != "le"}
        assert sample_labels == set(labels), name
        assert name.startswith("pqproxy_")


def test_two_instances_do_not_collide() -> None:
    first, second = ProxyMetrics(), ProxyMetrics()
    first.connections.labels("closed").inc()
    assert value(first, "pqproxy_connections_total", result="closed") == 1
    assert value(second, "pqproxy_connections_total", result="closed") == 0


@pytest.mark.parametrize(
    ("attribute", "buckets", "smallest", "largest"),
    [
        ("tls_key_exchange", CRYPTO_BUCKETS, 0.00005, 1.0),
        ("kem_operation_duration", CRYPTO_BUCKETS, 0.00005, 1.0),
        ("tls_handshake_duration", HANDSHAKE_BUCKETS, 0.00025, 10.0),
        ("upstream_first_byte", REQUEST_BUCKETS, 0.001, 600.0),
        ("http_request_duration", REQUEST_BUCKETS, 0.001, 600.0),
    ],
)
def test_buckets_fit_what_they_measure(
    attribute: str, buckets: tuple[float, ...], smallest: float, largest: float
) -> None:
    assert buckets == tuple(sorted(buckets))
    assert (buckets[0], buckets[-1]) == (smallest, largest)
    metrics = ProxyMetrics()
    name, label_names = next((n, labs) for a, n, _k, labs in EXPECTED if a == attribute)
    labels = {label: "x" for label in label_names}
    getattr(metrics, attribute).labels(**labels).observe(smallest / 2)
    bounds = [
        float(s.labels["le"]) for s in families(metrics)[name].samples if s.name.endswith("_bucket")
    ]
    assert bounds == [*buckets, float("inf")]
    # A value below the smallest bound lands in the first bucket: resolved, not lumped.
    assert value(metrics, f"{name}_bucket", le=str(smallest), **labels) == 1


# --- what moves them ----------------------------------------------------------------------------


def test_offered_groups_fold_grease_and_unknown_into_other() -> None:
    telemetry = Telemetry(ProxyMetrics())
    telemetry.handshake(
        group=NamedGroup.x25519,
        cipher_suite=0x1301,
        backend="openssl",
        hrr=False,
        ok=True,
        # GREASE (RFC 8701), a code point pqproxy does not know, two known groups (x25519
        # twice: a client listing a group twice is counted once).
        offered_groups=(0x0A0A, 0x1234, NamedGroup.x25519, NamedGroup.secp256r1, 0x001D),
        seconds=0.002,
        signature=SignatureScheme.mldsa65,
    )
    metrics = telemetry.metrics
    offered = "pqproxy_tls_client_groups_offered_total"
    assert value(metrics, offered, group="other") == 2
    assert value(metrics, offered, group="x25519") == 1
    assert value(metrics, offered, group="secp256r1") == 1
    assert value(metrics, offered, group="X25519MLKEM768") == 0
    # Every series is a known group name or "other": nothing the client chose.
    labels = {
        s.labels["group"] for s in families(metrics)["pqproxy_tls_client_groups_offered"].samples
    }
    assert labels <= {g.name for g in NamedGroup} | {"other"}
    assert value(metrics, "pqproxy_tls_handshakes_no_hybrid_offered_total", result="ok") == 1
    assert (
        value(
            metrics,
            "pqproxy_tls_handshakes_total",
            group="x25519",
            cipher_suite="TLS_AES_128_GCM_SHA256",
            signature="mldsa65",
            backend="openssl",
            hrr="false",
            resumed="false",
            result="ok",
        )
        == 1
    )
    assert value(
        metrics, "pqproxy_tls_handshake_duration_seconds_sum", group="x25519", backend="openssl"
    ) == pytest.approx(0.002)


def test_a_resumed_handshake_is_labelled_resumed_with_the_psk_signature() -> None:
    telemetry = Telemetry(ProxyMetrics())
    for resumed in (False, True):
        telemetry.handshake(
            group=NamedGroup.X25519MLKEM768,
            cipher_suite=0x1301,
            backend="openssl",
            hrr=False,
            ok=True,
            offered_groups=(NamedGroup.X25519MLKEM768,),
            seconds=0.001,
            # A resumed session signs nothing; a caller passing a scheme anyway still gets psk.
            signature=SignatureScheme.ecdsa_secp256r1_sha256,
            resumed=resumed,
        )
    common = {
        "group": "X25519MLKEM768",
        "cipher_suite": "TLS_AES_128_GCM_SHA256",
        "backend": "openssl",
        "hrr": "false",
        "result": "ok",
    }
    metrics = telemetry.metrics
    name = "pqproxy_tls_handshakes_total"
    assert value(metrics, name, signature="ecdsa_secp256r1_sha256", resumed="false", **common) == 1
    assert value(metrics, name, signature="psk", resumed="true", **common) == 1
    assert value(metrics, name, signature="ecdsa_secp256r1_sha256", resumed="true", **common) == 0


def test_a_hybrid_offer_is_not_counted_as_no_hybrid() -> None:
    telemetry = Telemetry(ProxyMetrics())
    telemetry.handshake(
        group=None,
        cipher_suite=None,
        backend="openssl",
        hrr=False,
        ok=False,
        offered_groups=(NamedGroup.X25519MLKEM768, NamedGroup.x25519),
        failure_reason="handshake_failure",
    )
    metrics = telemetry.metrics
    no_hybrid = "pqproxy_tls_handshakes_no_hybrid_offered_total"
    assert value(metrics, no_hybrid, result="failed") == 0
    assert value(metrics, "pqproxy_tls_handshake_failures_total", reason="handshake_failure") == 1
    failed = {
        "cipher_suite": "none",
        "signature": "none",
        "backend": "openssl",
        "hrr": "false",
        "resumed": "false",
        "result": "failed",
    }
    assert value(metrics, "pqproxy_tls_handshakes_total", group="none", **failed) == 1
    # A failed handshake has no duration.
    assert "pqproxy_tls_handshake_duration_seconds" not in {
        name for name, family in families(metrics).items() if family.samples
    }


def _summary(kind: CloseKind, alert: AlertDescription | None, sent: bool) -> ConnectionClosed:
    return ConnectionClosed(
        peer="127.0.0.1:1",
        kind=kind,
        reason="free text that must not become a label",
        alert=alert,
        alert_sent=sent,
        handshake_complete=False,
        duration=0.1,
        bytes_from_client=10,
        bytes_to_client=0,
    )


@pytest.mark.parametrize(
    ("kind", "alert", "sent", "reason"),
    [
        (CloseKind.TLS_ALERT, AlertDescription.handshake_failure, True, "handshake_failure"),
        (CloseKind.TLS_ALERT, AlertDescription.protocol_version, True, "protocol_version"),
        (CloseKind.TLS_ALERT, AlertDescription.unknown_ca, False, "client_alert"),
        (CloseKind.PEER_EOF, None, False, "client_closed"),
        (CloseKind.HANDSHAKE_TIMEOUT, None, False, "timeout"),
        (CloseKind.SHUTDOWN, None, False, "shutdown"),
        (CloseKind.INTERNAL_ERROR, None, False, "internal_error"),
        (CloseKind.UPSTREAM_FAILED, None, False, "other"),
    ],
)
def test_failure_reasons_are_a_fixed_set(
    kind: CloseKind, alert: AlertDescription | None, sent: bool, reason: str
) -> None:
    found = handshake_failure_reason(_summary(kind, alert, sent))
    assert found == reason
    assert found in FAILURE_REASONS or found in AlertDescription.__members__


# --- the provider seam --------------------------------------------------------------------------


def test_timed_group_reports_each_backend_call() -> None:
    calls: list[tuple[str, str, str, float]] = []

    def observe(backend: str, op: str, result: str, seconds: float) -> None:
        calls.append((backend, op, result, seconds))

    provider = TimedProvider(OpenSSLProvider(), observe)
    group = provider.groups[NamedGroup.X25519MLKEM768]
    assert isinstance(group, TimedKxGroup)
    assert (provider.name, group.backend, group.group) == ("openssl", "openssl", 0x11EC)
    client = group.start()
    share, secret = group.server_exchange(client.share)
    assert client.complete(share) == secret
    assert [(b, op, result) for b, op, result, _ in calls] == [
        ("openssl", "keygen", "ok"),
        ("openssl", "encapsulate", "ok"),
        ("openssl", "decapsulate", "ok"),
    ]
    assert all(0 < seconds < 1 for *_, seconds in calls)
    calls.clear()
    with pytest.raises(InvalidKeyShare):
        group.server_exchange(b"\x00" * 7)
    assert [(op, result) for _b, op, result, _ in calls] == [("encapsulate", "invalid_share")]


def test_the_engine_runs_on_a_timed_provider(dev_certs: DevCertPaths) -> None:
    telemetry = Telemetry(ProxyMetrics())
    provider = TimedProvider(OpenSSLProvider(), telemetry.kem_observer)
    config = ServerConfig(certificates=(load_certified_key(dev_certs.cert, dev_certs.key),))
    server = ServerConnection(config, provider, lambda n: bytes(n))
    events = pump(memory_client(client_context(dev_certs.ca)), server)
    assert any(isinstance(e, HandshakeComplete) for e in events)
    ops = "pqproxy_kem_operations_total"
    metrics = telemetry.metrics
    assert value(metrics, ops, backend="openssl", op="encapsulate", result="ok") == 1


# --- the dashboard --------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def test_dashboard_is_a_grafana_model() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["type"] in {"timeseries", "state-timeline", "stat", "bargauge"}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["targets"] and all(t["refId"] and t["expr"] for t in panel["targets"])
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job"} <= names


def test_dashboard_asks_only_for_metrics_that_exist() -> None:
    known = ProxyMetrics().sample_names()
    used = {name for expr in _exprs(_dashboard()) for name in re.findall(r"\bpqproxy_\w+", expr)}
    assert used, "the dashboard queries no pqproxy metric"
    assert used <= known, f"unknown metrics: {sorted(used - known)}"


@pytest.mark.parametrize(
    ("topic", "metric"),
    [
        ("hybrid", "pqproxy_tls_handshakes_total"),
        ("handshake latency", "pqproxy_tls_handshake_duration_seconds_bucket"),
        ("key-exchange", "pqproxy_tls_key_exchange_seconds_bucket"),
        ("alerts", "pqproxy_tls_alerts_sent_total"),
        ("first token", "pqproxy_upstream_first_byte_seconds_bucket"),
        ("upstream health", "pqproxy_upstream_healthy"),
    ],
)
def test_dashboard_has_the_panels_the_issue_lists(topic: str, metric: str) -> None:
    panels = [p for p in _dashboard()["panels"] if topic in p["title"].lower()]
    assert len(panels) == 1, f"one panel about {topic!r}"
    assert any(metric in t["expr"] for t in panels[0]["targets"])
    if metric.endswith("_bucket"):
        # Latencies as p50 and p99.
        exprs = " ".join(t["expr"] for t in panels[0]["targets"])
        assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
