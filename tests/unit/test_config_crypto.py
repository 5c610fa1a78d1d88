"""The ``crypto:`` section: which backend, how its calls run (pqproxy.crypto.offload)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pqproxy.config import (
    BatchConfig,
    BreakerConfig,
    ConfigError,
    CryptoConfig,
    parse_config,
    parse_duration,
)
from pqproxy.crypto.offload import OffloadMode


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "server.pem").write_text("")
    (tmp_path / "server.key").write_text("")
    return tmp_path


def config_with(crypto: Any) -> dict[str, Any]:
    return {
        "crypto": crypto,
        "listeners": [
            {
                "listen": "127.0.0.1:8443",
                "upstream": "demo",
                "tls": {"certificates": [{"cert": "server.pem", "key": "server.key"}]},
            }
        ],
        "upstreams": {"demo": {"servers": ["http://127.0.0.1:8000"]}},
    }


def problems(data: object, base_dir: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir)
    return info.value.problems


def test_default_is_openssl_inline(base: Path) -> None:
    data = config_with(None)
    del data["crypto"]
    assert parse_config(data, base).crypto == CryptoConfig()
    assert CryptoConfig().offload is OffloadMode.INLINE


def test_full_section(base: Path) -> None:
    config = parse_config(
        config_with(
            {
                "backend": "liboqs",
                "offload": "batch",
                "workers": 2,
                "concurrency": 128,
                "timeout": "1500ms",
                "batch": {"max_items": 16, "max_delay": "250us"},
                "fallback": "openssl",
                "breaker": {"failures": 3, "probe_interval": "2s"},
            }
        ),
        base,
    )
    assert config.crypto == CryptoConfig(
        backend="liboqs",
        offload=OffloadMode.BATCH,
        workers=2,
        concurrency=128,
        timeout=1.5,
        batch=BatchConfig(16, 250e-6),
        fallback="openssl",
        breaker=BreakerConfig(3, 2.0),
    )


def test_microseconds_are_a_duration() -> None:
    assert parse_duration("200us") == pytest.approx(200e-6)
    assert parse_duration("200µs") == pytest.approx(200e-6)


@pytest.mark.parametrize(
    ("crypto", "expected"),
    [
        (
            {"backend": "gpu"},
            "crypto.backend: expected one of openssl, liboqs, pkcs11, got the string 'gpu'",
        ),
        ({"offload": "fork"}, "crypto.offload: expected one of inline, thread, process, batch"),
        ({"fallback": "openssl"}, "crypto.fallback: must be another backend than openssl"),
        (
            {"backend": "pkcs11", "offload": "process"},
            "crypto.backend: pkcs11 cannot run in offload: process",
        ),
        (
            {"offload": "process", "fallback": "pkcs11"},
            "crypto.fallback: pkcs11 cannot run in offload: process",
        ),
        ({"batch": {"max_items": 4}}, "crypto.batch: applies to offload: batch only"),
        ({"breaker": {"failures": 2}}, "crypto.breaker: applies with a fallback only"),
        ({"workers": 0}, "crypto.workers: 0 is too small (minimum 1)"),
        ({"timeout": "0s"}, "crypto.timeout: '0s': must be more than 0"),
        ({"offload": "batch", "batch": {"size": 4}}, "crypto.batch.size: unknown key"),
        ({"threads": 4}, "crypto.threads: unknown key"),
    ],
)
def test_problems_name_the_key(base: Path, crypto: dict[str, Any], expected: str) -> None:
    found = problems(config_with(crypto), base)
    assert any(p.startswith(expected) for p in found), found
