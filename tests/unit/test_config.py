"""The YAML configuration: defaults, formats, every error path, flags and the shipped files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pqproxy.config import (
    Balance,
    CertificateConfig,
    Config,
    ConfigError,
    HeaderConfig,
    HealthCheckConfig,
    KeepAliveConfig,
    ListenerLimits,
    ListenerTimeouts,
    LogFormat,
    LoggingConfig,
    Mode,
    PassiveConfig,
    ServerAddress,
    UpstreamServer,
    UpstreamTimeouts,
    addresses_collide,
    apply_overrides,
    check_config_main,
    config_from_flags,
    describe,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from pqproxy.cpus import available_cpus
from pqproxy.crypto.certs import load_certified_key
from pqproxy.devcert import generate_dev_certs
from pqproxy.tls.enums import CipherSuite, NamedGroup
from pqproxy.tls.server import DEFAULT_CIPHER_SUITES, DEFAULT_GROUPS, PqPolicy

REPO_ROOT = Path(__file__).resolve().parents[2]
KNOWN_GROUPS = (
    "X25519MLKEM768, SecP256r1MLKEM768, SecP384r1MLKEM1024, secp256r1, secp384r1, secp521r1, "
    "x25519, x448, ffdhe2048, ffdhe3072, ffdhe4096, ffdhe6144, ffdhe8192"
)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A directory holding (empty) certificate and key files: loading only checks they exist."""
    (tmp_path / "server.pem").write_text("")
    (tmp_path / "server.key").write_text("")
    return tmp_path


def minimal(**listener: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "listen": "127.0.0.1:8443",
        "upstream": "demo",
        "tls": {"certificates": [{"cert": "server.pem", "key": "server.key"}]},
    }
    entry.update(listener)
    return {"listeners": [entry], "upstreams": {"demo": {"servers": ["http://127.0.0.1:8000"]}}}


def problems(data: object, base_dir: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir)
    return info.value.problems


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# -- defaults ---------------------------------------------------------------------------------


def test_minimal_config_gets_the_documented_defaults(base: Path) -> None:
    config = parse_config(minimal(), base)
    # Issue 19: a file without `workers` runs one worker per CPU this process may use.
    assert config.workers == available_cpus() and config.workers_auto
    assert config.admin == ServerAddress("127.0.0.1", 9100)
    assert config.logging == LoggingConfig(level="info", access_log=True, format=LogFormat.JSON)
    assert config.drain_timeout == 30.0
    (listener,) = config.listeners
    assert listener.name == "listener0"
    assert listener.listen == ServerAddress("127.0.0.1", 8443)
    assert listener.mode is Mode.HTTP
    assert listener.upstream == "demo"
    assert listener.tls.certificates == (
        CertificateConfig(cert=base / "server.pem", key=base / "server.key", server_names=None),
    )
    assert listener.tls.groups == DEFAULT_GROUPS
    assert listener.tls.pq_policy is PqPolicy.PREFER
    assert listener.tls.cipher_suites == DEFAULT_CIPHER_SUITES
    assert listener.tls.alpn == ("http/1.1",)
    assert listener.timeouts == ListenerTimeouts(handshake=10.0, header_read=30.0, idle=75.0)
    assert listener.limits == ListenerLimits(
        max_header_bytes=32 * 1024, max_body_bytes=100 * 1024 * 1024, max_connections=10000
    )
    assert listener.headers == HeaderConfig(
        x_forwarded_for=True,
        x_forwarded_proto=True,
        x_forwarded_host=True,
        via=True,
        tls_info="X-PQ-TLS",
    )
    (pool,) = config.upstreams
    assert config.upstream_for(listener) is pool
    assert pool.name == "demo"
    assert pool.servers == (UpstreamServer("http://127.0.0.1:8000", "127.0.0.1", 8000),)
    assert pool.balance is Balance.LEAST_OUTSTANDING
    assert pool.timeouts == UpstreamTimeouts(connect=5.0, read=600.0)
    assert pool.keepalive == KeepAliveConfig(max_idle_per_server=32, idle_timeout=60.0)
    assert pool.health_check == HealthCheckConfig(
        path="/health", interval=5.0, timeout=2.0, healthy_threshold=2, unhealthy_threshold=2
    )
    assert pool.passive == PassiveConfig(max_fails=3, ejection_time=10.0)
    assert pool.retries == 2


