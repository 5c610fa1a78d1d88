"""The PKCS#11 backend: keys and key exchanges inside a token (HSM, FPGA card, SoftHSM2).

Through python-pkcs11 (the ``pqproxy[pkcs11]`` extra), imported lazily so that
this module loads without it.

- **Signing** (CertificateVerify): ECDSA on P-256/P-384 with ``CKM_ECDSA`` over
  a digest computed here, and RSA-PSS with ``CKM_RSA_PKCS_PSS``. The private
  key never leaves the token; its public key is read from the token so that
  ``certs.load_certified_key`` can match it with the certificate.
- **ECDH** (``"ecdh"`` operation): the P-256/P-384 halves of the hybrid groups
  with ``CKM_ECDH1_DERIVE`` on an ephemeral key pair generated in the token as
  session objects, destroyed after each exchange.
- **ML-KEM** (``"ml-kem"`` operation): ``C_EncapsulateKey`` with ``CKM_ML_KEM``
  (PKCS#11 3.2) where the token offers it. Without it, ML-KEM runs on the
  ``openssl`` backend and the hybrid is composed across both.

Start-up probes the token's mechanism list (``C_GetMechanismList`` and
``C_GetMechanismInfo``), and an operation the token cannot do is refused with
a message naming the missing mechanism.

The configuration (module path, token label, PIN) comes from the config file,
the ``PQPROXY_PKCS11_*`` environment variables or a PIN file, never from the
command line; a key is named by an RFC 7512 ``pkcs11:`` URI. The PIN appears in
no repr, log line or error message.

Error policy at this edge, as for ``openssl``: a bad peer share is
``InvalidKeyShare``; a token failure is ``BackendError`` naming the operation
and the PKCS#11 error class, never data.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import unquote, unquote_to_bytes

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ...tls.enums import NamedGroup, SignatureScheme, group_name
from ..hybrid import HYBRID_LAYOUTS, compose_groups
from ..provider import (
    BackendError,
    ClientKeyExchange,
    InvalidKeyShare,
    Kem,
    KemDecapsulator,
    KxGroup,
    SharedSecret,
    Signer,
    check_share_length,
)
from . import openssl

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

NAME: Final = "pkcs11"

ENV_MODULE: Final = "PQPROXY_PKCS11_MODULE"
ENV_TOKEN: Final = "PQPROXY_PKCS11_TOKEN"
ENV_PIN: Final = "PQPROXY_PKCS11_PIN"
ENV_PIN_FILE: Final = "PQPROXY_PKCS11_PIN_FILE"
ENV_KEY: Final = "PQPROXY_PKCS11_KEY"
ENV_OPERATIONS: Final = "PQPROXY_PKCS11_OPERATIONS"

T = TypeVar("T")

# --- Mechanisms --------------------------------------------------------------------------

# Numeric values from the PKCS#11 3.2 headers (pkcs11t.h). Written out rather
# than taken from python-pkcs11 so that the probe does not depend on which
# constants a given release of the binding knows (CKM_ML_KEM is new in 3.2).
CKM_RSA_PKCS_PSS: Final = 0x0000000D
CKM_ML_KEM_KEY_PAIR_GEN: Final = 0x0000000F
CKM_ML_KEM: Final = 0x00000017
CKM_EC_KEY_PAIR_GEN: Final = 0x00001040
CKM_ECDSA: Final = 0x00001041
CKM_ECDH1_DERIVE: Final = 0x00001050

# CK_MECHANISM_INFO.flags: what the token will do with a mechanism.
CKF_SIGN: Final = 0x00000800
CKF_GENERATE_KEY_PAIR: Final = 0x00010000
CKF_DERIVE: Final = 0x00080000
CKF_ENCAPSULATE: Final = 0x10000000

_FLAG_NAMES: Final = {
    CKF_SIGN: "CKF_SIGN",
    CKF_GENERATE_KEY_PAIR: "CKF_GENERATE_KEY_PAIR",
    CKF_DERIVE: "CKF_DERIVE",
    CKF_ENCAPSULATE: "CKF_ENCAPSULATE",
}


@dataclass(frozen=True)
class Mechanism:
    """A mechanism pqproxy uses, the function flag it needs, and what it is for."""

    name: str
    value: int
    flag: int
    purpose: str


MECHANISMS: Final[Mapping[int, Mechanism]] = MappingProxyType(
    {
        m.value: m
        for m in (
            Mechanism("CKM_ECDSA", CKM_ECDSA, CKF_SIGN, "ECDSA signature"),
            Mechanism("CKM_RSA_PKCS_PSS", CKM_RSA_PKCS_PSS, CKF_SIGN, "RSA-PSS signature"),
            Mechanism(
                "CKM_EC_KEY_PAIR_GEN",
                CKM_EC_KEY_PAIR_GEN,
                CKF_GENERATE_KEY_PAIR,
                "EC key generation",
            ),
            Mechanism("CKM_ECDH1_DERIVE", CKM_ECDH1_DERIVE, CKF_DERIVE, "ECDH key derivation"),
            Mechanism("CKM_ML_KEM", CKM_ML_KEM, CKF_ENCAPSULATE, "ML-KEM key encapsulation"),
            Mechanism(
                "CKM_ML_KEM_KEY_PAIR_GEN",
                CKM_ML_KEM_KEY_PAIR_GEN,
                CKF_GENERATE_KEY_PAIR,
                "ML-KEM key generation",
            ),
        )
    }
)

# What each configurable operation needs from the token. Signing is not listed:
# its mechanism depends on the key, and is checked when the key is loaded.
OPERATIONS: Final[Mapping[str, tuple[int, ...]]] = MappingProxyType(
    {
        "ecdh": (CKM_EC_KEY_PAIR_GEN, CKM_ECDH1_DERIVE),
        # The server only encapsulates; key generation (the client role) is
        # checked when it is used.
        "ml-kem": (CKM_ML_KEM,),
    }
)
DEFAULT_OPERATIONS: Final = frozenset({"ecdh"})


def mechanism_name(value: int) -> str:
    """The CKM_ name of a mechanism number, also for ones pqproxy does not use."""
    known = MECHANISMS.get(value)
    if known is not None:
        return known.name
    try:
        from pkcs11 import Mechanism as P11Mechanism

        return f"CKM_{P11Mechanism(value).name.lstrip('_')}"
    except (ImportError, ValueError):
        return f"CKM_{value:#010x}"


def check_required(
    token_label: str,
    offered: Mapping[int, int],
    required: Iterable[int],
    purpose: str,
) -> None:
    """Refuse (BackendError) when the token lacks a mechanism, or offers it
    without the function ``purpose`` needs. ``offered`` maps mechanism numbers
    to their CK_MECHANISM_INFO flags, as ``Pkcs11Token.mechanisms`` holds them."""
    for value in required:
        mech = MECHANISMS.get(value)
        name = mech.name if mech is not None else mechanism_name(value)
        what = f"{name} ({mech.purpose})" if mech is not None else name
        flags = offered.get(value)
        if flags is None:
            raise BackendError(f"token {token_label!r} lacks {what}, needed for {purpose}")
        if mech is not None and not flags & mech.flag:
            raise BackendError(
                f"token {token_label!r} offers {name} but not with {_FLAG_NAMES[mech.flag]}, "
                f"needed for {purpose}"
            )


# --- Configuration -----------------------------------------------------------------------


def read_pin_file(path: str | os.PathLike[str]) -> str:
    """The PIN in a file: its first line, without the line ending. Errors name
    the file, never its content."""
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except OSError as exc:
        raise BackendError(f"PIN file {name}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise BackendError(f"PIN file {name}: not UTF-8 text") from None
    pin = first.rstrip("\r\n")
    if not pin:
        raise BackendError(f"PIN file {name}: empty")
    return pin


@dataclass(frozen=True)
class Pkcs11Config:
    """Where the token is and what pqproxy will ask of it.

    ``operations`` names the key-exchange work done on the token (``"ecdh"``,
    ``"ml-kem"``); each is checked against the token's mechanism list before
    anything is served. ``key_label`` names the signing key the self-test uses.
    """

    module: str
    token_label: str
    pin: str = field(repr=False)
    key_label: str | None = None
    operations: frozenset[str] = DEFAULT_OPERATIONS

    def __post_init__(self) -> None:
        if not self.module:
            raise ValueError("pkcs11: no module path given")
        if not self.token_label:
            raise ValueError("pkcs11: no token label given")
        if not self.pin:
            raise ValueError("pkcs11: empty PIN")
        unknown = sorted(set(self.operations) - set(OPERATIONS))
        if unknown:
            raise ValueError(
                f"pkcs11: unknown operation(s) {', '.join(unknown)}; "
                f"expected some of {', '.join(OPERATIONS)}"
            )
        object.__setattr__(self, "operations", frozenset(self.operations))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Pkcs11Config:
        """Read ``PQPROXY_PKCS11_MODULE``, ``_TOKEN``, ``_PIN`` or ``_PIN_FILE``,
        ``_KEY`` (a key label, optional) and ``_OPERATIONS`` (comma-separated,
        default ``ecdh``). ValueError names the first missing variable."""
        env = os.environ if environ is None else environ
        module = env.get(ENV_MODULE, "")
        if not module:
            raise ValueError(f"no PKCS#11 module configured: set {ENV_MODULE}")
        token = env.get(ENV_TOKEN, "")
        if not token:
            raise ValueError(f"no PKCS#11 token configured: set {ENV_TOKEN}")
        pin = env.get(ENV_PIN, "")
        if not pin:
            pin_file = env.get(ENV_PIN_FILE, "")
            if not pin_file:
                raise ValueError(f"no PKCS#11 PIN configured: set {ENV_PIN} or {ENV_PIN_FILE}")
            pin = read_pin_file(pin_file)
        raw_ops = env.get(ENV_OPERATIONS)
        operations = (
            DEFAULT_OPERATIONS
            if raw_ops is None
            else frozenset(op.strip() for op in raw_ops.split(",") if op.strip())
        )
        return cls(module, token, pin, env.get(ENV_KEY) or None, operations)


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 URI that pqproxy uses to find a private key."""

    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    pin_source: str | None = None


