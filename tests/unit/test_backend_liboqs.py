"""What is specific to the liboqs backend: finding the library without ever
letting liboqs-python fetch and build it, its reports, its own modulus check,
its key lifetime. The behaviour every backend shares is in
tests/backends/test_backend_suite.py.

The probe tests run in a fresh interpreter each: whether ``oqs`` gets imported,
what it prints and which processes it starts are process-wide facts. An audit
hook (PEP 578) in that interpreter records every process start and network
connection, and refuses git, cmake and any connection, so even a regression
cannot reach the network.
"""

from __future__ import annotations

import ctypes.util
import gc
import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem

from pqproxy.crypto.backends import liboqs
from pqproxy.crypto.provider import InvalidKeyShare, SharedSecret

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_LIBOQS = Path(sys.prefix) / "liboqs"
Q = 3329

# Runs first in every child: records process starts and connections, refuses
# the ones liboqs-python's installer would make.
TRIPWIRE = textwrap.dedent(
    """
    import json, os, sys, time
    EVENTS = []

    def _hook(event, args):
        if event == "subprocess.Popen":
            argv = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            argv = [str(a) for a in argv]
            EVENTS.append({"popen": argv})
            if os.path.basename(argv[0]) in ("git", "cmake"):
                raise RuntimeError("tripwire: refused " + argv[0])
        elif event == "socket.connect":
            EVENTS.append({"connect": repr(args[1])})
            raise RuntimeError("tripwire: refused a connection")

    sys.addaudithook(_hook)

    def report(**fields):
        fields["events"] = EVENTS
        print("RESULT " + json.dumps(fields))
    """
)


