"""The load tester (``pqproxy bench handshake`` / ``request``) run briefly for real: against
pqproxy (in process, on its own event loop in a background thread, so the server's own view of
each handshake can be checked) and against the OpenSSL-native baseline (bench/
baseline_server.py, a subprocess), with its client processes spawned as in a real run.

What is checked is what the report claims: every documented JSON field is there and nothing
undocumented; the counts add up; each handshake negotiated the group it asked for (the
client's SSL_get0_group_name, and the server's HandshakeComplete); --force-hrr makes HRRs
that both sides see; the plot is a real PNG.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pqproxy.bench.handshake import HandshakeOptions, run_handshake_bench
from pqproxy.bench.pool import interleave
from pqproxy.bench.procs import ServerProcess, python_env
from pqproxy.bench.report import HANDSHAKE_FIELDS, REQUEST_FIELDS, field_paths, summarize
from pqproxy.devcert import DevCertPaths, generate_dev_certs
from pqproxy.tls.enums import NamedGroup
from pqproxy.tls.events import HandshakeComplete
from tests.inprocess import http_proxy_in_thread

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0
COUNT = 40
GROUPS = ("X25519MLKEM768", "X25519")
SERVER_GROUP = {"X25519MLKEM768": NamedGroup.X25519MLKEM768, "X25519": NamedGroup.x25519}
# ML-KEM-768 alone adds 1184 bytes to the ClientHello's share and 1088 to the ServerHello's.
# Around it, the rest of the flights differ a little: an ECDSA signature's DER length varies
# by a few bytes, and OpenSSL adds its supported_groups (18 bytes) to EncryptedExtensions when
# the client's group is not its first choice.
MLKEM768_EXTRA_BYTES = 1184 + 1088
FLIGHT_JITTER = 32
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class InProcessProxy:
    port: int = 0
    handshakes: queue.Queue[HandshakeComplete] = field(default_factory=queue.Queue)

    def take(self, count: int) -> list[HandshakeComplete]:
        """The next ``count`` handshakes the server completed (each waited for, bounded)."""
        return [self.handshakes.get(timeout=WAIT) for _ in range(count)]

    def nothing_more(self) -> bool:
        return self.handshakes.empty()


@pytest.fixture
def pqproxy_server(dev_certs: DevCertPaths) -> Iterator[InProcessProxy]:
    """pqproxy in http mode (the default of `pqproxy serve`) before the demo upstream."""
    proxy = InProcessProxy()
    with http_proxy_in_thread(
        dev_certs, proxy.handshakes.put, tokens=4, token_interval=0.0
    ) as port:
        proxy.port = port
        yield proxy


@pytest.fixture
def baseline_port(dev_certs: DevCertPaths) -> Iterator[int]:
    argv = [
        sys.executable,
        str(REPO_ROOT / "bench" / "baseline_server.py"),
        "--listen",
        "127.0.0.1:0",
        "--cert",
        str(dev_certs.cert),
        "--key",
        str(dev_certs.key),
    ]
    with ServerProcess(
        argv, ready=r"baseline listening on https://127\.0\.0\.1:(\d+) ", timeout=WAIT
    ) as server:
        yield int(server.match.group(1))
        assert server.popen.poll() is None, "the baseline died during the test"


def bench_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pqproxy.bench.cli", *args],
        cwd=REPO_ROOT,
        env=python_env(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def options(port: int, ca: Path, **overrides: Any) -> HandshakeOptions:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "groups": GROUPS,
        "count": COUNT,
        "concurrency": 4,
        "processes": 2,
        "cafile": str(ca),
    }
    values.update(overrides)
    return HandshakeOptions(**values)


def check_report(result: dict[str, Any], *, hrr: bool = False) -> None:
    """Every field documented and present, counts that add up, sane figures."""
    assert field_paths(result) == set(HANDSHAKE_FIELDS)
    assert result["schema"] == "pqproxy.bench.handshake/1"
    assert result["attempts"] == COUNT
    assert result["successes"] + result["errors"] == result["attempts"]
    assert result["errors"] == 0, result["errors_by_reason"]
    assert result["errors_by_reason"] == {}
    assert result["options"]["processes"] == 2
    assert result["client"]["processes"] == 2
    assert 0 < result["wall_seconds"] < WAIT
    assert result["handshakes_per_s"] == pytest.approx(COUNT / result["wall_seconds"])
    assert list(result["groups"]) == list(GROUPS)
    for name, group in result["groups"].items():
        # Every group once per cycle of len(GROUPS) attempts: exactly half of them each.
        assert group["attempts"] == COUNT // len(GROUPS)
        assert group["successes"] + group["errors"] == group["attempts"]
        assert group["negotiated"] == {name: group["successes"]}
        assert group["negotiated_mismatches"] == 0
        latency = group["latency_ms"]
        assert latency["count"] == group["successes"]
        assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"]
        assert latency["p99"] <= latency["max"] < WAIT * 1000
        assert group["connect_ms"]["max"] <= latency["max"]
        assert len(group["cdf_ms"]) == 101 and group["cdf_ms"] == sorted(group["cdf_ms"])
        assert group["cdf_ms"][0] == latency["min"] and group["cdf_ms"][-1] == latency["max"]
        assert group["handshakes_per_s"] > 0
        timeline = group["timeline_per_s"]
        counted = sum(rate * timeline["bucket_seconds"] for rate in timeline["per_s"])
        assert counted == pytest.approx(group["successes"])
        expected_hrr = group["attempts"] if hrr and name != "X25519" else 0
        assert group["hello_retry_requests"] == expected_hrr
    assert result["hello_retry_requests"] == sum(
        g["hello_retry_requests"] for g in result["groups"].values()
    )
    hybrid, classical = result["groups"]["X25519MLKEM768"], result["groups"]["X25519"]
    hybrid_bytes = hybrid["bytes_sent_per_handshake"] + hybrid["bytes_received_per_handshake"]
    classical_bytes = (
        classical["bytes_sent_per_handshake"] + classical["bytes_received_per_handshake"]
    )
    if hrr:
        # The HRR and the second ClientHello come on top.
        assert hybrid_bytes - classical_bytes > MLKEM768_EXTRA_BYTES
    else:
        assert hybrid_bytes - classical_bytes == pytest.approx(
            MLKEM768_EXTRA_BYTES, abs=FLIGHT_JITTER
        )
    [overhead] = result["overhead"]
    assert overhead["group"] == "X25519MLKEM768" and overhead["baseline"] == "X25519"
    assert overhead["bytes_per_handshake"] == pytest.approx(hybrid_bytes - classical_bytes)
    assert overhead["latency_p50_ratio"] == pytest.approx(
        hybrid["latency_ms"]["p50"] / classical["latency_ms"]["p50"]
    )
    assert 0 < result["client"]["busy_fraction"] <= 1.5
    assert result["client"]["cpu_per_handshake_us"] > 0


def test_handshake_bench_against_pqproxy(
    pqproxy_server: InProcessProxy, dev_certs: DevCertPaths
) -> None:
    result = run_handshake_bench(options(pqproxy_server.port, dev_certs.ca))
    check_report(result)
    # The server's view: one handshake per success, each with the group the client asked for.
    seen = pqproxy_server.take(COUNT)
    assert Counter(NamedGroup(h.group).name for h in seen) == {
        SERVER_GROUP[g].name: COUNT // 2 for g in GROUPS
    }
    assert not any(h.hello_retry for h in seen)
    assert pqproxy_server.nothing_more()


def test_force_hrr_is_seen_by_client_and_server(
    pqproxy_server: InProcessProxy, dev_certs: DevCertPaths
) -> None:
    result = run_handshake_bench(options(pqproxy_server.port, dev_certs.ca, force_hrr=True))
    check_report(result, hrr=True)
    assert result["groups"]["X25519MLKEM768"]["offered"] == "X25519MLKEM768:*X25519"
    assert result["groups"]["X25519"]["offered"] == "X25519"
    seen = pqproxy_server.take(COUNT)
    retried = Counter(NamedGroup(h.group).name for h in seen if h.hello_retry)
    direct = Counter(NamedGroup(h.group).name for h in seen if not h.hello_retry)
    assert retried == {"X25519MLKEM768": COUNT // 2}
    assert direct == {"x25519": COUNT // 2}


def test_split_client_hello_still_completes_and_pays_its_delays(
    pqproxy_server: InProcessProxy, dev_certs: DevCertPaths
) -> None:
    delay = 0.05
    result = run_handshake_bench(
        options(
            pqproxy_server.port,
            dev_certs.ca,
            count=8,
            split_client_hello=True,
            split_segments=3,
            split_delay=delay,
        )
    )
    assert result["successes"] == 8 and result["errors"] == 0
    for group in result["groups"].values():
        # Three segments: the last leaves two delays after the first, and the server cannot
        # answer before it has the whole ClientHello.
        assert group["latency_ms"]["min"] >= 2 * delay * 1000
    assert len(pqproxy_server.take(8)) == 8


def test_handshake_cli_against_the_openssl_baseline_writes_json_and_plot(
    baseline_port: int, dev_certs: DevCertPaths, tmp_path: Path
) -> None:
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    done = bench_cli(
        "handshake",
        "--target",
        f"127.0.0.1:{baseline_port}",
        "--cafile",
        str(dev_certs.ca),
        "--groups",
        ",".join(GROUPS),
        "--count",
        str(COUNT),
        "--concurrency",
        "4",
        "--processes",
        "2",
        "--json",
        str(report),
        "--plot",
        str(plot),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    check_report(result)
    # The table names both groups and the overhead line.
    assert "X25519MLKEM768 over X25519: p50" in done.stdout
    png = plot.read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert len(png) > 1024


def test_force_hrr_against_the_openssl_baseline(
    baseline_port: int, dev_certs: DevCertPaths
) -> None:
    # The baseline prefers X25519MLKEM768 strictly, as pqproxy does: a client with only an
    # X25519 share gets an HRR from OpenSSL too.
    result = run_handshake_bench(options(baseline_port, dev_certs.ca, force_hrr=True))
    check_report(result, hrr=True)


def test_errors_are_counted_by_reason(dev_certs: DevCertPaths, tmp_path: Path) -> None:
    # A port nobody listens on: bound, never listening, so it stays free of strangers.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        result = run_handshake_bench(options(port, dev_certs.ca, count=10, processes=1))
    assert result["attempts"] == 10
    assert result["successes"] == 0 and result["errors"] == 10
    assert result["errors_by_reason"] == {"connect: ECONNREFUSED": 10}
    assert sum(g["errors"] for g in result["groups"].values()) == 10


def test_an_untrusted_certificate_is_an_error_with_its_reason(
    pqproxy_server: InProcessProxy, tmp_path: Path
) -> None:
    other_ca = generate_dev_certs(tmp_path / "other").ca
    result = run_handshake_bench(options(pqproxy_server.port, other_ca, count=6, processes=1))
    assert result["successes"] == 0 and result["errors"] == 6
    assert result["errors_by_reason"] == {"tls: certificate verify failed": 6}


def test_request_bench_compares_direct_hybrid_and_classical(tmp_path: Path) -> None:
    """Without --proxy the run starts its own demo upstream and pqproxy (subprocesses)."""
    report, plot = tmp_path / "request.json", tmp_path / "request.png"
    done = bench_cli(
        "request",
        "--count",
        "30",
        "--concurrency",
        "3",
        "--processes",
        "2",
        "--tokens",
        "4",
        "--json",
        str(report),
        "--plot",
        str(plot),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    assert field_paths(result) == set(REQUEST_FIELDS)
    assert result["requests"] == 30
    assert result["successes"] + result["errors"] == result["requests"]
    assert result["errors"] == 0, [p["errors_by_reason"] for p in result["paths"].values()]
    assert list(result["paths"]) == ["direct", "proxy-X25519MLKEM768", "proxy-X25519"]
    assert len(result["options"]["started_servers"]) == 2
    for name, path in result["paths"].items():
        assert path["requests"] == path["successes"] == 10
        # Keep-alive: one connection per slot and path, opened before the clock started.
        assert sum(path["negotiated"].values()) == (0 if name == "direct" else 3)
        if name != "direct":
            assert path["negotiated"] == {name.removeprefix("proxy-"): 3}
        ttfb, ttft, total = path["ttfb_ms"], path["ttft_ms"], path["total_ms"]
        assert ttft["count"] == total["count"] == 10
        assert 0 < ttfb["p50"] <= ttft["p50"] <= total["p50"] < WAIT * 1000
        assert path["response_bytes_mean"] > 0
    pairs = {(o["path"], o["baseline"]) for o in result["overhead"]}
    assert pairs == {
        ("proxy-X25519MLKEM768", "direct"),
        ("proxy-X25519", "direct"),
        ("proxy-X25519MLKEM768", "proxy-X25519"),
    }
    assert plot.read_bytes().startswith(PNG_MAGIC)


def test_request_bench_against_the_baseline_without_a_direct_path(
    baseline_port: int, dev_certs: DevCertPaths, tmp_path: Path
) -> None:
    """Plain responses (no SSE: no time-to-first-token), keep-alive, and the baseline's own
    HTTP answers, 100 kB each, read to the end on every path."""
    report = tmp_path / "request.json"
    size = 100_000
    done = bench_cli(
        "request",
        "--proxy",
        f"127.0.0.1:{baseline_port}",
        "--cafile",
        str(dev_certs.ca),
        "--method",
        "GET",
        "--path",
        f"/bytes/{size}",
        "--no-stream",
        "--count",
        "20",
        "--concurrency",
        "2",
        "--processes",
        "1",
        "--json",
        str(report),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    assert field_paths(result) == set(REQUEST_FIELDS)
    assert result["upstream"] is None
    assert list(result["paths"]) == ["proxy-X25519MLKEM768", "proxy-X25519"]
    assert result["successes"] == result["requests"] == 20
    for path in result["paths"].values():
        assert path["successes"] == 10
        assert path["response_bytes_mean"] == size
        assert path["ttft_ms"]["count"] == 0 and path["ttft_ms"]["p50"] is None
        assert 0 < path["ttfb_ms"]["p50"] <= path["total_ms"]["p50"]
    assert [(o["path"], o["baseline"]) for o in result["overhead"]] == [
        ("proxy-X25519MLKEM768", "proxy-X25519")
    ]
    assert result["overhead"][0]["ttft_p50_ms"] is None


@pytest.mark.parametrize("variants", [2, 3])
def test_interleave_takes_every_variant_once_per_cycle_in_varying_orders(variants: int) -> None:
    cycles = [[interleave(c * variants + p, variants) for p in range(variants)] for c in range(60)]
    assert all(sorted(cycle) == list(range(variants)) for cycle in cycles)
    # No variant always comes first, so none always follows the same other one.
    assert {cycle[0] for cycle in cycles} == set(range(variants))
    assert interleave(7, variants) == interleave(7, variants)  # seeded: runs repeat


def test_field_paths_catch_a_missing_and_an_undocumented_field() -> None:
    document = {
        "a": 1,
        "groups": {"X25519": {"ok": 1, "latency_ms": summarize([1.0, 2.0])}},
        "overhead": [{"group": "X25519MLKEM768"}],
        "warnings": [],
    }
    assert field_paths(document) == {
        "a",
        "groups.*.ok",
        "groups.*.latency_ms",
        "overhead[].group",
        "warnings",
    }
    del document["a"]
    document["b"] = 2
    assert "a" not in field_paths(document) and "b" in field_paths(document)


def test_summary_percentiles_interpolate() -> None:
    summary = summarize(float(v) for v in range(1, 101))
    assert summary["count"] == 100
    assert summary["min"] == 1.0 and summary["max"] == 100.0
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p99"] == pytest.approx(99.01)
    assert summarize([])["p50"] is None