# RFC 7512 §2.3 path attributes pqproxy honours. The others (serial,
# manufacturer, slot-id, …) would narrow the choice of token, and silently
# ignoring one could pick a different token than the operator meant.
_URI_PATH_ATTRS: Final = frozenset({"token", "object", "id", "type"})


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse ``pkcs11:token=…;object=…;id=…;type=private[?pin-source=…]``.

    ``pin-value`` is refused: a URI given on the command line would show the
    PIN in the process list. So is ``module-path``: the module comes from the
    configuration, where it is one place to audit."""
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme.lower() != "pkcs11":
        raise ValueError("not a PKCS#11 URI: expected 'pkcs11:' (RFC 7512)")
    path, _, query = rest.partition("?")
    values: dict[str, str] = {}
    raw_id: bytes | None = None
    for part in filter(None, path.split(";")):
        name, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"PKCS#11 URI: attribute {name!r} has no value")
        if name not in _URI_PATH_ATTRS:
            raise ValueError(
                f"PKCS#11 URI: attribute {name!r} is not supported; "
                f"use {', '.join(sorted(_URI_PATH_ATTRS))}"
            )
        if name in values or (name == "id" and raw_id is not None):
            raise ValueError(f"PKCS#11 URI: attribute {name!r} given twice")
        if name == "id":
            raw_id = unquote_to_bytes(value)
        else:
            values[name] = unquote(value, errors="strict")
    pin_source: str | None = None
    for part in filter(None, query.split("&")):
        name, _, value = part.partition("=")
        if name == "pin-value":
            raise ValueError(
                "PKCS#11 URI: pin-value is refused (a PIN on the command line is visible to "
                f"every user); use pin-source=<file>, {ENV_PIN_FILE} or the config file"
            )
        if name in ("module-path", "module-name"):
            raise ValueError(
                f"PKCS#11 URI: {name} is refused; set the module in the config or {ENV_MODULE}"
            )
        if name != "pin-source":
            raise ValueError(f"PKCS#11 URI: query attribute {name!r} is not supported")
        source = unquote(value, errors="strict")
        pin_source = source.removeprefix("file:")
    key_type = values.get("type")
    if key_type is not None and key_type != "private":
        raise ValueError(f"PKCS#11 URI: type={key_type} cannot sign; the key must be type=private")
    if values.get("object") is None and raw_id is None:
        raise ValueError("PKCS#11 URI: name the key with object=<label> or id=<bytes>")
    return Pkcs11Uri(values.get("token"), values.get("object"), raw_id, key_type, pin_source)


def config_from_uri(
    uri: str,
    module: str | None = None,
    pin: str | None = None,
    operations: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> tuple[Pkcs11Config, Pkcs11Uri]:
    """A config for the token a key URI names. The module comes from ``module``
    or ``PQPROXY_PKCS11_MODULE``; the PIN from ``pin``, the URI's pin-source
    file, ``PQPROXY_PKCS11_PIN`` or ``PQPROXY_PKCS11_PIN_FILE``, in that order."""
    env = os.environ if environ is None else environ
    parsed = parse_pkcs11_uri(uri)
    if parsed.token is None:
        raise ValueError("PKCS#11 URI: name the token with token=<label>")
    module = module or env.get(ENV_MODULE, "")
    if not module:
        raise ValueError(f"no PKCS#11 module configured: set {ENV_MODULE} or the config")
    if pin is None:
        if parsed.pin_source is not None:
            pin = read_pin_file(parsed.pin_source)
        elif env.get(ENV_PIN):
            pin = env[ENV_PIN]
        elif env.get(ENV_PIN_FILE):
            pin = read_pin_file(env[ENV_PIN_FILE])
        else:
            raise ValueError(f"no PKCS#11 PIN: use pin-source=<file>, {ENV_PIN} or {ENV_PIN_FILE}")
    return Pkcs11Config(module, parsed.token, pin, parsed.object, frozenset(operations)), parsed


# --- Library loading and probing ---------------------------------------------------------


def _import_pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError as exc:
        raise BackendError(
            f"python-pkcs11 is not installed ({exc}); install pqproxy[pkcs11]"
        ) from None
    return pkcs11


def _error_name(exc: BaseException) -> str:
    # python-pkcs11 raises one class per CKR_ code and its messages are mostly
    # empty; the class name is what tells an operator what happened.
    return type(exc).__name__


# Which process loaded (C_Initialize'd) each module. python-pkcs11 caches the
# loaded module, and a forked child would inherit a module it must not use.
_LOADED_BY: dict[str, int] = {}


def _load_module(module: str) -> Any:
    pkcs11 = _import_pkcs11()
    if not os.path.isfile(module):
        raise BackendError(f"PKCS#11 module {module}: no such file")
    loader = _LOADED_BY.get(module)
    if loader is not None and loader != os.getpid():
        # PKCS#11 makes a child call C_Initialize for itself, but a second
        # C_Initialize on the inherited state is refused by most modules, and
        # C_Finalize in the child may tear down connections the parent shares.
        raise BackendError(
            f"PKCS#11 module {module} was loaded by process {loader} before this one was "
            "forked; call unload_module() before forking workers, or load it only in them"
        )
    try:
        lib = pkcs11.lib(module)
    except pkcs11.PKCS11Error as exc:
        raise BackendError(f"PKCS#11 module {module}: cannot load: {exc}") from None
    _LOADED_BY[module] = os.getpid()
    return lib


def _find_token(lib: Any, module: str, label: str) -> Any:
    pkcs11 = _import_pkcs11()
    try:
        return lib.get_token(token_label=label)
    except pkcs11.NoSuchToken:
        try:
            present = sorted(t.label for t in lib.get_tokens())
        except pkcs11.PKCS11Error:
            present = []
        listed = ", ".join(repr(p) for p in present) or "none"
        raise BackendError(
            f"no token labelled {label!r} in PKCS#11 module {module} (tokens: {listed})"
        ) from None
    except pkcs11.MultipleTokensReturned:
        raise BackendError(f"several tokens labelled {label!r} in {module}") from None
    except pkcs11.PKCS11Error as exc:
        raise BackendError(
            f"PKCS#11 module {module}: listing tokens failed ({_error_name(exc)})"
        ) from None


def _mechanism_table(token: Any) -> dict[int, int]:
    """Every mechanism the token's slot lists, with the flags of the ones pqproxy uses."""
    slot = token.slot
    table: dict[int, int] = {}
    for mech in slot.get_mechanisms():
        value = int(mech)
        flags = 0
        if value in MECHANISMS:
            flags = int(slot.get_mechanism_info(value).flags)
        table[value] = flags
    return table


