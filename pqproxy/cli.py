"""The ``pqproxy`` command.

    pqproxy serve --listen HOST:PORT --cert PEM --key PEM --upstream http://HOST:PORT
    pqproxy gen-cert --out DIR [--key-type T] [--san NAME]... [--days N]
    pqproxy demo-upstream --listen HOST:PORT [--tokens N] [--token-interval S]
    pqproxy check-config FILE

Exit status: 0 on success and after SIGTERM/SIGINT, 2 for bad arguments, 1 when something the
arguments name cannot be used (a missing certificate, a port already taken).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from . import __version__
from .crypto.certs import CertificateLoadError, load_certified_key
from .crypto.provider import BackendError, CryptoProvider
from .devcert import KEY_TYPES, generate_dev_certs
from .tls.enums import HYBRID_GROUPS, NamedGroup
from .tls.server import DEFAULT_GROUPS, PqPolicy, ServerConfig

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


def parse_upstream(value: str) -> tuple[str, int]:
    """``http://HOST:PORT`` (the relay forwards raw bytes; TLS to the upstream comes later)."""
    try:
        url = urlsplit(value)
        port = url.port
    except ValueError as exc:
        raise UsageError(f"--upstream {value!r}: {exc}") from None
    if url.scheme != "http":
        raise UsageError(f"--upstream {value!r}: only http:// upstreams are supported")
    if not url.hostname:
        raise UsageError(f"--upstream {value!r}: no host")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise UsageError(f"--upstream {value!r}: a path, query or fragment is not supported")
    return url.hostname, port if port is not None else 80


def _group_names() -> dict[str, NamedGroup]:
    return {member.name.lower(): member for member in NamedGroup}


def parse_groups(value: str, supported: Sequence[int]) -> tuple[int, ...]:
    """Comma-separated NamedGroup names, case-insensitive, in preference order."""
    known = _group_names()
    valid = ", ".join(NamedGroup(g).name for g in supported)
    groups: list[int] = []
    for raw in value.split(","):
        name = raw.strip()
        if not name:
            continue
        member = known.get(name.lower())
        if member is None:
            raise UsageError(f"--groups: unknown group {name!r}; valid groups: {valid}")
        if member not in supported:
            raise UsageError(
                f"--groups: group {member.name} is not supported here; valid groups: {valid}"
            )
        if member in groups:
            raise UsageError(f"--groups: group {member.name} is listed twice")
        groups.append(member)
    if not groups:
        raise UsageError(f"--groups: no group given; valid groups: {valid}")
    return tuple(groups)


def parse_alpn(values: Sequence[str]) -> tuple[str, ...]:
    protocols: list[str] = []
    for value in values:
        for raw in value.split(","):
            name = raw.strip()
            if not name:
                continue
            # RFC 7301 §3.1: a protocol name is 1..255 bytes; ASCII keeps logs and config sane.
            if not name.isascii() or len(name) > 255:
                raise UsageError(f"--alpn: {name!r} is not a valid protocol name")
            if name not in protocols:
                protocols.append(name)
    return tuple(protocols)


def check_policy(groups: Sequence[int], policy: PqPolicy) -> None:
    hybrid = [g for g in groups if g in HYBRID_GROUPS]
    classical = [g for g in groups if g not in HYBRID_GROUPS]
    if policy is PqPolicy.REQUIRE and not hybrid:
        raise UsageError("--pq-policy require: --groups lists no hybrid post-quantum group")
    if policy is PqPolicy.OFF and not classical:
        raise UsageError("--pq-policy off: --groups lists no classical group")


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be greater than 0")
    return number


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must not be negative")
    return number


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


def _non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must not be negative")
    return number


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pqproxy", description="Hybrid post-quantum TLS 1.3 reverse proxy."
    )
    parser.add_argument("--version", action="version", version=f"pqproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="terminate TLS 1.3 and relay to an upstream")
    serve.add_argument("--listen", required=True, metavar="HOST:PORT")
    serve.add_argument("--cert", required=True, metavar="PEM", help="certificate chain, leaf first")
    serve.add_argument("--key", required=True, metavar="PEM", help="the leaf's private key")
    serve.add_argument("--upstream", required=True, metavar="http://HOST:PORT")
    serve.add_argument(
        "--groups",
        metavar="G1,G2,...",
        help="key-exchange groups in preference order (default: "
        + ",".join(NamedGroup(g).name for g in DEFAULT_GROUPS)
        + ")",
    )
    serve.add_argument(
        "--pq-policy", choices=[p.value for p in PqPolicy], default=PqPolicy.PREFER.value
    )
    serve.add_argument(
        "--alpn", action="append", default=[], metavar="PROTO", help="e.g. http/1.1 (repeatable)"
    )
    serve.add_argument("--handshake-timeout", type=_positive, default=10.0, metavar="S")
    serve.add_argument("--idle-timeout", type=_positive, default=300.0, metavar="S")
    serve.add_argument("--upstream-connect-timeout", type=_positive, default=5.0, metavar="S")
    serve.add_argument("--max-connections", type=_positive_int, default=10000, metavar="N")
    serve.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    _add_log_level(serve)

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


def _make_provider() -> CryptoProvider:
    from .crypto.backends.openssl import OpenSSLProvider

    try:
        return OpenSSLProvider()
    except BackendError as exc:
        raise StartupError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from .io.loop import run
    from .io.tls_server import ListenerSettings, TLSListener, serve

    listen_host, listen_port = parse_host_port(args.listen, "--listen")
    upstream_host, upstream_port = parse_upstream(args.upstream)
    policy = PqPolicy(args.pq_policy)
    alpn = parse_alpn(args.alpn)
    provider = _make_provider()
    supported = [g for g in NamedGroup if g in provider.groups]
    groups = parse_groups(args.groups, supported) if args.groups else DEFAULT_GROUPS
    missing = [NamedGroup(g).name for g in groups if g not in provider.groups]
    if missing:
        raise StartupError(f"backend {provider.name} lacks groups: {', '.join(missing)}")
    check_policy(groups, policy)
    try:
        certified = load_certified_key(args.cert, args.key)
    except CertificateLoadError as exc:
        raise StartupError(str(exc)) from None
    try:
        config = ServerConfig(
            certificates=(certified,), groups=groups, pq_policy=policy, alpn_protocols=alpn
        )
    except ValueError as exc:
        raise StartupError(f"invalid configuration: {exc}") from None

    settings = ListenerSettings(
        host=listen_host,
        port=listen_port,
        server_config=config,
        provider=provider,
        upstream_host=upstream_host,
        upstream_port=upstream_port,
        handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout,
        upstream_connect_timeout=args.upstream_connect_timeout,
        max_connections=args.max_connections,
    )
    offered = ",".join(NamedGroup(g).name for g in config.groups_for_policy())

    def on_listening(listener: TLSListener) -> None:
        _announce(
            f"pqproxy listening on https://{_url_host(listen_host)}:{listener.port} "
            f"(groups: {offered}, policy: {policy.value})"
        )
        logger.info("relaying to http://%s:%d", _url_host(upstream_host), upstream_port)

    try:
        run(serve(settings, on_listening=on_listening), use_uvloop=not args.no_uvloop)
    except OSError as exc:
        raise StartupError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    return EXIT_OK


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
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse has printed its message; --help and --version exit 0.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"pqproxy {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:
        print(f"pqproxy {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        # A Ctrl-C before the signal handlers are installed (during start-up).
        return EXIT_OK
