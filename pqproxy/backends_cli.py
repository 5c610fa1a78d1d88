"""``pqproxy backends [--json]``: what each crypto backend can do on this machine.

For every backend (openssl, liboqs, pkcs11): whether it is available and, if not, why; its
library, groups and signature schemes; its self-test (``crypto.selftest``: known answers,
cross-check, the backend's own tests); and a short speed line: ML-KEM-768 key generations,
encapsulations and decapsulations per second on the backend's own ML-KEM, the server's
whole hybrid key exchange per second, and signatures per second where the backend signs.

Speed is wall-clock (a token's latency is part of what it costs), the median of a few short
rounds per operation, about ``--speed-seconds`` per backend in all: a sketch for choosing a
backend, not a benchmark (``bench/kem_backends.py`` is that).

pkcs11 is configured from the environment (``Pkcs11Config.from_env``: PQPROXY_PKCS11_MODULE,
_TOKEN, _PIN or _PIN_FILE, _KEY, _OPERATIONS), never from the command line.

Exit status: 0 when every available backend passes its self-test, 1 when one fails (an
unavailable backend is reported, not an error), 2 for bad arguments.

    python -m pqproxy.backends_cli [--json]   # the same without the main CLI
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from .crypto.backends import BACKEND_MODULES
from .crypto.provider import CryptoProvider, Kem, KxGroup, Signer
from .crypto.selftest import SelfTestReport, self_test_backend
from .tls.enums import NamedGroup, SignatureScheme, group_name

logger = logging.getLogger(__name__)

# About this long of measuring per backend, split over its operations.
SPEED_SECONDS: Final = 0.3
# Rounds per operation; the figure is their median, so one disturbed round does not count.
SPEED_ROUNDS: Final = 5
SPEED_KEM: Final = "ML-KEM-768"
# The hybrid whose whole server key exchange is timed, in order of preference.
SPEED_GROUPS: Final = (
    NamedGroup.X25519MLKEM768,
    NamedGroup.SecP256r1MLKEM768,
    NamedGroup.SecP384r1MLKEM1024,
)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``backends`` subcommand to the ``pqproxy`` parser's subparsers; its handler
    is ``run(args)``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "backends",
        help="list the crypto backends: availability, groups, self-test, speed",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument(
        "--no-speed", action="store_true", help="skip the speed measurement (faster)"
    )
    parser.add_argument(
        "--speed-seconds",
        type=_positive_float,
        default=SPEED_SECONDS,
        metavar="S",
        help=f"measuring time per backend (default {SPEED_SECONDS:g})",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    return parser


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be positive")
    return number


# --- speed --------------------------------------------------------------------------------------


def rate(operation: Callable[[], object], seconds: float, rounds: int = SPEED_ROUNDS) -> float:
    """Calls per second of ``operation``: the median of ``rounds`` rounds of about
    ``seconds / rounds`` each (at least one call per round)."""
    operation()  # first-call costs (lazy imports, caches) are not what is measured
    per_round = seconds / rounds
    samples = []
    for _ in range(rounds):
        calls = 0
        start = time.perf_counter()
        while True:
            operation()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= per_round:
                break
        samples.append(calls / elapsed)
    return statistics.median(samples)


def _find_kem(provider: CryptoProvider, backend: str, name: str) -> Kem | None:
    """The backend's own ML-KEM, found in its groups (a hybrid's component)."""
    for group in provider.groups.values():
        for part in getattr(group, "components", (group,)):
            kem = getattr(part, "kem", None)
            if kem is not None and kem.name == name and kem.backend == backend:
                found: Kem = kem
                return found
    return None


def _speed_group(provider: CryptoProvider, backend: str) -> KxGroup | None:
    """The first hybrid in which this backend does part of the work."""
    for code in SPEED_GROUPS:
        group = provider.groups.get(code)
        if group is not None and backend in group.backend.split("+"):
            return group
    return None


def _speed_signer(name: str, provider: CryptoProvider, pkcs11_config: Any) -> Signer | None:
    if name == "openssl":
        from cryptography.hazmat.primitives.asymmetric import ec

        from .crypto.backends.openssl import signer_from_private_key

        return signer_from_private_key(ec.generate_private_key(ec.SECP256R1()))
    if name == "pkcs11" and pkcs11_config is not None and pkcs11_config.key_label:
        from .crypto.backends.pkcs11 import Pkcs11Uri

        signer: Signer = provider.token.load_signer(  # type: ignore[attr-defined]
            Pkcs11Uri(object=pkcs11_config.key_label)
        )
        return signer
    return None  # liboqs signs nothing yet (its capabilities list no signature scheme)


def measure_speed(
    name: str, provider: CryptoProvider, seconds: float, pkcs11_config: Any = None
) -> dict[str, Any]:
    """The speed line's figures (per second, rounded); missing operations are left out."""
    kem = _find_kem(provider, name, SPEED_KEM)
    group = _speed_group(provider, name)
    signer = _speed_signer(name, provider, pkcs11_config)
    operations: list[tuple[str, Callable[[], object]]] = []
    if kem is not None:
        key = kem.generate()
        ciphertext, _ = kem.encapsulate(key.encapsulation_key)
        operations += [
            ("keygen_per_s", kem.generate),
            ("encaps_per_s", lambda: kem.encapsulate(key.encapsulation_key)),
            ("decaps_per_s", lambda: key.decapsulate(ciphertext)),
        ]
    if group is not None:
        # The client share comes from the group's own start(): its generation is not timed.
        share = group.start().share
        operations.append(("exchange_per_s", lambda: group.server_exchange(share)))
    if signer is not None:
        scheme = signer.schemes[0]
        message = b"\x20" * 64 + b"pqproxy backends speed" + bytes(48)
        operations.append(("sign_per_s", lambda: signer.sign(scheme, message)))
    result: dict[str, Any] = {}
    if kem is not None:
        result["kem"] = kem.name
    if group is not None:
        result["exchange_group"] = group_name(group.group)
    if signer is not None:
        result["sign_scheme"] = _scheme_name(signer.schemes[0])
    started = time.perf_counter()
    for key_name, operation in operations:
        result[key_name] = round(rate(operation, seconds / max(1, len(operations))), 1)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _scheme_name(scheme: int) -> str:
    try:
        return SignatureScheme(scheme).name
    except ValueError:
        return f"0x{scheme:04x}"