def test_tcp_mode_defaults_to_any_alpn(base: Path) -> None:
    config = parse_config(minimal(mode="tcp"), base)
    assert config.listeners[0].mode is Mode.TCP
    assert config.listeners[0].tls.alpn == ()


def test_config_is_frozen(base: Path) -> None:
    config = parse_config(minimal(), base)
    with pytest.raises(AttributeError):
        config.workers = 2  # type: ignore[misc]


def test_upstream_lookup_by_unknown_name_is_a_key_error(base: Path) -> None:
    with pytest.raises(KeyError):
        parse_config(minimal(), base).upstream("nope")


def test_a_full_config_is_read_as_written(base: Path) -> None:
    path = write(
        base / "full.yaml",
        """
        workers: 4
        admin: null
        logging: {level: DEBUG, access_log: false, format: text}
        drain_timeout: 0
        listeners:
          - name: grpc
            listen: "[::1]:9443"
            mode: tcp
            upstream: triton
            tls:
              certificates:
                - cert: server.pem
                  key: server.key
                  server_names: [API.Example.com., "*.example.org"]
                - {cert: server.pem, key: server.key}
              groups: [x25519mlkem768, X25519]
              pq_policy: off
              cipher_suites: [tls_chacha20_poly1305_sha256]
              alpn: [h2]
            timeouts: {handshake: 2s, header_read: 1m, idle: 1h}
            limits: {max_header_bytes: 8KiB, max_body_bytes: 10MB, max_connections: 5}
        upstreams:
          triton:
            servers: ["http://[::1]:8001/", http://localhost]
            balance: round_robin
            timeouts: {connect: 250ms, read: 1h}
            keepalive: {max_idle_per_server: 0, idle_timeout: 5s}
            health_check: null
            passive: {max_fails: 1, ejection_time: 1m}
            retries: 0
        """,
    )
    config = load_config(path)
    assert (config.workers, config.admin, config.drain_timeout) == (4, None, 0.0)
    assert config.logging == LoggingConfig(level="debug", access_log=False, format=LogFormat.TEXT)
    assert config.source == str(path)
    (listener,) = config.listeners
    assert listener.name == "grpc"
    assert listener.listen == ServerAddress("::1", 9443)
    assert str(listener.listen) == "[::1]:9443"
    tls = listener.tls
    assert tls.certificates[0].server_names == ("api.example.com", "*.example.org")
    assert tls.certificates[1].server_names is None
    assert tls.groups == (0x11EC, 0x001D)
    assert tls.groups == (NamedGroup.X25519MLKEM768, NamedGroup.x25519)
    # An unquoted `off` is YAML 1.1 for false; it still means the policy named off.
    assert tls.pq_policy is PqPolicy.OFF
    assert tls.cipher_suites == (CipherSuite.TLS_CHACHA20_POLY1305_SHA256,)
    assert tls.alpn == ("h2",)
    assert listener.timeouts == ListenerTimeouts(handshake=2.0, header_read=60.0, idle=3600.0)
    assert listener.limits == ListenerLimits(
        max_header_bytes=8192, max_body_bytes=10_000_000, max_connections=5
    )
    pool = config.upstream("triton")
    assert pool.servers == (
        UpstreamServer("http://[::1]:8001", "::1", 8001),
        UpstreamServer("http://localhost:80", "localhost", 80),
    )
    assert pool.balance is Balance.ROUND_ROBIN
    assert pool.timeouts == UpstreamTimeouts(connect=0.25, read=3600.0)
    assert pool.keepalive == KeepAliveConfig(max_idle_per_server=0, idle_timeout=5.0)
    assert pool.health_check is None
    assert pool.passive == PassiveConfig(max_fails=1, ejection_time=60.0)
    assert pool.retries == 0


@pytest.mark.parametrize("value", [None, False])
def test_tls_info_can_be_turned_off(base: Path, value: object) -> None:
    config = parse_config(minimal(headers={"tls_info": value, "via": False}), base)
    assert config.listeners[0].headers.tls_info is None
    assert config.listeners[0].headers.via is False


def test_tls_info_takes_a_prefix(base: Path) -> None:
    config = parse_config(minimal(headers={"tls_info": "X-Quantum"}), base)
    assert config.listeners[0].headers.tls_info == "X-Quantum"


