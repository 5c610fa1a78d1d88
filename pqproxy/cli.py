"""The ``pqproxy`` command.

    pqproxy serve --config FILE [--listen HOST:PORT] [--upstream URL]... [--workers N|auto] ...
    pqproxy serve --listen HOST:PORT --cert PEM --key PEM --upstream http://HOST:PORT [...]
    pqproxy gen-cert --out DIR [--key-type T] [--san NAME]... [--days N]
    pqproxy demo-upstream --listen HOST:PORT [--tokens N] [--token-interval S]
    pqproxy check-config FILE

Exit status: 0 on success and after SIGTERM/SIGINT, 2 for bad arguments or configuration
(every problem listed), 1 when something they name cannot be used (a certificate that does not
load, a port already taken).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, backends_cli
from .argtypes import non_negative_float as _non_negative_float
from .argtypes import non_negative_int as _non_negative_int
from .argtypes import positive_int as _positive_int
from .argtypes import positive_int_or_auto
from .bench.cli import register as register_bench
from .bench.cli import run as run_bench
from .crypto.provider import BackendError, CryptoProvider
from .devcert import KEY_TYPES, generate_dev_certs
from .tls.enums import NamedGroup
from .tls.server import DEFAULT_GROUPS, PqPolicy

if TYPE_CHECKING:
    from .config import Config, ConfigError

logger = logging.getLogger("pqproxy")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad arguments: reported on one line, exit status 2."""


class StartupError(Exception):
    """The arguments are well-formed but what they name cannot be used: exit status 1."""


# -- argument parsing helpers -----------------------------------------------------------------


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise UsageError(f"{what} {value!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"{what} {value!r}: write an IPv6 address in brackets, [::1]:8443")
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"{what} {value!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"{what} {value!r}: port {port} is out of range")
    return host, port


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# Serve flags that only shape the config built from flags: with --config they belong in the
# file, and silently ignoring them would leave an operator believing they took effect.
_FILE_ONLY_FLAGS = {
    "groups": "--groups",
    "pq_policy": "--pq-policy",
    "alpn": "--alpn",
    "mode": "--mode",
    "handshake_timeout": "--handshake-timeout",
    "idle_timeout": "--idle-timeout",
    "upstream_connect_timeout": "--upstream-connect-timeout",
    "max_connections": "--max-connections",
}


def _add_serve(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="terminate TLS 1.3 and relay to an upstream",
        description="Serve a config file (--config), or one listener described by flags. "
        "With --config, --listen/--upstream/--cert/--key apply to the first listener and "
        "override the file. SIGHUP reloads; SIGTERM drains.",
    )
    serve.add_argument("--config", metavar="FILE", help="YAML configuration file")
    serve.add_argument("--listen", metavar="HOST:PORT")
    serve.add_argument("--cert", metavar="PEM", help="certificate chain, leaf first")
    serve.add_argument("--key", metavar="PEM", help="the leaf's private key")
    serve.add_argument(
        "--upstream",
        action="append",
        metavar="http://HOST:PORT",
        help="an upstream server (repeatable: a pool)",
    )
    serve.add_argument(
        "--workers",
        type=positive_int_or_auto,
        metavar="N|auto",
        help="worker processes; auto: the CPUs this process may use (affinity and cgroup "
        "quota). Default: the file's workers (auto when it has none); 1 without --config",
    )
    serve.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="admin endpoint address, or 'off' (default: the file's; off without --config)",
    )
    serve.add_argument("--mode", choices=["http", "tcp"], help="http (default) or tcp relay")
    serve.add_argument(
        "--groups",
        metavar="G1,G2,...",
        help="key-exchange groups in preference order (default: "
        + ",".join(NamedGroup(g).name for g in DEFAULT_GROUPS)
        + ")",
    )
    serve.add_argument("--pq-policy", choices=[p.value for p in PqPolicy])
    serve.add_argument(
        "--alpn", action="append", metavar="PROTO", help="e.g. http/1.1 (repeatable)"
    )
    serve.add_argument("--handshake-timeout", metavar="DURATION", help="e.g. 10s (default 10s)")
    serve.add_argument("--idle-timeout", metavar="DURATION", help="keep-alive idle (default 75s)")
    serve.add_argument("--upstream-connect-timeout", metavar="DURATION", help="default 5s")
    serve.add_argument("--max-connections", type=_positive_int, metavar="N")
    serve.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    serve.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: the file's logging.level, else INFO",
    )
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="default: the file's logging.format; text without --config",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pqproxy", description="Hybrid post-quantum TLS 1.3 reverse proxy."
    )
    parser.add_argument("--version", action="version", version=f"pqproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_serve(sub)

    gen = sub.add_parser("gen-cert", help="write a development CA and server certificate")
    gen.add_argument("--out", required=True, metavar="DIR")
    gen.add_argument("--key-type", choices=KEY_TYPES, default="ecdsa-p256")
    gen.add_argument(
        "--san", action="append", default=[], metavar="NAME", help="extra DNS name or IP"
    )
    gen.add_argument("--days", type=_positive_int, default=365)
    _add_log_level(gen)

    demo = sub.add_parser("demo-upstream", help="a small OpenAI-shaped HTTP server for demos")
    demo.add_argument("--listen", required=True, metavar="HOST:PORT")
    demo.add_argument("--tokens", type=_non_negative_int, default=16, metavar="N")
    demo.add_argument("--token-interval", type=_non_negative_float, default=0.02, metavar="S")
    demo.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    _add_log_level(demo)

    backends_cli.register(sub)
    register_bench(sub)

    check = sub.add_parser(
        "check-config", help="validate a YAML config file and print what it sets up"
    )
    check.add_argument("file", metavar="FILE")
    _add_log_level(check)
    return parser


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)


