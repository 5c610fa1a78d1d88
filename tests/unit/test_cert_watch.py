"""pqproxy.io.cert_watch: certificate files watched on a real directory laid out as a
Kubernetes Secret volume, real certificates, real loads through ``load_certified_key``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pqproxy.config import (
    CertificateConfig,
    Config,
    ConfigError,
    ListenerConfig,
    ServerAddress,
    TlsConfig,
    load_yaml,
    parse_config,
)
from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.provider import CertifiedKey
from pqproxy.devcert import DevCertPaths, generate_dev_certs
from pqproxy.io.cert_watch import (
    DEFAULT_INTERVAL,
    CertificateWatch,
    CertificateWatcher,
    PollResult,
    file_stamp,
    replace_certificates,
)
from pqproxy.io.tls_server import ListenerSettings
from pqproxy.tls.enums import NamedGroup
from pqproxy.tls.server import PqPolicy, ServerConfig
from tests.secret_volume import SecretVolume

LOGGER = "pqproxy.io.cert_watch"
# A deadline for the one test that waits on the polling task, far above its 10 ms interval.
WAIT = 5.0


@dataclass(frozen=True)
class Pair:
    cert: bytes
    key: bytes
    leaf_der: bytes


def _pair(paths: DevCertPaths) -> Pair:
    cert = paths.cert.read_bytes()
    leaf = x509.load_pem_x509_certificate(cert)
    return Pair(cert, paths.key.read_bytes(), leaf.public_bytes(serialization.Encoding.DER))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pair, Pair, Pair]:
    """Three chains, each from its own CA."""
    return (
        _pair(generate_dev_certs(tmp_path_factory.mktemp("first"))),
        _pair(generate_dev_certs(tmp_path_factory.mktemp("second"), sans=["second.test"])),
        _pair(generate_dev_certs(tmp_path_factory.mktemp("third"), key_type="ed25519")),
    )


@pytest.fixture
def volume(tmp_path: Path, pairs: tuple[Pair, Pair, Pair]) -> SecretVolume:
    """A Secret volume holding the first pair."""
    vol = SecretVolume(tmp_path / "certs")
    vol.update({"tls.crt": pairs[0].cert, "tls.key": pairs[0].key})
    return vol


def cert_config(volume: SecretVolume, names: tuple[str, ...] | None = None) -> CertificateConfig:
    return CertificateConfig(
        cert=volume.path("tls.crt"), key=volume.path("tls.key"), server_names=names
    )


class Reloads:
    """The callback: what it was handed, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[CertifiedKey, ...]]] = []

    def __call__(self, name: str, certificates: tuple[CertifiedKey, ...]) -> None:
        self.calls.append((name, certificates))


def leaf(certified: CertifiedKey) -> bytes:
    return certified.chain[0]


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# -- detecting a change ------------------------------------------------------------------------


def test_unchanged_files_are_not_reloaded(volume: SecretVolume) -> None:
    reloads = Reloads()
    watcher = CertificateWatcher("main", [cert_config(volume)])
    assert [watcher.poll(reloads) for _ in range(3)] == [PollResult.UNCHANGED] * 3
    assert reloads.calls == []