def test_relative_certificate_paths_are_relative_to_the_config_file(
    base: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    (base / "conf").mkdir()
    write(base / "conf" / "pqproxy.yaml", _yaml_of(minimal(), cert_prefix="../"))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_config(Path(base / "conf" / "pqproxy.yaml"))
    certificate = config.listeners[0].tls.certificates[0]
    assert certificate.cert == base / "server.pem"
    assert certificate.key == base / "server.key"


def _yaml_of(data: dict[str, Any], cert_prefix: str = "") -> str:
    import yaml

    for listener in data["listeners"]:
        for cert in listener["tls"]["certificates"]:
            cert["cert"] = cert_prefix + cert["cert"]
            cert["key"] = cert_prefix + cert["key"]
    return yaml.safe_dump(data)


# -- durations and sizes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (2, 2.0),
        (1.5, 1.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("0.25s", 0.25),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("90", 90.0),
        (" 10 s ", 10.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["5 parsecs", "1d", "-1s", "s", "", 0, "0s", -3, True, None, [1], float("inf")]
)
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_zero_duration_only_where_allowed(base: Path) -> None:
    assert parse_duration("0s", allow_zero=True) == 0.0
    with pytest.raises(ValueError):
        parse_duration("-1s", allow_zero=True)
    assert parse_config({**minimal(), "drain_timeout": "0s"}, base).drain_timeout == 0.0
    assert problems(minimal(timeouts={"idle": 0}), base) == [
        "listeners[0].timeouts.idle: 0: must be more than 0"
    ]


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1024, 1024),
        ("100B", 100),
        ("64KiB", 65536),
        ("1MiB", 1 << 20),
        ("1GiB", 1 << 30),
        ("2KB", 2000),
        ("10MB", 10_000_000),
        ("1GB", 10**9),
        ("1.5KiB", 1536),
        ("32kib", 32768),
    ],
)
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["10XB", "MiB", "", "1 MiB MiB", 0, -5, 1.5, True, None, "0KiB"])
def test_bad_sizes(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.5, "500ms"), (30.0, "30s"), (300.0, "5m"), (3600.0, "1h"), (90, "90s")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# -- errors -----------------------------------------------------------------------------------


def test_unknown_top_level_key(base: Path) -> None:
    assert problems({**minimal(), "workerz": 2}, base) == [
        "workerz: unknown key (did you mean 'workers'?)"
    ]


def test_unknown_nested_keys(base: Path) -> None:
    data = minimal()
    data["listeners"][0]["tls"]["grups"] = ["x25519"]
    data["upstreams"]["demo"]["health_check"] = {"zzz": 1}
    assert problems(data, base) == [
        "upstreams.demo.health_check.zzz: unknown key (expected: path, interval, timeout, "
        "healthy_threshold, unhealthy_threshold)",
        "listeners[0].tls.grups: unknown key (did you mean 'groups'?)",
    ]


def test_unknown_group_names_every_known_group(base: Path) -> None:
    tls = {
        "certificates": [{"cert": "server.pem", "key": "server.key"}],
        "groups": ["X25519MLKEM768", "x25519", "X25519Kyber768"],
    }
    assert problems(minimal(tls=tls), base) == [
        f"listeners[0].tls.groups[2]: unknown group 'X25519Kyber768' (known: {KNOWN_GROUPS})"
    ]


def test_group_listed_twice(base: Path) -> None:
    tls = {
        "certificates": [{"cert": "server.pem", "key": "server.key"}],
        "groups": ["x25519", "X25519"],
    }
    assert problems(minimal(tls=tls), base) == [
        "listeners[0].tls.groups[1]: group x25519 is listed twice"
    ]


def test_unknown_cipher_suite(base: Path) -> None:
    tls = {
        "certificates": [{"cert": "server.pem", "key": "server.key"}],
        "cipher_suites": ["TLS_AES_128_CCM_SHA256"],
    }
    (problem,) = problems(minimal(tls=tls), base)
    assert problem.startswith(
        "listeners[0].tls.cipher_suites[0]: unknown cipher suite 'TLS_AES_128_CCM_SHA256' "
        "(known: TLS_AES_128_GCM_SHA256,"
    )


@pytest.mark.parametrize("policy", ["maybe", True, 1])
def test_bad_pq_policy(base: Path, policy: object) -> None:
    tls = {"certificates": [{"cert": "server.pem", "key": "server.key"}], "pq_policy": policy}
    (problem,) = problems(minimal(tls=tls), base)
    assert problem.startswith("listeners[0].tls.pq_policy: expected one of prefer, require, off")


