"""The liboqs backend: ML-KEM from liboqs (through liboqs-python), the classical
halves of the hybrids from the default openssl backend.

liboqs-python loads the liboqs shared library when ``oqs`` is first imported.
When it finds none, version 0.16 clones liboqs from GitHub and builds it right
there, after a five-second countdown, and raises SystemExit if that fails
(``oqs.oqs._load_liboqs`` calls ``_install_liboqs``; no setting turns this
off). A proxy must never do that at start-up, so this module never imports
``oqs`` at import time: it first looks for the library where liboqs-python
would, in the same order, and imports ``oqs`` only once a candidate has
loaded. The order (``oqs.oqs._load_shared_obj``): the loader path
(``ctypes.util.find_library`` for "liboqs", then "oqs"), then
``$OQS_INSTALL_PATH/lib`` and ``lib64``, with ``~/_oqs`` when the variable is
unset. pqproxy adds one place of its own before ``~/_oqs``: ``<venv>/liboqs``,
where ``make liboqs`` installs.

Error policy as in the openssl backend: a bad peer share is
``InvalidKeyShare``, any other library failure ``BackendError``; messages
never carry input or key material.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import sys
import warnings
import weakref
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, Final

from ...tls.enums import group_name
from ..hybrid import compose_groups
from ..provider import (
    BackendError,
    InvalidKeyShare,
    Kem,
    KxGroup,
    SharedSecret,
    check_share_length,
)
from . import openssl

NAME: Final = "liboqs"
# The hybrids pair liboqs's ML-KEM with the openssl backend's X25519/ECDH.
PROVIDER_NAME: Final = "liboqs+openssl"

NOT_FOUND: Final = "liboqs shared library not found"
INSTALL_HINT: Final = (
    "install liboqs (>= 0.16, with ML-KEM) from a distribution package where one exists, "
    "or run `make liboqs` in the pqproxy checkout (builds the pinned release into "
    ".venv/liboqs; LIBOQS_SRC=<release tarball or URL> picks the source), "
    "or set OQS_INSTALL_PATH to the install prefix of an existing build"
)
PIP_HINT: Final = "pip install 'pqproxy[liboqs]'"

# FIPS 203 Table 3: (encapsulation key, ciphertext) lengths; the secret is 32 bytes.
MLKEM_PARAMETERS: Final[dict[str, tuple[int, int]]] = {
    "ML-KEM-512": (800, 768),
    "ML-KEM-768": (1184, 1088),
    "ML-KEM-1024": (1568, 1568),
}
_SECRET_LENGTH: Final = 32
# Without these two there is no hybrid group to serve; ML-KEM-512 is optional.
_REQUIRED_KEMS: Final = ("ML-KEM-768", "ML-KEM-1024")

_LIBRARY_SUFFIX: Final = ".dylib" if sys.platform == "darwin" else ".so"


# --- finding the library without letting liboqs-python fetch it --------------------------


@dataclass(frozen=True)
class _Loaded:
    oqs: ModuleType
    library: str  # what the loader opened, as liboqs-python reports it
    version: str  # liboqs's own OQS_version()
    python_version: str  # liboqs-python's


def _install_dir(environ: Mapping[str, str]) -> tuple[Path | None, bool]:
    """The directory liboqs-python will search, and whether pqproxy has to set
    OQS_INSTALL_PATH for it (the venv location is pqproxy's, not liboqs-python's)."""
    if "OQS_INSTALL_PATH" in environ:
        return Path(environ["OQS_INSTALL_PATH"]), False
    venv_dir = Path(sys.prefix) / "liboqs"
    if any((venv_dir / lib / f"liboqs{_LIBRARY_SUFFIX}").exists() for lib in ("lib", "lib64")):
        return venv_dir, True
    try:
        return Path.home() / "_oqs", False
    except RuntimeError:  # no home directory to resolve: nothing to search there
        return None, False


def _candidates(install_dir: Path | None) -> list[str]:
    """The paths liboqs-python 0.16 tries, in its order."""
    found: list[str] = []
    for name in ("liboqs", "oqs"):
        try:
            soname = ctypes.util.find_library(name)
        except Exception:  # liboqs-python ignores a failing lookup too
            soname = None
        if soname:
            found.append(soname)
    if install_dir is not None:
        for lib in ("lib", "lib64"):
            found.append(str(install_dir.absolute() / lib / f"liboqs{_LIBRARY_SUFFIX}"))
    return found


def _first_loadable(candidates: list[str]) -> str | None:
    for candidate in candidates:
        try:
            ctypes.CDLL(candidate)
        except OSError:
            continue
        return candidate
    return None


def _import_oqs(install_dir: Path | None, set_install_path: bool) -> ModuleType:
    """Import liboqs-python once its library is known to load."""
    # liboqs-python attaches a stdout handler to its logger and logs a line at
    # import; a proxy's stdout is not a library's. Mute it for the import and
    # hand its records to the application's logging afterwards.
    logger = logging.getLogger("oqs.oqs")
    logger.disabled = True
    environ: MutableMapping[str, str] = os.environ
    try:
        with warnings.catch_warnings():
            # Its only import-time warning is a liboqs/liboqs-python version
            # mismatch, which _load() checks and reports itself.
            warnings.simplefilter("ignore")
            if set_install_path and install_dir is not None:
                environ["OQS_INSTALL_PATH"] = str(install_dir)
                try:
                    return importlib.import_module("oqs")
                finally:
                    del environ["OQS_INSTALL_PATH"]
            return importlib.import_module("oqs")
    finally:
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logger.disabled = False


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def _probe() -> _Loaded | str:
    # Already imported by someone else: its library is loaded, nothing to probe.
    imported = sys.modules.get("oqs") is not None
    if not imported and importlib.util.find_spec("oqs") is None:
        return f"liboqs-python is not installed: {PIP_HINT}"
    install_dir, set_install_path = _install_dir(os.environ)
    if not imported:
        candidates = _candidates(install_dir)
        if _first_loadable(candidates) is None:
            return f"{NOT_FOUND} (tried {', '.join(candidates) or 'nothing'}); {INSTALL_HINT}"
    oqs = _import_oqs(install_dir, set_install_path)
    loaded = _Loaded(
        oqs=oqs,
        library=str(oqs.native()._name),
        version=str(oqs.oqs_version()),
        python_version=str(oqs.oqs_python_version() or "unknown"),
    )
    # liboqs-python mirrors liboqs's C structs (OQS_KEM) field by field; a
    # library from another release may lay them out differently.
    if _major_minor(loaded.version) != _major_minor(loaded.python_version):
        return (
            f"liboqs {loaded.version} at {loaded.library} does not match liboqs-python "
            f"{loaded.python_version}; {INSTALL_HINT}"
        )
    enabled = set(oqs.get_enabled_kem_mechanisms())
    missing = [name for name in _REQUIRED_KEMS if name not in enabled]
    if missing:
        return (
            f"liboqs {loaded.version} at {loaded.library} lacks {', '.join(missing)}; "
            f"{INSTALL_HINT}"
        )
    return loaded


@functools.cache
def _load() -> _Loaded | str:
    """liboqs-python with its library loaded, or why not. Never raises, never
    downloads, never builds."""
    try:
        return _probe()
    except (Exception, SystemExit) as exc:
        # SystemExit: liboqs-python's answer to a failed load. The probe makes
        # it unreachable; if it is reached anyway, report it, never exit.
        return f"liboqs-python failed to load liboqs ({type(exc).__name__}: {exc})"


def unavailable_reason() -> str | None:
    """Why this backend cannot serve, or None if it can. Never raises."""
    state = _load()
    return state if isinstance(state, str) else None


def is_available() -> bool:
    return unavailable_reason() is None


def _loaded() -> _Loaded:
    state = _load()
    if isinstance(state, str):
        raise BackendError(f"liboqs backend unavailable: {state}")
    return state


def _backend_error(operation: str, exc: BaseException) -> BackendError:
    # Only the type: library messages may echo their input.
    return BackendError(f"liboqs backend: {operation} failed ({type(exc).__name__})")


# --- the FIPS 203 §7.2 modulus check ------------------------------------------------------

_Q: Final = 3329


@functools.cache
def _modulus_masks(k: int) -> tuple[int, int, int]:
    """Masks over the ByteEncode12 part of a key as one little-endian integer:
    the 256·k coefficients are consecutive 12-bit fields. Taken two fields per
    24-bit slot, each field gets 12 free bits above it, so adding 4096 − q to
    every field at once carries into bit 12 of its slot exactly when the
    field is ≥ q, and no carry reaches the next slot."""
    slots = 256 * k // 2
    low = int.from_bytes(b"\xff\x0f\x00" * slots, "little")
    add = int.from_bytes((4096 - _Q).to_bytes(3, "little") * slots, "little")
    carry = int.from_bytes((1 << 12).to_bytes(3, "little") * slots, "little")
    return low, add, carry


def modulus_check(encapsulation_key: bytes) -> bool:
    """FIPS 203 §7.2 input check: every coefficient of the key is < q. liboqs
    runs the same check inside OQS_KEM_encaps (self_test proves it); this one
    only tells a bad key from a library failure when encapsulation fails."""
    k = (len(encapsulation_key) - 32) // 384
    if k not in (2, 3, 4) or len(encapsulation_key) != 384 * k + 32:
        return False
    low, add, carry = _modulus_masks(k)
    t = int.from_bytes(encapsulation_key[: 384 * k], "little")
    even, odd = t & low, (t >> 12) & low
    return not (((even + add) | (odd + add)) & carry)


# --- ML-KEM ---------------------------------------------------------------------------------


class LiboqsKem:
    """ML-KEM on liboqs. ``encapsulate`` returns (ciphertext, secret), which
    is also liboqs-python's own order.

    One ``oqs.KeyEncapsulation`` serves every encapsulation, from any thread:
    ``encap_secret`` allocates its buffers per call and only reads the
    OQS_KEM descriptor, which liboqs never writes after creating it (checked
    in liboqs-python 0.16.0.1). Creating one costs ~4 µs, a third of an
    encapsulation, so it is created once."""

    __slots__ = ("_name", "_oqs", "_encapsulator", "_ek_length", "_ct_length")

    def __init__(self, name: str) -> None:
        if name not in MLKEM_PARAMETERS:
            raise ValueError(f"unknown ML-KEM parameter set {name!r}")
        loaded = _loaded()
        self._name = name
        self._oqs = loaded.oqs
        self._ek_length, self._ct_length = MLKEM_PARAMETERS[name]
        try:
            self._encapsulator: Any = loaded.oqs.KeyEncapsulation(name)
        except Exception as exc:
            raise _backend_error(f"{name} initialisation", exc) from exc
        details = self._encapsulator.details
        # The lengths come from the C struct liboqs-python reads; a mismatch
        # would mean a struct layout it does not know, so buffers of the wrong size.
        if (
            details["length_public_key"],
            details["length_ciphertext"],
            details["length_shared_secret"],
        ) != (self._ek_length, self._ct_length, _SECRET_LENGTH):
            raise BackendError(f"liboqs backend: {name} reports unexpected lengths")

    @property
    def name(self) -> str:
        return self._name

    @property
    def backend(self) -> str:
        return NAME

    @property
    def encapsulation_key_length(self) -> int:
        return self._ek_length

    @property
    def ciphertext_length(self) -> int:
        return self._ct_length

    def encapsulate(self, encapsulation_key: bytes) -> tuple[bytes, SharedSecret]:
        check_share_length(f"{self._name} encapsulation key", encapsulation_key, self._ek_length)
        try:
            ciphertext, secret = self._encapsulator.encap_secret(encapsulation_key)
        except Exception as exc:
            # OQS_KEM_encaps fails for a key that fails the FIPS 203 §7.2
            # modulus check, and liboqs-python says only "Can not encapsulate".
            if not modulus_check(encapsulation_key):
                raise InvalidKeyShare(
                    f"{self._name}: encapsulation key fails the FIPS 203 §7.2 modulus check"
                ) from None
            raise _backend_error(f"{self._name} encapsulation", exc) from exc
        return bytes(ciphertext), SharedSecret(secret)

    def generate(self) -> LiboqsDecapsulator:
        return LiboqsDecapsulator(self._oqs, self._name, self._ct_length)

    def generate_from_seed(self, seed: bytes) -> LiboqsDecapsulator:
        """FIPS 203 ML-KEM.KeyGen_internal from the 64-byte seed d ‖ z, for
        known-answer tests."""
        return LiboqsDecapsulator(self._oqs, self._name, self._ct_length, seed)

    def __repr__(self) -> str:
        return f"<LiboqsKem {self._name}>"


class LiboqsDecapsulator:
    """A key pair. It owns an ``oqs.KeyEncapsulation`` (holding the secret
    key), whose ``free()`` wipes the key and frees the C object; liboqs-python
    has no finaliser, so a ``weakref.finalize`` calls it."""

    __slots__ = ("_name", "_kem", "_encapsulation_key", "_ct_length", "_finalizer", "__weakref__")

    def __init__(
        self, oqs: ModuleType, name: str, ciphertext_length: int, seed: bytes | None = None
    ) -> None:
        self._name = name
        self._ct_length = ciphertext_length
        try:
            kem: Any = oqs.KeyEncapsulation(name)
        except Exception as exc:
            raise _backend_error(f"{name} key generation", exc) from exc
        self._finalizer = weakref.finalize(self, kem.free)
        self._kem = kem
        try:
            if seed is None:
                self._encapsulation_key = bytes(kem.generate_keypair())
            else:
                self._encapsulation_key = bytes(kem.generate_keypair_seed(seed))
        except Exception as exc:
            self._finalizer()
            raise _backend_error(f"{name} key generation", exc) from exc

    @property
    def encapsulation_key(self) -> bytes:
        return self._encapsulation_key

    def decapsulate(self, ciphertext: bytes) -> SharedSecret:
        check_share_length(f"{self._name} ciphertext", ciphertext, self._ct_length)
        # Decapsulation of a well-sized ciphertext cannot fail (implicit
        # rejection): a failure is the library's, internal_error per
        # draft-ietf-tls-ecdhe-mlkem §3.1.2.
        try:
            return SharedSecret(self._kem.decap_secret(ciphertext))
        except Exception as exc:
            raise _backend_error(f"{self._name} decapsulation", exc) from exc

    def __repr__(self) -> str:
        return f"<LiboqsDecapsulator {self._name}>"


@functools.cache
def kems() -> Mapping[str, LiboqsKem]:
    """The ML-KEM parameter sets this liboqs has, keyed by name; empty when the
    backend is unavailable."""
    state = _load()
    if isinstance(state, str):
        return MappingProxyType({})
    enabled = set(state.oqs.get_enabled_kem_mechanisms())
    return MappingProxyType({n: LiboqsKem(n) for n in MLKEM_PARAMETERS if n in enabled})


# --- provider -------------------------------------------------------------------------------


class LiboqsProvider:
    """The three hybrids with ML-KEM on liboqs, then the classical groups, all
    on the openssl backend's X25519/ECDH."""

    __slots__ = ("_groups",)

    def __init__(self) -> None:
        _loaded()
        kem_map: dict[str, Kem] = dict(kems())
        self._groups: Mapping[int, KxGroup] = MappingProxyType(
            compose_groups(kem_map, openssl.classical_groups())
        )

    @property
    def name(self) -> str:
        return PROVIDER_NAME

    @property
    def groups(self) -> Mapping[int, KxGroup]:
        return self._groups

    def __repr__(self) -> str:
        return f"<LiboqsProvider groups={len(self._groups)}>"


