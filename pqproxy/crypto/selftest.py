"""Start-up self-tests: before a listener accepts, each configured backend shows that it
computes what FIPS 203 and an independent implementation say, and every signing key signs
and verifies against its certificate. A mismatch is a ``SelfTestError``; start-up is refused
with its message.

Three kinds of evidence, strongest first:

- **Known answers (FIPS 203)** where the backend takes fixed randomness. liboqs does
  (``OQS_KEM_keypair_derand``, ``OQS_KEM_encaps_derand``), so ML-KEM-768 is run through the
  accumulated vectors of Go's ``crypto/mlkem`` (``TestAccumulated``, the 100-iteration value
  of its short mode): a SHAKE-128 stream of the empty string supplies each iteration's key
  seed d ‖ z, message m and a random ciphertext; ek, the ciphertext, the secret, and the
  implicit-rejection secret of the random ciphertext are absorbed into a second SHAKE-128,
  whose first 32 bytes must match. Key generation, encapsulation, decapsulation and implicit
  rejection are all covered. cryptography (the openssl backend) takes no fixed randomness
  for encapsulation, and PKCS#11 has none at all: they get the cross-check only.
- **Cross-check** with another implementation, at the level the server uses it: for every
  group both have, the backend serves a client key share made by the reference (the openssl
  backend; liboqs when the backend under test is openssl itself) and both must derive the
  same secret; then the other way round. A hybrid's layout is checked with it.
- **The backend's own ``self_test()``** (its known answers, e.g. RFC 7748 for X25519, and
  round trips through every group).

This module runs on the caller's thread (start-up, ``pqproxy backends``): no event loop.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509

from ..tls.enums import SignatureScheme, group_name
from .backends import BACKEND_MODULES
from .provider import BackendError, CertifiedKey, CryptoProvider, KxGroup, Signer

DEFAULT_BACKEND: Final = "openssl"

# Go crypto/mlkem (src/crypto/mlkem/mlkem_test.go) TestAccumulated, testing.Short():
# 100 iterations of ML-KEM-768 (FIPS 203 final).
ACCUMULATED_ITERATIONS: Final = 100
ACCUMULATED_768: Final = "1114b1b6699ed191734fa339376afa7e285c9e6acf6ff0177d346696ce564415"
# FIPS 203 Table 3 sizes for ML-KEM-768: ek, dk, ciphertext; the secret is 32 bytes, the
# key-generation seed d ‖ z 64 and the encapsulation message m 32.
_MLKEM768_SIZES: Final = (1184, 2400, 1088)


class SelfTestError(BackendError):
    """A backend or a signing key failed its start-up self-test."""


@dataclass(frozen=True)
class Check:
    """One self-test step: ``ok`` True (passed), False (failed) or None (skipped, with why)."""

    name: str
    ok: bool | None
    detail: str = ""


@dataclass(frozen=True)
class SelfTestReport:
    backend: str
    checks: tuple[Check, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(check.ok is not False for check in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if check.ok is False)

    @property
    def method(self) -> str:
        """What the passing checks amount to, in a few words."""
        passed = [check.name for check in self.checks if check.ok]
        kinds = []
        if any(name.startswith("FIPS 203") for name in passed):
            kinds.append("FIPS 203 known answers")
        if any(name.startswith("cross-check") for name in passed):
            kinds.append("cross-check")
        if any(name.startswith("signature") for name in passed):
            kinds.append("signatures verify")
        if "backend self-test" in passed:
            kinds.append("backend self-test")
        return " + ".join(kinds) or "nothing passed"

    def summary(self) -> str:
        if not self.ok:
            return "FAILED: " + ", ".join(check.name for check in self.failures)
        passed = sum(1 for check in self.checks if check.ok)
        return f"ok ({self.method}; {passed} checks, {self.seconds * 1000:.0f} ms)"


def _module(backend: str) -> Any:
    return importlib.import_module(BACKEND_MODULES[backend])


def _run(name: str, step: Callable[[], str | None]) -> Check:
    """A step returns a detail line (passed) or raises (failed, with the reason)."""
    try:
        detail = step()
    except _Skip as skip:
        return Check(name, None, str(skip))
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        return Check(name, False, f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
    return Check(name, True, detail or "")


class _Skip(Exception):
    pass


# --- FIPS 203 known answers on liboqs -----------------------------------------------------------


class _LiboqsDerand:
    """liboqs's derandomised ML-KEM entry points, bound on a ctypes handle of our own: the
    library liboqs-python loaded, opened again (the loader returns the same mapping), so
    the argument types set here cannot change the prototypes liboqs-python relies on."""

    def __init__(self, algorithm: str) -> None:
        oqs = sys.modules.get("oqs")
        if oqs is None:  # the backend's probe imports it; never import it here (see liboqs.py)
            raise BackendError("liboqs-python is not loaded")
        lib = ctypes.CDLL(oqs.native()._name)
        p = ctypes.c_char_p
        lib.OQS_KEM_new.restype = ctypes.c_void_p
        lib.OQS_KEM_new.argtypes = [p]
        lib.OQS_KEM_free.restype = None
        lib.OQS_KEM_free.argtypes = [ctypes.c_void_p]
        lib.OQS_KEM_keypair_derand.argtypes = [ctypes.c_void_p, p, p, p]
        lib.OQS_KEM_encaps_derand.argtypes = [ctypes.c_void_p, p, p, p, p]
        lib.OQS_KEM_decaps.argtypes = [ctypes.c_void_p, p, p, p]
        for function in ("OQS_KEM_keypair_derand", "OQS_KEM_encaps_derand", "OQS_KEM_decaps"):
            getattr(lib, function).restype = ctypes.c_int
        self._lib = lib
        self._kem = lib.OQS_KEM_new(algorithm.encode())
        if not self._kem:
            raise BackendError(f"liboqs has no {algorithm}")

    def close(self) -> None:
        if self._kem:
            self._lib.OQS_KEM_free(self._kem)
            self._kem = None

    def keypair(self, seed: bytes, ek_len: int, dk_len: int) -> tuple[bytes, bytes]:
        ek, dk = ctypes.create_string_buffer(ek_len), ctypes.create_string_buffer(dk_len)
        if self._lib.OQS_KEM_keypair_derand(self._kem, ek, dk, seed) != 0:
            raise BackendError("OQS_KEM_keypair_derand failed")
        return ek.raw, dk.raw

    def encaps(self, ek: bytes, m: bytes, ct_len: int) -> tuple[bytes, bytes]:
        ct, k = ctypes.create_string_buffer(ct_len), ctypes.create_string_buffer(32)
        if self._lib.OQS_KEM_encaps_derand(self._kem, ct, k, ek, m) != 0:
            raise BackendError("OQS_KEM_encaps_derand failed")
        return ct.raw, k.raw

    def decaps(self, dk: bytes, ct: bytes) -> bytes:
        k = ctypes.create_string_buffer(32)
        if self._lib.OQS_KEM_decaps(self._kem, k, ct, dk) != 0:
            raise BackendError("OQS_KEM_decaps failed")
        return k.raw


def accumulated_mlkem768(iterations: int = ACCUMULATED_ITERATIONS) -> str:
    """The accumulated-vector digest of liboqs's ML-KEM-768 (see the module docstring)."""
    ek_len, dk_len, ct_len = _MLKEM768_SIZES
    stream = hashlib.shake_128(b"").digest(iterations * (64 + 32 + ct_len))
    accumulator = hashlib.shake_128()
    kem = _LiboqsDerand("ML-KEM-768")
    try:
        position = 0

        def take(count: int) -> bytes:
            nonlocal position
            position += count
            return stream[position - count : position]

        for _ in range(iterations):
            ek, dk = kem.keypair(take(64), ek_len, dk_len)
            accumulator.update(ek)
            ct, k = kem.encaps(ek, take(32), ct_len)
            accumulator.update(ct)
            accumulator.update(k)
            if kem.decaps(dk, ct) != k:
                raise SelfTestError("ML-KEM-768 decapsulation disagrees with encapsulation")
            accumulator.update(kem.decaps(dk, take(ct_len)))
    finally:
        kem.close()
    return accumulator.hexdigest(32)


def _fips203_liboqs() -> str:
    got = accumulated_mlkem768()
    if got != ACCUMULATED_768:
        raise SelfTestError(
            f"ML-KEM-768 accumulated vectors give {got[:16]}…, expected {ACCUMULATED_768[:16]}…"
        )
    return f"ML-KEM-768, {ACCUMULATED_ITERATIONS} accumulated vectors (Go crypto/mlkem)"


# --- cross-check with another implementation --------------------------------------------------


def _round_trip(server: KxGroup, client_side: KxGroup) -> None:
    client = client_side.start()
    share, secret = server.server_exchange(client.share)
    if len(share) != server.server_share_length:
        raise SelfTestError(f"server share is {len(share)} bytes, not {server.server_share_length}")
    if client.complete(share) != secret:
        raise SelfTestError("the two sides derive different secrets")


def cross_check(
    name: str, provider: CryptoProvider, reference_name: str, reference: CryptoProvider
) -> list[Check]:
    """Every group both providers have in different implementations, served by each for a
    client of the other."""
    checks = []
    for code, ours in provider.groups.items():
        theirs = reference.groups.get(code)
        # The same implementation on both sides (liboqs's classical groups are openssl's)
        # would only check itself.
        if theirs is None or theirs.backend == ours.backend:
            continue
        label = group_name(code)
        checks.append(
            _run(
                f"cross-check {label}: {name} serves, {reference_name} client",
                functools.partial(_round_trip, ours, theirs),
            )
        )
        checks.append(
            _run(
                f"cross-check {label}: {reference_name} serves, {name} client",
                functools.partial(_round_trip, theirs, ours),
            )
        )
    return checks


# --- signing keys ---------------------------------------------------------------------------------


def _scheme_name(scheme: int) -> str:
    try:
        return SignatureScheme(scheme).name
    except ValueError:
        return f"0x{scheme:04x}"


def _sign_and_verify(signer: Signer, public_key: Any, scheme: int, message: bytes) -> str:
    from .backends.openssl import verify_signature

    signature = signer.sign(scheme, message)
    verify_signature(public_key, scheme, message, signature)
    return f"{signer.backend}, {len(signature)} bytes"


def check_signers(certified_keys: Iterable[CertifiedKey]) -> list[Check]:
    """Each key signs a CertificateVerify-shaped message under each of its schemes, and the
    signature verifies with the public key of its certificate (so the key also matches it)."""
    checks = []
    for certified in certified_keys:
        leaf = x509.load_der_x509_certificate(certified.chain[0])
        public_key = leaf.public_key()
        subject = leaf.subject.rfc4514_string() or "certificate"
        # RFC 8446 §4.4.3: 64 spaces, the context string, a zero byte, a transcript hash.
        message = b" " * 64 + b"TLS 1.3, server CertificateVerify\x00" + os.urandom(48)
        for scheme in certified.signer.schemes:
            step = functools.partial(
                _sign_and_verify, certified.signer, public_key, scheme, message
            )
            checks.append(_run(f"signature {_scheme_name(scheme)} ({subject})", step))
    return checks


# --- per backend ----------------------------------------------------------------------------------


def self_test_backend(
    name: str,
    provider: CryptoProvider | None = None,
    *,
    reference: CryptoProvider | None = None,
    pkcs11_config: Any = None,
) -> SelfTestReport:
    """Every self-test of the backend ``name``. ``provider``: the one that will serve
    (created here if None); ``reference``: the implementation to cross-check with (the
    openssl backend, or liboqs for openssl itself). Raises nothing: see the report."""
    started = time.perf_counter()
    module = _module(name)
    checks: list[Check] = []
    # pkcs11 takes its configuration; the other backends need none.
    extra = (pkcs11_config,) if name == "pkcs11" else ()
    reason = module.unavailable_reason(*extra)
    if reason is not None:
        checks.append(Check("available", False, reason))
        return SelfTestReport(name, tuple(checks), time.perf_counter() - started)

    checks.append(_run("backend self-test", lambda: module.self_test(*extra)))

    def fips203() -> str:
        if name == "liboqs":
            return _fips203_liboqs()
        raise _Skip("the backend takes no fixed randomness for encapsulation: cross-check instead")

    checks.append(_run("FIPS 203 known answers", fips203))

    created = provider is None
    if provider is None:
        try:
            provider = module.create_provider(*extra)
        except Exception as exc:
            checks.append(Check("create provider", False, f"{type(exc).__name__}: {exc}"))
            return SelfTestReport(name, tuple(checks), time.perf_counter() - started)
    assert provider is not None
    reference_name = DEFAULT_BACKEND if name != DEFAULT_BACKEND else "liboqs"
    if reference is None:
        reference_module = _module(reference_name)
        if reference_module.is_available():
            reference = reference_module.create_provider()
    if reference is None:
        checks.append(
            Check("cross-check", None, f"no second implementation ({reference_name}) installed")
        )
    else:
        checks.extend(cross_check(name, provider, reference_name, reference))
    close = getattr(provider, "close", None)
    if created and callable(close):
        close()  # a token session is shared and counted: give back only what was taken
    return SelfTestReport(name, tuple(checks), time.perf_counter() - started)


def run_startup_self_tests(
    backends: Sequence[str],
    certified_keys: Iterable[CertifiedKey] = (),
    *,
    providers: Mapping[str, CryptoProvider] | None = None,
    pkcs11_config: Any = None,
) -> list[SelfTestReport]:
    """The start-up gate: every configured backend (the primary and the fallback) and every
    certificate's key. Returns the reports (for the log); raises SelfTestError naming every
    failed check when anything failed."""
    providers = providers or {}
    reports = [
        self_test_backend(name, providers.get(name), pkcs11_config=pkcs11_config)
        for name in dict.fromkeys(backends)
    ]
    started = time.perf_counter()
    signer_checks = check_signers(certified_keys)
    if signer_checks:
        reports.append(
            SelfTestReport("signing keys", tuple(signer_checks), time.perf_counter() - started)
        )
    failed = [f"{r.backend}: {c.name}: {c.detail}" for r in reports for c in r.failures]
    if failed:
        raise SelfTestError("self-test failed: " + "; ".join(failed))
    return reports


__all__ = [
    "ACCUMULATED_768",
    "Check",
    "SelfTestError",
    "SelfTestReport",
    "accumulated_mlkem768",
    "check_signers",
    "cross_check",
    "run_startup_self_tests",
    "self_test_backend",
]