def _announce(line: str) -> None:
    # Straight to stderr, whatever the log level: scripts and tests wait for this line.
    print(line, file=sys.stderr, flush=True)


# -- subcommands ------------------------------------------------------------------------------


def _make_provider(config: Config) -> CryptoProvider:
    from .crypto.offload import OffloadConfigError, create_provider

    try:
        return create_provider(config.crypto.backend)
    except (BackendError, OffloadConfigError) as exc:
        raise StartupError(f"crypto: {exc}") from None


class _ConfigProblems(Exception):
    """A ConfigError from the serve flags or file: every problem printed, exit status 2."""

    def __init__(self, error: ConfigError) -> None:
        super().__init__(str(error))
        self.error = error


def _serve_config_loader(args: argparse.Namespace) -> Callable[[], Config]:
    """How ``serve`` gets its configuration, now and again on every SIGHUP: the file with the
    flags over it, or the config the flags describe (re-checking that its files exist)."""
    from dataclasses import replace

    from .config import LogFormat, apply_overrides, config_from_flags, load_config

    given = {name: flag for name, flag in _FILE_ONLY_FLAGS.items() if getattr(args, name)}
    if args.config is not None and given:
        raise UsageError(
            f"{', '.join(given.values())}: cannot be combined with --config; set "
            f"{'them' if len(given) > 1 else 'it'} in the file"
        )
    if args.config is None:
        required = {"--listen": args.listen, "--cert": args.cert, "--key": args.key}
        required["--upstream"] = args.upstream
        missing = [flag for flag, value in required.items() if not value]
        if missing:
            raise UsageError(
                f"without --config, {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                "required"
            )

    def load() -> Config:
        if args.config is not None:
            config = apply_overrides(
                load_config(Path(args.config)),
                listen=args.listen,
                upstreams=args.upstream,
                cert=Path(args.cert) if args.cert else None,
                key=Path(args.key) if args.key else None,
                workers=args.workers,
                admin=args.admin,
            )
        else:
            config = config_from_flags(
                args.listen,
                Path(args.cert),
                Path(args.key),
                args.upstream,
                workers=args.workers,
                admin=args.admin if args.admin != "off" else None,
                mode=args.mode,
                groups=args.groups,
                pq_policy=args.pq_policy,
                alpn=args.alpn,
                handshake_timeout=args.handshake_timeout,
                idle_timeout=args.idle_timeout,
                upstream_connect_timeout=args.upstream_connect_timeout,
                max_connections=args.max_connections,
                # A person at a terminal, not a log collector: text unless asked.
                log_format=args.log_format or "text",
            )
        logging_config = config.logging
        if args.log_level is not None:
            logging_config = replace(logging_config, level=args.log_level.lower())
        if args.log_format is not None:
            logging_config = replace(logging_config, format=LogFormat(args.log_format))
        return replace(config, logging=logging_config)

    return load


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .io.loop import run
    from .io.supervisor import (
        ServeError,
        check_servable,
        run_supervisor,
        run_worker,
        setup_logging,
    )

    load = _serve_config_loader(args)
    try:
        config = load()
    except ConfigError as exc:
        raise _ConfigProblems(exc) from None
    try:
        setup_logging(config.logging)
        provider = _make_provider(config)
        check_servable(config, provider)
        if config.workers > 1:
            return run_supervisor(
                config, reload=load, provider=provider, use_uvloop=not args.no_uvloop
            )
        run(run_worker(config, provider=provider, reload=load), use_uvloop=not args.no_uvloop)
    except ServeError as exc:
        raise StartupError(str(exc)) from None
    return EXIT_OK


def _print_config_problems(command: str, error: ConfigError) -> None:
    if len(error.problems) == 1:
        print(f"pqproxy {command}: error: {error.problems[0]}", file=sys.stderr)
        return
    print(
        f"pqproxy {command}: error: invalid configuration {error.source} "
        f"({len(error.problems)} problems):",
        file=sys.stderr,
    )
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)


def cmd_gen_cert(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = generate_dev_certs(
            out, key_type=args.key_type, sans=tuple(args.san), days=args.days
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot write to {out}: {exc.strerror or exc}") from None
    print(f"ca:   {paths.ca}")
    print(f"cert: {paths.cert}")
    print(f"key:  {paths.key}")
    return EXIT_OK


def cmd_demo_upstream(args: argparse.Namespace) -> int:
    from .demo_upstream import run_demo_upstream
    from .io.loop import run

    host, port = parse_host_port(args.listen, "--listen")

    def on_listening(bound_host: str, bound_port: int) -> None:
        _announce(
            f"demo upstream listening on http://{_url_host(bound_host)}:{bound_port} "
            f"(tokens: {args.tokens}, interval: {args.token_interval:g}s)"
        )

    try:
        run(
            run_demo_upstream(
                host,
                port,
                tokens=args.tokens,
                token_interval=args.token_interval,
                on_listening=on_listening,
            ),
            use_uvloop=not args.no_uvloop,
        )
    except OSError as exc:
        raise StartupError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from .config import check_config_main

    return check_config_main(args.file)


COMMANDS = {
    "serve": cmd_serve,
    "gen-cert": cmd_gen_cert,
    "demo-upstream": cmd_demo_upstream,
    "check-config": cmd_check_config,
    "backends": backends_cli.run,
    "bench": run_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse has printed its message; --help and --version exit 0.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.log_level or "INFO")
    try:
        return COMMANDS[args.command](args)
    except _ConfigProblems as exc:
        _print_config_problems(args.command, exc.error)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"pqproxy {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:
        print(f"pqproxy {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        # A Ctrl-C before the signal handlers are installed (during start-up).
        return EXIT_OK
