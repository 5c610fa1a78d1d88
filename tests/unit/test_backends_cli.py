"""``pqproxy backends``: run as a process (``python -m pqproxy.backends_cli`` and through the
``register(subparsers)`` hook the main CLI uses), its JSON names every backend with either a
reason it is unavailable or a self-test result and a speed line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pqproxy import backends_cli
from pqproxy.crypto import selftest
from pqproxy.crypto.backends import BACKEND_MODULES, liboqs
from tests.conftest import REPO_ROOT

RUN_WAIT = 120.0
PKCS11_VARIABLES = (
    "PQPROXY_PKCS11_MODULE",
    "PQPROXY_PKCS11_TOKEN",
    "PQPROXY_PKCS11_PIN",
    "PQPROXY_PKCS11_PIN_FILE",
    "PQPROXY_PKCS11_KEY",
    "PQPROXY_PKCS11_OPERATIONS",
)
# The subcommand registered on a parser of its own, as pqproxy/cli.py registers it.
HARNESS = """
import argparse, sys
from pqproxy import backends_cli
parser = argparse.ArgumentParser(prog="pqproxy")
backends_cli.register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(backends_cli.run(args))
"""


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PKCS11_VARIABLES}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_WAIT,
        check=False,
    )


def _by_name(stdout: str) -> dict[str, dict[str, Any]]:
    document = json.loads(stdout)
    return {entry["name"]: entry for entry in document["backends"]}


def _liboqs_expected() -> bool:
    # liboqs-python installed means `make test` built liboqs (tests/backends/conftest.py).
    return importlib.util.find_spec("oqs") is not None


def test_json_lists_every_backend_with_a_reason_or_a_result() -> None:
    result = _run(
        ["-m", "pqproxy.backends_cli", "--json", "--speed-seconds", "0.05"], _environment()
    )
    assert result.returncode == 0, result.stderr
    entries = _by_name(result.stdout)
    assert list(entries) == list(BACKEND_MODULES)

    ossl = entries["openssl"]
    assert ossl["available"] is True and ossl["reason"] is None
    assert "X25519MLKEM768" in ossl["groups"]
    assert "ecdsa_secp256r1_sha256" in ossl["signature_schemes"]
    assert ossl["self_test"]["ok"] is True
    assert ossl["self_test"]["summary"].startswith("ok (")
    assert {c["name"] for c in ossl["self_test"]["checks"]} >= {"backend self-test"}
    speed = ossl["speed"]
    assert speed["kem"] == "ML-KEM-768" and speed["exchange_group"] == "X25519MLKEM768"
    for figure in ("keygen_per_s", "encaps_per_s", "decaps_per_s", "exchange_per_s", "sign_per_s"):
        assert speed[figure] > 0, figure

    oqs = entries["liboqs"]
    if _liboqs_expected():
        assert oqs["available"] is True, oqs["reason"]
        assert oqs["self_test"]["ok"] is True
        assert "FIPS 203 known answers" in oqs["self_test"]["method"]
        assert oqs["speed"]["encaps_per_s"] > 0
        assert "sign_per_s" not in oqs["speed"]  # liboqs signs nothing here
    else:
        assert oqs["available"] is False and oqs["reason"]

    p11 = entries["pkcs11"]
    assert p11["available"] is False
    assert p11["reason"] == "no PKCS#11 module configured: set PQPROXY_PKCS11_MODULE"
    assert p11["self_test"] is None and p11["speed"] is None


def test_registered_subcommand_prints_one_line_per_backend() -> None:
    result = _run(["-c", HARNESS, "backends", "--no-speed"], _environment())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("openssl: available (cryptography ")
    assert sum(line.startswith("  self-test:   ok (") for line in lines) >= 1
    assert not any(line.startswith("  speed:") for line in lines)
    assert "pkcs11: unavailable: no PKCS#11 module configured: set PQPROXY_PKCS11_MODULE" in lines


def test_pkcs11_from_the_environment_with_a_softhsm_token(tmp_path: Path) -> None:
    from tests.backends.softhsm import softhsm_token

    with softhsm_token(tmp_path / "hsm") as hsm:
        hsm.generate_ec_key("speed-key", b"\x07", "secp256r1")
        env = _environment(
            SOFTHSM2_CONF=str(hsm.conf),
            PQPROXY_PKCS11_MODULE=hsm.module,
            PQPROXY_PKCS11_TOKEN=hsm.label,
            PQPROXY_PKCS11_PIN_FILE=str(hsm.pin_file),
            PQPROXY_PKCS11_KEY="speed-key",
        )
        result = _run(["-m", "pqproxy.backends_cli", "--json", "--speed-seconds", "0.05"], env)
    assert result.returncode == 0, result.stderr
    p11 = _by_name(result.stdout)["pkcs11"]
    assert p11["available"] is True, p11["reason"]
    assert p11["token"] == [hsm.label]
    assert "SecP256r1MLKEM768" in p11["token_groups"]
    assert p11["self_test"]["ok"] is True, p11["self_test"]
    assert any(
        c["name"] == "cross-check secp256r1: pkcs11 serves, openssl client" and c["ok"]
        for c in p11["self_test"]["checks"]
    )
    assert p11["speed"]["exchange_group"] == "SecP256r1MLKEM768"
    assert p11["speed"]["sign_scheme"] == "ecdsa_secp256r1_sha256"
    assert p11["speed"]["sign_per_s"] > 0
    assert hsm.pin not in result.stdout + result.stderr


def test_a_failing_self_test_sets_exit_status_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if not liboqs.is_available():
        pytest.skip(f"liboqs unavailable: {liboqs.unavailable_reason()}")
    monkeypatch.setattr(selftest, "ACCUMULATED_768", "00" * 32)
    for name in PKCS11_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    status = backends_cli.main(["--no-speed"])
    out = capsys.readouterr().out
    assert status == 1
    assert "  self-test:   FAILED: FIPS 203 known answers\n" in out
    assert (
        "    failed: FIPS 203 known answers: SelfTestError: ML-KEM-768 accumulated vectors "
        "give 1114b1b6699ed191…, expected 0000000000000000…"
    ) in out
    assert out.splitlines()[0].startswith("openssl: available")


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert backends_cli.main(["--speed-seconds", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
