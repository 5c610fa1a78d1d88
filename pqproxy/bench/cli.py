"""``pqproxy bench handshake`` and ``pqproxy bench request``.

Wired into the ``pqproxy`` command by ``register(subparsers)``; also runnable on its own as
``python -m pqproxy.bench.cli handshake|request ...``.

Exit status: 0 when the run completed (whatever its error count: errors are results, counted
by reason in the report), 1 when it could not run, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..argtypes import non_negative_float as _non_negative_float
from ..argtypes import positive_float as _positive_float
from ..argtypes import positive_int as _positive_int

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: the port is not a number") from None
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"{value!r}: port out of range")
    return host, number


def _segments(value: str) -> int:
    number = _positive_int(value)
    if number < 2:
        raise argparse.ArgumentTypeError(f"{value!r}: a split needs at least 2 segments")
    return number


def _groups(value: str) -> tuple[str, ...]:
    from .handshake import canonical_group

    groups = tuple(canonical_group(g) for g in value.split(",") if g.strip())
    if not groups:
        raise argparse.ArgumentTypeError("no group given")
    return groups


def _add_common(parser: argparse.ArgumentParser, *, default_concurrency: int) -> None:
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(
        "--duration", type=_positive_float, metavar="S", help="run for S seconds (default 10)"
    )
    amount.add_argument("--count", type=_positive_int, metavar="N", help="N attempts in total")
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=default_concurrency,
        metavar="N",
        help=f"in flight at any time (default {default_concurrency})",
    )
    parser.add_argument(
        "--processes",
        type=_positive_int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="client processes the load is spread over (default: the CPU count)",
    )
    verify = parser.add_mutually_exclusive_group()
    verify.add_argument("--cafile", metavar="PEM", help="verify the server against this CA")
    verify.add_argument(
        "--insecure", action="store_true", help="do not verify the server's certificate"
    )
    parser.add_argument("--sni", metavar="NAME", help="server_name (default: the host if a name)")
    parser.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG plot (needs matplotlib)")
    parser.add_argument(
        "--quiet", action="store_true", help="no table on stdout (with --json or --plot)"
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` (with ``handshake`` and ``request``) to an argparse subparsers object.
    The chosen subcommand's function is ``args.bench_func``; ``run(args)`` calls it."""
    bench: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="load-test a TLS server or the proxy path"
    )
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")

    hs = sub.add_parser(
        "handshake",
        help="TLS 1.3 handshakes/s and latency per group against any TLS 1.3 server",
        description="TLS 1.3 handshakes/s and latency per key-exchange group, the groups "
        "interleaved connection by connection in one run.",
    )
    hs.add_argument("--target", required=True, type=_host_port, metavar="HOST:PORT")
    hs.add_argument(
        "--groups",
        type=_groups,
        default=("X25519MLKEM768", "X25519"),
        metavar="G1,G2,...",
        help="groups to compare (OpenSSL names; default X25519MLKEM768,X25519)",
    )
    hs.add_argument(
        "--force-hrr",
        action="store_true",
        help="offer each group without its key share, an X25519 share instead",
    )
    hs.add_argument(
        "--split-client-hello",
        action="store_true",
        help="send the ClientHello in several TCP segments, with a delay between them",
    )
    hs.add_argument("--split-segments", type=_segments, default=3, metavar="N")
    hs.add_argument("--split-delay", type=_non_negative_float, default=0.005, metavar="S")
    hs.add_argument("--timeout", type=_positive_float, default=10.0, metavar="S")
    hs.add_argument(
        "--linger",
        type=_non_negative_float,
        default=2.0,
        metavar="S",
        help="wait at most S seconds for the server to close after the handshake",
    )
    _add_common(hs, default_concurrency=8)
    hs.set_defaults(bench_func=cmd_handshake)

    rq = sub.add_parser(
        "request",
        help="end to end through a proxy: direct vs via the proxy with each group",
        description="Requests through a TLS proxy to an upstream: direct (plain HTTP), via "
        "the proxy with X25519MLKEM768, via the proxy with X25519, interleaved. Without "
        "--proxy a demo upstream and pqproxy are started for the run.",
    )
    rq.add_argument("--proxy", type=_host_port, metavar="HOST:PORT", help="the TLS proxy")
    rq.add_argument(
        "--upstream",
        type=_host_port,
        metavar="HOST:PORT",
        help="the upstream behind it, for the direct path (omitted: no direct path)",
    )
    rq.add_argument("--groups", type=_groups, default=("X25519MLKEM768", "X25519"))
    rq.add_argument("--method", default="POST", type=str.upper)
    rq.add_argument("--path", default="/v1/chat/completions", metavar="TARGET")
    rq.add_argument("--body", metavar="JSON", help="request body (default: a chat completion)")
    rq.add_argument(
        "--no-stream",
        dest="stream",
        action="store_false",
        help="ask for a whole response, not an SSE stream (no time-to-first-token)",
    )
    rq.add_argument("--tokens", type=_positive_int, default=16, metavar="N")
    rq.add_argument(
        "--new-connections",
        action="store_true",
        help="a new connection per request (handshake included); default keep-alive",
    )
    rq.add_argument("--timeout", type=_positive_float, default=30.0, metavar="S")
    _add_common(rq, default_concurrency=4)
    rq.set_defaults(bench_func=cmd_request)
    return bench


