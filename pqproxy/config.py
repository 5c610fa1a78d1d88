"""The configuration file: YAML in, typed and validated frozen dataclasses out.

Rules of this module:

- Every key is known. A key this module does not read is an error, never ignored: a typo in
  ``pq_policy`` must not silently leave a listener on the default.
- Every problem names its key path (``listeners[0].tls.groups[2]``) and what is wrong, and
  all problems found are reported together in one ``ConfigError``, so an operator fixes the
  file in one pass.
- Loading checks that files exist but never loads keys or certificates: that is
  ``pqproxy.crypto.certs.load_certified_key``, called by whoever starts the listeners.
- No I/O beyond reading the file and ``stat``-ing the files it names: no sockets, no loop.

The same validation serves the command line: ``config_from_flags`` builds the raw structure a
file would hold and runs it through ``parse_config``, with problems named by flag.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from . import cpus
from .crypto.backends import BACKEND_MODULES
from .crypto.client_auth import DEFAULT_MAX_CHAIN_DEPTH, MAX_CHAIN_LENGTH
from .crypto.offload import OffloadMode
from .relay.fields import HOP_BY_HOP
from .relay.forwarding import FORWARDING_HEADER_NAMES, ForwardedFor, UnderscoreHeaders
from .relay.request import DEFAULT_MAX_HEADER_COUNT
from .tls.enums import HYBRID_GROUPS, CipherSuite, NamedGroup
from .tls.server import (
    DEFAULT_CIPHER_SUITES,
    DEFAULT_GROUPS,
    DEFAULT_MAX_AUTH_AGE,
    MAX_AUTH_AGE,
    MAX_TICKET_LIFETIME,
    MAX_TICKETS_PER_HANDSHAKE,
    ClientAuth,
    PqPolicy,
)

T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str], source: str = "<config>") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return "\n".join(self.problems)


# -- the typed configuration ------------------------------------------------------------------


class Mode(StrEnum):
    HTTP = "http"  # HTTP/1.1 through the h11 relay: headers added, bodies streamed
    TCP = "tcp"  # decrypted bytes relayed as they are (gRPC over h2, anything else)


class Balance(StrEnum):
    LEAST_OUTSTANDING = "least_outstanding"
    ROUND_ROBIN = "round_robin"


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_TLS_INFO_PREFIX = "X-PQ-TLS"
DEFAULT_ADMIN_PORT = 9100


@dataclass(frozen=True, slots=True)
class ServerAddress:
    host: str  # without brackets, also for IPv6
    port: int

    def __str__(self) -> str:
        return f"{_url_host(self.host)}:{self.port}"


DEFAULT_ADMIN = ServerAddress("127.0.0.1", DEFAULT_ADMIN_PORT)


@dataclass(frozen=True, slots=True)
class UpstreamServer:
    url: str  # normalised: http://HOST:PORT
    host: str
    port: int

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True, slots=True)
class CertificateConfig:
    cert: Path
    key: Path
    # SNI names this chain is preferred for; None: the names in the certificate itself.
    server_names: tuple[str, ...] | None = None


# The upstream reads the client certificate's identity in these request headers.
DEFAULT_IDENTITY_HEADERS = ("X-Client-Subject", "X-Client-URI", "X-Client-DNS")
# Headers the proxy itself writes or that frame the request: an identity header of that name
# would be dropped, or would change how the upstream reads the message.
# The lists are the relay's own (pqproxy/relay/fields.py and forwarding.py), so the two never
# drift apart.
_RESERVED_HEADER_NAMES = frozenset(
    name.decode("ascii")
    for name in (HOP_BY_HOP | FORWARDING_HEADER_NAMES | {b"host", b"content-length", b"expect"})
)


@dataclass(frozen=True, slots=True)
class IdentityHeadersConfig:
    """Request header names for the verified client identity; None: that part is not sent.
    Whatever the client sent under these names is always removed first."""

    subject: str | None = DEFAULT_IDENTITY_HEADERS[0]  # RFC 4514 subject DN
    uris: str | None = DEFAULT_IDENTITY_HEADERS[1]  # URI SANs (SPIFFE IDs), comma-separated
    dns: str | None = DEFAULT_IDENTITY_HEADERS[2]  # DNS SANs, comma-separated

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.subject, self.uris, self.dns) if n is not None)


@dataclass(frozen=True, slots=True)
class ClientAuthConfig:
    """Mutual TLS on one listener."""

    mode: ClientAuth = ClientAuth.NONE
    ca: Path | None = None  # PEM bundle of the CAs that issue client certificates
    # Identities let through (an exact URI SAN, DNS SAN or RFC 4514 subject); anyone else
    # gets 403. None: every client the handshake admitted.
    allow: tuple[str, ...] | None = None
    identity_headers: IdentityHeadersConfig = field(default_factory=IdentityHeadersConfig)
    # A resumed session keeps the client's identity this long after its last
    # CertificateVerify (and never past its certificate's end); then a full handshake proves
    # the certificate again (RFC 8446 §4.6.1). Whole seconds, at most 7 days.
    max_auth_age: int = DEFAULT_MAX_AUTH_AGE
    # Certificates a client may send (leaf, intermediates, a root): a longer chain is
    # refused before any path search.
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH


# RotatingTicketKeys keeps ceil(lifetime / rotation) old keys so that a ticket opens for its
# whole lifetime; opening a ticket tries each of them, so their number is bounded.
MAX_TICKET_KEYS_KEPT = 24


@dataclass(frozen=True, slots=True)
class TicketsConfig:
    """Session tickets (resumption with psk_dhe_ke only: a resumed session still runs a
    fresh hybrid key exchange; no 0-RTT)."""

    enabled: bool = True
    per_handshake: int = 2
    lifetime: int = 7200  # seconds, as the NewSessionTicket message carries it
    # A file with the master secret the ticket keys derive from, shared by several hosts so
    # that each opens the others' tickets (created with 32 random bytes, mode 0600, when
    # missing). None: generated at start, once, and shared by every worker process.
    key_file: Path | None = None
    rotation: float = 3600.0  # a new ticket key every this many seconds

    @property
    def keys_kept(self) -> int:
        """Old keys kept: enough that a ticket opens until its lifetime ends."""
        return max(1, math.ceil(self.lifetime / self.rotation))


@dataclass(frozen=True, slots=True)
class TlsConfig:
    certificates: tuple[CertificateConfig, ...]  # the first is the default
    groups: tuple[int, ...] = DEFAULT_GROUPS
    pq_policy: PqPolicy = PqPolicy.PREFER
    cipher_suites: tuple[int, ...] = DEFAULT_CIPHER_SUITES
    alpn: tuple[str, ...] = ("http/1.1",)
    # NSS key log of this listener's sessions (debugging only); None: off, unless the
    # SSLKEYLOGFILE environment variable names a file.
    key_log_file: Path | None = None
    client_auth: ClientAuthConfig = field(default_factory=ClientAuthConfig)
    tickets: TicketsConfig = field(default_factory=TicketsConfig)


@dataclass(frozen=True, slots=True)
class ListenerTimeouts:
    handshake: float = 10.0
    header_read: float = 30.0
    idle: float = 75.0  # keep-alive: between requests on one connection
    # No write progress toward the client for this long aborts the connection, client and
    # upstream side (nginx's send_timeout); http and tcp mode alike.
    send: float = 60.0


# listen(2) backlog: nginx's default on Linux is 511, the kernel's somaxconn default 4096
# (Linux 5.4+); bursts of model clients (a batch job, a fleet restart) need the larger one.
DEFAULT_BACKLOG = 4096
# The kernel keeps the backlog in 32 bits, and somaxconn caps it far below this anyway.
MAX_BACKLOG = 1 << 20


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    max_header_bytes: int = 32 * 1024
    max_body_bytes: int = 100 * 1024 * 1024
    max_connections: int = 10_000
    # The kernel's accept queue of each listening socket (listen(2) backlog): connections
    # that completed their TCP handshake and wait for the worker to accept them. A burst
    # beyond it is dropped at SYN (TcpExt ListenOverflows). The kernel caps it at
    # net.core.somaxconn; pqproxy says so at start-up.
    backlog: int = DEFAULT_BACKLOG
    # Fields in one request head (or a chunked body's trailers): more is 431.
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT
    # Request body bytes read before the request goes upstream (0: none, stream at once).
    request_buffering: int = 0


@dataclass(frozen=True, slots=True)
class HeaderConfig:
    x_forwarded_for: bool = True
    x_forwarded_proto: bool = True
    x_forwarded_host: bool = True
    via: bool = True
    # Prefix of the X-PQ-TLS-Group / -Cipher / -Resumed request headers; None: not sent.
    tls_info: str | None = DEFAULT_TLS_INFO_PREFIX
    # Client header names with "_": drop (as nginx and Envoy), reject (400), or allow (still
    # dropped when they normalise to a header pqproxy owns).
    underscore_headers: UnderscoreHeaders = UnderscoreHeaders.DROP
    # X-Forwarded-For: append the peer address to the client's list, or replace it.
    forwarded_for: ForwardedFor = ForwardedFor.APPEND


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    listen: ServerAddress
    upstream: str  # the name of an UpstreamConfig in Config.upstreams
    tls: TlsConfig
    mode: Mode = Mode.HTTP
    timeouts: ListenerTimeouts = field(default_factory=ListenerTimeouts)
    limits: ListenerLimits = field(default_factory=ListenerLimits)
    headers: HeaderConfig = field(default_factory=HeaderConfig)


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    connect: float = 5.0
    # Longest silence between two bytes from the upstream: a model thinking before its first
    # token, or between tokens, is silent for long stretches.
    read: float = 600.0


@dataclass(frozen=True, slots=True)
class KeepAliveConfig:
    max_idle_per_server: int = 32
    idle_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    path: str = "/health"
    interval: float = 5.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2


@dataclass(frozen=True, slots=True)
class PassiveConfig:
    max_fails: int = 3  # consecutive connect failures or 5xx before a server is ejected
    ejection_time: float = 10.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    servers: tuple[UpstreamServer, ...]
    balance: Balance = Balance.LEAST_OUTSTANDING
    timeouts: UpstreamTimeouts = field(default_factory=UpstreamTimeouts)
    keepalive: KeepAliveConfig = field(default_factory=KeepAliveConfig)
    health_check: HealthCheckConfig | None = field(default_factory=HealthCheckConfig)
    passive: PassiveConfig | None = field(default_factory=PassiveConfig)
    # Tries on another server for a request that never reached an upstream.
    retries: int = 2


LOG_STREAMS = ("stderr", "stdout")
# How often the certificate and key files are checked for a change (pqproxy.io.cert_watch).
DEFAULT_CERT_WATCH_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class CertWatchConfig:
    """Reload rotated certificates (a renewed Kubernetes Secret) without a restart or a
    signal: every listener's certificate and key files are checked every ``interval``."""

    interval: float = DEFAULT_CERT_WATCH_INTERVAL


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    access_log: bool = True
    format: LogFormat = LogFormat.JSON
    # "stderr", "stdout", or the absolute path of a file (appended to).
    destination: str = "stderr"