@pytest.mark.parametrize(
    ("policy", "groups", "message"),
    [
        ("require", ["x25519", "secp256r1"], "require: groups lists no hybrid group"),
        ("off", ["X25519MLKEM768"], "off: groups lists no classical group"),
    ],
)
def test_pq_policy_must_leave_a_group(
    base: Path, policy: str, groups: list[str], message: str
) -> None:
    tls = {
        "certificates": [{"cert": "server.pem", "key": "server.key"}],
        "pq_policy": policy,
        "groups": groups,
    }
    assert problems(minimal(tls=tls), base) == [f"listeners[0].tls.pq_policy: {message}"]


def test_h2_needs_tcp_mode(base: Path) -> None:
    tls = {
        "certificates": [{"cert": "server.pem", "key": "server.key"}],
        "alpn": ["http/1.1", "h2"],
    }
    assert problems(minimal(tls=tls), base) == [
        "listeners[0].tls.alpn[1]: h2 needs mode: tcp (mode: http relays HTTP/1.1 only)"
    ]
    assert parse_config(minimal(tls=tls, mode="tcp"), base).listeners[0].tls.alpn == (
        "http/1.1",
        "h2",
    )


def test_headers_only_apply_to_http_mode(base: Path) -> None:
    assert problems(minimal(mode="tcp", headers={"via": False}), base) == [
        "listeners[0].headers: applies to mode: http only (this listener is tcp)"
    ]


def test_unknown_upstream_reference(base: Path) -> None:
    data = minimal(upstream="foo")
    data["upstreams"] = {"vllm": {"servers": ["http://127.0.0.1:8000"]}}
    assert problems(data, base) == [
        "listeners[0].upstream: no upstream pool named 'foo' (defined: vllm)"
    ]


def test_a_pool_with_a_bad_server_is_still_a_valid_reference(base: Path) -> None:
    data = minimal()
    data["upstreams"]["demo"]["servers"] = ["ftp://x"]
    assert problems(data, base) == ["upstreams.demo.servers[0]: not an http:// URL: 'ftp://x'"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x", "not an http:// URL: 'ftp://x'"),
        ("127.0.0.1:8000", "not an http:// URL: '127.0.0.1:8000' (write http://127.0.0.1:8000)"),
        (8000, "not an http:// URL: got the number 8000"),
        ("https://a:1", "'https://a:1': https upstreams are not supported yet; use http://"),
        ("http://a/v1", "'http://a/v1': a path, query or fragment is not supported"),
        ("http://a:99999", "'http://a:99999': port must be a number from 1 to 65535"),
        ("http://a:0", "'http://a:0': port must be a number from 1 to 65535"),
        ("http://u:p@a:1", "'http://u:p@a:1': credentials in the URL are not supported"),
        ("http://a b:1", "'a b' is not a valid host name or IP address"),
    ],
)
def test_bad_upstream_urls(base: Path, url: object, message: str) -> None:
    data = minimal()
    data["upstreams"]["demo"]["servers"] = ["http://127.0.0.1:8000", url]
    (problem,) = problems(data, base)
    assert problem.startswith(f"upstreams.demo.servers[1]: {message}")


def test_duplicate_upstream_server(base: Path) -> None:
    data = minimal()
    data["upstreams"]["demo"]["servers"] = ["http://127.0.0.1:8000", "http://127.0.0.1:8000/"]
    assert problems(data, base) == [
        "upstreams.demo.servers[1]: server http://127.0.0.1:8000 is listed twice"
    ]


def test_duplicate_listener_address_and_name(base: Path) -> None:
    data = minimal(name="main")
    second = dict(data["listeners"][0], listen="0.0.0.0:8443")
    data["listeners"].append(second)
    assert problems(data, base) == [
        "listeners[1].name: 'main' is already the name of listeners[0]",
        "listeners[1].listen: 0.0.0.0:8443 collides with listeners[0] (main) on 127.0.0.1:8443",
    ]


def test_admin_must_not_collide_with_a_listener(base: Path) -> None:
    assert problems({**minimal(), "admin": "127.0.0.1:8443"}, base) == [
        "admin: 127.0.0.1:8443 collides with listeners[0] (listener0) on 127.0.0.1:8443"
    ]


