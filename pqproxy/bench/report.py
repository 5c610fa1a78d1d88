"""Reports of the benchmarks: statistics, the ``--json`` document (every field documented
below), the text table, the progress bar, and the ``--plot`` PNG.

Percentiles interpolate linearly between the two nearest ranks (numpy's default), so a p99 of
40 samples is not simply the maximum.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

# --- statistics -------------------------------------------------------------------------------

QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}
CDF_POINTS = 101


def quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of already sorted ``ordered`` (not empty)."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Iterable[float]) -> dict[str, Any]:
    """count, min, mean, p50, p90, p99, max (None each when there is no value)."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "min": None, "mean": None, **dict.fromkeys(QUANTILES), "max": None}
    return {
        "count": len(ordered),
        "min": ordered[0],
        "mean": sum(ordered) / len(ordered),
        **{name: quantile(ordered, q) for name, q in QUANTILES.items()},
        "max": ordered[-1],
    }


def cdf_points(values: Iterable[float], points: int = CDF_POINTS) -> list[float]:
    """The value at each percentile 0, 1, …, 100: enough to redraw the CDF, bounded in size."""
    ordered = sorted(values)
    if not ordered:
        return []
    return [quantile(ordered, i / (points - 1)) for i in range(points)]


def timeline(ends: Iterable[float], wall: float, buckets: int) -> dict[str, Any]:
    """Completions per second in ``buckets`` equal slices of the run (``ends``: seconds from
    its start)."""
    width = wall / buckets if wall > 0 else 1.0
    counts = [0] * buckets
    for end in ends:
        counts[min(buckets - 1, max(0, int(end / width)))] += 1
    return {"bucket_seconds": width, "per_s": [c / width for c in counts]}


# --- the JSON documents -----------------------------------------------------------------------