@dataclass(frozen=True, slots=True)
class BatchConfig:
    max_items: int = 32  # a batch runs as soon as it holds this many requests
    max_delay: float = 200e-6  # ... or this long after its first one


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failures: int = 5  # consecutive key-exchange failures that switch to the fallback
    probe_interval: float = 5.0


@dataclass(frozen=True, slots=True)
class CryptoConfig:
    """Which backend does the key exchange (and signs, for keys it holds) and how its calls
    run (pqproxy.crypto.offload). One per process: pools and token sessions are per-process
    resources shared by every listener."""

    backend: str = "openssl"
    offload: OffloadMode = OffloadMode.INLINE
    workers: int = 4
    concurrency: int = 64
    timeout: float = 2.0
    batch: BatchConfig = field(default_factory=BatchConfig)
    fallback: str | None = None
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    upstreams: tuple[UpstreamConfig, ...]  # in file order; look up by name with upstream()
    # Worker processes. "workers: auto" (the default in a file) is resolved when the file is
    # read, to the CPUs this process may use (pqproxy.cpus); workers_auto remembers it.
    workers: int = 1
    workers_auto: bool = False
    admin: ServerAddress | None = DEFAULT_ADMIN
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    drain_timeout: float = 30.0
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    # The default of every listener's tls.tickets (each key may be overridden there).
    tickets: TicketsConfig = field(default_factory=TicketsConfig)
    # None: certificates change only on SIGHUP or a restart.
    cert_watch: CertWatchConfig | None = field(default_factory=CertWatchConfig)
    source: str = "<config>"

    def upstream(self, name: str) -> UpstreamConfig:
        for pool in self.upstreams:
            if pool.name == name:
                return pool
        raise KeyError(name)

    def upstream_for(self, listener: ListenerConfig) -> UpstreamConfig:
        return self.upstream(listener.upstream)


# -- scalar parsers: raise ValueError with the message, the caller adds the path ---------------

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|µs|ms|s|m|h)?\s*$")
_DURATION_UNITS = {
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    None: 1.0,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$"
)
# RFC 9110 §5.6.2: a header field name is a token.
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def parse_duration(value: object, *, allow_zero: bool = False) -> float:
    """Seconds: a number, or a string like "500ms", "30s", "5m", "1h"."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(
            f"expected a duration (seconds, or a string like '500ms', '30s', '5m', '1h'), "
            f"got {_type_name(value)}"
        )
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a duration (write a number of seconds, or e.g. "
                "'500ms', '30s', '5m', '1h')"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"{value!r}: must be {'0 or more' if allow_zero else 'more than 0'}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes: an integer, or a string like "64KiB", "1MiB" (2^20) or "10MB" (10^6)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(
            f"expected a size (bytes as a whole number, or a string like '64KiB', '10MB'), "
            f"got {_type_name(value)}"
        )
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value)
        unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
        if match is None or unit is None:
            raise ValueError(
                f"{value!r} is not a size (units: B, KB, MB, GB = powers of 10; "
                "KiB, MiB, GiB = powers of 2)"
            )
        size = int(float(match.group(1)) * unit)
    if size < 1:
        raise ValueError(f"{value!r}: must be at least 1 byte")
    return size


def _size_or_zero(value: object) -> int:
    """A size (`parse_size`), or 0 for "off"."""
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return 0
    return parse_size(value)


def _int(value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {_type_name(value)}")
    if value < minimum:
        raise ValueError(f"{value} is too small (minimum {minimum})")
    return value


AUTO = "auto"
# The workers of a config file that does not say.
_FILE_WORKERS: int | str = AUTO


def _workers(value: object) -> int | str:
    """A worker count, or "auto" (the CPUs this process may use)."""
    if value == AUTO:
        return AUTO
    return _int(value, 1)


def _backlog(value: object) -> int:
    backlog = _int(value, 1)
    if backlog > MAX_BACKLOG:
        raise ValueError(f"{backlog} is too large (maximum {MAX_BACKLOG})")
    return backlog


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type_name(value)}")
    return value


def _choice(value: object, choices: Iterable[str]) -> str:
    options = list(choices)
    if isinstance(value, str) and value.lower() in options:
        return value.lower()
    listed = ", ".join(options)
    raise ValueError(f"expected one of {listed}, got {_type_name(value)}")


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            f"{what} must be letters, digits, '_', '.' or '-' (got {_type_name(value)})"
        )
    return value


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME_RE.match(host):
        raise ValueError(f"{host!r} is not a valid host name or IP address")
    return host.lower()


def parse_address(value: object, *, min_port: int = 0) -> ServerAddress:
    """``HOST:PORT``, with an IPv6 address in brackets: ``[::1]:8443``."""
    if not isinstance(value, str):
        hint = ""
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 10:30 as the base-60 number 630.
            hint = "; quote it"
        elif isinstance(value, list):
            # An unquoted [::1]:8443 starts a YAML list.
            hint = '; quote an IPv6 address: "[::1]:8443"'
        raise ValueError(f'expected "HOST:PORT", got {_type_name(value)}{hint}')
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, as in [::1]:8443")
    if not port_text.isdigit() or not min_port <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: port must be a number from {min_port} to 65535")
    return ServerAddress(_check_host(host), int(port_text))


def parse_upstream_url(value: object) -> UpstreamServer:
    """``http://HOST[:PORT][/]``; the port defaults to 80."""
    if not isinstance(value, str):
        raise ValueError(f"not an http:// URL: got {_type_name(value)}")
    url = urlsplit(value)
    if url.scheme == "https":
        raise ValueError(
            f"{value!r}: https upstreams are not supported yet; use http:// "
            "(pqproxy terminates TLS and talks plain HTTP to the model server)"
        )
    if url.scheme != "http" or not url.netloc:
        hint = f" (write http://{value})" if "://" not in value else ""
        raise ValueError(f"not an http:// URL: {value!r}{hint}")
    try:
        port = url.port
    except ValueError:
        raise ValueError(f"{value!r}: port must be a number from 1 to 65535") from None
    if url.username is not None or url.password is not None:
        raise ValueError(f"{value!r}: credentials in the URL are not supported")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError(
            f"{value!r}: a path, query or fragment is not supported (requests keep their path)"
        )
    if not url.hostname:
        raise ValueError(f"{value!r}: no host")
    if port == 0:
        raise ValueError(f"{value!r}: port must be a number from 1 to 65535")
    host = _check_host(url.hostname)
    port = 80 if port is None else port
    return UpstreamServer(f"http://{_url_host(host)}:{port}", host, port)