def _run_child(
    code: str, env_changes: dict[str, str | None], timeout: float = 60
) -> dict[str, Any]:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    done = subprocess.run(
        [sys.executable, "-c", TRIPWIRE + textwrap.dedent(code)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and len(lines) == 1, (done.returncode, done.stdout, done.stderr)
    result: dict[str, Any] = json.loads(lines[0][len("RESULT ") :])
    result["stdout"] = [line for line in done.stdout.splitlines() if not line.startswith("RESULT ")]
    return result


@pytest.fixture
def empty_install(tmp_path: Path) -> dict[str, str | None]:
    """An environment where liboqs cannot be found: OQS_INSTALL_PATH an empty
    directory, and HOME and TMPDIR empty too, so that anything the installer
    would create (a clone in a temporary directory, ~/_oqs) would show."""
    if ctypes.util.find_library("oqs") or ctypes.util.find_library("liboqs"):
        pytest.skip("a system-wide liboqs is on the loader path: it cannot be made absent")
    for name in ("install", "home", "tmp"):
        (tmp_path / name).mkdir()
    return {
        "OQS_INSTALL_PATH": str(tmp_path / "install"),
        "HOME": str(tmp_path / "home"),
        "TMPDIR": str(tmp_path / "tmp"),
    }


def _nothing_created(env: dict[str, str | None]) -> None:
    for key in ("OQS_INSTALL_PATH", "HOME", "TMPDIR"):
        value = env[key]
        assert value is not None
        assert list(Path(value).iterdir()) == [], f"{key} is no longer empty"


def _started(events: list[dict[str, Any]]) -> list[str]:
    return [os.path.basename(e["popen"][0]) for e in events if "popen" in e]


# --- the probe ------------------------------------------------------------------------------


def test_missing_library_is_reported_without_any_install_attempt(
    empty_install: dict[str, str | None],
) -> None:
    result = _run_child(
        """
        import pqproxy.crypto.backends.liboqs as backend
        imported_at_import = "oqs" in sys.modules
        start = time.perf_counter()
        available = backend.is_available()
        elapsed = time.perf_counter() - start
        refusals = []
        for call in (backend.create_provider, backend.self_test):
            try:
                call()
                refusals.append(None)
            except Exception as exc:
                refusals.append(type(exc).__name__ + ": " + str(exc))
        report(
            elapsed=elapsed,
            imported_at_import=imported_at_import,
            imported=sys.modules.get("oqs") is not None,
            available=available,
            reason=backend.unavailable_reason(),
            capabilities=backend.capabilities(),
            refusals=refusals,
        )
        """,
        empty_install,
    )
    assert result["available"] is False
    reason = result["reason"]
    assert reason.startswith("liboqs shared library not found")
    assert f"{empty_install['OQS_INSTALL_PATH']}/lib/liboqs.so" in reason
    for hint in ("make liboqs", "OQS_INSTALL_PATH", "distribution package"):
        assert hint in reason
    assert result["imported_at_import"] is False
    assert result["imported"] is False
    assert not {"git", "cmake"} & set(_started(result["events"]))
    assert not [e for e in result["events"] if "connect" in e]
    # liboqs-python's installer alone counts down five seconds before cloning.
    assert result["elapsed"] < 2.0
    assert result["capabilities"]["groups"] == []
    for refusal in result["refusals"]:
        assert refusal == f"BackendError: liboqs backend unavailable: {reason}"
    _nothing_created(empty_install)


def test_importing_oqs_directly_would_fetch_liboqs(empty_install: dict[str, str | None]) -> None:
    """The control for the test above: in the same environment, a plain
    ``import oqs`` starts a git clone of liboqs from GitHub (refused here by the
    tripwire). If a liboqs-python release stops doing that, this fails, and the
    probe in the backend may be simplified."""
    if importlib.util.find_spec("oqs") is None:
        pytest.skip("liboqs-python is not installed")
    result = _run_child(
        """
        time.sleep = lambda seconds: None  # its five-second countdown
        try:
            import oqs
            outcome = "imported"
        except BaseException as exc:
            outcome = type(exc).__name__ + ": " + str(exc)
        report(outcome=outcome)
        """,
        empty_install,
    )
    assert result["outcome"].startswith("RuntimeError: tripwire: refused git")
    clones = [e["popen"] for e in result["events"] if "popen" in e and "git" in e["popen"][0]]
    assert len(clones) == 1
    assert "clone" in clones[0]
    assert "https://github.com/open-quantum-safe/liboqs" in clones[0]


def test_missing_liboqs_python_is_reported(empty_install: dict[str, str | None]) -> None:
    result = _run_child(
        """
        sys.modules["oqs"] = None  # how an absent package looks to the import system
        import pqproxy.crypto.backends.liboqs as backend
        report(available=backend.is_available(), reason=backend.unavailable_reason())
        """,
        empty_install,
    )
    assert result["available"] is False
    assert result["reason"] == "liboqs-python is not installed: pip install 'pqproxy[liboqs]'"


def test_library_in_the_venv_is_found_quietly() -> None:
    """``make liboqs`` installs into <venv>/liboqs; with OQS_INSTALL_PATH unset
    the backend finds it there, imports ``oqs`` only when asked, leaves the
    environment as it was and keeps liboqs-python's log line off stdout."""
    if not (VENV_LIBOQS / "lib" / "liboqs.so").exists():
        pytest.skip(f"no liboqs in {VENV_LIBOQS}: run `make liboqs`")
    result = _run_child(
        """
        import pqproxy.crypto.backends.liboqs as backend
        imported_at_import = "oqs" in sys.modules
        available = backend.is_available()
        report(
            imported_at_import=imported_at_import,
            available=available,
            reason=backend.unavailable_reason(),
            library=backend.capabilities()["library"],
            env_after=os.environ.get("OQS_INSTALL_PATH"),
        )
        """,
        {"OQS_INSTALL_PATH": None},
    )
    assert result["reason"] is None and result["available"] is True
    assert result["imported_at_import"] is False
    assert result["library"][0].startswith("liboqs 0.16")
    assert f"({VENV_LIBOQS}/lib/liboqs.so)" in result["library"][0]
    assert result["env_after"] is None
    assert result["stdout"] == []
    assert not {"git", "cmake"} & set(_started(result["events"]))


# --- with the library -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def available() -> None:
    if not liboqs.is_available():
        reason = f"liboqs backend unavailable: {liboqs.unavailable_reason()}"
        if importlib.util.find_spec("oqs") is not None:
            pytest.fail(f"{reason} (liboqs-python is installed: run `make liboqs`)")
        pytest.skip(reason)


@pytest.mark.usefixtures("available")
def test_reports_name_the_library_and_the_split_of_work() -> None:
    caps = liboqs.capabilities()
    version, _, location = caps["library"][0].partition(" (")
    assert version.startswith("liboqs 0.16")
    assert Path(location.rstrip(")")).is_file()
    assert caps["kems"] == ["ML-KEM-512", "ML-KEM-768", "ML-KEM-1024"]
    assert caps["groups"][:3] == ["X25519MLKEM768", "SecP256r1MLKEM768", "SecP384r1MLKEM1024"]
    assert {"ML-DSA-44", "ML-DSA-65", "ML-DSA-87"} <= set(caps["library_signatures"])
    provider = liboqs.create_provider()
    assert provider.name == "liboqs+openssl"
    assert provider.groups[0x11EC].backend == "liboqs+openssl"
    assert provider.groups[0x001D].backend == "openssl"


@pytest.mark.usefixtures("available")
def test_encapsulate_returns_ciphertext_then_secret_that_openssl_recovers() -> None:
    private_key = mlkem.MLKEM768PrivateKey.generate()
    ciphertext, secret = liboqs.kems()["ML-KEM-768"].encapsulate(
        private_key.public_key().public_bytes_raw()
    )
    assert isinstance(secret, SharedSecret)
    assert (len(ciphertext), len(secret)) == (1088, 32)
    assert private_key.decapsulate(ciphertext) == secret


@pytest.mark.usefixtures("available")
def test_encapsulation_key_with_bad_coefficient_is_invalid_key_share() -> None:
    kem = liboqs.kems()["ML-KEM-1024"]
    with pytest.raises(InvalidKeyShare, match="modulus check"):
        kem.encapsulate(b"\xff" * 1536 + bytes(32))


@pytest.mark.usefixtures("available")
def test_unknown_parameter_set_is_refused() -> None:
    with pytest.raises(ValueError, match="ML-KEM-999"):
        liboqs.LiboqsKem("ML-KEM-999")


@pytest.mark.usefixtures("available")
def test_dropping_a_key_pair_frees_and_wipes_it() -> None:
    decapsulator = liboqs.kems()["ML-KEM-768"].generate()
    finalizer = decapsulator._finalizer
    assert finalizer.alive
    del decapsulator
    gc.collect()
    assert not finalizer.alive


@pytest.mark.usefixtures("available")
def test_self_test_passes() -> None:
    liboqs.self_test()


# --- the modulus check, against a coefficient-by-coefficient reference ----------------------


def _reference_check(key: bytes) -> bool:
    """FIPS 203 §7.2 read literally: ByteDecode12 then compare each with q."""
    k = (len(key) - 32) // 384
    if k not in (2, 3, 4) or len(key) != 384 * k + 32:
        return False
    for at in range(0, 384 * k, 3):
        b0, b1, b2 = key[at : at + 3]
        if (b0 | (b1 & 0x0F) << 8) >= Q or (b1 >> 4 | b2 << 4) >= Q:
            return False
    return True


def _with_coefficient(key: bytes, index: int, value: int) -> bytes:
    body = int.from_bytes(key[:-32], "little")
    body = body & ~(0xFFF << 12 * index) | value << 12 * index
    return body.to_bytes(len(key) - 32, "little") + key[-32:]


@pytest.mark.parametrize(
    "generate", [mlkem.MLKEM768PrivateKey.generate, mlkem.MLKEM1024PrivateKey.generate]
)
def test_modulus_check_matches_the_reference(generate: Any) -> None:
    rng = random.Random(203)
    for _ in range(20):
        key = generate().public_key().public_bytes_raw()
        assert liboqs.modulus_check(key) is _reference_check(key) is True
        index = rng.randrange((len(key) - 32) * 8 // 12)
        for value in (Q - 1, Q, rng.randrange(Q, 4096), 4095, 0):
            changed = _with_coefficient(key, index, value)
            assert liboqs.modulus_check(changed) is _reference_check(changed) is (value < Q)


def test_modulus_check_refuses_a_key_of_no_ml_kem_size() -> None:
    for length in (0, 32, 800 - 1, 1184 + 1, 384 * 5 + 32):
        assert liboqs.modulus_check(bytes(length)) is False
    assert liboqs.modulus_check(bytes(800)) is True