# Every field of `pqproxy bench handshake --json`. "*" is a key chosen by the run (a group
# name); "[]" an element of a list. A field documented as a map is a leaf here.
_SUMMARY = "count, min, mean, p50, p90, p99, max"
HANDSHAKE_FIELDS: dict[str, str] = {
    "schema": '"pqproxy.bench.handshake/1"; bumped when a field changes meaning',
    "tool.pqproxy": "pqproxy version of the load tester",
    "tool.openssl": "OpenSSL version of the client (cryptography's bundled OpenSSL)",
    "tool.python": "Python version of the client",
    "started_at": "UTC start time, ISO 8601",
    "target": "HOST:PORT measured",
    "options.groups": "groups compared; every group once per cycle of n attempts, shuffled",
    "options.concurrency": "connections in flight at any time, over all client processes",
    "options.processes": "client processes (at most the concurrency)",
    "options.duration": "seconds during which new attempts start (null with --count)",
    "options.count": "total attempts (null with --duration)",
    "options.sni": "server_name sent (null: none, the target is an IP address)",
    "options.force_hrr": "groups offered without their key share, an X25519 share instead",
    "options.split_client_hello": "the ClientHello is sent in several TCP segments",
    "options.split_segments": "how many segments with --split-client-hello",
    "options.split_delay": "seconds between two segments with --split-client-hello",
    "options.verify": "the server's certificate chain and name are verified",
    "options.cafile": "CA file verified against (null: the system's, or --insecure)",
    "options.timeout": "seconds allowed for the TCP connect plus the handshake",
    "options.linger": "seconds the client waits for the server to close after the handshake",
    "wall_seconds": "from the common start of the client processes to the last one's end",
    "attempts": "connections attempted (== successes + errors)",
    "successes": "handshakes completed",
    "errors": "attempts that failed",
    "errors_by_reason": "map: reason -> count, all groups (connect:, timeout:, tls:, eof: …)",
    "handshakes_per_s": "successes / wall_seconds, all groups together",
    "hello_retry_requests": "HelloRetryRequests seen by the client, all groups",
    "groups.*.offered": "the OpenSSL group list the client used (G, or G:*X25519)",
    "groups.*.attempts": "attempts with this group (== successes + errors)",
    "groups.*.successes": "handshakes completed with this group asked",
    "groups.*.errors": "attempts with this group that failed",
    "groups.*.errors_by_reason": "map: reason -> count",
    "groups.*.negotiated": "map: group the server chose (SSL_get0_group_name) -> count",
    "groups.*.negotiated_mismatches": "successes that negotiated another group than asked",
    "groups.*.hello_retry_requests": "HRRs seen (first server message a ServerHello whose "
    "random is the RFC 8446 HRR constant)",
    "groups.*.handshakes_per_s": "handshakes/s if every slot used this group: concurrency / "
    "mean slot time (Little's law; the groups are interleaved, so their counts are equal "
    "and their shares of the total rate say nothing)",
    "groups.*.completed_per_s": "successes with this group / wall_seconds (its share)",
    "groups.*.latency_ms": f"TCP connect start -> handshake complete on the client: {_SUMMARY}",
    "groups.*.connect_ms": f"TCP connect alone: {_SUMMARY}",
    "groups.*.cdf_ms": "latency_ms at percentiles 0, 1, …, 100 (101 values; [] if none)",
    "groups.*.timeline_per_s.bucket_seconds": "width of a time line bucket",
    "groups.*.timeline_per_s.per_s": "handshakes completed per second, bucket by bucket",
    "groups.*.bytes_sent_per_handshake": "TCP payload bytes sent per attempt",
    "groups.*.bytes_received_per_handshake": "TCP payload bytes received per attempt "
    "(the server's flight, tickets and close_notify)",
    "groups.*.linger_expired": "successes after which the server had not closed within linger",
    "overhead[].group": "a post-quantum group of the run",
    "overhead[].baseline": "the classical group it is compared with (its classical half "
    "when present in the run, else the first classical group)",
    "overhead[].latency_p50_ms": "p50 latency, group minus baseline (ms)",
    "overhead[].latency_p50_ratio": "p50 latency, group / baseline",
    "overhead[].latency_p99_ms": "p99 latency, group minus baseline (ms)",
    "overhead[].latency_p99_ratio": "p99 latency, group / baseline",
    "overhead[].handshakes_per_s": "handshakes/s, group minus baseline",
    "overhead[].handshakes_per_s_ratio": "handshakes/s, group / baseline",
    "overhead[].bytes_per_handshake": "bytes sent + received per handshake, group minus baseline",
    "overhead[].bytes_per_handshake_ratio": "bytes per handshake, group / baseline",
    "client.processes": "client processes",
    "client.cores": "CPUs of this machine",
    "client.cpu_seconds": "user + system CPU of the client processes during the run",
    "client.busy_fraction": "client cpu_seconds / the processes' wall time (1.0: each "
    "process used a whole core)",
    "client.cpu_per_handshake_us": "client CPU per completed handshake (µs)",
    "client.machine_busy_fraction": "the whole machine's CPU busy fraction during the run "
    "(/proc/stat; null off Linux)",
    "client.bottleneck": "busy_fraction > 0.9: the client may be what limits the rate",
    "warnings": "list of sentences: client bottleneck, shared cores, group mismatches",
}