@pytest.mark.parametrize(
    ("a", "b", "collide"),
    [
        ("127.0.0.1:8443", "127.0.0.1:8443", True),
        ("0.0.0.0:8443", "127.0.0.1:8443", True),
        ("127.0.0.1:8443", "0.0.0.0:8443", True),
        ("[::]:8443", "[::1]:8443", True),
        ("0.0.0.0:8443", "localhost:8443", True),
        ("0.0.0.0:8443", "[::]:8443", False),  # IPv6 sockets are bound v6-only
        ("127.0.0.1:8443", "127.0.0.2:8443", False),
        ("127.0.0.1:8443", "127.0.0.1:8444", False),
        ("127.0.0.1:0", "127.0.0.1:0", False),  # each gets its own free port
    ],
)
def test_address_collisions(a: str, b: str, collide: bool) -> None:
    from pqproxy.config import parse_address

    assert addresses_collide(parse_address(a), parse_address(b)) is collide


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("8443", "'8443' is not HOST:PORT"),
        ("::1:8443", "'::1:8443': write an IPv6 address in brackets, as in [::1]:8443"),
        ("[fe80::zz]:8443", "'[fe80::zz]:8443': 'fe80::zz' in brackets is not an IPv6 address"),
        ("127.0.0.1:70000", "'127.0.0.1:70000': port must be a number from 0 to 65535"),
        ("127.0.0.1:http", "'127.0.0.1:http': port must be a number from 0 to 65535"),
        ("bad_host!:1", "'bad_host!' is not a valid host name or IP address"),
        # YAML 1.1 reads an unquoted 10:30 as the base-60 number 630.
        (630, 'expected "HOST:PORT", got the number 630; quote it'),
        (["::1"], 'expected "HOST:PORT", got a list; quote an IPv6 address: "[::1]:8443"'),
    ],
)
def test_bad_listen_addresses(base: Path, listen: object, message: str) -> None:
    assert problems(minimal(listen=listen), base) == [f"listeners[0].listen: {message}"]


def test_missing_certificate_and_key_files_are_named(base: Path) -> None:
    tls = {"certificates": [{"cert": "missing.pem", "key": str(base)}]}
    assert problems(minimal(tls=tls), base) == [
        f"listeners[0].tls.certificates[0].cert: no such file: {base / 'missing.pem'}",
        f"listeners[0].tls.certificates[0].key: not a file: {base}",
    ]


def test_missing_files_can_be_left_unchecked(base: Path) -> None:
    tls = {"certificates": [{"cert": "missing.pem", "key": "missing.key"}]}
    config = parse_config(minimal(tls=tls), base, check_files=False)
    assert config.listeners[0].tls.certificates[0].cert == base / "missing.pem"


def test_bad_server_name(base: Path) -> None:
    cert = {"cert": "server.pem", "key": "server.key", "server_names": ["a.example", "a*.b"]}
    (problem,) = problems(minimal(tls={"certificates": [cert]}), base)
    assert problem.startswith(
        "listeners[0].tls.certificates[0].server_names[1]: 'a*.b' is not a DNS name"
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, ["<top level>: the configuration is empty"]),
        ([], ["<top level>: expected a mapping, got a list"]),
        ({}, ["upstreams: required", "listeners: required"]),
        (
            {"listeners": [], "upstreams": {}},
            ["upstreams: needs at least 1 pool", "listeners: needs at least 1 item"],
        ),
        (
            {"listeners": [None], "upstreams": {"p": None}},
            [
                "upstreams.p: expected a mapping, got null",
                "listeners[0]: expected a mapping, got null",
            ],
        ),
        (
            {"listeners": [{}], "upstreams": {"p": {"servers": []}}},
            [
                "upstreams.p.servers: needs at least 1 item",
                "listeners[0].listen: required",
                "listeners[0].upstream: required",
                "listeners[0].tls: required",
            ],
        ),
    ],
)
def test_structure_errors(base: Path, data: object, expected: list[str]) -> None:
    assert problems(data, base) == expected


