"""Issue 19's bench row: bench/burst.py run for real with tiny numbers, and the open-loop
client it shares with tests/e2e/test_connection_burst.py (``pqproxy.bench.burst``).

The script starts its own servers (pqproxy with 1 worker and with ``--workers auto``, and nginx
where it is installed: scripts/install-test-peers.sh installs it), so what is checked is the
whole path: every target measured in the same run, the counts adding up, the backlog each
listening socket really has, and a "Connection bursts" section written into a results file
without touching the sections of other tools.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqproxy.bench.burst import BurstOptions, run_burst_client
from pqproxy.cpus import available_cpus
from pqproxy.devcert import DevCertPaths
from pqproxy.io.listen_queue import read_somaxconn

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
RATE = 40
DURATION = 0.5
ROUNDS = 2
PER_RUN = int(RATE * DURATION)
HEADING = "## Connection bursts"
# nginx's listen backlog when its configuration names none (NGX_LISTEN_BACKLOG on Linux).
NGINX_DEFAULT_BACKLOG = 511


def test_issue19_bench_burst_measures_every_target_and_writes_its_section(
    tmp_path: Path,
) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# results\n\n## Before\n\nkept before\n\n"
        f"{HEADING}\n\nan older run\n\n## After\n\nkept after\n",
        encoding="utf-8",
    )
    report = tmp_path / "burst.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "bench" / "burst.py"),
            "--rates",
            str(RATE),
            "--duration",
            str(DURATION),
            "--rounds",
            str(ROUNDS),
            "--timeout",
            "10",
            "--json",
            str(report),
            "--append-results",
            str(results),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(report.read_text())
    nginx = shutil.which("nginx") is not None
    expected = {"pqproxy-1", "pqproxy-auto"} | ({"nginx-1"} if nginx else set())
    assert set(document["targets"]) == expected
    assert set(document["samples"]) == expected
    if not nginx:
        assert document["skipped"] == ["nginx: not installed (`which nginx` finds nothing)"]

    for key, by_rate in document["samples"].items():
        assert list(by_rate) == [str(RATE)]
        runs = by_rate[str(RATE)]
        assert len(runs) == ROUNDS
        for run in runs:
            # A light load on loopback: every client completes, none resends a SYN.
            assert run["connections"] == PER_RUN, key
            assert run["completed"] == PER_RUN and run["failures"] == {}, (key, run)
            assert run["retransmissions"] == 0 and run["retransmitting_clients"] == 0
            assert 0 < run["offered_per_s"] <= RATE * 1.01
            assert 0 < run["completed_per_s"] <= RATE * 1.5
            handshake = run["handshake_ms"]
            assert handshake["count"] == PER_RUN
            assert 0 < handshake["p50"] <= handshake["p99"] <= handshake["max"] < 10_000
            assert run["client_lateness_ms"]["count"] == PER_RUN
            assert run["listen_overflows"] is not None and run["listen_overflows"] >= 0
            assert run["server_cpu_seconds"] >= 0
            assert run["client_cpu_seconds"] > 0
            assert 0 < run["client_busy"] <= 1.5

    # Each listening socket's real accept-queue limit: limits.backlog's default (capped by
    # somaxconn) per pqproxy worker, one socket per worker with workers auto.
    somaxconn = read_somaxconn() or 4096
    backlogs = {k: v["listen_backlogs"] for k, v in document["targets"].items()}
    assert backlogs["pqproxy-1"] == [min(4096, somaxconn)]
    assert backlogs["pqproxy-auto"] == [min(4096, somaxconn)] * available_cpus()
    assert document["targets"]["pqproxy-auto"]["command"].endswith("--workers auto")
    if nginx:
        assert backlogs["nginx-1"] == [min(NGINX_DEFAULT_BACKLOG, somaxconn)]

    text = results.read_text(encoding="utf-8")
    # Replaced in place of the older run; the other tools' sections kept.
    assert text.count(HEADING) == 1 and "an older run" not in text
    assert "kept before" in text and "kept after" in text
    section = text[text.index(HEADING) :]
    labels = [v["label"] for v in document["targets"].values()]
    for label in labels:
        row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == str(RATE)
        assert cells[6] == f"0 of {PER_RUN * ROUNDS}"
        assert cells[11].endswith("%") and cells[12] != "?"
    assert f"--rates {RATE} --duration {DURATION:g} --rounds {ROUNDS}" in section
    assert ("```nginx" in section) == nginx
    assert done.stdout.strip() == section.strip()


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A socket that listens and never accepts nor answers: every TLS handshake stalls."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        yield sock.getsockname()[1]


def test_issue19_burst_client_is_open_loop_and_counts_failures_by_reason(
    dev_certs: DevCertPaths, silent_listener: int
) -> None:
    # No client ever completes, yet each starts on its schedule: arrivals do not wait for
    # answers (a closed-loop client would have started one clump and waited).
    options = BurstOptions(
        host="127.0.0.1",
        port=silent_listener,
        cafile=str(dev_certs.ca),
        connections=12,
        rate=24.0,
        clump=4,
        timeout=1.0,
    )
    result = run_burst_client(options)
    assert result.completed == 0
    assert result.failures == {"TimeoutError": 12}
    assert result.completed_per_s == 0.0
    assert result.handshake_ms()["count"] == 0
    scheduled = [r["scheduled"] for r in result.results]
    assert scheduled == [0.0] * 4 + [1 / 6] * 4 + [1 / 3] * 4
    for r in result.results:
        assert r["scheduled"] <= r["started"] < r["scheduled"] + 0.5
        assert r["seconds"] >= 1.0  # waited out its timeout
    assert result.offered_seconds < 0.5 + 1 / 3
    assert result.offered_per_s == pytest.approx(24.0, rel=0.5)


def test_issue19_burst_client_names_a_refused_connection(dev_certs: DevCertPaths) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: refused, and nobody else's
        port = closed.getsockname()[1]
        result = run_burst_client(
            BurstOptions(
                host="127.0.0.1",
                port=port,
                cafile=str(dev_certs.ca),
                connections=5,
                rate=50.0,
                timeout=5.0,
            )
        )
    assert result.failures == {"ConnectionRefusedError": 5}
    assert result.completed == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("connections", 0), ("connections", 20_001), ("rate", 0.0), ("clump", 0), ("pool", 0)],
)
def test_issue19_burst_options_are_bounded(
    dev_certs: DevCertPaths, field: str, value: float
) -> None:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 1,
        "cafile": str(dev_certs.ca),
        "connections": 10,
        "rate": 10.0,
    }
    values[field] = value
    with pytest.raises(ValueError):
        BurstOptions(**values)  # type: ignore[arg-type]