def probe_capabilities(module: str, token_label: str) -> frozenset[str]:
    """The CKM_ names of every mechanism the token offers. Needs no PIN:
    ``C_GetMechanismList`` works without a session."""
    pkcs11 = _import_pkcs11()
    token = _find_token(_load_module(module), module, token_label)
    try:
        return frozenset(mechanism_name(v) for v in _mechanism_table(token))
    except pkcs11.PKCS11Error as exc:
        raise BackendError(
            f"token {token_label!r}: reading the mechanism list failed ({_error_name(exc)})"
        ) from None


# --- The token session -------------------------------------------------------------------


def _pin_digest(pin: str) -> bytes:
    return hashlib.sha256(pin.encode("utf-8")).digest()


class Pkcs11Token:
    """One logged-in session on one token, shared by everything using that token.

    One session, because PKCS#11 login state belongs to the application, not
    the session: a second ``C_Login`` fails and a ``C_Logout`` on any session
    logs all of them out. One lock around every call, because python-pkcs11
    initialises the module with ``C_Initialize(NULL)``, which tells it that the
    application never calls in from two threads at once (the PKCS#11 rules for
    C_Initialize's locking arguments), so the module may do no locking of its
    own; and signing may run on a thread pool.

    Obtained with ``open_token`` (shared, reference-counted) and released with
    ``close``. ``operations`` counts each successful token operation by
    mechanism name, for metrics and for tests that need to see work happen
    inside the token.
    """

    def __init__(self, config: Pkcs11Config) -> None:
        pkcs11 = _import_pkcs11()
        self._module = config.module
        self._label = config.token_label
        self._pin_digest = _pin_digest(config.pin)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._users = 1
        self._closed = False
        self.operations: Counter[str] = Counter()
        lib = _load_module(config.module)
        self._library_info = (
            f"{lib.manufacturer_id} {lib.library_description} "
            f"{'.'.join(map(str, lib.library_version))} "
            f"(Cryptoki {'.'.join(map(str, lib.cryptoki_version))})"
        )
        token = _find_token(lib, config.module, config.token_label)
        try:
            self._mechanisms = MappingProxyType(_mechanism_table(token))
        except pkcs11.PKCS11Error as exc:
            raise BackendError(
                f"token {self._label!r}: reading the mechanism list failed ({_error_name(exc)})"
            ) from None
        try:
            self._session = token.open(rw=True, user_pin=config.pin)
        except pkcs11.PinIncorrect:
            raise BackendError(f"token {self._label!r}: login failed: incorrect PIN") from None
        except pkcs11.PinLocked:
            raise BackendError(f"token {self._label!r}: login failed: the PIN is locked") from None
        except pkcs11.PinLenRange:
            raise BackendError(
                f"token {self._label!r}: login failed: PIN length out of range"
            ) from None
        except pkcs11.UserAlreadyLoggedIn:
            raise BackendError(
                f"token {self._label!r}: another user of {self._module} in this process is "
                "already logged in"
            ) from None
        except pkcs11.PKCS11Error as exc:
            raise BackendError(
                f"token {self._label!r}: opening a session failed ({_error_name(exc)})"
            ) from None

    @property
    def label(self) -> str:
        return self._label

    @property
    def module(self) -> str:
        return self._module

    @property
    def library_info(self) -> str:
        return self._library_info

    @property
    def mechanisms(self) -> Mapping[int, int]:
        """Mechanism number → CK_MECHANISM_INFO flags (flags only for the ones pqproxy uses)."""
        return self._mechanisms

    @property
    def closed(self) -> bool:
        return self._closed

    def offers(self, *mechanisms: int) -> bool:
        try:
            check_required(self._label, self._mechanisms, mechanisms, "probe")
        except BackendError:
            return False
        return True

    def check_required(self, mechanisms: Iterable[int], purpose: str) -> None:
        check_required(self._label, self._mechanisms, mechanisms, purpose)

    def check_operations(self, operations: Iterable[str]) -> None:
        for operation in sorted(operations):
            self.check_required(OPERATIONS[operation], f"the {operation!r} operation")

    def run(self, what: str, mechanism: str | None, call: Callable[[Any], T]) -> T:
        """Run ``call(session)`` under the token lock; a PKCS#11 failure becomes
        BackendError naming ``what``. Counts the operation under ``mechanism``."""
        if os.getpid() != self._pid:
            # A forked child inherits the handles but not a usable module:
            # PKCS#11 makes a child process call C_Initialize for itself.
            raise BackendError(
                f"token {self._label!r}: session opened in process {self._pid}, used in "
                f"{os.getpid()}; run this backend inline or on threads, not in a process pool"
            )
        pkcs11 = _import_pkcs11()
        with self._lock:
            if self._closed:
                raise BackendError(f"token {self._label!r}: session closed")
            try:
                result = call(self._session)
            except pkcs11.PKCS11Error as exc:
                raise BackendError(
                    f"{NAME} backend: token {self._label!r}: {what} failed ({_error_name(exc)})"
                ) from None
            if mechanism is not None:
                self.operations[mechanism] += 1
            return result

    def load_signer(self, uri: str | Pkcs11Uri) -> Pkcs11Signer:
        """A signer for the private key a URI names (ValueError when the URI
        or the key cannot be used, BackendError when the token fails)."""
        parsed = parse_pkcs11_uri(uri) if isinstance(uri, str) else uri
        if parsed.token is not None and parsed.token != self._label:
            raise ValueError(
                f"PKCS#11 URI names token {parsed.token!r}, but token {self._label!r} is configured"
            )
        return _load_signer(self, parsed)

    def signer_loader(self) -> Callable[[bytes, bytes | None], Signer]:
        """A ``load_signer`` hook for ``certs.load_certified_key``: the key file
        holds a ``pkcs11:`` URI instead of a PEM key."""

        def load(key_file: bytes, password: bytes | None) -> Signer:
            if password is not None:
                raise ValueError("a PKCS#11 key takes no password; the token PIN is configured")
            try:
                text = key_file.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError("expected a pkcs11: URI (RFC 7512), not binary data") from None
            if not text.startswith("pkcs11:"):
                raise ValueError("expected a pkcs11: URI (RFC 7512)")
            return self.load_signer(text)

        return load

    def close(self) -> None:
        """Release one user; the last one logs out and closes the session."""
        with _REGISTRY_LOCK:
            self._users -= 1
            if self._users > 0 or self._closed:
                return
            if _REGISTRY.get((self._module, self._label)) is self:
                del _REGISTRY[(self._module, self._label)]
            with self._lock:
                self._closed = True
                if self._pid != os.getpid():
                    # Inherited through fork: the session is the parent's.
                    return
                try:
                    self._session.close()
                except Exception:  # noqa: BLE001 - closing a dead session must not mask the cause
                    pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Pkcs11Token {self._label!r} {state}>"