# Every field of `pqproxy bench request --json`; "*" is a path name (direct, proxy-GROUP).
REQUEST_FIELDS: dict[str, str] = {
    "schema": '"pqproxy.bench.request/1"',
    "tool.pqproxy": "pqproxy version of the load tester",
    "tool.openssl": "OpenSSL version of the client",
    "tool.python": "Python version of the client",
    "started_at": "UTC start time, ISO 8601",
    "proxy": "HOST:PORT of the TLS proxy",
    "upstream": "HOST:PORT of the upstream (null: the direct path was not measured)",
    "options.method": "HTTP method",
    "options.path": "request target",
    "options.body_bytes": "request body size",
    "options.stream": "the response is an SSE stream (time-to-first-token is measured)",
    "options.concurrency": "requests in flight at any time, over all client processes",
    "options.processes": "client processes",
    "options.duration": "seconds during which new requests start (null with --count)",
    "options.count": "total requests (null with --duration)",
    "options.new_connections": "a new connection (TCP + TLS) per request; else keep-alive "
    "connections opened before the clock starts",
    "options.verify": "the proxy's certificate is verified",
    "options.groups": "groups of the proxy paths, one path each",
    "options.started_servers": "commands of the servers this run started itself ([] if none)",
    "wall_seconds": "from the common start to the last client process's end",
    "requests": "requests attempted (== successes + errors)",
    "successes": "requests answered 2xx and read to the end",
    "errors": "requests that failed",
    "paths.*.description": "what the path is",
    "paths.*.requests": "requests on this path (== successes + errors)",
    "paths.*.successes": "2xx responses read to the end",
    "paths.*.errors": "failed requests",
    "paths.*.errors_by_reason": "map: reason -> count",
    "paths.*.negotiated": "map: TLS group negotiated -> connections (empty for direct)",
    "paths.*.requests_per_s": "requests/s if every slot used this path: concurrency / mean "
    "total latency (Little's law; the paths are interleaved request by request)",
    "paths.*.ttfb_ms": f"request sent -> first response byte: {_SUMMARY}",
    "paths.*.ttft_ms": f"request sent -> first complete SSE `data:` event: {_SUMMARY}",
    "paths.*.total_ms": f"request sent -> last response byte: {_SUMMARY}",
    "paths.*.connect_ms": f"TCP connect + TLS handshake of the connections: {_SUMMARY}",
    "paths.*.response_bytes_mean": "mean response size (body)",
    "overhead[].path": "a proxy path",
    "overhead[].baseline": "the path it is compared with (direct, or the classical proxy path)",
    "overhead[].ttfb_p50_ms": "p50 TTFB, path minus baseline (ms)",
    "overhead[].ttft_p50_ms": "p50 TTFT, path minus baseline (ms; null without SSE)",
    "overhead[].ttft_p50_ratio": "p50 TTFT, path / baseline",
    "overhead[].total_p50_ms": "p50 total latency, path minus baseline (ms)",
    "overhead[].total_p50_ratio": "p50 total latency, path / baseline",
    "overhead[].total_p99_ms": "p99 total latency, path minus baseline (ms)",
    "client.processes": "client processes",
    "client.cores": "CPUs of this machine",
    "client.cpu_seconds": "user + system CPU of the client processes",
    "client.busy_fraction": "client cpu_seconds / the processes' wall time",
    "client.machine_busy_fraction": "the whole machine's CPU busy fraction during the run",
    "client.bottleneck": "busy_fraction > 0.9",
    "warnings": "list of sentences",
}

# Maps whose keys the run chooses: their values are documented once, under "*".
_NAMED_MAPS = frozenset({"groups", "paths"})
# Maps documented as a whole: counts by key, and the summaries (keys of ``summarize``).
_LEAF_MAPS = frozenset(
    {"errors_by_reason", "negotiated", "latency_ms", "connect_ms", "ttfb_ms", "ttft_ms", "total_ms"}
)


def field_paths(document: dict[str, Any], prefix: str = "") -> set[str]:
    """The documented-form paths of every leaf of ``document`` (see HANDSHAKE_FIELDS)."""
    paths: set[str] = set()
    for key, value in document.items():
        path = f"{prefix}{key}"
        if key in _LEAF_MAPS or not isinstance(value, dict | list):
            paths.add(path)
        elif key in _NAMED_MAPS and isinstance(value, dict):
            for item in value.values():
                paths |= field_paths(item, f"{path}.*.")
        elif isinstance(value, dict):
            if value:
                paths |= field_paths(value, f"{path}.")
            else:
                paths.add(path)
        elif value and all(isinstance(item, dict) for item in value):
            for item in value:
                paths |= field_paths(item, f"{path}[].")
        else:
            paths.add(path)  # a list of values, or an empty list
    return paths