def test_required_certificate_keys(base: Path) -> None:
    assert problems(minimal(tls={"certificates": [{"cert": "server.pem"}]}), base) == [
        "listeners[0].tls.certificates[0].key: required"
    ]
    assert problems(minimal(tls={"certificates": []}), base) == [
        "listeners[0].tls.certificates: needs at least 1 item"
    ]


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("", "workers", 0, "0 is too small (minimum 1)"),
        ("", "workers", "2", "expected a whole number, got the string '2'"),
        ("logging", "level", "loud", "expected one of debug, info, warning, error"),
        ("logging", "format", "xml", "expected one of json, text"),
        ("logging", "access_log", "yes please", "expected true or false"),
        ("upstreams.demo", "balance", "random", "expected one of least_outstanding, round_robin"),
        ("upstreams.demo", "retries", -1, "-1 is too small (minimum 0)"),
        ("upstreams.demo.health_check", "path", "health", "expected a request path starting"),
        ("upstreams.demo.health_check", "timeout", "10s", "must not be longer than interval"),
        ("upstreams.demo.passive", "max_fails", 0, "0 is too small (minimum 1)"),
        ("upstreams.demo.keepalive", "idle_timeout", "soon", "'soon' is not a duration"),
        ("listeners[0].limits", "max_body_bytes", "10XB", "'10XB' is not a size"),
        ("listeners[0].limits", "max_connections", 0, "0 is too small (minimum 1)"),
        ("listeners[0].headers", "via", "yes please", "expected true or false"),
        ("listeners[0].headers", "tls_info", "X PQ", "expected a header name prefix"),
        ("listeners[0]", "mode", "udp", "expected one of http, tcp"),
        ("listeners[0]", "name", "my listener", "a listener name must be letters"),
    ],
)
def test_bad_values_name_their_path(
    base: Path, section: str, key: str, value: object, message: str
) -> None:
    data: dict[str, Any] = minimal()
    node: Any = data
    for part in section.replace("[0]", ".0").split(".") if section else []:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[key] = value
    path = f"{section}.{key}" if section else key
    (problem,) = problems(data, base)
    assert problem.startswith(f"{path}: {message}")


def test_all_problems_are_reported_together(base: Path) -> None:
    data = minimal(upstream="foo", mode="udp")
    data["workers"] = 0
    data["listeners"][0]["tls"]["groups"] = ["nope"]
    with pytest.raises(ConfigError) as info:
        parse_config(data, base)
    error = info.value
    assert isinstance(error, ValueError)
    assert len(error.problems) == 4
    assert str(error).splitlines() == error.problems
    assert [p.split(":")[0] for p in error.problems] == [
        "workers",
        "listeners[0].mode",
        "listeners[0].upstream",
        "listeners[0].tls.groups[0]",
    ]


