"""ML-KEM on each installed backend, side by side: key generation,
encapsulation and decapsulation per second, and the server's whole key
exchange per hybrid group (what one handshake costs in key exchange).

    .venv/bin/python bench/kem_backends.py [--ops 2000] [--breakdown] [--handshakes 1000]

Each figure is the median of 5 runs of --ops operations, in CPU time of this
process, the backends' runs alternating. --breakdown splits
one ML-KEM-768 encapsulation into its layers (library call, Python wrapper,
pqproxy's edge) to show where the time goes; --handshakes times the server
side of whole X25519MLKEM768 handshakes against a pyOpenSSL memory-BIO client.
Figures, not pass/fail: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pqproxy.crypto.backends import BACKEND_MODULES  # noqa: E402
from pqproxy.tls.enums import group_name  # noqa: E402

RUNS = 5
KEMS = ("ML-KEM-512", "ML-KEM-768", "ML-KEM-1024")
HYBRIDS = (0x11EC, 0x11EB, 0x11ED)


def per_second(*operations: Callable[[], object], ops: int) -> list[float]:
    """For each operation, the median over RUNS runs of ``ops`` calls, in calls
    per CPU second of this process. The runs of the operations alternate, and
    CPU time (not wall time) is counted, so that other load on the machine
    skews neither one nor the comparison much."""
    for operation in operations:
        operation()  # first-call costs (lazy imports, caches) are not what is measured
    rates: list[list[float]] = [[] for _ in operations]
    for _ in range(RUNS):
        for operation, samples in zip(operations, rates, strict=True):
            start = time.process_time()
            for _ in range(ops):
                operation()
            samples.append(ops / (time.process_time() - start))
    return [statistics.median(samples) for samples in rates]


def installed_backends() -> dict[str, Any]:
    import importlib

    found: dict[str, Any] = {}
    # The default backend first: the ratio column is every other one against it.
    for name in sorted(BACKEND_MODULES, key=lambda n: (n != "openssl", n)):
        module: Any = importlib.import_module(BACKEND_MODULES[name])
        if not module.is_available() or not hasattr(module, "kems"):
            reason = module.unavailable_reason() or "no ML-KEM of its own"
            print(f"# {name}: skipped ({reason})")
            continue
        found[name] = module
    return found


def kem_table(backends: dict[str, Any], ops: int) -> None:
    names = list(backends)
    header = f"{'kem':<12} {'operation':<10}" + "".join(f"{n + ' op/s':>16}" for n in names)
    if len(names) == 2:
        header += f"{'speed-up':>12}"
    print(header)
    for kem_name in KEMS:
        for operation in ("keygen", "encaps", "decaps"):
            calls: list[Callable[[], object]] = []
            present: list[bool] = []
            for module in backends.values():
                kem = module.kems().get(kem_name)
                present.append(kem is not None)
                if kem is None:
                    continue
                key = kem.generate()
                ciphertext, _ = kem.encapsulate(key.encapsulation_key)
                calls.append(
                    {
                        "keygen": kem.generate,
                        "encaps": lambda kem=kem, ek=key.encapsulation_key: kem.encapsulate(ek),
                        "decaps": lambda key=key, ct=ciphertext: key.decapsulate(ct),
                    }[operation]
                )
            measured = iter(per_second(*calls, ops=ops))
            rates = [next(measured) if here else None for here in present]
            cells = "".join(f"{r:>16,.0f}" if r else f"{'-':>16}" for r in rates)
            ratio = ""
            if len(rates) == 2 and rates[0] and rates[1]:
                ratio = f"{rates[1] / rates[0]:>11.2f}x"
            print(f"{kem_name:<12} {operation:<10}{cells}{ratio}")


def hybrid_table(backends: dict[str, Any], ops: int) -> None:
    names = list(backends)
    print(f"{'group':<20} {'server_exchange':<16}" + "".join(f"{n + ' µs':>14}" for n in names))
    for code in HYBRIDS:
        calls: list[Callable[[], object]] = []
        for module in backends.values():
            group = module.create_provider().groups[code]
            share = group.start().share
            calls.append(lambda group=group, share=share: group.server_exchange(share))
        cells = "".join(f"{1e6 / rate:>14.1f}" for rate in per_second(*calls, ops=ops))
        print(f"{group_name(code):<20} {'':<16}{cells}")


def breakdown(backends: dict[str, Any], ops: int) -> None:
    """One ML-KEM-768 encapsulation, layer by layer, in µs per call."""
    rows: list[tuple[str, Callable[[], object]]] = []
    if "openssl" in backends:
        from cryptography.hazmat.primitives.asymmetric import mlkem

        ek = mlkem.MLKEM768PrivateKey.generate().public_key().public_bytes_raw()
        public = mlkem.MLKEM768PublicKey.from_public_bytes(ek)
        kem = backends["openssl"].kems()["ML-KEM-768"]
        rows += [
            ("openssl: pqproxy MlKem.encapsulate", lambda: kem.encapsulate(ek)),
            (
                "openssl: from_public_bytes + encapsulate",
                lambda: mlkem.MLKEM768PublicKey.from_public_bytes(ek).encapsulate(),
            ),
            (
                "openssl: from_public_bytes alone",
                lambda: mlkem.MLKEM768PublicKey.from_public_bytes(ek),
            ),
            ("openssl: encapsulate, key already loaded", public.encapsulate),
        ]
    if "liboqs" in backends:
        import oqs

        from pqproxy.crypto.backends.liboqs import modulus_check

        lkem = backends["liboqs"].kems()["ML-KEM-768"]
        ek2 = lkem.generate().encapsulation_key
        wrapper = oqs.KeyEncapsulation("ML-KEM-768")
        # The floor: the C function through ctypes with argument types declared
        # and output buffers allocated once.
        encaps = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
            ("OQS_KEM_ml_kem_768_encaps", oqs.native())
        )
        ct_buffer, ss_buffer = ctypes.create_string_buffer(1088), ctypes.create_string_buffer(32)
        rows += [
            ("liboqs: pqproxy LiboqsKem.encapsulate", lambda: lkem.encapsulate(ek2)),
            ("liboqs: oqs KeyEncapsulation.encap_secret", lambda: wrapper.encap_secret(ek2)),
            ("liboqs: bare C call via ctypes", lambda: encaps(ct_buffer, ss_buffer, ek2)),
            (
                "liboqs: new KeyEncapsulation per call (avoided)",
                lambda: oqs.KeyEncapsulation("ML-KEM-768").free(),
            ),
            ("pure-Python FIPS 203 §7.2 modulus check", lambda: modulus_check(ek2)),
        ]
    print(f"{'ML-KEM-768 encapsulation, layer by layer':<52}{'µs/call':>10}")
    rates = per_second(*(call for _, call in rows), ops=ops)
    for (label, _), rate in zip(rows, rates, strict=True):
        print(f"{label:<52}{1e6 / rate:>10.2f}")


def handshakes(backends: dict[str, Any], count: int) -> None:
    """Server CPU per whole X25519MLKEM768 handshake (median of RUNS batches)."""
    from OpenSSL import SSL

    from pqproxy.crypto.certs import load_certified_key
    from pqproxy.devcert import generate_dev_certs
    from pqproxy.tls.events import HandshakeComplete
    from pqproxy.tls.server import ServerConfig, ServerConnection, resolve_inline
    from tests.peers import client_context, drain_bio, memory_client

    with tempfile.TemporaryDirectory() as tmp:
        paths = generate_dev_certs(Path(tmp), key_type="ecdsa-p256")
        config = ServerConfig(
            certificates=(load_certified_key(paths.cert, paths.key),), groups=(0x11EC,)
        )
        ctx = client_context(paths.ca, groups="X25519MLKEM768")

        def one(provider: Any) -> float:
            client = memory_client(ctx)
            server = ServerConnection(config, provider, os.urandom)
            cpu, done = 0.0, False
            for _ in range(6):
                try:
                    client.do_handshake()
                except SSL.WantReadError:
                    pass
                data = drain_bio(client)
                if not data:
                    break
                start = time.process_time()
                server.receive_data(data)
                events = resolve_inline(server)
                out = server.data_to_send()
                cpu += time.process_time() - start
                done = done or any(isinstance(e, HandshakeComplete) for e in events)
                if out:
                    client.bio_write(out)
            if not done:
                raise RuntimeError("handshake did not complete")
            return cpu

        print(f"{'X25519MLKEM768 handshake, server CPU':<40}{'µs':>10}")
        providers = {name: module.create_provider() for name, module in backends.items()}
        for provider in providers.values():
            for _ in range(50):
                one(provider)
        per_batch = max(1, count // RUNS)
        batches: dict[str, list[float]] = {name: [] for name in providers}
        for _ in range(RUNS):
            for name, provider in providers.items():
                total = sum(one(provider) for _ in range(per_batch))
                batches[name].append(total / per_batch * 1e6)
        for name, samples in batches.items():
            print(f"{name:<40}{statistics.median(samples):>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=2000, help="operations per run")
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--handshakes", type=int, default=0, metavar="N")
    args = parser.parse_args()

    backends = installed_backends()
    print(
        f"# Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs; median of {RUNS} runs of {args.ops} operations"
    )
    for name, module in backends.items():
        print(f"# {name}: {', '.join(module.capabilities()['library'])}")
    kem_table(backends, args.ops)
    print()
    hybrid_table(backends, args.ops)
    if args.breakdown:
        print()
        breakdown(backends, args.ops)
    if args.handshakes:
        print()
        handshakes(backends, args.handshakes)


if __name__ == "__main__":
    main()