def _server_name(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a DNS name or IP address, got {_type_name(value)}")
    name = value.lower().rstrip(".")
    bare = name[2:] if name.startswith("*.") else name
    try:
        ipaddress.ip_address(bare)
        is_ip = True
    except ValueError:
        is_ip = False
    if is_ip and bare != name:
        raise ValueError(f"{value!r}: a wildcard cannot stand before an IP address")
    if not is_ip and ("*" in bare or not _HOSTNAME_RE.match(bare)):
        raise ValueError(
            f"{value!r} is not a DNS name (a wildcard may only be the whole leftmost label, "
            "as in *.example.com)"
        )
    return name


def _known_groups() -> list[NamedGroup]:
    # Hybrids first: they are the point of this proxy and the likeliest intended spelling.
    hybrids = [g for g in NamedGroup if g in HYBRID_GROUPS]
    hybrids.sort(key=lambda g: DEFAULT_GROUPS.index(g) if g in DEFAULT_GROUPS else len(NamedGroup))
    return hybrids + [g for g in NamedGroup if g not in HYBRID_GROUPS]


def _by_name(members: Iterable[T], name_of: Callable[[T], str]) -> dict[str, T]:
    return {name_of(m).lower(): m for m in members}


# -- the structural parser ----------------------------------------------------------------------


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class _Parser:
    """Walks the raw YAML structure, collecting every problem as (path, message)."""

    def __init__(
        self,
        base_dir: Path,
        check_files: bool,
        available_cpus: Callable[[], int] = cpus.available_cpus,
    ) -> None:
        self.base_dir = base_dir
        self.check_files = check_files
        self.available_cpus = available_cpus
        self.problems: list[tuple[str, str]] = []

    def resolve_workers(self, value: int | str) -> int:
        """A worker count as given, or "auto" as the CPUs this process may use."""
        return self.available_cpus() if value == AUTO else int(value)

    def add(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def section(
        self, path: str, value: object, keys: Sequence[str], *, nullable: bool = True
    ) -> dict[str, Any]:
        """A mapping with only ``keys``; null reads as empty (all defaults) if ``nullable``."""
        if value is None and nullable:
            return {}
        if not isinstance(value, dict):
            self.add(path or "<top level>", f"expected a mapping, got {_type_name(value)}")
            return {}
        known: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.add(_join(path, str(key)), f"a key must be a string, got {_type_name(key)}")
            elif key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"expected: {', '.join(keys)}"
                self.add(_join(path, key), f"unknown key ({hint})")
            else:
                known[key] = item
        return known

    def get(
        self, mapping: Mapping[str, Any], path: str, key: str, parse: Callable[[Any], T], default: T
    ) -> T:
        if key not in mapping:
            return default
        try:
            return parse(mapping[key])
        except ValueError as exc:
            self.add(_join(path, key), str(exc))
            return default

    def require(self, mapping: Mapping[str, Any], path: str, key: str) -> bool:
        if key in mapping and mapping[key] is not None:
            return True
        self.add(_join(path, key), "required")
        return False

    def items(self, path: str, value: object, *, min_items: int = 1) -> list[Any]:
        if not isinstance(value, list):
            self.add(path, f"expected a list, got {_type_name(value)}")
            return []
        if len(value) < min_items:
            self.add(path, f"needs at least {min_items} item{'s' if min_items > 1 else ''}")
        return value

    def each(
        self,
        path: str,
        values: list[Any],
        parse: Callable[[Any], T],
        what: str = "item",
        show: Callable[[T], str] = str,
    ) -> tuple[T, ...]:
        """Parse every item; an item equal to an earlier one is a problem."""
        result: list[T] = []
        for index, raw in enumerate(values):
            try:
                item = parse(raw)
            except ValueError as exc:
                self.add(_join(path, index), str(exc))
                continue
            if item in result:
                self.add(_join(path, index), f"{what} {show(item)} is listed twice")
                continue
            result.append(item)
        return tuple(result)

    def file(self, path: str, value: object) -> Path:
        if not isinstance(value, str) or not value:
            self.add(path, f"expected a file path, got {_type_name(value)}")
            return Path()
        resolved = Path(os.path.abspath(self.base_dir / Path(value).expanduser()))
        if self.check_files:
            if not resolved.exists():
                self.add(path, f"no such file: {resolved}")
            elif not resolved.is_file():
                self.add(path, f"not a file: {resolved}")
            elif not os.access(resolved, os.R_OK):
                self.add(path, f"not readable: {resolved}")
        return resolved

    # -- sections --------------------------------------------------------------------------

    def config(self, data: object, source: str) -> Config | None:
        if data is None:
            self.add("<top level>", "the configuration is empty")
            return None
        top = self.section(
            "",
            data,
            [
                "workers",
                "admin",
                "logging",
                "drain_timeout",
                "crypto",
                "tickets",
                "cert_watch",
                "listeners",
                "upstreams",
            ],
        )
        if not top and not isinstance(data, dict):
            return None
        workers_value = self.get(top, "", "workers", _workers, _FILE_WORKERS)
        workers = self.resolve_workers(workers_value)
        default_admin: ServerAddress | None = DEFAULT_ADMIN
        admin = self.get(top, "", "admin", _optional_address, default_admin)
        logging = self.logging(top.get("logging"))
        drain = self.get(
            top, "", "drain_timeout", lambda v: parse_duration(v, allow_zero=True), 30.0
        )
        crypto = self.crypto(top.get("crypto"))
        tickets = self.tickets("tickets", top.get("tickets"), TicketsConfig())
        cert_watch = self.cert_watch(top)
        upstreams: tuple[UpstreamConfig, ...] = ()
        # Names as written, so that a pool with a bad server is still a valid reference.
        pool_names: list[str] | None = None
        if self.require(top, "", "upstreams"):
            upstreams = self.upstreams(top["upstreams"])
            if isinstance(top["upstreams"], dict):
                pool_names = [str(name) for name in top["upstreams"]]
        listeners: list[tuple[int, ListenerConfig]] = []
        if self.require(top, "", "listeners"):
            raw_listeners = self.items("listeners", top["listeners"])
            for index, raw in enumerate(raw_listeners):
                listener = self.listener(index, raw, pool_names, tickets)
                if listener is not None:
                    listeners.append((index, listener))
        self.check_addresses(listeners, admin)
        if self.problems:
            return None
        return Config(
            listeners=tuple(listener for _, listener in listeners),
            upstreams=upstreams,
            workers=workers,
            workers_auto=workers_value == AUTO,
            admin=admin,
            logging=logging,
            drain_timeout=drain,
            crypto=crypto,
            tickets=tickets,
            cert_watch=cert_watch,
            source=source,
        )

    def cert_watch(self, top: Mapping[str, Any]) -> CertWatchConfig | None:
        """``cert_watch: {interval: 5s}`` (the default), or null or false (YAML reads an
        unquoted ``off`` as false) to turn it off."""
        if "cert_watch" not in top:
            return CertWatchConfig()
        if top["cert_watch"] is None or top["cert_watch"] is False:
            return None
        raw = self.section("cert_watch", top["cert_watch"], ["interval"], nullable=False)
        return CertWatchConfig(
            interval=self.get(
                raw, "cert_watch", "interval", parse_duration, DEFAULT_CERT_WATCH_INTERVAL
            )
        )

    def crypto(self, value: object) -> CryptoConfig:
        path = "crypto"
        keys = [
            "backend",
            "offload",
            "workers",
            "concurrency",
            "timeout",
            "batch",
            "fallback",
            "breaker",
        ]
        raw = self.section(path, value, keys)
        d = CryptoConfig()
        backends = list(BACKEND_MODULES)
        backend = self.get(raw, path, "backend", lambda v: _choice(v, backends), d.backend)
        offload = self.get(raw, path, "offload", _enum(OffloadMode), d.offload)
        fallback = self.get(raw, path, "fallback", lambda v: _choice(v, backends), None)
        if fallback is not None and fallback == backend:
            self.add(_join(path, "fallback"), f"must be another backend than {backend}")
        if offload is OffloadMode.PROCESS:
            for key, name in (("backend", backend), ("fallback", fallback)):
                if name == "pkcs11":
                    self.add(
                        _join(path, key),
                        "pkcs11 cannot run in offload: process (a PKCS#11 session belongs "
                        "to the process that logged in); use offload: thread",
                    )
        batch_path = _join(path, "batch")
        if "batch" in raw and offload is not OffloadMode.BATCH:
            self.add(batch_path, f"applies to offload: batch only (this is {offload.value})")
        raw_batch = self.section(batch_path, raw.get("batch"), ["max_items", "max_delay"])
        batch = BatchConfig(
            max_items=self.get(raw_batch, batch_path, "max_items", lambda v: _int(v, 1), 32),
            max_delay=self.get(
                raw_batch,
                batch_path,
                "max_delay",
                lambda v: parse_duration(v, allow_zero=True),
                200e-6,
            ),
        )
        breaker_path = _join(path, "breaker")
        if "breaker" in raw and fallback is None:
            self.add(breaker_path, "applies with a fallback only")
        raw_breaker = self.section(breaker_path, raw.get("breaker"), ["failures", "probe_interval"])
        breaker = BreakerConfig(
            failures=self.get(raw_breaker, breaker_path, "failures", lambda v: _int(v, 1), 5),
            probe_interval=self.get(
                raw_breaker, breaker_path, "probe_interval", parse_duration, 5.0
            ),
        )
        return CryptoConfig(
            backend=backend,
            offload=offload,
            workers=self.get(raw, path, "workers", lambda v: _int(v, 1), d.workers),
            concurrency=self.get(raw, path, "concurrency", lambda v: _int(v, 1), d.concurrency),
            timeout=self.get(raw, path, "timeout", parse_duration, d.timeout),
            batch=batch,
            fallback=fallback,
            breaker=breaker,
        )

    def logging(self, value: object) -> LoggingConfig:
        path = "logging"
        raw = self.section(path, value, ["level", "access_log", "format", "destination"])
        destination = "stderr"
        if "destination" in raw:
            destination = self.log_destination(_join(path, "destination"), raw["destination"])
        return LoggingConfig(
            level=self.get(raw, path, "level", lambda v: _choice(v, LOG_LEVELS), "info"),
            access_log=self.get(raw, path, "access_log", _bool, True),
            format=self.get(raw, path, "format", _enum(LogFormat), LogFormat.JSON),
            destination=destination,
        )

    def log_destination(self, path: str, value: object) -> str:
        """stderr, stdout, or a file to append to (its directory must exist; the file is
        created when missing). A file named like a stream is written ./stderr."""
        if isinstance(value, str) and value.strip().lower() in LOG_STREAMS:
            return value.strip().lower()
        return self.writable_file(path, value, "a log file path, stderr or stdout")

    def writable_file(self, path: str, value: object, what: str) -> str:
        """An absolute path to a file pqproxy will create or append to."""
        if not isinstance(value, str) or not value.strip():
            self.add(path, f"expected {what}, got {_type_name(value)}")
            return ""
        resolved = Path(os.path.abspath(self.base_dir / Path(value).expanduser()))
        if self.check_files:
            parent = resolved.parent
            if resolved.is_dir():
                self.add(path, f"is a directory: {resolved}")
            elif resolved.exists() and not os.access(resolved, os.W_OK):
                self.add(path, f"not writable: {resolved}")
            elif not resolved.exists() and not parent.is_dir():
                self.add(path, f"no such directory: {parent}")
            elif not resolved.exists() and not os.access(parent, os.W_OK | os.X_OK):
                self.add(path, f"cannot create a file in {parent}")
        return os.fspath(resolved)

    def listener(
        self,
        index: int,
        value: object,
        pool_names: list[str] | None,
        tickets: TicketsConfig = TicketsConfig(),  # noqa: B008 - frozen, so shared safely
    ) -> ListenerConfig | None:
        path = _join("listeners", index)
        keys = ["name", "listen", "mode", "upstream", "tls", "timeouts", "limits", "headers"]
        raw = self.section(path, value, keys, nullable=False)
        if not isinstance(value, dict):
            return None
        name = self.get(
            raw, path, "name", lambda v: _name(v, "a listener name"), f"listener{index}"
        )
        listen = None
        if self.require(raw, path, "listen"):
            listen = self.get(raw, path, "listen", parse_address, None)
        mode = self.get(raw, path, "mode", _enum(Mode), Mode.HTTP)
        upstream = None
        if self.require(raw, path, "upstream"):
            upstream = self.get(raw, path, "upstream", lambda v: _name(v, "a pool name"), None)
        if upstream is not None and pool_names is not None and upstream not in pool_names:
            self.add(
                _join(path, "upstream"),
                f"no upstream pool named {upstream!r} (defined: {', '.join(pool_names) or '-'})",
            )
        tls = None
        if self.require(raw, path, "tls"):
            tls = self.tls(_join(path, "tls"), raw["tls"], mode, tickets)
        timeouts = self.listener_timeouts(_join(path, "timeouts"), raw.get("timeouts"))
        limits = self.limits(_join(path, "limits"), raw.get("limits"))
        if mode is Mode.TCP and "headers" in raw:
            self.add(_join(path, "headers"), "applies to mode: http only (this listener is tcp)")
        headers = self.headers(_join(path, "headers"), raw.get("headers"))
        if listen is None or upstream is None or tls is None:
            return None
        return ListenerConfig(
            name=name,
            listen=listen,
            upstream=upstream,
            tls=tls,
            mode=mode,
            timeouts=timeouts,
            limits=limits,
            headers=headers,
        )

    def tls(
        self, path: str, value: object, mode: Mode, default_tickets: TicketsConfig
    ) -> TlsConfig | None:
        keys = [
            "certificates",
            "groups",
            "pq_policy",
            "cipher_suites",
            "alpn",
            "key_log_file",
            "client_auth",
            "tickets",
        ]
        raw = self.section(path, value, keys, nullable=False)
        if not isinstance(value, dict):
            return None
        certificates: tuple[CertificateConfig, ...] = ()
        if self.require(raw, path, "certificates"):
            cert_path = _join(path, "certificates")
            certificates = tuple(
                cert
                for index, item in enumerate(self.items(cert_path, raw["certificates"]))
                if (cert := self.certificate(_join(cert_path, index), item)) is not None
            )
        groups: tuple[int, ...] = DEFAULT_GROUPS
        if "groups" in raw:
            groups_path = _join(path, "groups")
            groups = self.each(
                groups_path, self.items(groups_path, raw["groups"]), _group, "group", _group_name
            )
        policy = self.get(raw, path, "pq_policy", _pq_policy, PqPolicy.PREFER)
        hybrid = [g for g in groups if g in HYBRID_GROUPS]
        if groups and policy is PqPolicy.REQUIRE and not hybrid:
            self.add(_join(path, "pq_policy"), "require: groups lists no hybrid group")
        if groups and policy is PqPolicy.OFF and len(hybrid) == len(groups):
            self.add(_join(path, "pq_policy"), "off: groups lists no classical group")
        suites: tuple[int, ...] = DEFAULT_CIPHER_SUITES
        if "cipher_suites" in raw:
            suites_path = _join(path, "cipher_suites")
            suites = self.each(
                suites_path,
                self.items(suites_path, raw["cipher_suites"]),
                _cipher_suite,
                "suite",
                _suite_name,
            )
        alpn: tuple[str, ...] = ("http/1.1",) if mode is Mode.HTTP else ()
        if "alpn" in raw:
            alpn_path = _join(path, "alpn")
            alpn = self.each(
                alpn_path, self.items(alpn_path, raw["alpn"], min_items=0), _alpn, "protocol"
            )
            if mode is Mode.HTTP and "h2" in alpn:
                self.add(
                    _join(alpn_path, raw["alpn"].index("h2")),
                    "h2 needs mode: tcp (mode: http relays HTTP/1.1 only)",
                )
        key_log_file = None
        if raw.get("key_log_file") is not None:
            written = self.writable_file(
                _join(path, "key_log_file"), raw["key_log_file"], "a key log file path"
            )
            key_log_file = Path(written) if written else None
        client_auth = self.client_auth(_join(path, "client_auth"), raw.get("client_auth"), mode)
        tickets = default_tickets
        if "tickets" in raw:
            tickets = self.tickets(_join(path, "tickets"), raw["tickets"], default_tickets)
        if not certificates or not groups or not suites:
            return None
        return TlsConfig(
            certificates=certificates,
            groups=groups,
            pq_policy=policy,
            cipher_suites=suites,
            alpn=alpn,
            key_log_file=key_log_file,
            client_auth=client_auth,
            tickets=tickets,
        )

    def client_auth(self, path: str, value: object, listener_mode: Mode) -> ClientAuthConfig:
        raw = self.section(
            path,
            value,
            ["mode", "ca", "allow", "identity_headers", "max_auth_age", "max_chain_depth"],
        )
        parsed = self.get(raw, path, "mode", _client_auth_mode, None)
        mode = parsed if parsed is not None else ClientAuth.NONE
        # A mode that did not parse is reported once; what goes with it is not judged by it.
        judged = parsed is not None or "mode" not in raw
        ca = None
        if raw.get("ca") is not None:
            ca = self.file(_join(path, "ca"), raw["ca"])
            if judged and mode is ClientAuth.NONE:
                self.add(_join(path, "ca"), "applies with mode optional or require only")
        elif mode is not ClientAuth.NONE:
            self.add(
                _join(path, "ca"),
                f"required with mode {mode.value} (the CA bundle that issues client certificates)",
            )
        allow = None
        if "allow" in raw:
            allow_path = _join(path, "allow")
            allow = self.each(
                allow_path, self.items(allow_path, raw["allow"]), _identity, "identity", repr
            )
            if judged and mode is ClientAuth.NONE:
                self.add(
                    allow_path,
                    "needs mode optional or require (without client certificates no client "
                    "has an identity, so everyone would get 403)",
                )
        if listener_mode is Mode.TCP and "identity_headers" in raw:
            self.add(
                _join(path, "identity_headers"),
                "applies to mode: http only (a tcp listener relays bytes, not requests)",
            )
        headers = self.identity_headers(
            _join(path, "identity_headers"), raw.get("identity_headers")
        )
        max_auth_age = self.get(raw, path, "max_auth_age", _max_auth_age, DEFAULT_MAX_AUTH_AGE)
        max_chain_depth = self.get(
            raw, path, "max_chain_depth", _max_chain_depth, DEFAULT_MAX_CHAIN_DEPTH
        )
        for key in ("max_auth_age", "max_chain_depth"):
            if key in raw and judged and mode is ClientAuth.NONE:
                self.add(_join(path, key), "applies with mode optional or require only")
        return ClientAuthConfig(
            mode=mode,
            ca=ca,
            allow=allow,
            identity_headers=headers,
            max_auth_age=max_auth_age,
            max_chain_depth=max_chain_depth,
        )

    def identity_headers(self, path: str, value: object) -> IdentityHeadersConfig:
        raw = self.section(path, value, ["subject", "uris", "dns"])
        d = IdentityHeadersConfig()
        subject = self.get(raw, path, "subject", _identity_header, d.subject)
        uris = self.get(raw, path, "uris", _identity_header, d.uris)
        dns = self.get(raw, path, "dns", _identity_header, d.dns)
        seen: dict[str, str] = {}
        for key, name in (("subject", subject), ("uris", uris), ("dns", dns)):
            if name is None:
                continue
            if name.lower() in seen:
                self.add(_join(path, key), f"{name} is already the {seen[name.lower()]} header")
            else:
                seen[name.lower()] = key
        return IdentityHeadersConfig(subject=subject, uris=uris, dns=dns)

    def tickets(self, path: str, value: object, default: TicketsConfig) -> TicketsConfig:
        """A tickets section; keys it does not set keep ``default``'s values (the top-level
        section, for a listener's)."""
        if value is False:
            return replace(default, enabled=False)
        keys = ["enabled", "per_handshake", "lifetime", "key_file", "rotation"]
        raw = self.section(path, value, keys)
        key_file = default.key_file
        if "key_file" in raw:
            key_file = None
            if raw["key_file"] is not None:
                key_file = self.secret_file(_join(path, "key_file"), raw["key_file"])
        tickets = TicketsConfig(
            enabled=self.get(raw, path, "enabled", _bool, default.enabled),
            per_handshake=self.get(
                raw, path, "per_handshake", _tickets_per_handshake, default.per_handshake
            ),
            lifetime=self.get(raw, path, "lifetime", _ticket_lifetime, default.lifetime),
            key_file=key_file,
            rotation=self.get(raw, path, "rotation", parse_duration, default.rotation),
        )
        if tickets.keys_kept > MAX_TICKET_KEYS_KEPT:
            where = "rotation" if "rotation" in raw or "lifetime" not in raw else "lifetime"
            self.add(
                _join(path, where),
                f"a lifetime of {format_duration(tickets.lifetime)} with a rotation of "
                f"{format_duration(tickets.rotation)} keeps {tickets.keys_kept} ticket keys "
                f"(at most {MAX_TICKET_KEYS_KEPT}): make rotation at least "
                f"{format_duration(math.ceil(tickets.lifetime / MAX_TICKET_KEYS_KEPT))}",
            )
        return tickets

    def secret_file(self, path: str, value: object) -> Path:
        """A file pqproxy reads, or creates when it is missing (its directory must then
        exist and be writable). Its contents and mode are checked when it is loaded."""
        if not isinstance(value, str) or not value.strip():
            self.add(path, f"expected a file path or null, got {_type_name(value)}")
            return Path()
        resolved = Path(os.path.abspath(self.base_dir / Path(value).expanduser()))
        if self.check_files:
            parent = resolved.parent
            if resolved.exists():
                if not resolved.is_file():
                    self.add(path, f"not a file: {resolved}")
                elif not os.access(resolved, os.R_OK):
                    self.add(path, f"not readable: {resolved}")
            elif not parent.is_dir():
                self.add(path, f"no such directory: {parent}")
            elif not os.access(parent, os.W_OK | os.X_OK):
                self.add(path, f"does not exist and cannot be created in {parent}")
        return resolved

    def certificate(self, path: str, value: object) -> CertificateConfig | None:
        raw = self.section(path, value, ["cert", "key", "server_names"], nullable=False)
        if not isinstance(value, dict):
            return None
        cert = (
            self.file(_join(path, "cert"), raw["cert"]) if self.require(raw, path, "cert") else None
        )
        key = self.file(_join(path, "key"), raw["key"]) if self.require(raw, path, "key") else None
        names = None
        if "server_names" in raw:
            names_path = _join(path, "server_names")
            names = self.each(
                names_path, self.items(names_path, raw["server_names"]), _server_name, "name"
            )
        if cert is None or key is None:
            return None
        return CertificateConfig(cert=cert, key=key, server_names=names)

    def listener_timeouts(self, path: str, value: object) -> ListenerTimeouts:
        raw = self.section(path, value, ["handshake", "header_read", "idle", "send"])
        d = ListenerTimeouts()
        return ListenerTimeouts(
            handshake=self.get(raw, path, "handshake", parse_duration, d.handshake),
            header_read=self.get(raw, path, "header_read", parse_duration, d.header_read),
            idle=self.get(raw, path, "idle", parse_duration, d.idle),
            send=self.get(raw, path, "send", parse_duration, d.send),
        )

    def limits(self, path: str, value: object) -> ListenerLimits:
        raw = self.section(
            path,
            value,
            [
                "max_header_bytes",
                "max_body_bytes",
                "max_connections",
                "backlog",
                "max_header_count",
                "request_buffering",
            ],
        )
        d = ListenerLimits()
        max_body_bytes = self.get(raw, path, "max_body_bytes", parse_size, d.max_body_bytes)
        request_buffering = self.get(
            raw, path, "request_buffering", _size_or_zero, d.request_buffering
        )
        if request_buffering > max_body_bytes:
            self.add(
                _join(path, "request_buffering"),
                f"{request_buffering} bytes is larger than max_body_bytes ({max_body_bytes})",
            )
        return ListenerLimits(
            max_header_bytes=self.get(
                raw, path, "max_header_bytes", parse_size, d.max_header_bytes
            ),
            max_body_bytes=max_body_bytes,
            max_connections=self.get(
                raw, path, "max_connections", lambda v: _int(v, 1), d.max_connections
            ),
            backlog=self.get(raw, path, "backlog", _backlog, d.backlog),
            max_header_count=self.get(
                raw, path, "max_header_count", lambda v: _int(v, 1), d.max_header_count
            ),
            request_buffering=request_buffering,
        )

    def headers(self, path: str, value: object) -> HeaderConfig:
        keys = [
            "x_forwarded_for",
            "x_forwarded_proto",
            "x_forwarded_host",
            "via",
            "tls_info",
            "underscore_headers",
            "forwarded_for",
        ]
        raw = self.section(path, value, keys)
        d = HeaderConfig()
        return HeaderConfig(
            x_forwarded_for=self.get(raw, path, "x_forwarded_for", _bool, d.x_forwarded_for),
            x_forwarded_proto=self.get(raw, path, "x_forwarded_proto", _bool, d.x_forwarded_proto),
            x_forwarded_host=self.get(raw, path, "x_forwarded_host", _bool, d.x_forwarded_host),
            via=self.get(raw, path, "via", _bool, d.via),
            tls_info=self.get(raw, path, "tls_info", _tls_info, d.tls_info),
            underscore_headers=self.get(
                raw, path, "underscore_headers", _enum(UnderscoreHeaders), d.underscore_headers
            ),
            forwarded_for=self.get(
                raw, path, "forwarded_for", _enum(ForwardedFor), d.forwarded_for
            ),
        )

    def upstreams(self, value: object) -> tuple[UpstreamConfig, ...]:
        path = "upstreams"
        if not isinstance(value, dict):
            self.add(path, f"expected a mapping of pool names to pools, got {_type_name(value)}")
            return ()
        if not value:
            self.add(path, "needs at least 1 pool")
        pools: list[UpstreamConfig] = []
        for name, raw in value.items():
            pool_path = _join(path, str(name))
            try:
                _name(name, "a pool name")
            except ValueError as exc:
                self.add(pool_path, str(exc))
                continue
            pool = self.upstream(pool_path, str(name), raw)
            if pool is not None:
                pools.append(pool)
        return tuple(pools)

    def upstream(self, path: str, name: str, value: object) -> UpstreamConfig | None:
        keys = [
            "servers",
            "balance",
            "timeouts",
            "keepalive",
            "health_check",
            "passive",
            "retries",
        ]
        raw = self.section(path, value, keys, nullable=False)
        if not isinstance(value, dict):
            return None
        servers: tuple[UpstreamServer, ...] = ()
        if self.require(raw, path, "servers"):
            servers_path = _join(path, "servers")
            servers = self.each(
                servers_path, self.items(servers_path, raw["servers"]), parse_upstream_url, "server"
            )
        d = UpstreamConfig(name, servers)
        timeouts_path = _join(path, "timeouts")
        raw_timeouts = self.section(timeouts_path, raw.get("timeouts"), ["connect", "read"])
        timeouts = UpstreamTimeouts(
            connect=self.get(raw_timeouts, timeouts_path, "connect", parse_duration, 5.0),
            read=self.get(raw_timeouts, timeouts_path, "read", parse_duration, 600.0),
        )
        keepalive_path = _join(path, "keepalive")
        raw_keepalive = self.section(
            keepalive_path, raw.get("keepalive"), ["max_idle_per_server", "idle_timeout"]
        )
        keepalive = KeepAliveConfig(
            max_idle_per_server=self.get(
                raw_keepalive, keepalive_path, "max_idle_per_server", lambda v: _int(v, 0), 32
            ),
            idle_timeout=self.get(
                raw_keepalive, keepalive_path, "idle_timeout", parse_duration, 60.0
            ),
        )
        health = d.health_check
        if "health_check" in raw:
            health = self.health_check(_join(path, "health_check"), raw["health_check"])
        passive = d.passive
        if "passive" in raw:
            passive = self.passive(_join(path, "passive"), raw["passive"])
        if not servers:
            return None
        return UpstreamConfig(
            name=name,
            servers=servers,
            balance=self.get(raw, path, "balance", _enum(Balance), d.balance),
            timeouts=timeouts,
            keepalive=keepalive,
            health_check=health,
            passive=passive,
            retries=self.get(raw, path, "retries", lambda v: _int(v, 0), d.retries),
        )

    def health_check(self, path: str, value: object) -> HealthCheckConfig | None:
        if value is None or value is False:
            return None  # active checks off: only passive ejection judges the servers
        keys = ["path", "interval", "timeout", "healthy_threshold", "unhealthy_threshold"]
        raw = self.section(path, value, keys)
        d = HealthCheckConfig()
        check = HealthCheckConfig(
            path=self.get(raw, path, "path", _request_path, d.path),
            interval=self.get(raw, path, "interval", parse_duration, d.interval),
            timeout=self.get(raw, path, "timeout", parse_duration, d.timeout),
            healthy_threshold=self.get(raw, path, "healthy_threshold", lambda v: _int(v, 1), 2),
            unhealthy_threshold=self.get(raw, path, "unhealthy_threshold", lambda v: _int(v, 1), 2),
        )
        if check.timeout > check.interval:
            # Probes would pile up on a server that hangs: at most one is in flight.
            self.add(_join(path, "timeout"), "must not be longer than interval")
        return check

    def passive(self, path: str, value: object) -> PassiveConfig | None:
        if value is None or value is False:
            return None
        raw = self.section(path, value, ["max_fails", "ejection_time"])
        d = PassiveConfig()
        return PassiveConfig(
            max_fails=self.get(raw, path, "max_fails", lambda v: _int(v, 1), d.max_fails),
            ejection_time=self.get(raw, path, "ejection_time", parse_duration, d.ejection_time),
        )

    def check_addresses(
        self, listeners: Sequence[tuple[int, ListenerConfig]], admin: ServerAddress | None
    ) -> None:
        """Unique names, and addresses that can all be bound at once."""
        for position, (index, listener) in enumerate(listeners):
            path = _join("listeners", index)
            for earlier_index, earlier in listeners[:position]:
                if earlier.name == listener.name:
                    self.add(
                        _join(path, "name"),
                        f"{listener.name!r} is already the name of listeners[{earlier_index}]",
                    )
                if addresses_collide(earlier.listen, listener.listen):
                    self.add(
                        _join(path, "listen"),
                        f"{listener.listen} collides with listeners[{earlier_index}] "
                        f"({earlier.name}) on {earlier.listen}",
                    )
            if admin is not None and addresses_collide(admin, listener.listen):
                self.add(
                    "admin",
                    f"{admin} collides with listeners[{index}] ({listener.name}) "
                    f"on {listener.listen}",
                )


def _enum(kind: type[Any]) -> Callable[[object], Any]:
    def parse(value: object) -> Any:
        return kind(_choice(value, [m.value for m in kind]))

    return parse


def _optional_address(value: object) -> ServerAddress | None:
    if value is None or value is False:
        return None
    return parse_address(value)


def _pq_policy(value: object) -> PqPolicy:
    # YAML 1.1 reads an unquoted `off` as false.
    if value is False:
        return PqPolicy.OFF
    return PqPolicy(_choice(value, [p.value for p in PqPolicy]))


def _group(value: object) -> int:
    known = _known_groups()
    if isinstance(value, str):
        member = _by_name(known, lambda g: g.name).get(value.strip().lower())
        if member is not None:
            return member
    names = ", ".join(g.name for g in known)
    shown = repr(value) if isinstance(value, str) else _type_name(value)
    raise ValueError(f"unknown group {shown} (known: {names})")


def _group_name(group: int) -> str:
    return NamedGroup(group).name


def _suite_name(suite: int) -> str:
    return CipherSuite(suite).name


def _cipher_suite(value: object) -> int:
    if isinstance(value, str):
        member = _by_name(CipherSuite, lambda s: s.name).get(value.strip().lower())
        if member is not None:
            return member
    names = ", ".join(s.name for s in CipherSuite)
    shown = repr(value) if isinstance(value, str) else _type_name(value)
    raise ValueError(f"unknown cipher suite {shown} (known: {names})")


def _alpn(value: object) -> str:
    # RFC 7301 §3.1: 1 to 255 bytes; printable ASCII keeps logs and headers sane.
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 255
        or not all(0x21 <= ord(c) <= 0x7E for c in value)
    ):
        raise ValueError(f"not an ALPN protocol name (e.g. http/1.1, h2): {_type_name(value)}")
    return value


def _tls_info(value: object) -> str | None:
    if value is None or value is False:
        return None
    if value is True:
        return DEFAULT_TLS_INFO_PREFIX
    if not isinstance(value, str) or not _TOKEN_RE.match(value):
        raise ValueError(
            f"expected a header name prefix such as {DEFAULT_TLS_INFO_PREFIX}, or null to "
            f"send none; got {_type_name(value)}"
        )
    return value


def _client_auth_mode(value: object) -> ClientAuth:
    # YAML 1.1 reads an unquoted `off`/`no` as false: the operator meant none.
    if value is False:
        return ClientAuth.NONE
    return ClientAuth(_choice(value, [m.value for m in ClientAuth]))


def _identity(value: object) -> str:
    # Compared exactly with what the certificate says; a control character could never
    # match one and would only hide in a log line.
    if not isinstance(value, str) or not value or not value.isprintable():
        raise ValueError(
            "expected an identity: a URI (spiffe://...), a DNS name or an RFC 4514 subject "
            f"(CN=...,O=...); got {_type_name(value)}"
        )
    if value != value.strip():
        raise ValueError(f"{value!r}: leading or trailing spaces never match a certificate")
    return value


def _identity_header(value: object) -> str | None:
    if value is None or value is False:
        return None
    if not isinstance(value, str) or not _TOKEN_RE.match(value):
        raise ValueError(f"expected a header name or null, got {_type_name(value)}")
    if value.lower() in _RESERVED_HEADER_NAMES:
        raise ValueError(f"{value} is a header the proxy manages itself; choose another name")
    return value


def _max_auth_age(value: object) -> int:
    seconds = parse_duration(value)
    if not seconds.is_integer():
        raise ValueError(f"{value!r}: must be a whole number of seconds")
    if seconds > MAX_AUTH_AGE:
        # A ticket lives at most 7 days (RFC 8446 §4.6.1): so does a resumed identity.
        raise ValueError(f"{value!r}: at most 7 days (RFC 8446 §4.6.1)")
    return int(seconds)


def _max_chain_depth(value: object) -> int:
    depth = _int(value, 1)
    if depth > MAX_CHAIN_LENGTH:
        raise ValueError(f"{depth} is too large (maximum {MAX_CHAIN_LENGTH})")
    return depth


def _tickets_per_handshake(value: object) -> int:
    count = _int(value, 0)
    if count > MAX_TICKETS_PER_HANDSHAKE:
        raise ValueError(f"{count} is too large (maximum {MAX_TICKETS_PER_HANDSHAKE})")
    return count


def _ticket_lifetime(value: object) -> int:
    seconds = parse_duration(value)
    # NewSessionTicket carries whole seconds (RFC 8446 §4.6.1), at most seven days.
    if not seconds.is_integer():
        raise ValueError(f"{value!r}: must be a whole number of seconds")
    if seconds > MAX_TICKET_LIFETIME:
        raise ValueError(f"{value!r}: at most 7 days (RFC 8446 §4.6.1)")
    return int(seconds)


def _request_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c.isspace() for c in value):
        raise ValueError(f"expected a request path starting with '/', got {_type_name(value)}")
    return value