# -- YAML -------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(base: Path) -> None:
    path = write(
        base / "bad.yaml",
        """
        workers: 1
        listeners:
          - listen: [::1]:8443
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:3:")
    assert problem.endswith('; quote an IPv6 address: "[::1]:8443"')


def test_yaml_key_given_twice_is_an_error(base: Path) -> None:
    path = write(base / "twice.yaml", "workers: 1\nadmin: null\nworkers: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:3:1: while constructing a mapping: key 'workers' is given twice"
    ]


def test_yaml_merge_keys_may_be_overridden(base: Path) -> None:
    path = write(
        base / "merge.yaml",
        """
        upstreams:
          a: &pool {servers: ["http://127.0.0.1:8000"], retries: 1}
          b: {<<: *pool, retries: 3}
        listeners:
          - {listen: "127.0.0.1:8443", upstream: b,
             tls: {certificates: [{cert: server.pem, key: server.key}]}}
        """,
    )
    config = load_config(path)
    assert (config.upstream("a").retries, config.upstream("b").retries) == (1, 3)


def test_unreadable_file(base: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(base / "absent.yaml")
    assert info.value.problems == [
        f"{base / 'absent.yaml'}: cannot read: No such file or directory"
    ]


# -- command-line flags -----------------------------------------------------------------------


def test_config_from_flags(base: Path) -> None:
    config = config_from_flags(
        "127.0.0.1:8443",
        base / "server.pem",
        base / "server.key",
        ["http://127.0.0.1:8000", "http://127.0.0.1:8001"],
    )
    (listener,) = config.listeners
    assert listener.name == "main"
    assert listener.listen == ServerAddress("127.0.0.1", 8443)
    assert listener.tls.certificates == (
        CertificateConfig(base / "server.pem", base / "server.key"),
    )
    assert listener.tls.groups == DEFAULT_GROUPS
    pool = config.upstream_for(listener)
    assert [s.port for s in pool.servers] == [8000, 8001]
    # Flags name no admin endpoint and no health path: neither is assumed.
    assert config.admin is None
    assert pool.health_check is None
    assert config.source == "<command line>"


def test_config_from_flags_with_overrides(base: Path) -> None:
    config = config_from_flags(
        "[::1]:0",
        base / "server.pem",
        base / "server.key",
        ["http://127.0.0.1:8000"],
        groups="X25519MLKEM768, secp256r1",
        pq_policy="require",
        alpn=["http/1.1"],
        idle_timeout=300.0,
        handshake_timeout="2s",
        max_connections=7,
        upstream_connect_timeout=1,
        upstream_read_timeout="1h",
        health_check="/healthz",
        admin="127.0.0.1:0",
        workers=3,
        tls_info=False,
        cipher_suites=None,  # a flag that was not given
    )
    listener = config.listeners[0]
    assert listener.tls.groups == (NamedGroup.X25519MLKEM768, NamedGroup.secp256r1)
    assert listener.tls.pq_policy is PqPolicy.REQUIRE
    assert listener.tls.cipher_suites == DEFAULT_CIPHER_SUITES
    assert listener.timeouts.idle == 300.0
    assert listener.timeouts.handshake == 2.0
    assert listener.limits.max_connections == 7
    assert listener.headers.tls_info is None
    pool = config.upstreams[0]
    assert pool.timeouts == UpstreamTimeouts(connect=1.0, read=3600.0)
    assert pool.health_check is not None and pool.health_check.path == "/healthz"
    assert config.admin == ServerAddress("127.0.0.1", 0)
    assert config.workers == 3


def test_config_from_flags_names_flags_in_errors(base: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_flags(
            "127.0.0.1",
            base / "absent.pem",
            base / "server.key",
            ["ftp://x"],
            groups="x25519,kyber",
            idle_timeout="forever",
        )
    assert info.value.problems == [
        "--upstream: not an http:// URL: 'ftp://x'",
        "--listen: '127.0.0.1' is not HOST:PORT",
        f"--cert: no such file: {base / 'absent.pem'}",
        f"--groups: unknown group 'kyber' (known: {KNOWN_GROUPS})",
        "--idle-timeout: 'forever' is not a duration (write a number of seconds, or e.g. "
        "'500ms', '30s', '5m', '1h')",
    ]


def test_config_from_flags_refuses_an_unknown_override(base: Path) -> None:
    with pytest.raises(TypeError, match="unknown override"):
        config_from_flags(
            "127.0.0.1:8443", base / "server.pem", base / "server.key", [], colour="blue"
        )


def _two_listener_config(base: Path) -> Config:
    data = minimal(name="main")
    data["listeners"].append(
        {
            "name": "other",
            "listen": "127.0.0.1:9443",
            "upstream": "other",
            "tls": {"certificates": [{"cert": "server.pem", "key": "server.key"}]},
        }
    )
    data["upstreams"]["other"] = {"servers": ["http://127.0.0.1:9000"]}
    return parse_config(data, base)


def test_apply_overrides(base: Path) -> None:
    (base / "other.pem").write_text("")
    config = _two_listener_config(base)
    result = apply_overrides(
        config,
        listen="0.0.0.0:443",
        upstreams=["http://10.0.0.1:8000", "http://10.0.0.2:8000"],
        cert=base / "other.pem",
        workers=8,
        admin="127.0.0.1:9200",
    )
    main, other = result.listeners
    assert main.listen == ServerAddress("0.0.0.0", 443)
    assert main.tls.certificates[0] == CertificateConfig(base / "other.pem", base / "server.key")
    assert [s.host for s in result.upstream("demo").servers] == ["10.0.0.1", "10.0.0.2"]
    # Only the first listener and its pool change.
    assert other == config.listeners[1]
    assert result.upstream("other") == config.upstream("other")
    assert (result.workers, result.admin) == (8, ServerAddress("127.0.0.1", 9200))
    assert apply_overrides(config, admin="off").admin is None
    assert apply_overrides(config) == config


def test_apply_overrides_reports_flags(base: Path) -> None:
    config = _two_listener_config(base)
    with pytest.raises(ConfigError) as info:
        apply_overrides(
            config,
            listen="nope",
            upstreams=["https://x"],
            key=base / "absent.key",
            workers=0,
            admin="localhost",
        )
    assert [p.split(":")[0] for p in info.value.problems] == [
        "--listen",
        "--key",
        "--upstream",
        "--workers",
        "--admin",
    ]


def test_apply_overrides_rechecks_collisions(base: Path) -> None:
    config = _two_listener_config(base)
    with pytest.raises(ConfigError) as info:
        apply_overrides(config, listen="127.0.0.1:9443")
    assert info.value.problems == [
        "listeners[1].listen: 127.0.0.1:9443 collides with listeners[0] (main) on 127.0.0.1:9443"
    ]


# -- summary and check-config -----------------------------------------------------------------


def _auto_workers() -> str:
    """How describe() names the default worker count (issue 19: workers: auto)."""
    count = available_cpus()
    return f"{count} worker{'' if count == 1 else 's'} (auto)"


def test_describe(base: Path) -> None:
    text = describe(parse_config(minimal(name="main"), base))
    assert text.splitlines()[0] == (
        f"1 listener, 1 upstream pool, {_auto_workers()}, admin on 127.0.0.1:9100, drain 30s"
    )
    assert "listener main: 127.0.0.1:8443 mode http -> demo" in text
    assert "groups X25519MLKEM768,x25519," in text
    assert "upstream demo: http://127.0.0.1:8000 (least_outstanding; read timeout 10m" in text


def test_check_config_main(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(base / "good.yaml", _yaml_of(minimal()))
    assert check_config_main(str(good)) == 0
    out, err = capsys.readouterr()
    assert out.startswith("OK: 1 listener, 1 upstream pool")
    assert err == ""

    bad = write(base / "bad.yaml", _yaml_of(minimal(upstream="foo", mode="udp")))
    assert check_config_main(str(bad)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{bad}: invalid configuration (2 problems):",
        "  listeners[0].mode: expected one of http, tcp, got the string 'udp'",
        "  listeners[0].upstream: no upstream pool named 'foo' (defined: demo)",
    ]


# -- the shipped files ------------------------------------------------------------------------


def test_demo_config_loads_with_the_certificates_make_demo_writes(tmp_path: Path) -> None:
    # The demo config names ../.demo/certs relative to config/: rebuild that layout in a tmp
    # copy, with real certificates, and load them as `serve` does.
    (tmp_path / "config").mkdir()
    shutil.copy(REPO_ROOT / "config" / "pqproxy.yaml", tmp_path / "config")
    generate_dev_certs(tmp_path / ".demo" / "certs")
    config = load_config(tmp_path / "config" / "pqproxy.yaml")
    (listener,) = config.listeners
    assert listener.listen == ServerAddress("127.0.0.1", 8443)
    assert listener.tls.pq_policy is PqPolicy.PREFER
    assert listener.tls.groups[0] == NamedGroup.X25519MLKEM768
    assert [s.url for s in config.upstream_for(listener).servers] == ["http://127.0.0.1:8000"]
    certificate = listener.tls.certificates[0]
    assert certificate.cert == tmp_path / ".demo" / "certs" / "server.pem"
    certified = load_certified_key(certificate.cert, certificate.key)
    assert certified.chain


def test_vllm_example() -> None:
    config = load_config(REPO_ROOT / "config" / "examples" / "vllm.yaml", check_files=False)
    pool = config.upstream_for(config.listeners[0])
    assert [s.url for s in pool.servers] == ["http://127.0.0.1:8000"]
    assert pool.timeouts.read == 3600.0
    assert pool.health_check is not None and pool.health_check.path == "/health"
    assert config.listeners[0].mode is Mode.HTTP


def test_ollama_example() -> None:
    config = load_config(REPO_ROOT / "config" / "examples" / "ollama.yaml", check_files=False)
    pool = config.upstream_for(config.listeners[0])
    assert [s.url for s in pool.servers] == ["http://127.0.0.1:11434"]
    # Ollama has no /health; GET / answers "Ollama is running".
    assert pool.health_check is not None and pool.health_check.path == "/"


def test_triton_grpc_example() -> None:
    config = load_config(REPO_ROOT / "config" / "examples" / "triton-grpc.yaml", check_files=False)
    listener = config.listeners[0]
    assert listener.mode is Mode.TCP
    assert listener.tls.alpn == ("h2",)
    pool = config.upstream_for(listener)
    assert [s.url for s in pool.servers] == ["http://127.0.0.1:8001"]
    assert pool.health_check is None


def test_check_config_subcommand(base: Path) -> None:
    good = write(base / "good.yaml", _yaml_of(minimal()))
    bad = write(base / "bad.yaml", "workers: 1\nworkers: 2\n")
    command = [sys.executable, "-m", "pqproxy", "check-config"]
    ok = subprocess.run([*command, str(good)], capture_output=True, text=True, check=False)
    assert (ok.returncode, ok.stdout.splitlines()[0]) == (
        0,
        f"OK: 1 listener, 1 upstream pool, {_auto_workers()}, admin on 127.0.0.1:9100, drain 30s",
    )
    failed = subprocess.run([*command, str(bad)], capture_output=True, text=True, check=False)
    assert failed.returncode == 2
    assert f"{bad}:2:1: while constructing a mapping: key 'workers' is given twice" in failed.stderr