_REGISTRY: dict[tuple[str, str], Pkcs11Token] = {}
_REGISTRY_LOCK = threading.Lock()


def open_token(config: Pkcs11Config) -> Pkcs11Token:
    """The shared logged-in session for the config's token; each call must be
    paired with ``close()``. A second config for the same token must carry the
    same PIN: the session is already logged in, so a wrong PIN would otherwise
    go unnoticed."""
    key = (config.module, config.token_label)
    with _REGISTRY_LOCK:
        token = _REGISTRY.get(key)
        if token is not None and token._pid == os.getpid():
            if not hmac.compare_digest(token._pin_digest, _pin_digest(config.pin)):
                raise BackendError(
                    f"token {config.token_label!r}: login failed: incorrect PIN "
                    "(differs from the PIN of the open session)"
                )
            token._users += 1
            return token
        token = Pkcs11Token(config)
        _REGISTRY[key] = token
        return token


def unload_module(module: str) -> None:
    """Close every session on ``module`` and unload it, so that the next use
    reads the module's configuration again (SoftHSM2 reads SOFTHSM2_CONF at
    ``C_Initialize``). For tests and reloads; safe when nothing is loaded."""
    with _REGISTRY_LOCK:
        tokens = [t for (m, _), t in _REGISTRY.items() if m == module]
        for token in tokens:
            token._users = 1
    for token in tokens:
        token.close()
    _LOADED_BY.pop(module, None)
    try:
        import pkcs11
    except ImportError:
        return
    pkcs11.unload(module)


# --- EC points ---------------------------------------------------------------------------

# Named-curve OIDs as DER, the form CKA_EC_PARAMS holds (RFC 5480 §2.1.1.1).
_CURVES: Final[dict[int, tuple[ec.EllipticCurve, bytes]]] = {
    NamedGroup.secp256r1: (ec.SECP256R1(), bytes.fromhex("06082a8648ce3d030107")),
    NamedGroup.secp384r1: (ec.SECP384R1(), bytes.fromhex("06052b81040022")),
}
_CURVE_BY_PARAMS: Final = {params: group for group, (_, params) in _CURVES.items()}