def run(args: argparse.Namespace) -> int:
    """The ``bench`` command: runs the subcommand chosen by ``register``'s parsers."""
    result: int = args.bench_func(args)
    return result


def _progress_stream() -> Any:
    # The bar is for people watching a terminal, never for a log file or a pipe.
    return sys.stderr if sys.stderr.isatty() else None


def _output(args: argparse.Namespace, result: dict[str, Any], kind: str) -> int:
    from .report import handshake_table, plot_handshake, plot_request, request_table, write_json

    if args.json:
        write_json(result, args.json)
    if args.plot:
        try:
            (plot_handshake if kind == "handshake" else plot_request)(result, args.plot)
        except ImportError:
            print(
                "pqproxy bench: --plot needs matplotlib (pip install 'pqproxy[bench]')",
                file=sys.stderr,
            )
            return EXIT_FAILURE
    if not args.quiet:
        print(handshake_table(result) if kind == "handshake" else request_table(result))
    return EXIT_OK


def cmd_handshake(args: argparse.Namespace) -> int:
    from .handshake import HandshakeOptions, run_handshake_bench
    from .pool import BenchError

    host, port = args.target
    try:
        options = HandshakeOptions(
            host=host,
            port=port,
            groups=args.groups,
            concurrency=args.concurrency,
            processes=args.processes,
            duration=args.duration,
            count=args.count,
            sni=args.sni,
            force_hrr=args.force_hrr,
            split_client_hello=args.split_client_hello,
            split_segments=args.split_segments,
            split_delay=args.split_delay,
            cafile=args.cafile,
            insecure=args.insecure,
            timeout=args.timeout,
            linger=args.linger,
        )
    except ValueError as exc:
        print(f"pqproxy bench handshake: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = run_handshake_bench(options, progress_stream=_progress_stream())
    except (ValueError, OSError, BenchError) as exc:
        print(f"pqproxy bench handshake: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return _output(args, result, "handshake")


def cmd_request(args: argparse.Namespace) -> int:
    from .pool import BenchError
    from .request import RequestOptions, default_servers, run_request_bench

    def options_for(
        proxy: tuple[str, int],
        upstream: tuple[str, int] | None,
        cafile: str | None,
        started: tuple[str, ...],
    ) -> RequestOptions:
        return RequestOptions(
            proxy_host=proxy[0],
            proxy_port=proxy[1],
            upstream_host=upstream[0] if upstream else None,
            upstream_port=upstream[1] if upstream else None,
            groups=args.groups,
            method=args.method,
            path=args.path,
            body=args.body.encode() if args.body is not None else None,
            stream=args.stream,
            tokens=args.tokens,
            concurrency=args.concurrency,
            processes=args.processes,
            duration=args.duration,
            count=args.count,
            new_connections=args.new_connections,
            cafile=cafile,
            insecure=args.insecure,
            sni=args.sni,
            timeout=args.timeout,
            started_servers=started,
        )

    try:
        if args.proxy is not None:
            result = run_request_bench(
                options_for(args.proxy, args.upstream, args.cafile, ()),
                progress_stream=_progress_stream(),
            )
        else:
            with default_servers(args.tokens) as servers:
                options = options_for(
                    ("127.0.0.1", servers.proxy_port),
                    ("127.0.0.1", servers.upstream_port),
                    None if args.insecure else servers.cafile,
                    servers.commands,
                )
                result = run_request_bench(options, progress_stream=_progress_stream())
    except ValueError as exc:
        print(f"pqproxy bench request: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, RuntimeError, BenchError) as exc:
        print(f"pqproxy bench request: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return _output(args, result, "request")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pqproxy.bench.cli handshake|request ...``."""
    parser = argparse.ArgumentParser(prog="pqproxy")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    import logging

    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