# --- inspection ---------------------------------------------------------------------------------


def _self_test_dict(report: SelfTestReport) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "summary": report.summary(),
        "method": report.method,
        "seconds": round(report.seconds, 3),
        "checks": [
            {"name": check.name, "ok": check.ok, "detail": check.detail} for check in report.checks
        ],
    }


def inspect_backend(name: str, *, speed_seconds: float | None = SPEED_SECONDS) -> dict[str, Any]:
    """Everything ``pqproxy backends`` says about one backend, as plain data. Never raises
    for a backend's sake: whatever goes wrong is in the entry."""
    entry: dict[str, Any] = {
        "name": name,
        "available": False,
        "reason": None,
        "library": [],
        "groups": [],
        "kems": [],
        "signature_schemes": [],
        "self_test": None,
        "speed": None,
    }
    pkcs11_config: Any = None
    extra: tuple[Any, ...] = ()
    try:
        module: Any = importlib.import_module(BACKEND_MODULES[name])
        if name == "pkcs11":
            try:
                pkcs11_config = module.Pkcs11Config.from_env()
            except (ValueError, module.BackendError) as exc:
                entry["reason"] = str(exc)
                return entry
            extra = (pkcs11_config,)
        reason = module.unavailable_reason(*extra)
        if reason is not None:
            entry["reason"] = reason
            return entry
        entry["available"] = True
        capabilities = module.capabilities(*extra)
        for key in ("library", "groups", "kems", "signature_schemes"):
            entry[key] = list(capabilities.get(key, []))
        if name == "pkcs11":
            for key in ("token", "token_groups", "missing_mechanisms"):
                entry[key] = list(capabilities.get(key, []))
        provider: CryptoProvider = module.create_provider(*extra)
    except Exception as exc:
        entry["reason"] = entry["reason"] or f"{type(exc).__name__}: {exc}"
        entry["error"] = f"{type(exc).__name__}: {exc}"
        return entry
    try:
        report = self_test_backend(name, provider, pkcs11_config=pkcs11_config)
        entry["self_test"] = _self_test_dict(report)
        if speed_seconds is not None and report.ok:
            try:
                entry["speed"] = measure_speed(name, provider, speed_seconds, pkcs11_config)
            except Exception as exc:
                entry["speed"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        close = getattr(provider, "close", None)
        if callable(close):
            close()
    return entry


def inspect_backends(*, speed_seconds: float | None = SPEED_SECONDS) -> list[dict[str, Any]]:
    return [inspect_backend(name, speed_seconds=speed_seconds) for name in BACKEND_MODULES]


# --- output -------------------------------------------------------------------------------------


def _per_second(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k/s"
    if value >= 1000:
        return f"{value / 1000:.1f}k/s"
    return f"{value:.0f}/s"


def speed_line(speed: dict[str, Any]) -> str:
    if "error" in speed:
        return f"not measured: {speed['error']}"
    parts = []
    if "kem" in speed:
        parts.append(
            f"{speed['kem']} keygen {_per_second(speed['keygen_per_s'])}, "
            f"encaps {_per_second(speed['encaps_per_s'])}, "
            f"decaps {_per_second(speed['decaps_per_s'])}"
        )
    if "exchange_group" in speed:
        parts.append(f"{speed['exchange_group']} exchange {_per_second(speed['exchange_per_s'])}")
    if "sign_scheme" in speed:
        parts.append(f"{speed['sign_scheme']} sign {_per_second(speed['sign_per_s'])}")
    return "; ".join(parts) or "nothing this backend does alone"


def format_text(entries: Sequence[dict[str, Any]]) -> str:
    lines = []
    for entry in entries:
        if not entry["available"]:
            lines.append(f"{entry['name']}: unavailable: {entry['reason']}")
            continue
        library = ", ".join(entry["library"])
        lines.append(f"{entry['name']}: available ({library})")
        if entry.get("token"):
            lines.append(f"  token:       {', '.join(entry['token'])}")
        lines.append(f"  groups:      {', '.join(entry['groups']) or '-'}")
        if entry.get("token_groups"):
            lines.append(f"  in token:    {', '.join(entry['token_groups'])}")
        lines.append(f"  signatures:  {', '.join(entry['signature_schemes']) or '-'}")
        test = entry["self_test"]
        lines.append(f"  self-test:   {test['summary'] if test else 'not run'}")
        if test and not test["ok"]:
            for check in test["checks"]:
                if check["ok"] is False:
                    lines.append(f"    failed: {check['name']}: {check['detail']}")
        if entry["speed"] is not None:
            lines.append(f"  speed:       {speed_line(entry['speed'])}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    speed = None if args.no_speed else args.speed_seconds
    entries = inspect_backends(speed_seconds=speed)
    if args.json:
        print(json.dumps({"backends": entries}, indent=2))
    else:
        print(format_text(entries))
    failed = [e for e in entries if e["self_test"] is not None and not e["self_test"]["ok"]]
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pqproxy")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    arguments = ["backends", *(sys.argv[1:] if argv is None else argv)]
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