def create_provider() -> LiboqsProvider:
    """The provider a listener gets when its configuration names this backend."""
    return LiboqsProvider()


def capabilities() -> dict[str, list[str]]:
    """What this installation can do, for the start-up report."""
    state = _load()
    if isinstance(state, str):
        return {"library": [], "groups": [], "kems": [], "signature_schemes": []}
    kem_map: dict[str, Kem] = dict(kems())
    groups = compose_groups(kem_map, openssl.classical_groups())
    return {
        "library": [
            f"liboqs {state.version} ({state.library})",
            f"liboqs-python {state.python_version}",
        ],
        "groups": [group_name(g) for g in groups],
        "kems": list(kems()),
        # ML-DSA signing through liboqs is a later issue; the library has it.
        "signature_schemes": [],
        "library_signatures": [
            s for s in state.oqs.get_enabled_sig_mechanisms() if s.startswith("ML-DSA")
        ],
    }


# --- self-test ------------------------------------------------------------------------------

# Known answers from cryptography's independent ML-KEM (OpenSSL): the key pair
# from the seed d ‖ z = 00 01 … 3f (SHA-256 of the encapsulation key), and the
# secret that decapsulating an all-zero ciphertext gives (implicit rejection:
# K̄ = J(z ‖ c), FIPS 203 Algorithm 18).
_KAT_SEED: Final = bytes(range(64))
_KATS: Final[dict[str, tuple[str, str]]] = {
    "ML-KEM-768": (
        "0b7934c83125c788995e2ba6bd761e33046b3e40571be53e023309a29f398cc9",
        "c8fbeddafdacef2ffeb8b354ea644f11b5c150f3e2c4a74ce38abba8f854ae16",
    ),
    "ML-KEM-1024": (
        "c7b8fa0aa471d5ae18922d6ccad5b31e1d84f92ae723abfd13747018740a8530",
        "294cb5b6b0f37a047745a2a69991f66ac85936e1b077e717eaeb26bb0ba42c68",
    ),
}