def _ip_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None  # a name may resolve to either family


def addresses_collide(a: ServerAddress, b: ServerAddress) -> bool:
    """Whether binding both would fail or, worse with SO_REUSEPORT, silently share a port.

    Port 0 (any free port) never collides. A wildcard (0.0.0.0, ::) covers every address of
    its family; asyncio binds IPv6 sockets v6-only, so 0.0.0.0 and :: do not collide.
    """
    if a.port != b.port or a.port == 0:
        return False
    if a.host == b.host:
        return True
    for x, y in ((a, b), (b, a)):
        version = _ip_version(x.host)
        if version is not None and ipaddress.ip_address(x.host).is_unspecified:
            if _ip_version(y.host) in (version, None):
                return True
    return False


# -- YAML ----------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys from a << merge may be overridden; that is its purpose
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"key {key!r} is given twice",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# An unquoted "[::1]:8443" is the likeliest YAML syntax error in this file: it opens a list.
_UNQUOTED_IPV6_RE = re.compile(r"(?<![\"'])\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\]:\d+")


def _yaml_problem(exc: yaml.YAMLError, source: str, text: str) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = exc.problem or "invalid YAML"
        if exc.context:
            what = f"{exc.context}: {what}"
        lines = text.splitlines()
        if mark.line < len(lines) and _UNQUOTED_IPV6_RE.search(lines[mark.line]):
            what += '; quote an IPv6 address: "[::1]:8443"'
        return f"{source}:{mark.line + 1}:{mark.column + 1}: {what}"
    return f"{source}: invalid YAML: {exc}"


