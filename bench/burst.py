"""Connection bursts: clients arriving open-loop at a fixed rate, against pqproxy with 1 worker
and with ``workers: auto``, beside nginx, in the same run.

    .venv/bin/python bench/burst.py [--rates 250,500] [--duration 2] [--rounds 3]
        [--timeout 10] [--json FILE] [--append-results bench/RESULTS.md]

Each run offers ``rate × duration`` new TLS connections on a fixed schedule (client ``i``
starts at ``i / rate`` s, whether or not the server has answered the ones before it: the
open-loop client of ``pqproxy.bench.burst``, one process of stdlib ``ssl`` clients that close
each connection once its handshake completes). It reports the rate offered and the rate
completed, the handshake time p50/p99 from each client's ``connect()``, the clients that
failed (no handshake within ``--timeout``), the clients whose socket had to resend a SYN, the
growth of the kernel's TcpExt ListenOverflows/ListenDrops over the run, and the server's CPU
per handshake (``/proc``, the server and every worker). Each (server, rate) runs
``--rounds`` times, the order rotating every round; the table holds medians.

The servers are started as bench/run_all.py starts them (its ``Suite``: the same flags, the
same nginx.conf); pqproxy's http mode needs an upstream, a demo upstream that no client
reaches. Loads go to 127.0.0.1 only, bounded in count and time. Also run by
``bench/run_all.py --only burst``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pqproxy.bench.burst import BurstOptions, run_burst_client  # noqa: E402
from pqproxy.bench.procs import raise_nofile_limit  # noqa: E402
from pqproxy.bench.report import replace_section  # noqa: E402
from pqproxy.io.listen_queue import read_kernel_counters, read_somaxconn  # noqa: E402

if TYPE_CHECKING:
    from run_all import Server, Suite

HEADING = "## Connection bursts"
LOCAL = "127.0.0.1"
DEFAULT_RATES = (250.0, 500.0)
DEFAULT_DURATION = 2.0
DEFAULT_ROUNDS = 3
DEFAULT_TIMEOUT = 10.0
# Before the measured rounds, each server gets a small burst (imports, first handshakes).
WARMUP_CONNECTIONS = 50
WARMUP_RATE = 100.0
# A client busier than this (its CPU over the run's length) limits what the run can show.
CLIENT_BOUND = 0.9
# The measured rows: the 1-worker pqproxy is the reference of the ratios against nginx.
PQ_ONE, PQ_AUTO, NGINX = "pqproxy-1", "pqproxy-auto", "nginx-1"


def log(message: str) -> None:
    print(f"[burst {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def listen_backlogs(port: int) -> list[int]:
    """The accept-queue limit of each socket listening on ``port`` (``ss``'s Send-Q column
    for a listening socket), one per worker with SO_REUSEPORT."""
    try:
        done = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(line.split()[2]) for line in done.stdout.splitlines() if line.strip()]


def start_targets(suite: Suite, upstream_port: int) -> tuple[list[Server], list[str]]:
    """pqproxy with 1 worker and with ``--workers auto``, and nginx when installed."""
    one = suite.pqproxy(1, upstream_port)
    auto = suite.pqproxy("auto", upstream_port)
    workers = len(auto.process.tree()) - 1  # the supervisor and its workers
    auto.key, auto.label = PQ_AUTO, f"pqproxy, workers auto ({workers} here)"
    targets, skipped = [one, auto], []
    nginx = suite.nginx(1)
    if nginx is None:
        skipped.append("nginx: not installed (`which nginx` finds nothing)")
    else:
        targets.append(nginx)
    return targets, skipped


def run_one(
    server: Server, cafile: str, rate: float, duration: float, timeout: float
) -> dict[str, Any]:
    options = BurstOptions(
        host=LOCAL,
        port=server.port,
        cafile=cafile,
        connections=max(1, round(rate * duration)),
        rate=rate,
        timeout=timeout,
    )
    kernel_before = read_kernel_counters()
    cpu_before = server.process.cpu_seconds()
    result = run_burst_client(options)
    cpu = server.process.cpu_seconds() - cpu_before
    kernel_after = read_kernel_counters()
    sample = result.summary()
    if kernel_before is not None and kernel_after is not None:
        sample["listen_overflows"] = kernel_after.overflows - kernel_before.overflows
        sample["listen_drops"] = kernel_after.drops - kernel_before.drops
    else:
        sample["listen_overflows"] = sample["listen_drops"] = None
    sample["server_cpu_seconds"] = cpu
    sample["server_cpu_per_handshake_us"] = (
        cpu / result.completed * 1e6 if result.completed else None
    )
    return sample


def measure(
    suite: Suite,
    targets: Sequence[Server],
    *,
    rates: Sequence[float],
    duration: float,
    rounds: int,
    timeout: float,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """samples[server key][rate as text]: one summary per round, in round order."""
    for server in targets:
        warmup = BurstOptions(
            host=LOCAL,
            port=server.port,
            cafile=suite.ca,
            connections=WARMUP_CONNECTIONS,
            rate=WARMUP_RATE,
            timeout=timeout,
        )
        run_burst_client(warmup)
    pairs = [(server, rate) for rate in rates for server in targets]
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        s.key: {_rate(r): [] for r in rates} for s in targets
    }
    for round_ in range(rounds):
        shift = round_ % len(pairs)
        for server, rate in pairs[shift:] + pairs[:shift]:
            sample = run_one(server, suite.ca, rate, duration, timeout)
            samples[server.key][_rate(rate)].append(sample)
            hs = sample["handshake_ms"]
            log(
                f"round={round_} target={server.key} rate={rate:g} "
                f"offered={sample['offered_per_s']:.0f}/s "
                f"completed={sample['completed_per_s']:.0f}/s "
                f"ok={sample['completed']}/{sample['connections']} "
                f"p50={_num(hs['p50'], 1)}ms p99={_num(hs['p99'], 1)}ms "
                f"failures={sample['failures']} resent_syn={sample['retransmitting_clients']} "
                f"overflows={sample['listen_overflows']}"
            )
    return samples


def _rate(rate: float) -> str:
    return f"{rate:g}"


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _p(sample: dict[str, Any], name: str) -> float | None:
    value: float | None = sample["handshake_ms"][name]
    return value


def _ratios(
    a: list[dict[str, Any]], b: list[dict[str, Any]], value: Any
) -> tuple[float | None, str]:
    """The median of a/b round by round (runs seconds apart see the same machine load), and
    the range of the per-round ratios."""
    ratios = []
    for x, y in zip(a, b, strict=False):
        vx, vy = value(x), value(y)
        if vx is not None and vy:
            ratios.append(vx / vy)
    if not ratios:
        return None, ""
    return statistics.median(ratios), f"rounds {min(ratios):.2f}x to {max(ratios):.2f}x"


def _row(
    server: Server, rate: float, runs: list[dict[str, Any]], backlogs: dict[str, list[int]]
) -> str:
    def med(value: Any, digits: int = 0) -> str:
        return _num(_median([value(s) for s in runs]), digits)

    reasons: dict[str, int] = {}
    for s in runs:
        for reason, n in s["failures"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    failed = sum(reasons.values())
    offered = sum(s["connections"] for s in runs)
    why = f" ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))})" if reasons else ""
    overflows = [s["listen_overflows"] for s in runs if s["listen_overflows"] is not None]
    most = _num(max(overflows)) if overflows else "-"
    backlog = " + ".join(str(b) for b in backlogs.get(server.key, [])) or "?"
    cells = [
        server.label,
        f"{rate:g}",
        med(lambda s: s["offered_per_s"]),
        med(lambda s: s["completed_per_s"]),
        med(lambda s: _p(s, "p50"), 1),
        med(lambda s: _p(s, "p99"), 1),
        f"{failed:,} of {offered:,}{why}",
        med(lambda s: s["retransmitting_clients"]),
        f"{med(lambda s: s['listen_overflows'])} (max {most})",
        med(lambda s: s["server_cpu_per_handshake_us"]),
        med(lambda s: s["client_lateness_ms"]["p99"], 1),
        f"{med(lambda s: s['client_busy'] * 100)}%",
        backlog,
    ]
    return "| " + " | ".join(cells) + " |"


def section(
    targets: Sequence[Server],
    samples: dict[str, dict[str, list[dict[str, Any]]]],
    *,
    rates: Sequence[float],
    duration: float,
    rounds: int,
    timeout: float,
    backlogs: dict[str, list[int]],
    skipped: Sequence[str],
    commands: Sequence[str],
    command: str,
    nginx_conf: str | None,
    load: tuple[str, str],
) -> str:
    lines = [
        HEADING,
        "",
        "`bench/burst.py`: open-loop arrivals (`pqproxy.bench.burst`): client *i* starts at "
        "*i* / rate s whatever the server has answered so far, "
        f"rate × {duration:g} s connections per run, each given {timeout:g} s to complete its "
        "TLS 1.3 handshake; one client process of stdlib `ssl` on the system OpenSSL 3.0 "
        "(X25519 for every server, nginx included; ECDSA P-256 certificate), which closes "
        "each connection once its handshake completes. The servers run side by side in the "
        f"same run, the order rotating every round; medians of {rounds} rounds "
        f"(load average before / after: {load[0]} / {load[1]}; the machine is shared and "
        "noisy).",
        "",
        "| server | offered/s | achieved | completed/s | handshake p50 (ms) | p99 (ms) | "
        "failed | clients that resent a SYN | ListenOverflows Δ | server CPU per handshake "
        "(µs) | client late p99 (ms) | client busy | listen backlog |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for rate in rates:
        for server in targets:
            lines.append(_row(server, rate, samples[server.key][_rate(rate)], backlogs))
    bound = [
        f"{rate:g}/s"
        for rate in rates
        if any(
            statistics.median(s["client_busy"] for s in samples[t.key][_rate(rate)]) >= CLIENT_BOUND
            for t in targets
        )
    ]
    if bound:
        lines += [
            "",
            f"At {', '.join(bound)} the client process was busy {CLIENT_BOUND:.0%} of the "
            "run or more (*client busy*): those rows say more about the client than about "
            "the servers.",
        ]
    lines += ["", "Ratios (median of the per-round ratios):", ""]
    keys = {s.key for s in targets}
    for rate in rates:
        r = _rate(rate)
        pairs = [(PQ_ONE, NGINX), (PQ_AUTO, NGINX), (PQ_AUTO, PQ_ONE)]
        for a, b in pairs:
            if a not in keys or b not in keys:
                continue
            done, done_spread = _ratios(
                samples[a][r], samples[b][r], lambda s: s["completed_per_s"]
            )
            p99, p99_spread = _ratios(samples[a][r], samples[b][r], lambda s: _p(s, "p99"))
            name = {PQ_ONE: "pqproxy 1 worker", PQ_AUTO: "pqproxy auto", NGINX: "nginx"}
            lines.append(
                f"- {rate:g}/s, {name[a]} / {name[b]}: completed/s "
                f"{_num(done, 2)}x ({done_spread}), handshake p99 {_num(p99, 2)}x ({p99_spread})"
            )
    lines += ["", "Handshake p99 per round (ms):", ""]
    for rate in rates:
        for server in targets:
            runs = samples[server.key][_rate(rate)]
            lines.append(
                f"- {server.label}, {rate:g}/s: " + ", ".join(_num(_p(s, "p99"), 1) for s in runs)
            )
    lines += [
        "",
        "- offered/s is the schedule's rate, *achieved* what the client managed (a busy client "
        "offers less: its lateness is the *client late* column); completed/s counts the "
        "handshakes completed from the start of the run to the last one; *client busy* is the "
        "client process's CPU over the run's length (one core at 100%).",
        "- ListenOverflows Δ is the kernel's TcpExt counter over the run: host-wide for the "
        "network namespace, so other work on the machine can move it; *clients that resent a "
        "SYN* (TCP_INFO `tcpi_total_retrans`) is this run's own evidence of a full accept queue.",
        f"- listen backlog: each listening socket's accept-queue limit (`ss -ltn`; one per "
        f"worker with SO_REUSEPORT), net.core.somaxconn = {read_somaxconn() or '?'}. pqproxy's "
        "is `limits.backlog` (default 4096); nginx's is its own default (511 on Linux).",
    ]
    lines += [f"- {line}" for line in skipped]
    lines += ["", "Commands:", "", f"- `{command}`"]
    lines += [f"- `{c}`" for c in commands]
    for server in targets:
        lines.append(f"- {server.label}: `{server.command}`")
    if nginx_conf is not None:
        lines += ["", "nginx.conf:", "", "```nginx", nginx_conf.rstrip("\n"), "```"]
    lines.append("")
    return "\n".join(lines)


def run_section(
    suite: Suite,
    upstream_port: int,
    *,
    command: str,
    rates: Sequence[float] = DEFAULT_RATES,
    duration: float = DEFAULT_DURATION,
    rounds: int = DEFAULT_ROUNDS,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[str, dict[str, Any]]:
    """Start the targets on ``suite``, measure, and return (the Markdown section, the JSON
    document). The targets stay running until the suite stops them."""
    from run_all import NGINX_CONF, loadavg

    load_before = loadavg()
    targets, skipped = start_targets(suite, upstream_port)
    backlogs = {s.key: listen_backlogs(s.port) for s in targets}
    samples = measure(
        suite, targets, rates=rates, duration=duration, rounds=rounds, timeout=timeout
    )
    nginx_conf = None
    if any(s.key == NGINX for s in targets):
        nginx_conf = NGINX_CONF.format(
            workers=1,
            prefix="$PREFIX",
            port="PORT",
            cert="$CERTS/server.pem",
            key="$CERTS/server.key",
            user="root" if os.geteuid() == 0 else "nobody",
        )
    text = section(
        targets,
        samples,
        rates=rates,
        duration=duration,
        rounds=rounds,
        timeout=timeout,
        backlogs=backlogs,
        skipped=skipped,
        commands=suite.commands,
        command=command,
        nginx_conf=nginx_conf,
        load=(load_before, loadavg()),
    )
    document = {
        "schema": "pqproxy.bench.burst/1",
        "options": {
            "rates": list(rates),
            "duration": duration,
            "rounds": rounds,
            "timeout": timeout,
        },
        "targets": {
            s.key: {"label": s.label, "command": s.command, "listen_backlogs": backlogs[s.key]}
            for s in targets
        },
        "samples": samples,
        "skipped": list(skipped),
    }
    return text, document


def _rates(value: str) -> list[float]:
    rates = [float(v) for v in value.split(",") if v]
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be positive numbers, comma-separated")
    return rates


def main(argv: list[str] | None = None) -> int:
    from run_all import Suite

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=_rates, default=list(DEFAULT_RATES),
                        help="connections offered per second, comma-separated")  # fmt: skip
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION,
                        help="seconds of arrivals per run")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds each client waits for its handshake")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write every run's figures there")
    parser.add_argument("--append-results", type=Path, help="write the section into this file")
    args = parser.parse_args(argv)
    command = ".venv/bin/python bench/burst.py" + " ".join(
        ["", "--rates", ",".join(_rate(r) for r in args.rates), "--duration",
         f"{args.duration:g}", "--rounds", str(args.rounds), "--timeout", f"{args.timeout:g}"]
    )  # fmt: skip
    if args.append_results is not None:
        command += " --append-results bench/RESULTS.md"
    raise_nofile_limit()
    with tempfile.TemporaryDirectory(prefix="pqproxy-burst-") as tmp:
        suite = Suite(argparse.Namespace(), Path(tmp))
        try:
            suite.gen_cert()
            _, upstream_port, upstream_command = suite.demo_upstream()
            suite.commands.append(upstream_command + "  # pqproxy's upstream; never reached")
            text, document = run_section(
                suite,
                upstream_port,
                command=command,
                rates=args.rates,
                duration=args.duration,
                rounds=args.rounds,
                timeout=args.timeout,
            )
        finally:
            suite.stop_all()
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    if args.append_results is not None:
        replace_section(args.append_results, HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
