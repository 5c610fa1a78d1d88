"""The observability keys of the configuration: ``logging.destination`` (stderr, stdout or a
file) and ``listeners[].tls.key_log_file``, their defaults and every error path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pqproxy.config import ConfigError, LoggingConfig, describe, parse_config


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "server.pem").write_text("")
    (tmp_path / "server.key").write_text("")
    return tmp_path


def config_data(logging: object = None, **tls: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listeners": [
            {
                "listen": "127.0.0.1:8443",
                "upstream": "demo",
                "tls": {"certificates": [{"cert": "server.pem", "key": "server.key"}], **tls},
            }
        ],
        "upstreams": {"demo": {"servers": ["http://127.0.0.1:8000"]}},
    }
    if logging is not None:
        data["logging"] = logging
    return data


def problems(data: object, base_dir: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir)
    return info.value.problems


def test_defaults_log_to_stderr_without_a_key_log(base: Path) -> None:
    config = parse_config(config_data(), base)
    assert config.logging == LoggingConfig(destination="stderr")
    assert config.listeners[0].tls.key_log_file is None


@pytest.mark.parametrize(("value", "expected"), [("stderr", "stderr"), ("STDOUT", "stdout")])
def test_log_streams(base: Path, value: str, expected: str) -> None:
    config = parse_config(config_data({"destination": value}), base)
    assert config.logging.destination == expected


def test_log_file_is_resolved_against_the_config_directory(base: Path) -> None:
    (base / "logs").mkdir()
    config = parse_config(config_data({"destination": "logs/pqproxy.log"}), base)
    assert config.logging.destination == os.fspath(base / "logs" / "pqproxy.log")
    # A file literally named like a stream is written with a path.
    config = parse_config(config_data({"destination": "./stderr"}), base)
    assert config.logging.destination == os.fspath(base / "stderr")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("missing-dir/pqproxy.log", "logging.destination: no such directory: "),
        (".", "logging.destination: is a directory: "),
        (42, "logging.destination: expected a log file path, stderr or stdout, got the number 42"),
        ("", "logging.destination: expected a log file path, stderr or stdout, got the string"),
    ],
)
def test_bad_log_destinations(base: Path, value: object, message: str) -> None:
    found = problems(config_data({"destination": value}), base)
    assert len(found) == 1 and found[0].startswith(message), found


def test_unwritable_log_file(base: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: the permission check cannot fail")
    locked = base / "locked"
    locked.mkdir(mode=0o500)
    found = problems(config_data({"destination": "locked/pqproxy.log"}), base)
    assert found == [f"logging.destination: cannot create a file in {locked}"]


def test_log_destination_files_can_be_left_unchecked(base: Path) -> None:
    config = parse_config(
        config_data({"destination": "missing-dir/x.log"}), base, check_files=False
    )
    assert config.logging.destination == os.fspath(base / "missing-dir" / "x.log")


def test_key_log_file(base: Path) -> None:
    config = parse_config(config_data(key_log_file="keys.log"), base)
    assert config.listeners[0].tls.key_log_file == base / "keys.log"
    assert f"key log {base / 'keys.log'} (debugging only)" in describe(config)


def test_key_log_file_null_is_off(base: Path) -> None:
    assert parse_config(config_data(key_log_file=None), base).listeners[0].tls.key_log_file is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nowhere/keys.log", "listeners[0].tls.key_log_file: no such directory: "),
        (["a"], "listeners[0].tls.key_log_file: expected a key log file path, got a list"),
    ],
)
def test_bad_key_log_file(base: Path, value: object, message: str) -> None:
    found = problems(config_data(key_log_file=value), base)
    assert len(found) == 1 and found[0].startswith(message), found


def test_unknown_logging_key_suggests_destination(base: Path) -> None:
    found = problems(config_data({"destinaton": "stderr"}), base)
    assert found == ["logging.destinaton: unknown key (did you mean 'destination'?)"]