def load_yaml(text: str, source: str) -> object:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc, source, text)], source) from None


# -- entry points --------------------------------------------------------------------------------


def parse_config(
    data: object,
    base_dir: Path,
    source: str = "<config>",
    *,
    check_files: bool = True,
    available_cpus: Callable[[], int] = cpus.available_cpus,
) -> Config:
    """Validate the raw structure of a config file.

    Relative certificate paths are resolved against ``base_dir``; with ``check_files`` the
    files must exist (they are not read). ``workers: auto`` (also the default) becomes
    ``available_cpus()``.
    """
    parser = _Parser(base_dir, check_files, available_cpus)
    config = parser.config(data, source)
    if config is None:
        raise ConfigError([f"{path}: {message}" for path, message in parser.problems], source)
    return config


def load_config(path: Path, *, check_files: bool = True) -> Config:
    """Read, parse and validate a YAML config file."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"], source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text: {exc.reason}"], source) from None
    data = load_yaml(text, source)
    base_dir = Path(os.path.abspath(path)).parent
    return parse_config(data, base_dir, source, check_files=check_files)


# What each keyword of config_from_flags sets, as a path into the raw structure; the error for
# a bad value names the flag (--idle-timeout), not the path.
_L = ("listeners", 0)
_U = ("upstreams", "default")
_FLAG_PATHS: dict[str, tuple[str | int, ...]] = {
    "mode": (*_L, "mode"),
    "groups": (*_L, "tls", "groups"),
    "pq_policy": (*_L, "tls", "pq_policy"),
    "cipher_suites": (*_L, "tls", "cipher_suites"),
    "alpn": (*_L, "tls", "alpn"),
    "handshake_timeout": (*_L, "timeouts", "handshake"),
    "header_read_timeout": (*_L, "timeouts", "header_read"),
    "idle_timeout": (*_L, "timeouts", "idle"),
    "max_header_bytes": (*_L, "limits", "max_header_bytes"),
    "max_body_bytes": (*_L, "limits", "max_body_bytes"),
    "max_connections": (*_L, "limits", "max_connections"),
    "tls_info": (*_L, "headers", "tls_info"),
    "balance": (*_U, "balance"),
    "upstream_connect_timeout": (*_U, "timeouts", "connect"),
    "upstream_read_timeout": (*_U, "timeouts", "read"),
    "health_check": (*_U, "health_check"),
    "retries": (*_U, "retries"),
    "workers": ("workers",),
    "admin": ("admin",),
    "drain_timeout": ("drain_timeout",),
    "log_level": ("logging", "level"),
    "access_log": ("logging", "access_log"),
    "log_format": ("logging", "format"),
}
_LIST_FLAGS = ("groups", "cipher_suites", "alpn")


def _dotted(parts: Sequence[str | int]) -> str:
    path = ""
    for part in parts:
        path = _join(path, part)
    return path


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _split_commas(value: object) -> object:
    # Flags give "a,b" or a repeated flag's list of such strings; YAML gives a list.
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        return [p.strip() for v in value for p in str(v).split(",") if p.strip()]
    return value


def config_from_flags(
    listen: str, cert: Path, key: Path, upstreams: Sequence[str], **overrides: Any
) -> Config:
    """The single-listener config of ``pqproxy serve`` without ``--config``.

    ``overrides`` take the names in ``_FLAG_PATHS`` (``groups``, ``pq_policy``, ``alpn``,
    ``idle_timeout``, ``admin``, …) with values as a config file would hold them. Unlike a
    file, no admin endpoint and no active health check unless asked for: flags describe one
    proxy in front of one model server, whose health path nobody has told us. An override of
    None means the flag was not given (to turn ``tls_info`` off, pass False).
    """
    unknown = sorted(set(overrides) - set(_FLAG_PATHS))
    if unknown:
        raise TypeError(f"config_from_flags: unknown override(s): {', '.join(unknown)}")
    listener: dict[str, Any] = {
        "name": "main",
        "listen": listen,
        "upstream": "default",
        "tls": {"certificates": [{"cert": os.fspath(cert), "key": os.fspath(key)}]},
    }
    data: dict[str, Any] = {
        "admin": None,
        # One process unless --workers says otherwise: "auto" is the default of a file only.
        "workers": 1,
        "listeners": [listener],
        "upstreams": {"default": {"servers": _as_list(upstreams), "health_check": None}},
    }
    flag_names = {
        _dotted((*_L, "listen")): "--listen",
        _dotted((*_L, "tls", "certificates", 0, "cert")): "--cert",
        _dotted((*_L, "tls", "certificates", 0, "key")): "--key",
        _dotted((*_U, "servers")): "--upstream",
    }
    for name, value in overrides.items():
        if value is None:
            continue
        parts = _FLAG_PATHS[name]
        if name in _LIST_FLAGS:
            value = _split_commas(value)
        if name == "health_check" and isinstance(value, str):
            value = {"path": value}
        node: Any = data
        for part in parts[:-1]:
            node = node[part] if isinstance(part, int) else node.setdefault(part, {})
        node[parts[-1]] = value
        flag_names[_dotted(parts)] = "--" + name.replace("_", "-")
    parser = _Parser(Path.cwd(), check_files=True)
    config = parser.config(data, "<command line>")
    if config is None:
        raise ConfigError(
            [f"{_rename(path, flag_names)}: {message}" for path, message in parser.problems],
            "<command line>",
        )
    return config


def _rename(path: str, names: Mapping[str, str]) -> str:
    # "--upstream", not "--upstream[1]": a flag has no index, and the message quotes the value.
    for prefix in sorted(names, key=len, reverse=True):
        if path == prefix or path.startswith((prefix + "[", prefix + ".")):
            return names[prefix]
    return path


def apply_overrides(
    config: Config,
    *,
    listen: str | None = None,
    upstreams: Sequence[str] | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    workers: int | str | None = None,
    admin: str | None = None,
    check_files: bool = True,
) -> Config:
    """Command-line flags over a config file.

    ``listen`` replaces the first listener's address, ``upstreams`` the servers of the first
    listener's pool, ``cert``/``key`` the first listener's first certificate; ``admin="off"``
    turns the admin endpoint off. None leaves a setting as the file has it.
    """
    parser = _Parser(Path.cwd(), check_files)
    first = config.listeners[0]
    new_first = first
    if listen is not None:
        address = parser.get({"--listen": listen}, "", "--listen", parse_address, None)
        if address is not None:
            new_first = replace(new_first, listen=address)
    if cert is not None or key is not None:
        default_cert = first.tls.certificates[0]
        new_cert = replace(
            default_cert,
            cert=parser.file("--cert", os.fspath(cert)) if cert is not None else default_cert.cert,
            key=parser.file("--key", os.fspath(key)) if key is not None else default_cert.key,
        )
        new_tls = replace(first.tls, certificates=(new_cert, *first.tls.certificates[1:]))
        new_first = replace(new_first, tls=new_tls)
    pools = config.upstreams
    if upstreams is not None:
        servers = parser.each(
            "--upstream", parser.items("--upstream", list(upstreams)), parse_upstream_url, "server"
        )
        if servers:
            pools = tuple(
                replace(pool, servers=servers) if pool.name == first.upstream else pool
                for pool in pools
            )
    new_workers, workers_auto = config.workers, config.workers_auto
    if workers is not None:
        value = parser.get({"--workers": workers}, "", "--workers", _workers, _FILE_WORKERS)
        new_workers, workers_auto = parser.resolve_workers(value), value == AUTO
    new_admin = config.admin
    if admin is not None:
        new_admin = parser.get(
            {"--admin": None if admin == "off" else admin}, "", "--admin", _optional_address, None
        )
    listeners = (new_first, *config.listeners[1:])
    if not parser.problems:
        # A new address may now collide; the file's own listeners name the paths.
        parser.check_addresses(list(enumerate(listeners)), new_admin)
    if parser.problems:
        names = {"--upstream": "--upstream"}
        raise ConfigError(
            [f"{_rename(path, names)}: {message}" for path, message in parser.problems],
            "<command line>",
        )
    return replace(
        config,
        listeners=listeners,
        upstreams=pools,
        workers=new_workers,
        workers_auto=workers_auto,
        admin=new_admin,
    )


# -- summary -----------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    if seconds < 1 and (seconds * 1000).is_integer():
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def describe(config: Config) -> str:
    """A few lines for an operator: what listens where, and where it relays to."""
    admin = f"admin on {config.admin}" if config.admin else "no admin endpoint"
    lines = [
        f"{_plural(len(config.listeners), 'listener')}, "
        f"{_plural(len(config.upstreams), 'upstream pool')}, "
        f"{_plural(config.workers, 'worker')}{' (auto)' if config.workers_auto else ''}, "
        f"{admin}, "
        f"drain {format_duration(config.drain_timeout)}"
    ]
    for listener in config.listeners:
        tls = listener.tls
        groups = ",".join(NamedGroup(g).name for g in tls.groups)
        alpn = ",".join(tls.alpn) or "any"
        lines.append(
            f"  listener {listener.name}: {listener.listen} mode {listener.mode.value} "
            f"-> {listener.upstream}; groups {groups}; pq_policy {tls.pq_policy.value}; "
            f"alpn {alpn}; {_plural(len(tls.certificates), 'certificate')}"
            f"; client auth {_describe_client_auth(tls.client_auth)}"
            f"; tickets {_describe_tickets(tls.tickets)}"
            + (f"; key log {tls.key_log_file} (debugging only)" if tls.key_log_file else "")
        )
    for pool in config.upstreams:
        servers = ", ".join(s.url for s in pool.servers)
        health = (
            f"health {pool.health_check.path} every {format_duration(pool.health_check.interval)}"
            if pool.health_check
            else "no active health check"
        )
        lines.append(
            f"  upstream {pool.name}: {servers} ({pool.balance.value}; "
            f"read timeout {format_duration(pool.timeouts.read)}; {health})"
        )
    return "\n".join(lines)


def _describe_client_auth(client_auth: ClientAuthConfig) -> str:
    if client_auth.mode is ClientAuth.NONE:
        return "none"
    allow = ""
    if client_auth.allow is not None:
        count = len(client_auth.allow)
        allow = f", allow {count} {'identity' if count == 1 else 'identities'}"
    return f"{client_auth.mode.value} (CA {client_auth.ca}{allow})"


def _describe_tickets(tickets: TicketsConfig) -> str:
    if not tickets.enabled or tickets.per_handshake == 0:
        return "off"
    keys = f"key file {tickets.key_file}" if tickets.key_file else "generated key"
    return (
        f"{tickets.per_handshake} per handshake, lifetime {format_duration(tickets.lifetime)}, "
        f"{keys} rotated every {format_duration(tickets.rotation)}"
    )


def check_config_main(path: str) -> int:
    """``pqproxy check-config FILE``: 0 and a summary if the file is usable, else 2."""
    try:
        config = load_config(Path(path))
    except ConfigError as exc:
        count = _plural(len(exc.problems), "problem")
        print(f"{path}: invalid configuration ({count}):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(f"OK: {describe(config)}")
    return 0