def write_json(document: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


def replace_section(path: Path, heading: str, text: str) -> None:
    """Put ``text`` (a Markdown section starting with ``heading``) into the file at ``path``:
    in place of the section under that heading (up to the next ``## `` heading), or at the
    end. The rest of the file is another tool's (bench/RESULTS.md has several writers)."""
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    start = existing.find(heading)
    if start >= 0:
        end = existing.find("\n## ", start + len(heading))
        rest = existing[end + 1 :] if end >= 0 else ""
        existing = existing[:start].rstrip("\n") + "\n\n" + rest
    path.write_text(existing.rstrip("\n") + "\n\n" + text, encoding="utf-8")


# --- text -------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"x{value:.2f}"


def _signed(value: float | None, unit: str = "", digits: int = 2) -> str:
    return "-" if value is None else f"{value:+.{digits}f}{unit}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return lines


def handshake_table(result: dict[str, Any]) -> str:
    options = result["options"]
    span = (
        f"{options['count']} attempts"
        if options["count"] is not None
        else f"{options['duration']:g} s"
    )
    extras = [
        name
        for name, on in (
            ("--force-hrr", options["force_hrr"]),
            ("--split-client-hello", options["split_client_hello"]),
            ("--insecure", not options["verify"]),
        )
        if on
    ]
    lines = [
        f"target {result['target']}  {options['processes']} processes x "
        f"{options['concurrency']} connections  {span} ({result['wall_seconds']:.1f} s)"
        + (f"  {' '.join(extras)}" if extras else ""),
        "",
    ]
    header = [
        "group",
        "ok",
        "errors",
        "HRR",
        "hs/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "bytes/hs",
        "negotiated",
    ]
    rows = []
    for name, group in result["groups"].items():
        latency = group["latency_ms"]
        negotiated = ",".join(f"{k}:{v}" for k, v in group["negotiated"].items()) or "-"
        rows.append(
            [
                name,
                str(group["successes"]),
                str(group["errors"]),
                str(group["hello_retry_requests"]),
                f"{group['handshakes_per_s']:.0f}",
                _ms(latency["p50"]),
                _ms(latency["p90"]),
                _ms(latency["p99"]),
                _ms(latency["max"]),
                f"{group['bytes_sent_per_handshake'] + group['bytes_received_per_handshake']:.0f}",
                negotiated,
            ]
        )
    lines += _table(header, rows)
    lines.append(
        f"total: {result['successes']} handshakes, {result['errors']} errors, "
        f"{result['handshakes_per_s']:.0f} handshakes/s over all groups"
    )
    for entry in result["overhead"]:
        lines.append(
            f"{entry['group']} over {entry['baseline']}: p50 "
            f"{_signed(entry['latency_p50_ms'], ' ms')} ({_ratio(entry['latency_p50_ratio'])}), "
            f"p99 {_signed(entry['latency_p99_ms'], ' ms')} "
            f"({_ratio(entry['latency_p99_ratio'])}), handshakes/s "
            f"{_ratio(entry['handshakes_per_s_ratio'])}, bytes "
            f"{_signed(entry['bytes_per_handshake'], '', 0)} "
            f"({_ratio(entry['bytes_per_handshake_ratio'])})"
        )
    if result["errors_by_reason"]:
        lines.append("errors:")
        lines += [f"  {count:6d}  {reason}" for reason, count in result["errors_by_reason"].items()]
    client = result["client"]
    lines.append(
        f"client: {client['processes']} processes on {client['cores']} cores, "
        f"{client['busy_fraction']:.0%} busy, {client['cpu_per_handshake_us']:.0f} us CPU "
        "per handshake"
        + (
            f"; machine {client['machine_busy_fraction']:.0%} busy"
            if client["machine_busy_fraction"] is not None
            else ""
        )
    )
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def request_table(result: dict[str, Any]) -> str:
    options = result["options"]
    span = (
        f"{options['count']} requests"
        if options["count"] is not None
        else f"{options['duration']:g} s"
    )
    conn = "a new connection per request" if options["new_connections"] else "keep-alive"
    lines = [
        f"{options['method']} {options['path']}  proxy {result['proxy']}  upstream "
        f"{result['upstream'] or '-'}  {options['processes']} processes x "
        f"{options['concurrency']} requests  {span}  {conn}",
        "",
    ]
    header = [
        "path",
        "ok",
        "errors",
        "req/s",
        "TTFB p50",
        "TTFT p50",
        "TTFT p99",
        "total p50",
        "total p99",
        "connect p50",
    ]
    rows = []
    for name, path in result["paths"].items():
        rows.append(
            [
                name,
                str(path["successes"]),
                str(path["errors"]),
                f"{path['requests_per_s']:.0f}",
                _ms(path["ttfb_ms"]["p50"]),
                _ms(path["ttft_ms"]["p50"]),
                _ms(path["ttft_ms"]["p99"]),
                _ms(path["total_ms"]["p50"]),
                _ms(path["total_ms"]["p99"]),
                _ms(path["connect_ms"]["p50"]),
            ]
        )
    lines += _table(header, rows)
    lines.append("(times in ms)")
    for entry in result["overhead"]:
        lines.append(
            f"{entry['path']} over {entry['baseline']}: TTFB p50 "
            f"{_signed(entry['ttfb_p50_ms'], ' ms')}, TTFT p50 "
            f"{_signed(entry['ttft_p50_ms'], ' ms')} ({_ratio(entry['ttft_p50_ratio'])}), "
            f"total p50 {_signed(entry['total_p50_ms'], ' ms')} "
            f"({_ratio(entry['total_p50_ratio'])}), total p99 "
            f"{_signed(entry['total_p99_ms'], ' ms')}"
        )
    for name, path in result["paths"].items():
        for reason, count in path["errors_by_reason"].items():
            lines.append(f"error {name}: {count} x {reason}")
    client = result["client"]
    lines.append(
        f"client: {client['processes']} processes on {client['cores']} cores, "
        f"{client['busy_fraction']:.0%} busy"
    )
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


# --- progress bar -----------------------------------------------------------------------------


class Progress:
    """A one-line progress bar, redrawn in place; for terminals only (the caller decides)."""

    WIDTH = 30

    def __init__(self, stream: TextIO, *, total: int | None, duration: float | None) -> None:
        self._stream = stream
        self._total = total
        self._duration = duration
        self._drawn = False

    def update(self, done: int, failed: int, elapsed: float) -> None:
        if self._total:
            fraction = (done + failed) / self._total
        elif self._duration:
            fraction = elapsed / self._duration
        else:
            fraction = 0.0
        fraction = min(1.0, max(0.0, fraction))
        filled = int(fraction * self.WIDTH)
        rate = done / elapsed if elapsed > 0 else 0.0
        self._stream.write(
            f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {fraction:4.0%}  {done} ok  "
            f"{failed} errors  {rate:.0f}/s  {elapsed:.1f}s "
        )
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()


# --- plots ------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    # No display: the Agg backend renders straight to the PNG.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_handshake(result: dict[str, Any], path: str | Path) -> None:
    """Latency CDF per group (left) and handshakes/s over the run per group (right)."""
    plt = _pyplot()
    fig, (cdf, rate) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, group in result["groups"].items():
        points = group["cdf_ms"]
        if points:
            fractions = [i / (len(points) - 1) for i in range(len(points))]
            cdf.plot(points, fractions, label=f"{name} (p50 {group['latency_ms']['p50']:.2f} ms)")
        line = group["timeline_per_s"]
        times = [(i + 0.5) * line["bucket_seconds"] for i in range(len(line["per_s"]))]
        rate.plot(
            times, line["per_s"], label=f"{name} ({group['handshakes_per_s']:.0f}/s if alone)"
        )
    cdf.set_xlabel("handshake latency (ms, TCP connect to handshake complete)")
    cdf.set_ylabel("fraction of handshakes")
    cdf.set_ylim(0, 1)
    cdf.grid(True, alpha=0.3)
    cdf.legend(loc="lower right")
    rate.set_xlabel("seconds since start")
    rate.set_ylabel("handshakes completed per second (interleaved)")
    rate.grid(True, alpha=0.3)
    rate.legend(loc="lower right")
    options = result["options"]
    fig.suptitle(
        f"pqproxy bench handshake -> {result['target']}: {options['concurrency']} connections, "
        f"{options['processes']} client processes, {result['successes']} handshakes, "
        f"{result['handshakes_per_s']:.0f}/s total"
    )
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def plot_request(result: dict[str, Any], path: str | Path) -> None:
    """TTFT (or TTFB) and total latency per path, as percentile bars."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    names = list(result["paths"])
    first = "ttft_ms" if result["options"]["stream"] else "ttfb_ms"
    for axis, key, label in (
        (axes[0], first, "time to first token" if first == "ttft_ms" else "time to first byte"),
        (axes[1], "total_ms", "total latency"),
    ):
        width = 0.25
        for offset, stat in enumerate(("p50", "p90", "p99")):
            values = [result["paths"][n][key][stat] or 0.0 for n in names]
            positions = [i + (offset - 1) * width for i in range(len(names))]
            axis.bar(positions, values, width, label=stat)
        axis.set_xticks(range(len(names)), names)
        axis.set_ylabel(f"{label} (ms)")
        axis.grid(True, axis="y", alpha=0.3)
        axis.legend()
    fig.suptitle(
        f"pqproxy bench request: {result['options']['method']} "
        f"{result['options']['path']} via {result['proxy']}"
    )
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