def _fail(what: str) -> BackendError:
    return BackendError(f"liboqs backend: self-test {what}")


def _check_kem(kem: LiboqsKem) -> None:
    name = kem.name
    try:
        decapsulator = kem.generate()
        ciphertext, secret = kem.encapsulate(decapsulator.encapsulation_key)
        again = decapsulator.decapsulate(ciphertext)
    except Exception as exc:
        raise _backend_error(f"self-test {name} round trip", exc) from exc
    if len(ciphertext) != kem.ciphertext_length or len(secret) != _SECRET_LENGTH:
        raise _fail(f"{name} lengths")
    if secret != again:
        raise _fail(f"{name} round trip: secrets differ")
    # The modulus check lives in liboqs (see LiboqsKem.encapsulate): a build
    # without it would accept keys that FIPS 203 §7.2 says to refuse.
    bad_key = b"\xff" * (kem.encapsulation_key_length - 32) + bytes(32)
    try:
        kem.encapsulate(bad_key)
    except InvalidKeyShare:
        pass
    else:
        raise _fail(f"{name}: an encapsulation key failing the modulus check was accepted")

    kat = _KATS.get(name)
    if kat is not None:
        key_hash, rejection_secret = kat
        seeded = kem.generate_from_seed(_KAT_SEED)
        if hashlib.sha256(seeded.encapsulation_key).hexdigest() != key_hash:
            raise _fail(f"{name} known answer: key generation")
        if seeded.decapsulate(bytes(kem.ciphertext_length)).hex() != rejection_secret:
            raise _fail(f"{name} known answer: implicit rejection")