def test_a_secret_update_is_loaded_and_handed_over(
    volume: SecretVolume, pairs: tuple[Pair, Pair, Pair], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    reloads = Reloads()
    watcher = CertificateWatcher("main", [cert_config(volume)])
    before = file_stamp(volume.path("tls.crt"))
    volume.update({"tls.crt": pairs[1].cert, "tls.key": pairs[1].key})
    # The path in the config is the same; what it resolves to is not.
    assert file_stamp(volume.path("tls.crt")) != before

    assert watcher.poll(reloads) is PollResult.RELOADED
    assert len(reloads.calls) == 1
    name, certificates = reloads.calls[0]
    assert name == "main"
    assert [leaf(c) for c in certificates] == [pairs[1].leaf_der]
    assert "second.test" in certificates[0].names
    # The signer is the new key: it matches the new leaf (load_certified_key checked it).
    assert certificates[0].signer.schemes
    (line,) = messages(caplog)
    assert line.startswith(f"certificate reloaded from {volume.path('tls.crt')} (listener main, ")
    # Once handed over, the same files are not loaded again.
    assert watcher.poll(reloads) is PollResult.UNCHANGED
    assert len(reloads.calls) == 1
    assert (watcher.reloads, watcher.refusals) == (1, 0)


def test_an_in_place_rewrite_is_seen(
    tmp_path: Path, pairs: tuple[Pair, Pair, Pair], caplog: pytest.LogCaptureFixture
) -> None:
    """Not every deployment has a Secret volume: plain files rewritten where they are (same
    inode) change size or mtime."""
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(pairs[0].cert)
    key.write_bytes(pairs[0].key)
    reloads = Reloads()
    watcher = CertificateWatcher("main", [CertificateConfig(cert=cert, key=key)])
    inode = os.stat(cert).st_ino
    # A key first, then its certificate: in between the pair does not match.
    key.write_bytes(pairs[2].key)
    assert watcher.poll(reloads) is PollResult.REFUSED
    cert.write_bytes(pairs[2].cert)
    assert os.stat(cert).st_ino == inode
    assert watcher.poll(reloads) is PollResult.RELOADED
    assert [leaf(c) for c in reloads.calls[0][1]] == [pairs[2].leaf_der]


# -- refusing what cannot be served --------------------------------------------------------------


def test_a_mismatched_pair_is_refused_once_and_retried_on_the_next_change(
    volume: SecretVolume, pairs: tuple[Pair, Pair, Pair], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    reloads = Reloads()
    watcher = CertificateWatcher("main", [cert_config(volume)])
    # The second certificate with the first key.
    volume.update({"tls.crt": pairs[1].cert, "tls.key": pairs[0].key})
    assert watcher.poll(reloads) is PollResult.REFUSED
    assert reloads.calls == []
    (line,) = messages(caplog)
    assert line.startswith("certificate reload refused: listener main: key file ")
    assert "key does not match the certificate" in line
    assert line.endswith("the previous certificate keeps serving")
    # The same broken files: no second attempt, no second line.
    assert watcher.poll(reloads) is PollResult.UNCHANGED
    assert len(messages(caplog)) == 1
    # Fixed by the next update: loaded.
    volume.update({"tls.crt": pairs[1].cert, "tls.key": pairs[1].key})
    assert watcher.poll(reloads) is PollResult.RELOADED
    assert [leaf(c) for c in reloads.calls[0][1]] == [pairs[1].leaf_der]
    assert (watcher.reloads, watcher.refusals) == (1, 1)


@pytest.mark.parametrize(
    ("what", "expected"),
    [
        ("truncated certificate", "malformed PEM"),
        ("no certificate", "no PEM certificate in file"),
        ("truncated key", "key file"),
        ("missing key", "no such file"),
    ],
)
def test_a_half_written_pair_is_refused(
    volume: SecretVolume,
    pairs: tuple[Pair, Pair, Pair],
    caplog: pytest.LogCaptureFixture,
    what: str,
    expected: str,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    reloads = Reloads()
    watcher = CertificateWatcher("main", [cert_config(volume)])
    new = pairs[1]
    files = {
        "truncated certificate": {"tls.crt": new.cert[: len(new.cert) // 2], "tls.key": new.key},
        "no certificate": {"tls.crt": b"", "tls.key": new.key},
        "truncated key": {"tls.crt": new.cert, "tls.key": new.key[: len(new.key) // 2]},
        "missing key": {"tls.crt": new.cert},
    }[what]
    volume.update(files)
    if what == "missing key":
        # A version of the Secret without the key: its symlink points at nothing.
        assert not volume.path("tls.key").exists()
    assert watcher.poll(reloads) is PollResult.REFUSED
    assert reloads.calls == []
    (line,) = messages(caplog)
    assert line.startswith("certificate reload refused: listener main: ")
    assert expected in line
    # Completed: loaded.
    volume.update({"tls.crt": new.cert, "tls.key": new.key})
    assert watcher.poll(reloads) is PollResult.RELOADED
    assert [leaf(c) for c in reloads.calls[0][1]] == [new.leaf_der]


def test_a_callback_that_refuses_the_set_is_a_refusal(
    volume: SecretVolume, pairs: tuple[Pair, Pair, Pair], caplog: pytest.LogCaptureFixture
) -> None:
    """What the listener cannot take (its ServerConfig raises) is logged like a bad pair,
    and never escapes into the loop."""
    caplog.set_level(logging.INFO, LOGGER)

    def refuse(name: str, certificates: tuple[CertifiedKey, ...]) -> None:
        raise ValueError("no signature scheme in common with the configured ones")

    watcher = CertificateWatcher("main", [cert_config(volume)])
    volume.update({"tls.crt": pairs[1].cert, "tls.key": pairs[1].key})
    assert watcher.poll(refuse) is PollResult.REFUSED
    (line,) = messages(caplog)
    assert line == (
        "certificate reload refused: listener main: no signature scheme in common with the "
        "configured ones; the previous certificate keeps serving"
    )

    def crash(name: str, certificates: tuple[CertifiedKey, ...]) -> None:
        raise RuntimeError("boom")

    volume.update({"tls.crt": pairs[2].cert, "tls.key": pairs[2].key})
    assert watcher.poll(crash) is PollResult.REFUSED
    assert "listener main: RuntimeError: boom;" in messages(caplog)[-1]


# -- what is handed over ---------------------------------------------------------------------------


def test_every_certificate_of_the_listener_is_handed_over_in_order(
    tmp_path: Path, pairs: tuple[Pair, Pair, Pair], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    ecdsa = SecretVolume(tmp_path / "ecdsa")
    ecdsa.update({"tls.crt": pairs[0].cert, "tls.key": pairs[0].key})
    eddsa = SecretVolume(tmp_path / "eddsa")
    eddsa.update({"tls.crt": pairs[2].cert, "tls.key": pairs[2].key})
    reloads = Reloads()
    watcher = CertificateWatcher(
        "edge", [cert_config(ecdsa), cert_config(eddsa, names=("api.example.com",))]
    )
    ecdsa.update({"tls.crt": pairs[1].cert, "tls.key": pairs[1].key})
    assert watcher.poll(reloads) is PollResult.RELOADED
    (_, certificates) = reloads.calls[0]
    # The unchanged second chain comes along (the listener's set is replaced whole), with
    # its configured server names as at start-up.
    assert [leaf(c) for c in certificates] == [pairs[1].leaf_der, pairs[2].leaf_der]
    assert certificates[1].names == ("api.example.com",)
    # Only what changed is named in the log.
    (line,) = messages(caplog)
    assert str(ecdsa.path("tls.crt")) in line
    assert str(eddsa.path("tls.crt")) not in line


def test_one_bad_certificate_swaps_nothing(tmp_path: Path, pairs: tuple[Pair, Pair, Pair]) -> None:
    first = SecretVolume(tmp_path / "a")
    first.update({"tls.crt": pairs[0].cert, "tls.key": pairs[0].key})
    second = SecretVolume(tmp_path / "b")
    second.update({"tls.crt": pairs[2].cert, "tls.key": pairs[2].key})
    reloads = Reloads()
    watcher = CertificateWatcher("edge", [cert_config(first), cert_config(second)])
    first.update({"tls.crt": pairs[1].cert, "tls.key": pairs[1].key})
    second.update({"tls.crt": pairs[2].cert, "tls.key": pairs[0].key})
    assert watcher.poll(reloads) is PollResult.REFUSED
    assert reloads.calls == []


def test_a_write_during_the_load_is_loaded_at_the_next_poll(
    volume: SecretVolume, pairs: tuple[Pair, Pair, Pair]
) -> None:
    """The stamp kept is the one from before the read: an update that lands while the
    previous one is being read is not mistaken for what was loaded."""
    racing = True

    def load_while_updated(cert: Path, key: Path) -> CertifiedKey:
        nonlocal racing
        loaded = load_certified_key(cert, key)
        if racing:
            racing = False
            volume.update({"tls.crt": pairs[2].cert, "tls.key": pairs[2].key})
        return loaded

    reloads = Reloads()
    watcher = CertificateWatcher("main", [cert_config(volume)], load=load_while_updated)
    volume.update({"tls.crt": pairs[1].cert, "tls.key": pairs[1].key})
    assert watcher.poll(reloads) is PollResult.RELOADED
    assert watcher.poll(reloads) is PollResult.RELOADED
    assert [leaf(calls[0]) for _, calls in reloads.calls] == [
        pairs[1].leaf_der,
        pairs[2].leaf_der,
    ]


def test_a_change_before_the_first_poll_is_seen(
    volume: SecretVolume, pairs: tuple[Pair, Pair, Pair]
) -> None:
    """The watcher remembers the files as they were when it was made: one made before the
    served pair is loaded sees an update that lands between the two."""
    watcher = CertificateWatcher("main", [cert_config(volume)])
    volume.update({"tls.crt": pairs[1].cert, "tls.key": pairs[1].key})
    served = load_certified_key(volume.path("tls.crt"), volume.path("tls.key"))
    assert leaf(served) == pairs[1].leaf_der
    reloads = Reloads()
    assert watcher.poll(reloads) is PollResult.RELOADED


def test_bad_arguments() -> None:
    cert = CertificateConfig(cert=Path("/nonexistent/c.pem"), key=Path("/nonexistent/k.pem"))
    with pytest.raises(ValueError, match="at least one certificate"):
        CertificateWatcher("main", [])
    for interval in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="interval must be more than 0"):
            CertificateWatcher("main", [cert], interval=interval)
    assert CertificateWatcher("main", [cert]).interval == DEFAULT_INTERVAL == 5.0


# -- on the loop ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_polling_task_reloads_and_stops_on_close(
    volume: SecretVolume, pairs: tuple[Pair, Pair, Pair]
) -> None:
    handed: asyncio.Queue[tuple[str, tuple[CertifiedKey, ...]]] = asyncio.Queue()

    def on_reload(name: str, certificates: tuple[CertifiedKey, ...]) -> None:
        handed.put_nowait((name, certificates))

    listener = ListenerConfig(
        name="main",
        listen=ServerAddress("127.0.0.1", 0),
        upstream="model",
        tls=TlsConfig(certificates=(cert_config(volume),)),
    )
    watch = CertificateWatch.for_listeners([listener], interval=0.01)
    watch.start(on_reload)
    try:
        assert all(w.running for w in watch.watchers)
        volume.update({"tls.crt": pairs[1].cert, "tls.key": pairs[1].key})
        name, certificates = await asyncio.wait_for(handed.get(), WAIT)
        assert name == "main"
        assert [leaf(c) for c in certificates] == [pairs[1].leaf_der]
        with pytest.raises(RuntimeError, match="already started"):
            watch.watchers[0].start(on_reload)
    finally:
        await watch.close()
    assert not any(w.running for w in watch.watchers)
    # Closed means closed: a later update is not picked up (a poll by hand still works).
    volume.update({"tls.crt": pairs[2].cert, "tls.key": pairs[2].key})
    assert handed.empty()
    assert watch.poll(on_reload) == [PollResult.RELOADED]
    await watch.close()  # a second close is harmless


# -- the swap itself -------------------------------------------------------------------------------


def test_replace_certificates_keeps_the_rest_of_the_listener(
    volume: SecretVolume, pairs: tuple[Pair, Pair, Pair]
) -> None:
    from pqproxy.crypto.backends.openssl import OpenSSLProvider

    old = load_certified_key(volume.path("tls.crt"), volume.path("tls.key"))
    server_config = ServerConfig(
        certificates=(old,),
        groups=(NamedGroup.X25519MLKEM768, NamedGroup.x25519),
        pq_policy=PqPolicy.REQUIRE,
        alpn_protocols=("http/1.1",),
    )
    settings = ListenerSettings(
        host="127.0.0.1",
        port=8443,
        server_config=server_config,
        provider=OpenSSLProvider(),
        upstream_host="127.0.0.1",
        upstream_port=8000,
        handshake_timeout=3.0,
    )
    volume.update({"tls.crt": pairs[1].cert, "tls.key": pairs[1].key})
    new = load_certified_key(volume.path("tls.crt"), volume.path("tls.key"))
    swapped = replace_certificates(settings, (new,))
    assert [leaf(c) for c in swapped.server_config.certificates] == [pairs[1].leaf_der]
    assert swapped.server_config.groups == server_config.groups
    assert swapped.server_config.pq_policy is PqPolicy.REQUIRE
    assert swapped.server_config.alpn_protocols == ("http/1.1",)
    assert (swapped.host, swapped.port, swapped.handshake_timeout) == ("127.0.0.1", 8443, 3.0)
    assert swapped.provider is settings.provider
    # Connections accepted before keep what they have: the old objects are untouched.
    assert settings.server_config.certificates == (old,)
    # ServerConfig's own validation still applies.
    with pytest.raises(ValueError, match="at least one certificate"):
        replace_certificates(settings, ())


# -- the configuration (PENDING: the lead's integration of Config.cert_watch) ------------------

CONFIG_PENDING = "cert_watch" not in {f.name for f in dataclasses.fields(Config)}
pending = pytest.mark.skipif(
    CONFIG_PENDING, reason="PENDING: Config.cert_watch (lead's integration in pqproxy/config.py)"
)


def _config(text: str) -> Config:
    base = textwrap.dedent(
        """\
        listeners:
          - listen: 127.0.0.1:8443
            upstream: model
            tls: {certificates: [{cert: server.pem, key: server.key}]}
        upstreams:
          model: {servers: ["http://127.0.0.1:8000"]}
        """
    )
    return parse_config(load_yaml(base + text, "<test>"), Path("/"), check_files=False)


def _cert_watch(config: Config) -> object:
    # Through asdict: the field does not exist before the integration, and mypy must pass
    # on this file either way.
    return dataclasses.asdict(config)["cert_watch"]


@pending
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {"interval": 5.0}),  # on by default: a rotated Secret needs no one to act
        ("cert_watch: {}\n", {"interval": 5.0}),
        ("cert_watch: {interval: 250ms}\n", {"interval": 0.25}),
        ("cert_watch: {interval: 1m}\n", {"interval": 60.0}),
        ("cert_watch: null\n", None),
        ("cert_watch: off\n", None),  # YAML 1.1 reads an unquoted off as false
    ],
)
def test_config_cert_watch(text: str, expected: object) -> None:
    assert _cert_watch(_config(text)) == expected


@pending
@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("cert_watch: {interval: 0}\n", "cert_watch.interval: 0: must be more than 0"),
        ("cert_watch: {interval: soon}\n", "cert_watch.interval: 'soon' is not a duration"),
        ("cert_watch: {intervall: 5s}\n", "cert_watch.intervall: unknown key (did you mean"),
        ("cert_watch: 5s\n", "cert_watch: expected a mapping, got the string '5s'"),
    ],
)
def test_config_cert_watch_problems(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(text)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems
