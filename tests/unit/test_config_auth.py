"""Client authentication and session tickets in the configuration: ``tls.client_auth`` and
``tickets`` (top level, and per listener in ``tls.tickets``), every error path, and how
``build_runtime`` turns them into a client verifier, an allow list, identity headers and
ticket keys, including which secrets a reload keeps and which listeners can open whose
tickets."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from pqproxy.config import (
    ClientAuthConfig,
    IdentityHeadersConfig,
    TicketsConfig,
    describe,
    load_config,
    parse_config,
)
from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.client_auth import X509ClientVerifier
from pqproxy.crypto.provider import TicketProtector
from pqproxy.crypto.tickets import RotatingTicketKeys
from pqproxy.devcert import DevCertPaths
from pqproxy.io.session_tickets import TicketKeyError, TicketMasters, listener_ticket_keys
from pqproxy.io.supervisor import ServeError, build_runtime, check_servable
from pqproxy.relay.identity import IdentityHeaders
from pqproxy.tls.server import ClientAuth
from tests.certs_factory import SPIFFE_CLIENT, bundle_pem, make_ca, make_client

REPO_ROOT = Path(__file__).resolve().parents[2]
PROVIDER = OpenSSLProvider()


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """Empty certificate, key and CA files: parsing only checks that they exist."""
    for name in ("server.pem", "server.key", "clients.pem"):
        (tmp_path / name).write_text("")
    return tmp_path


def config_data(tls: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    section: dict[str, Any] = {"certificates": [{"cert": "server.pem", "key": "server.key"}]}
    section.update(tls or {})
    data: dict[str, Any] = {
        "listeners": [
            {"name": "main", "listen": "127.0.0.1:8443", "upstream": "m", "tls": section}
        ],
        "upstreams": {"m": {"servers": ["http://127.0.0.1:8000"]}},
    }
    data.update(top)
    return data


def problems(data: object, base_dir: Path) -> list[str]:
    from pqproxy.config import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir)
    return info.value.problems


# --- defaults and what is read ---------------------------------------------------------------


def test_defaults_no_client_auth_and_tickets_on(base: Path) -> None:
    config = parse_config(config_data(), base)
    tls = config.listeners[0].tls
    assert tls.client_auth == ClientAuthConfig(
        mode=ClientAuth.NONE, ca=None, allow=None, identity_headers=IdentityHeadersConfig()
    )
    assert tls.client_auth.identity_headers.names() == (
        "X-Client-Subject",
        "X-Client-URI",
        "X-Client-DNS",
    )
    assert tls.tickets == TicketsConfig(
        enabled=True, per_handshake=2, lifetime=7200, key_file=None, rotation=3600.0
    )
    assert tls.tickets.keys_kept == 2
    assert config.tickets == tls.tickets


def test_client_auth_and_tickets_are_read_as_written(base: Path) -> None:
    path = base / "pqproxy.yaml"
    path.write_text(
        textwrap.dedent(
            """
            tickets: {per_handshake: 4, lifetime: 30m, rotation: 10m, key_file: tickets.key}
            listeners:
              - name: api
                listen: 127.0.0.1:8443
                upstream: m
                tls:
                  certificates: [{cert: server.pem, key: server.key}]
                  client_auth:
                    mode: REQUIRE
                    ca: clients.pem
                    allow:
                      - spiffe://example.org/ns/default/sa/client
                      - worker.example
                      - CN=batch,O=pqproxy tests
                    identity_headers: {subject: null, uris: X-Spiffe-Id}
                  tickets: {lifetime: 1h}
              - name: public
                listen: 127.0.0.1:9443
                upstream: m
                tls:
                  certificates: [{cert: server.pem, key: server.key}]
                  client_auth: {mode: optional, ca: clients.pem}
                  tickets: false
            upstreams:
              m: {servers: [http://127.0.0.1:8000]}
            """
        )
    )
    config = load_config(path)
    api, public = config.listeners
    assert api.tls.client_auth == ClientAuthConfig(
        mode=ClientAuth.REQUIRE,
        ca=base / "clients.pem",
        allow=(
            "spiffe://example.org/ns/default/sa/client",
            "worker.example",
            "CN=batch,O=pqproxy tests",
        ),
        identity_headers=IdentityHeadersConfig(
            subject=None, uris="X-Spiffe-Id", dns="X-Client-DNS"
        ),
    )
    assert config.tickets == TicketsConfig(True, 4, 1800, base / "tickets.key", 600.0)
    # A listener's section overrides only the keys it names; the rest come from the top.
    assert api.tls.tickets == TicketsConfig(True, 4, 3600, base / "tickets.key", 600.0)
    assert api.tls.tickets.keys_kept == 6
    assert public.tls.client_auth.mode is ClientAuth.OPTIONAL
    assert public.tls.client_auth.allow is None
    assert public.tls.tickets.enabled is False
    text = describe(config)
    assert "client auth require (CA " in text and "allow 3 identities)" in text
    assert "tickets 4 per handshake, lifetime 1h, key file " in text
    assert "rotated every 10m" in text
    assert "client auth optional" in text and "tickets off" in text


def test_unquoted_off_is_mode_none(base: Path) -> None:
    config = parse_config(config_data({"client_auth": {"mode": False}}), base)
    assert config.listeners[0].tls.client_auth.mode is ClientAuth.NONE


def test_top_level_off_can_be_turned_on_per_listener(base: Path) -> None:
    data = config_data({"tickets": {"enabled": True}}, tickets={"enabled": False, "lifetime": 60})
    tickets = parse_config(data, base).listeners[0].tls.tickets
    assert (tickets.enabled, tickets.lifetime) == (True, 60)


def test_the_mtls_example_loads() -> None:
    config = load_config(REPO_ROOT / "config" / "examples" / "mtls.yaml", check_files=False)
    (listener,) = config.listeners
    tls = listener.tls
    assert len(tls.certificates) == 2  # ML-DSA-65 first, ECDSA P-256 second
    assert tls.client_auth.mode is ClientAuth.REQUIRE and tls.client_auth.allow
    assert tls.tickets.enabled and tls.tickets.key_file is not None


# --- error paths -----------------------------------------------------------------------------

CA = "listeners[0].tls.client_auth"
TK = "listeners[0].tls.tickets"


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        (
            {"client_auth": {"mode": "require"}},
            f"{CA}.ca: required with mode require (the CA bundle that issues client certificates)",
        ),
        (
            {"client_auth": {"mode": "optional"}},
            f"{CA}.ca: required with mode optional (the CA bundle that issues client certificates)",
        ),
        (
            {"client_auth": {"ca": "clients.pem"}},
            f"{CA}.ca: applies with mode optional or require only",
        ),
        (
            {"client_auth": {"mode": "mandatory", "ca": "clients.pem"}},
            f"{CA}.mode: expected one of none, optional, require, got the string 'mandatory'",
        ),
        ({"client_auth": {"mode": "require", "ca": "nope.pem"}}, f"{CA}.ca: no such file: "),
        (
            {"client_auth": {"allow": ["spiffe://a/b"]}},
            f"{CA}.allow: needs mode optional or require (without client certificates no "
            "client has an identity, so everyone would get 403)",
        ),
        (
            {"client_auth": {"mode": "require", "ca": "clients.pem", "allow": ["a", "a"]}},
            f"{CA}.allow[1]: identity 'a' is listed twice",
        ),
        (
            {"client_auth": {"mode": "require", "ca": "clients.pem", "allow": []}},
            f"{CA}.allow: needs at least 1 item",
        ),
        (
            {"client_auth": {"mode": "require", "ca": "clients.pem", "allow": ["a\nb"]}},
            f"{CA}.allow[0]: expected an identity: a URI (spiffe://...), a DNS name or an "
            "RFC 4514 subject (CN=...,O=...); got the string 'a\\nb'",
        ),
        (
            {"client_auth": {"mode": "require", "ca": "clients.pem", "allow": [" CN=x"]}},
            f"{CA}.allow[0]: ' CN=x': leading or trailing spaces never match a certificate",
        ),
        (
            {"client_auth": {"mode": "require", "ca": "clients.pem", "allow": [7]}},
            f"{CA}.allow[0]: expected an identity: a URI (spiffe://...), a DNS name or an "
            "RFC 4514 subject (CN=...,O=...); got the number 7",
        ),
        (
            {"client_auth": {"identity_headers": {"uris": "X Client"}}},
            f"{CA}.identity_headers.uris: expected a header name or null, got the string "
            "'X Client'",
        ),
        (
            {"client_auth": {"identity_headers": {"subject": "X-Forwarded-For"}}},
            f"{CA}.identity_headers.subject: X-Forwarded-For is a header the proxy manages "
            "itself; choose another name",
        ),
        (
            {"client_auth": {"identity_headers": {"dns": "x-client-uri"}}},
            f"{CA}.identity_headers.dns: x-client-uri is already the uris header",
        ),
        (
            {"client_auth": {"identity_headers": {"spiffe": "X-Id"}}},
            f"{CA}.identity_headers.spiffe: unknown key (expected: subject, uris, dns)",
        ),
        ({"client_auth": {"moed": "require"}}, f"{CA}.moed: unknown key (did you mean 'mode'?)"),
        ({"tickets": {"per_handshake": 9}}, f"{TK}.per_handshake: 9 is too large (maximum 8)"),
        ({"tickets": {"per_handshake": -1}}, f"{TK}.per_handshake: -1 is too small (minimum 0)"),
        ({"tickets": {"lifetime": "8d"}}, f"{TK}.lifetime: '8d' is not a duration"),
        ({"tickets": {"lifetime": "169h"}}, f"{TK}.lifetime: '169h': at most 7 days"),
        ({"tickets": {"lifetime": "1.5s"}}, f"{TK}.lifetime: '1.5s': must be a whole number"),
        ({"tickets": {"lifetime": 0}}, f"{TK}.lifetime: 0: must be more than 0"),
        (
            {"tickets": {"rotation": "1m"}},
            f"{TK}.rotation: a lifetime of 2h with a rotation of 1m keeps 120 ticket keys "
            "(at most 24): make rotation at least 5m",
        ),
        (
            {"tickets": {"lifetime": "168h"}},
            f"{TK}.lifetime: a lifetime of 168h with a rotation of 1h keeps 168 ticket keys "
            "(at most 24): make rotation at least 7h",
        ),
        ({"tickets": {"key_file": "no/such/dir/t.key"}}, f"{TK}.key_file: no such directory: "),
        ({"tickets": {"key_file": "."}}, f"{TK}.key_file: not a file: "),
        ({"tickets": {"key_file": 5}}, f"{TK}.key_file: expected a file path or null, got "),
        ({"tickets": {"enabled": "yes"}}, f"{TK}.enabled: expected true or false"),
        ({"tickets": {"0rtt": True}}, f"{TK}.0rtt: unknown key"),
    ],
)
def test_bad_values_name_their_key(base: Path, tls: dict[str, Any], expected: str) -> None:
    found = problems(config_data(tls), base)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]


def test_identity_headers_need_an_http_listener(base: Path) -> None:
    data = config_data({"client_auth": {"identity_headers": {"uris": "X-Id"}}})
    data["listeners"][0]["mode"] = "tcp"
    assert problems(data, base) == [
        f"{CA}.identity_headers: applies to mode: http only (a tcp listener relays bytes, "
        "not requests)"
    ]


def test_top_level_tickets_problems_are_named_at_the_top(base: Path) -> None:
    assert problems(config_data(tickets={"per_handshake": 20, "rotaton": "1h"}), base) == [
        "tickets.rotaton: unknown key (did you mean 'rotation'?)",
        "tickets.per_handshake: 20 is too large (maximum 8)",
    ]


def test_every_problem_is_reported_at_once(base: Path) -> None:
    found = problems(
        config_data(
            {
                "client_auth": {"mode": "require", "allow": ["x", "x"]},
                "tickets": {"lifetime": "1.5s", "per_handshake": 99},
            }
        ),
        base,
    )
    assert [p.split(":", 1)[0] for p in found] == [
        f"{CA}.ca",
        f"{CA}.allow[1]",
        f"{TK}.per_handshake",
        f"{TK}.lifetime",
    ]


def test_an_unreadable_key_file_is_refused(base: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads anything: the permission check cannot fail")
    key = base / "tickets.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0)
    found = problems(config_data({"tickets": {"key_file": "tickets.key"}}), base)
    assert found == [f"{TK}.key_file: not readable: {key}"]


# --- the runtime -------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path, dev_certs: DevCertPaths) -> dict[str, Path]:
    """A real server chain and a client CA bundle on disk."""
    client_ca = make_ca("mldsa65", common_name="client CA")
    (tmp_path / "clients.pem").write_bytes(bundle_pem(client_ca))
    other = make_ca("ecdsa-p256", common_name="other client CA")
    (tmp_path / "other-clients.pem").write_bytes(bundle_pem(other))
    return {"cert": dev_certs.cert, "key": dev_certs.key, "ca": tmp_path / "clients.pem"}


def runtime_data(
    pki: dict[str, Path], *, name: str = "main", tls: dict[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    section: dict[str, Any] = {
        "certificates": [{"cert": str(pki["cert"]), "key": str(pki["key"])}],
        "client_auth": {"mode": "require", "ca": str(pki["ca"]), "allow": [SPIFFE_CLIENT]},
    }
    section.update(tls or {})
    data: dict[str, Any] = {
        "admin": None,
        "listeners": [{"name": name, "listen": "127.0.0.1:0", "upstream": "m", "tls": section}],
        "upstreams": {"m": {"servers": ["http://127.0.0.1:8000"], "health_check": None}},
    }
    data.update(top)
    return data


def test_build_runtime_wires_client_auth_and_tickets(pki: dict[str, Path], tmp_path: Path) -> None:
    data = runtime_data(
        pki,
        tls={"client_auth": {"mode": "require", "ca": str(pki["ca"]), "allow": [SPIFFE_CLIENT]}},
        tickets={"per_handshake": 3, "lifetime": "10m"},
    )
    data["listeners"][0]["tls"]["client_auth"]["identity_headers"] = {"dns": None}
    runtime = build_runtime(parse_config(data, tmp_path), PROVIDER)
    (settings,) = runtime.listeners
    server = settings.server_config
    assert server.client_auth is ClientAuth.REQUIRE
    assert isinstance(server.client_verifier, X509ClientVerifier)
    assert isinstance(server.tickets, RotatingTicketKeys)
    assert (server.tickets_per_handshake, server.ticket_lifetime) == (3, 600)
    assert settings.allowed_identities == frozenset({SPIFFE_CLIENT})
    assert settings.http is not None
    assert settings.http.forwarding.identity_headers == IdentityHeaders(
        subject="X-Client-Subject", uris="X-Client-URI", dns=None
    )
    # The verifier really is the configured bundle: a client of that CA verifies.
    client_ca = make_ca("mldsa65")
    (tmp_path / "clients.pem").write_bytes(bundle_pem(client_ca))
    again = build_runtime(parse_config(data, tmp_path), PROVIDER).listeners[0].server_config
    assert again.client_verifier is not None
    leaf = make_client(client_ca, "mldsa65", uris=(SPIFFE_CLIENT,))
    identity = again.client_verifier.verify_chain(leaf.chain_der(), time.time())
    assert identity.uris == (SPIFFE_CLIENT,)


def test_tickets_off_and_no_client_auth_leave_the_engine_without_either(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    data = runtime_data(pki, tls={"client_auth": {"mode": "none"}}, tickets=False)
    (settings,) = build_runtime(parse_config(data, tmp_path), PROVIDER).listeners
    server = settings.server_config
    assert server.client_auth is ClientAuth.NONE and server.client_verifier is None
    assert server.tickets is None
    assert settings.allowed_identities is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not a certificate", "client CA bundle: no PEM certificate in it"),
        (None, "is not a CA certificate (basicConstraints cA is not set)"),
    ],
    ids=["garbage", "leaf-as-ca"],
)
def test_an_unusable_client_ca_bundle_fails_before_serving(
    pki: dict[str, Path], tmp_path: Path, content: bytes | None, expected: str
) -> None:
    if content is None:
        content = make_client(make_ca("ecdsa-p256"), "ecdsa-p256").pem
    pki["ca"].write_bytes(content)
    config = parse_config(runtime_data(pki), tmp_path)
    with pytest.raises(ServeError) as info:
        check_servable(config, PROVIDER)
    message = str(info.value)
    assert message.startswith(f"listener main: {pki['ca']}: ") and expected in message


def test_a_key_file_open_to_others_fails_before_serving(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    key = tmp_path / "tickets.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    config = parse_config(runtime_data(pki, tickets={"key_file": str(key)}), tmp_path)
    with pytest.raises(ServeError) as info:
        check_servable(config, PROVIDER)
    assert str(info.value) == (
        f"listener main: ticket master secret {key}: mode 0644 is open to group or others; "
        f"it must be 0600 (chmod 600 {key})"
    )


def test_a_missing_key_file_is_created_once(pki: dict[str, Path], tmp_path: Path) -> None:
    key = tmp_path / "tickets.key"
    config = parse_config(runtime_data(pki, tickets={"key_file": str(key)}), tmp_path)
    first = TicketMasters.start(config)
    created = key.read_bytes()
    assert len(created) == 32 and key.stat().st_mode & 0o777 == 0o600
    assert first.master(key) == created
    # Another process (another host) reads the same file: the same secret.
    assert TicketMasters.start(config).master(key) == created
    assert "tickets.key" in repr(first) and created.hex() not in repr(first)


def test_a_reload_keeps_the_secrets_unless_the_key_file_changes(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    key, other = tmp_path / "a.key", tmp_path / "b.key"
    config = parse_config(runtime_data(pki, tickets={"key_file": str(key)}), tmp_path)
    masters = TicketMasters.start(config)
    generated, from_file = masters.master(None), masters.master(key)
    # The file changes on disk but the configuration names the same path: kept.
    key.write_bytes(os.urandom(32))
    kept = masters.for_config(config)
    assert (kept.master(None), kept.master(key)) == (generated, from_file)
    # Another path: read then; the generated secret stays.
    moved = parse_config(runtime_data(pki, tickets={"key_file": str(other)}), tmp_path)
    changed = kept.for_config(moved)
    assert changed.master(None) == generated
    assert changed.master(other) == other.read_bytes() != from_file
    # A fresh start (a restart) generates a new one.
    assert TicketMasters.start(config).master(None) != generated


def test_a_bad_new_key_file_on_reload_is_a_ticket_key_error(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    masters = TicketMasters.start(parse_config(runtime_data(pki), tmp_path))
    short = tmp_path / "short.key"
    short.write_bytes(b"too short")
    short.chmod(0o600)
    config = parse_config(runtime_data(pki, tickets={"key_file": str(short)}), tmp_path)
    with pytest.raises(TicketKeyError, match=r"listener main: .*9 bytes; at least 32 required"):
        masters.for_config(config)


def _opens(sealer: TicketProtector | None, opener: TicketProtector | None) -> bool:
    assert sealer is not None and opener is not None
    now = time.time()
    return opener.open(sealer.seal(b"session state", now), now) == b"session state"


def test_ticket_keys_are_bound_to_the_listener_and_its_client_auth(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    config = parse_config(runtime_data(pki), tmp_path)
    (listener,) = config.listeners
    masters = TicketMasters.start(config)
    ca_pem = pki["ca"].read_bytes()
    keys = listener_ticket_keys(masters, listener, ca_pem)
    # The same listener, built again (another worker, or after a reload): opens.
    assert _opens(keys, listener_ticket_keys(masters.for_config(config), listener, ca_pem))
    # Another listener name, another CA bundle, another mode, another master: does not.
    renamed = parse_config(runtime_data(pki, name="other"), tmp_path).listeners[0]
    assert not _opens(keys, listener_ticket_keys(masters, renamed, ca_pem))
    other_ca = (tmp_path / "other-clients.pem").read_bytes()
    assert not _opens(keys, listener_ticket_keys(masters, listener, other_ca))
    optional = parse_config(
        runtime_data(pki, tls={"client_auth": {"mode": "optional", "ca": str(pki["ca"])}}),
        tmp_path,
    ).listeners[0]
    assert not _opens(keys, listener_ticket_keys(masters, optional, ca_pem))
    assert not _opens(keys, listener_ticket_keys(TicketMasters.start(config), listener, ca_pem))


def test_a_reloaded_runtime_opens_the_tickets_of_the_one_before(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    config = parse_config(runtime_data(pki), tmp_path)
    first = build_runtime(config, PROVIDER)
    second = build_runtime(parse_config(runtime_data(pki), tmp_path), PROVIDER, previous=first)
    assert second.ticket_masters is not None
    assert _opens(
        first.listeners[0].server_config.tickets, second.listeners[0].server_config.tickets
    )
    # Without ``previous`` (a restart) the generated secret is new: the tickets are not.
    fresh = build_runtime(config, PROVIDER)
    assert not _opens(
        first.listeners[0].server_config.tickets, fresh.listeners[0].server_config.tickets
    )