def _cross_check(ours: LiboqsKem, theirs: Kem) -> None:
    """What one library encapsulates the other decapsulates, both ways."""
    name = ours.name
    try:
        their_key = theirs.generate()
        ciphertext, secret = ours.encapsulate(their_key.encapsulation_key)
        if their_key.decapsulate(ciphertext) != secret:
            raise _fail(f"{name}: openssl decapsulates a liboqs ciphertext differently")
        our_key = ours.generate()
        ciphertext, secret = theirs.encapsulate(our_key.encapsulation_key)
        if our_key.decapsulate(ciphertext) != secret:
            raise _fail(f"{name}: liboqs decapsulates an openssl ciphertext differently")
    except BackendError:
        raise
    except Exception as exc:
        raise _backend_error(f"self-test {name} cross-check with openssl", exc) from exc


def self_test() -> None:
    """Known answers, the modulus check, a cross-check against the openssl
    backend's ML-KEM (when that OpenSSL has it) and a round trip through every
    group; raises BackendError naming the first thing that is wrong."""
    _loaded()
    ours = kems()
    for kem in ours.values():
        _check_kem(kem)
    if openssl.is_available():
        for name, theirs in openssl.kems().items():
            if name in ours:
                _cross_check(ours[name], theirs)

    for code, group in LiboqsProvider().groups.items():
        what = group_name(code)
        try:
            client = group.start()
            server_share, server_secret = group.server_exchange(client.share)
            client_secret = client.complete(server_share)
        except Exception as exc:
            raise _backend_error(f"self-test {what} round trip", exc) from exc
        if len(client.share) != group.client_share_length:
            raise _fail(f"{what} client share length")
        if len(server_share) != group.server_share_length:
            raise _fail(f"{what} server share length")
        if not server_secret or client_secret != server_secret:
            raise _fail(f"{what} secrets differ")