def _point_length(curve: ec.EllipticCurve) -> int:
    return 1 + 2 * ((curve.key_size + 7) // 8)


def _unwrap_ec_point(value: bytes, expected: int) -> bytes:
    """CKA_EC_POINT as an uncompressed point. PKCS#11 says it is the DER
    OCTET STRING holding the point, but some tokens return the bare point;
    the lengths tell the two apart (a bare point is never 2 or 3 bytes longer
    than itself)."""
    if len(value) == expected and value[0] == 4:
        return value
    header = len(value) - expected
    if value[:1] == b"\x04" and (
        (header == 2 and value[1] == expected)
        or (header == 3 and value[1] == 0x81 and value[2] == expected)
    ):
        point = value[header:]
        if point[0] == 4:
            return point
    raise BackendError(f"{NAME} backend: token returned an EC point of unexpected form")


# --- Signing -----------------------------------------------------------------------------

# curve → (TLS 1.3 scheme, hash) and scheme → hash: RFC 8446 §4.2.3 ties each
# ECDSA curve to one hash, and fixes RSA-PSS at MGF1 over the signature's hash
# with a salt as long as the hash.
_ECDSA_SCHEMES: Final[dict[int, tuple[int, str]]] = {
    NamedGroup.secp256r1: (SignatureScheme.ecdsa_secp256r1_sha256, "sha256"),
    NamedGroup.secp384r1: (SignatureScheme.ecdsa_secp384r1_sha384, "sha384"),
}
_PSS_SCHEMES: Final[dict[int, str]] = {
    SignatureScheme.rsa_pss_rsae_sha256: "sha256",
    SignatureScheme.rsa_pss_rsae_sha384: "sha384",
    SignatureScheme.rsa_pss_rsae_sha512: "sha512",
}
_EC_KEY_TYPES: Final[dict[int, str]] = {
    NamedGroup.secp256r1: "ecdsa-p256",
    NamedGroup.secp384r1: "ecdsa-p384",
}
_P11_HASH: Final = {"sha256": "SHA256", "sha384": "SHA384", "sha512": "SHA512"}


class Pkcs11Signer:
    """A private key inside a token. ``sign`` hashes here and has the token
    sign the digest, so the token sees 32–64 bytes instead of the transcript."""

    __slots__ = ("_token", "_key", "_key_type", "_calls", "_schemes")

    def __init__(
        self,
        token: Pkcs11Token,
        key: Any,
        key_type: str,
        calls: Mapping[int, Callable[[bytes], bytes]],
    ) -> None:
        self._token = token
        self._key = key
        self._key_type = key_type
        self._calls = dict(calls)
        self._schemes = tuple(self._calls)

    @property
    def schemes(self) -> tuple[int, ...]:
        return self._schemes

    @property
    def backend(self) -> str:
        return NAME

    @property
    def key_type(self) -> str:
        return self._key_type

    @property
    def token(self) -> Pkcs11Token:
        return self._token

    def sign(self, scheme: int, message: bytes) -> bytes:
        call = self._calls.get(scheme)
        if call is None:
            raise ValueError(f"a {self._key_type} key cannot sign with scheme {scheme:#06x}")
        return call(message)

    def __repr__(self) -> str:
        return f"<Pkcs11Signer {self._key_type} token={self._token.label!r}>"


class Pkcs11KeyPairSigner(Pkcs11Signer):
    """A token key whose public half the token shows, so the certificate check
    compares keys instead of signing a test message."""

    __slots__ = ("_public_key_der", "_public_key")

    def __init__(
        self,
        token: Pkcs11Token,
        key: Any,
        key_type: str,
        calls: Mapping[int, Callable[[bytes], bytes]],
        public_key: PublicKeyTypes,
    ) -> None:
        super().__init__(token, key, key_type, calls)
        self._public_key = public_key
        self._public_key_der = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def public_key(self) -> PublicKeyTypes:
        return self._public_key

    @property
    def public_key_der(self) -> bytes:
        """SubjectPublicKeyInfo DER, to check the key against its certificate."""
        return self._public_key_der


def _find_private_key(session: Any, uri: Pkcs11Uri, token_label: str) -> Any:
    pkcs11 = _import_pkcs11()
    described = " ".join(
        part
        for part in (
            f"labelled {uri.object!r}" if uri.object is not None else "",
            f"with id {uri.id.hex()}" if uri.id is not None else "",
        )
        if part
    )
    try:
        return session.get_key(
            object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=uri.object, id=uri.id
        )
    except pkcs11.NoSuchKey:
        raise ValueError(f"no private key {described} on token {token_label!r}") from None
    except pkcs11.MultipleObjectsReturned:
        raise ValueError(
            f"several private keys {described} on token {token_label!r}; add id= to the URI"
        ) from None


def _find_public_key(session: Any, private_key: Any) -> Any | None:
    """The public-key object paired with a private key: same CKA_ID, and the
    same label when the private key has one."""
    pkcs11 = _import_pkcs11()
    attrs: dict[Any, Any] = {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PUBLIC_KEY}
    key_id = private_key[pkcs11.Attribute.ID]
    label = private_key[pkcs11.Attribute.LABEL]
    if key_id:
        attrs[pkcs11.Attribute.ID] = key_id
    if label:
        attrs[pkcs11.Attribute.LABEL] = label
    if len(attrs) == 1:
        return None
    found = list(session.get_objects(attrs))
    return found[0] if len(found) == 1 else None


def _load_signer(token: Pkcs11Token, uri: Pkcs11Uri) -> Pkcs11Signer:
    pkcs11 = _import_pkcs11()
    Attribute, KeyType = pkcs11.Attribute, pkcs11.KeyType

    def find(session: Any) -> tuple[Any, Any | None]:
        private_key = _find_private_key(session, uri, token.label)
        return private_key, _find_public_key(session, private_key)

    private_key, public_obj = token.run("finding the key", None, find)
    key_kind = private_key.key_type
    if key_kind == KeyType.EC:
        params = token.run(
            "reading CKA_EC_PARAMS",
            None,
            lambda _s: private_key[Attribute.EC_PARAMS],
        )
        group = _CURVE_BY_PARAMS.get(bytes(params))
        if group is None:
            raise ValueError(
                "unsupported ECDSA curve on the token: TLS 1.3 here signs with P-256 or P-384"
            )
        token.check_required((CKM_ECDSA,), "ECDSA signing")
        curve = _CURVES[group][0]
        scheme, hash_name = _ECDSA_SCHEMES[group]
        key_type = _EC_KEY_TYPES[group]
        public_key: PublicKeyTypes | None = None
        if public_obj is not None:
            raw = token.run(
                "reading CKA_EC_POINT",
                None,
                lambda _s: public_obj[Attribute.EC_POINT],
            )
            point = _unwrap_ec_point(bytes(raw), _point_length(curve))
            public_key = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        calls = {scheme: _ecdsa_call(token, private_key, key_type, hash_name, curve)}
    elif key_kind == KeyType.RSA:
        token.check_required((CKM_RSA_PKCS_PSS,), "RSA-PSS signing")
        # The modulus and exponent are public attributes of the private key
        # too, so RSA works without a public-key object.
        source = public_obj if public_obj is not None else private_key
        modulus, exponent = token.run(
            "reading the RSA public key",
            None,
            lambda _s: (source[Attribute.MODULUS], source[Attribute.PUBLIC_EXPONENT]),
        )
        numbers = rsa.RSAPublicNumbers(
            int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big")
        )
        public_key = numbers.public_key()
        if public_key.key_size < openssl.MIN_RSA_BITS:
            raise ValueError(
                f"RSA key of {public_key.key_size} bits is too small: "
                f"at least {openssl.MIN_RSA_BITS} required"
            )
        key_type = f"rsa{public_key.key_size}"
        calls = {
            scheme: _pss_call(token, private_key, key_type, hash_name)
            for scheme, hash_name in _PSS_SCHEMES.items()
        }
    else:
        raise ValueError(
            f"unsupported key type {key_kind!r} on the token: expected ECDSA P-256/P-384 or RSA"
        )
    if public_key is None:
        return Pkcs11Signer(token, private_key, key_type, calls)
    return Pkcs11KeyPairSigner(token, private_key, key_type, calls, public_key)


def _ecdsa_call(
    token: Pkcs11Token, key: Any, key_type: str, hash_name: str, curve: ec.EllipticCurve
) -> Callable[[bytes], bytes]:
    pkcs11 = _import_pkcs11()
    mechanism = pkcs11.Mechanism.ECDSA
    size = (curve.key_size + 7) // 8

    def sign(message: bytes) -> bytes:
        digest = hashlib.new(hash_name, message).digest()
        raw = token.run(
            f"{key_type} signature", "CKM_ECDSA", lambda _s: key.sign(digest, mechanism=mechanism)
        )
        # PKCS#11 returns r ‖ s, each the size of the group order; TLS wants
        # the DER SEQUENCE of two INTEGERs (RFC 8446 §4.2.3, RFC 3279).
        if len(raw) != 2 * size:
            raise BackendError(f"{NAME} backend: {key_type} signature has {len(raw)} bytes")
        r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
        return encode_dss_signature(r, s)

    return sign


def _pss_call(
    token: Pkcs11Token, key: Any, key_type: str, hash_name: str
) -> Callable[[bytes], bytes]:
    pkcs11 = _import_pkcs11()
    p11_hash = _P11_HASH[hash_name]
    salt = hashlib.new(hash_name).digest_size
    param = (getattr(pkcs11.Mechanism, p11_hash), getattr(pkcs11.MGF, p11_hash), salt)
    mechanism = pkcs11.Mechanism.RSA_PKCS_PSS

    def sign(message: bytes) -> bytes:
        digest = hashlib.new(hash_name, message).digest()
        return token.run(
            f"{key_type} PSS signature",
            "CKM_RSA_PKCS_PSS",
            lambda _s: bytes(key.sign(digest, mechanism=mechanism, mechanism_param=param)),
        )

    return sign


# --- ECDH in the token -------------------------------------------------------------------


def _ephemeral_ec_pair(session: Any, params: bytes) -> tuple[Any, Any]:
    pkcs11 = _import_pkcs11()
    Attribute = pkcs11.Attribute
    # Session objects (CKA_TOKEN false): they live only as long as the
    # session, never touch the token's storage, and are destroyed after use.
    public, private = session.generate_keypair(
        pkcs11.KeyType.EC,
        store=False,
        public_template={Attribute.EC_PARAMS: params, Attribute.TOKEN: False},
        private_template={
            Attribute.TOKEN: False,
            Attribute.DERIVE: True,
            Attribute.SIGN: False,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
        },
    )
    return public, private


def _derive(private_key: Any, peer_point: bytes, secret_bits: int) -> bytes:
    pkcs11 = _import_pkcs11()
    Attribute = pkcs11.Attribute
    # CKD_NULL: the raw x-coordinate, which is what TLS 1.3 uses as the ECDHE
    # secret (RFC 8446 §7.4.2). The secret must come out to feed the key
    # schedule, so this one object is made extractable and not sensitive.
    secret = private_key.derive_key(
        pkcs11.KeyType.GENERIC_SECRET,
        secret_bits,
        mechanism=pkcs11.Mechanism.ECDH1_DERIVE,
        mechanism_param=(pkcs11.KDF.NULL, None, peer_point),
        template={
            Attribute.TOKEN: False,
            Attribute.SENSITIVE: False,
            Attribute.EXTRACTABLE: True,
        },
    )
    try:
        return bytes(secret[Attribute.VALUE])
    finally:
        secret.destroy()


def _destroy(*objects: Any) -> None:
    for obj in objects:
        obj.destroy()


class Pkcs11EcdhGroup:
    """ECDHE on P-256 or P-384 with the private key generated and used inside
    the token. The peer's share is checked here first (length, uncompressed
    form, on the curve) so that a bad share is InvalidKeyShare whatever the
    token would have answered."""

    __slots__ = ("_token", "_group", "_name", "_params", "_validator", "_share_length", "_bits")

    def __init__(self, token: Pkcs11Token, group: NamedGroup) -> None:
        curve, params = _CURVES[group]
        self._token = token
        self._group = group
        self._name = group.name
        self._params = params
        self._validator = openssl.EcdhGroup(group, curve)
        self._share_length = _point_length(curve)
        self._bits = 8 * ((curve.key_size + 7) // 8)

    @property
    def group(self) -> int:
        return self._group

    @property
    def backend(self) -> str:
        return NAME

    @property
    def client_share_length(self) -> int:
        return self._share_length

    @property
    def server_share_length(self) -> int:
        return self._share_length

    def server_exchange(self, client_share: bytes) -> tuple[bytes, SharedSecret]:
        self._validator.load_share(client_share)

        def exchange(session: Any) -> tuple[bytes, bytes]:
            public, private = _ephemeral_ec_pair(session, self._params)
            try:
                share = self._public_point(public)
                return share, _derive(private, client_share, self._bits)
            finally:
                _destroy(private, public)

        share, secret = self._token.run(f"{self._name} key exchange", "CKM_ECDH1_DERIVE", exchange)
        return share, self._checked(secret)

    def start(self) -> ClientKeyExchange:
        def generate(session: Any) -> tuple[Any, Any, bytes]:
            public, private = _ephemeral_ec_pair(session, self._params)
            try:
                return public, private, self._public_point(public)
            except BaseException:
                _destroy(private, public)
                raise

        public, private, share = self._token.run(
            f"{self._name} key generation", "CKM_EC_KEY_PAIR_GEN", generate
        )
        return _Pkcs11EcdhClient(self, public, private, share)

    def _public_point(self, public: Any) -> bytes:
        pkcs11 = _import_pkcs11()
        return _unwrap_ec_point(bytes(public[pkcs11.Attribute.EC_POINT]), self._share_length)

    def _checked(self, secret: bytes) -> SharedSecret:
        if len(secret) != self._bits // 8:
            raise BackendError(f"{NAME} backend: {self._name} secret has {len(secret)} bytes")
        return SharedSecret(secret)

    def _complete(self, private: Any, public: Any, server_share: bytes) -> SharedSecret:
        self._validator.load_share(server_share)

        def derive(_session: Any) -> bytes:
            try:
                return _derive(private, server_share, self._bits)
            finally:
                _destroy(private, public)

        return self._checked(
            self._token.run(f"{self._name} key exchange", "CKM_ECDH1_DERIVE", derive)
        )

    def __repr__(self) -> str:
        return f"<Pkcs11EcdhGroup {self._name} token={self._token.label!r}>"


class _Pkcs11EcdhClient:
    """The client role (self-test, backend suite): the key pair lives in the
    token until ``complete`` uses and destroys it."""

    __slots__ = ("_group", "_public", "_private", "_share", "_done")

    def __init__(self, group: Pkcs11EcdhGroup, public: Any, private: Any, share: bytes) -> None:
        self._group = group
        self._public = public
        self._private = private
        self._share = share
        self._done = False

    @property
    def share(self) -> bytes:
        return self._share

    def complete(self, server_share: bytes) -> SharedSecret:
        if self._done:
            raise BackendError(f"{NAME} backend: client key already used")
        self._done = True
        return self._group._complete(self._private, self._public, server_share)

    def __repr__(self) -> str:
        return "<Pkcs11EcdhClient>"


# --- ML-KEM in the token (PKCS#11 3.2) ---------------------------------------------------

# name → (python-pkcs11 parameter-set name, encapsulation key length, ciphertext length,
# host-side key loader for the FIPS 203 §7.2 encapsulation-key check).
_MLKEM: Final[dict[str, tuple[str, int, int, Callable[[bytes], object]]]] = {
    "ML-KEM-768": ("ML_KEM_768", 1184, 1088, mlkem.MLKEM768PublicKey.from_public_bytes),
    "ML-KEM-1024": ("ML_KEM_1024", 1568, 1568, mlkem.MLKEM1024PublicKey.from_public_bytes),
}
_MLKEM_SECRET_LENGTH: Final = 32


class Pkcs11MlKem:
    """ML-KEM through ``C_EncapsulateKey`` / ``C_DecapsulateKey`` with
    ``CKM_ML_KEM``. The peer's encapsulation key is checked here first
    (FIPS 203 §7.2 modulus check, through cryptography), so a bad key is
    InvalidKeyShare whatever the token answers."""

    __slots__ = ("_token", "_name", "_parameter_set", "_ek_length", "_ct_length", "_check_key")

    def __init__(self, token: Pkcs11Token, name: str) -> None:
        self._token = token
        self._name = name
        self._parameter_set, self._ek_length, self._ct_length, self._check_key = _MLKEM[name]

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

    def _parameter(self) -> Any:
        return getattr(_import_pkcs11().MLKEMParameterSet, self._parameter_set)

    def encapsulate(self, encapsulation_key: bytes) -> tuple[bytes, SharedSecret]:
        check_share_length(f"{self._name} encapsulation key", encapsulation_key, self._ek_length)
        try:
            self._check_key(encapsulation_key)
        except ValueError:
            raise InvalidKeyShare(
                f"{self._name}: encapsulation key fails the modulus check"
            ) from None
        pkcs11 = _import_pkcs11()
        Attribute = pkcs11.Attribute

        def encapsulate(session: Any) -> tuple[bytes, bytes]:
            public = session.create_object(
                {
                    Attribute.CLASS: pkcs11.ObjectClass.PUBLIC_KEY,
                    Attribute.KEY_TYPE: pkcs11.KeyType.ML_KEM,
                    Attribute.TOKEN: False,
                    Attribute.PARAMETER_SET: self._parameter(),
                    Attribute.VALUE: encapsulation_key,
                    Attribute.ENCAPSULATE: True,
                }
            )
            try:
                ciphertext, secret = public.encapsulate_key(
                    pkcs11.KeyType.GENERIC_SECRET,
                    mechanism=pkcs11.Mechanism.ML_KEM,
                    template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
                )
                try:
                    return bytes(ciphertext), bytes(secret[Attribute.VALUE])
                finally:
                    secret.destroy()
            finally:
                public.destroy()

        ciphertext, secret = self._token.run(
            f"{self._name} encapsulation", "CKM_ML_KEM", encapsulate
        )
        if len(ciphertext) != self._ct_length or len(secret) != _MLKEM_SECRET_LENGTH:
            raise BackendError(f"{NAME} backend: {self._name} encapsulation has wrong lengths")
        return ciphertext, SharedSecret(secret)

    def generate(self) -> KemDecapsulator:
        self._token.check_required((CKM_ML_KEM_KEY_PAIR_GEN,), f"{self._name} key generation")
        pkcs11 = _import_pkcs11()
        Attribute = pkcs11.Attribute

        def generate(session: Any) -> tuple[Any, Any, bytes]:
            public, private = session.generate_keypair(
                pkcs11.KeyType.ML_KEM,
                store=False,
                public_template={
                    Attribute.PARAMETER_SET: self._parameter(),
                    Attribute.TOKEN: False,
                },
                private_template={Attribute.TOKEN: False, Attribute.SENSITIVE: True},
            )
            try:
                return public, private, bytes(public[Attribute.VALUE])
            except BaseException:
                _destroy(private, public)
                raise

        public, private, key = self._token.run(
            f"{self._name} key generation", "CKM_ML_KEM_KEY_PAIR_GEN", generate
        )
        return _Pkcs11MlKemDecapsulator(self, public, private, key)

    def __repr__(self) -> str:
        return f"<Pkcs11MlKem {self._name} token={self._token.label!r}>"


class _Pkcs11MlKemDecapsulator:
    __slots__ = ("_kem", "_public", "_private", "_key")

    def __init__(self, kem: Pkcs11MlKem, public: Any, private: Any, key: bytes) -> None:
        self._kem = kem
        self._public = public
        self._private = private
        self._key = key

    @property
    def encapsulation_key(self) -> bytes:
        return self._key

    def decapsulate(self, ciphertext: bytes) -> SharedSecret:
        kem = self._kem
        check_share_length(f"{kem.name} ciphertext", ciphertext, kem.ciphertext_length)
        pkcs11 = _import_pkcs11()
        Attribute = pkcs11.Attribute

        def decapsulate(_session: Any) -> bytes:
            try:
                secret = self._private.decapsulate_key(
                    ciphertext,
                    pkcs11.KeyType.GENERIC_SECRET,
                    mechanism=pkcs11.Mechanism.ML_KEM,
                    template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
                )
                try:
                    return bytes(secret[Attribute.VALUE])
                finally:
                    secret.destroy()
            finally:
                _destroy(self._private, self._public)

        return SharedSecret(kem._token.run(f"{kem.name} decapsulation", "CKM_ML_KEM", decapsulate))

    def __repr__(self) -> str:
        return f"<Pkcs11MlKemDecapsulator {self._kem.name}>"


# --- Provider ----------------------------------------------------------------------------


class Pkcs11Provider:
    """Every group, with the configured halves in the token and the rest on the
    ``openssl`` backend; each group's ``backend`` says where its work runs
    ("pkcs11", "pkcs11+openssl", "openssl").

    With ``"ecdh"`` the P-256/P-384 groups and their hybrids use the token's
    ECDH; X25519 (which PKCS#11 tokens rarely have) and P-521 stay on the host,
    so X25519MLKEM768 clients are still served. A listener that must keep all
    key agreement in the token lists only the token's groups in its ``groups``.
    With ``"ml-kem"`` the ML-KEM halves run in the token too."""

    __slots__ = ("_token", "_groups")

    def __init__(self, token: Pkcs11Token, operations: Iterable[str]) -> None:
        ops = frozenset(operations)
        token.check_operations(ops)
        self._token = token
        classical: dict[str, KxGroup] = dict(openssl.classical_groups())
        if "ecdh" in ops:
            classical.update({g.name: Pkcs11EcdhGroup(token, g) for g in map(NamedGroup, _CURVES)})
        kems: Mapping[str, Kem]
        if "ml-kem" in ops:
            kems = {name: Pkcs11MlKem(token, name) for name in _MLKEM}
        else:
            kems = openssl.kems()
        self._groups: Mapping[int, KxGroup] = MappingProxyType(compose_groups(kems, classical))

    @property
    def name(self) -> str:
        return NAME

    @property
    def groups(self) -> Mapping[int, KxGroup]:
        return self._groups

    @property
    def token(self) -> Pkcs11Token:
        return self._token

    def close(self) -> None:
        self._token.close()

    def __repr__(self) -> str:
        return f"<Pkcs11Provider token={self._token.label!r} groups={len(self._groups)}>"


# --- Module convention -------------------------------------------------------------------


def _config(config: Pkcs11Config | None) -> Pkcs11Config:
    if config is not None:
        return config
    try:
        return Pkcs11Config.from_env()
    except ValueError as exc:
        raise BackendError(f"{NAME} backend unavailable: {exc}") from None


def unavailable_reason(config: Pkcs11Config | None = None) -> str | None:
    """Why this backend cannot run, or None: python-pkcs11 missing, no
    configuration, or no module file at the configured path. Opens nothing."""
    try:
        import pkcs11  # noqa: F401
    except ImportError as exc:
        return f"python-pkcs11 is not installed ({exc}); install pqproxy[pkcs11]"
    if config is None:
        try:
            config = Pkcs11Config.from_env()
        except (ValueError, BackendError) as exc:
            return str(exc)
    if not os.path.isfile(config.module):
        return f"PKCS#11 module {config.module}: no such file"
    return None


def is_available(config: Pkcs11Config | None = None) -> bool:
    return unavailable_reason(config) is None


def create_provider(config: Pkcs11Config | None = None) -> Pkcs11Provider:
    """Open (or share) the token session and check every configured operation
    against its mechanism list; a missing mechanism refuses with its name."""
    config = _config(config)
    token = open_token(config)
    try:
        return Pkcs11Provider(token, config.operations)
    except BaseException:
        token.close()
        raise


def capabilities(config: Pkcs11Config | None = None) -> dict[str, list[str]]:
    """What the configured token can do for pqproxy, for ``pqproxy backends``.
    Reads the mechanism list only, so it needs no login."""
    config = _config(config)
    lib = _load_module(config.module)
    table = _mechanism_table(_find_token(lib, config.module, config.token_label))

    def has(*mechanisms: int) -> bool:
        try:
            check_required(config.token_label, table, mechanisms, "probe")
        except BackendError:
            return False
        return True

    token_kems = list(_MLKEM) if has(CKM_ML_KEM) else []
    token_curves = [NamedGroup(g).name for g in _CURVES] if has(*OPERATIONS["ecdh"]) else []
    token_parts = set(token_kems) | set(token_curves)
    components = set(token_kems or openssl.kems()) | set(openssl.classical_groups())
    # What compose_groups would build from these components, in its order; the
    # token_groups are those with a half the token can do.
    hybrids = [
        (code, (first, second))
        for code, (first, second) in HYBRID_LAYOUTS.items()
        if first in components and second in components
    ]
    groups = [group_name(code) for code, _ in hybrids] + list(openssl.classical_groups())
    token_groups = [
        group_name(code) for code, parts in hybrids if token_parts.intersection(parts)
    ] + token_curves
    schemes: list[str] = []
    if has(CKM_ECDSA):
        schemes += [SignatureScheme(s).name for s, _ in _ECDSA_SCHEMES.values()]
    if has(CKM_RSA_PKCS_PSS):
        schemes += [SignatureScheme(s).name for s in _PSS_SCHEMES]
    return {
        "library": [
            f"python-pkcs11 {_binding_version()}",
            f"{lib.manufacturer_id} {lib.library_description} "
            f"{'.'.join(map(str, lib.library_version))} "
            f"(Cryptoki {'.'.join(map(str, lib.cryptoki_version))})",
        ],
        "token": [config.token_label],
        "mechanisms": sorted(m.name for v, m in MECHANISMS.items() if v in table),
        "missing_mechanisms": sorted(m.name for v, m in MECHANISMS.items() if v not in table),
        "groups": groups,
        "token_groups": token_groups,
        "kems": token_kems,
        "signature_schemes": schemes,
    }


def _binding_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("python-pkcs11")
    except PackageNotFoundError:
        return "unknown"


def self_test(config: Pkcs11Config | None = None) -> None:
    """Cross-checks against the ``openssl`` backend: each token ECDH group
    against host ECDH, token ML-KEM encapsulation against host decapsulation,
    and the configured signing key signs and verifies. Raises BackendError
    naming the first thing that is wrong."""
    config = _config(config)
    provider = create_provider(config)
    token = provider.token
    try:
        if "ecdh" in config.operations:
            for group in map(NamedGroup, _CURVES):
                _cross_check_ecdh(
                    Pkcs11EcdhGroup(token, group), openssl.classical_groups()[group.name]
                )
        if "ml-kem" in config.operations:
            for name, host in openssl.kems().items():
                if name in _MLKEM:
                    _cross_check_kem(Pkcs11MlKem(token, name), host)
        if config.key_label is not None:
            _check_signer(token.load_signer(Pkcs11Uri(object=config.key_label)))
    finally:
        provider.close()


def _cross_check_ecdh(group: Pkcs11EcdhGroup, host: KxGroup) -> None:
    name = group_name(group.group)
    try:
        client = host.start()
        share, secret = group.server_exchange(client.share)
        expected = client.complete(share)
    except (BackendError, InvalidKeyShare) as exc:
        raise BackendError(f"{NAME} backend: self-test {name} failed: {exc}") from None
    if secret != expected:
        raise BackendError(f"{NAME} backend: self-test {name}: token and host secrets differ")


def _cross_check_kem(kem: Pkcs11MlKem, host: Kem) -> None:
    try:
        decapsulator = host.generate()
        ciphertext, secret = kem.encapsulate(decapsulator.encapsulation_key)
        expected = decapsulator.decapsulate(ciphertext)
    except (BackendError, InvalidKeyShare) as exc:
        raise BackendError(f"{NAME} backend: self-test {kem.name} failed: {exc}") from None
    if secret != expected:
        raise BackendError(f"{NAME} backend: self-test {kem.name}: token and host secrets differ")


def _check_signer(signer: Pkcs11Signer) -> None:
    message = b"pqproxy self-test"
    for scheme in signer.schemes:
        signature = signer.sign(scheme, message)
        if isinstance(signer, Pkcs11KeyPairSigner):
            try:
                openssl.verify_signature(signer.public_key, scheme, message, signature)
            except Exception as exc:
                raise BackendError(
                    f"{NAME} backend: self-test {signer.key_type} signature {scheme:#06x} "
                    f"does not verify ({type(exc).__name__})"
                ) from None
