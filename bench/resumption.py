"""Server CPU per resumed handshake against a full one, both X25519MLKEM768.

    .venv/bin/python bench/resumption.py --count 2000 [--key-type ecdsa-p256 --key-type mldsa65]
        [--append-results bench/RESULTS.md]

In-process, like bench/profile_handshake.py: pqproxy's engine against pyOpenSSL memory-BIO
clients, timing only the server's side (process CPU around ``receive_data``, the crypto the
engine asks for, and ``data_to_send``). The server issues 2 tickets per handshake, as
configured by default, on full and resumed handshakes alike, so both figures include
sealing them. A resumed handshake still runs the hybrid key exchange (psk_dhe_ke only);
what it saves is the certificate, the CertificateVerify signature and the client's
certificate checks.

OpenSSL offers each ticket once (RFC 8446 §C.4), so the resumed connections form a chain:
each resumes with the ticket the previous one received. Medians of 5 batches, after a
warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from OpenSSL import SSL
from OpenSSL._util import lib as _lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pqproxy.bench.report import replace_section  # noqa: E402
from pqproxy.crypto.backends.openssl import OpenSSLProvider  # noqa: E402
from pqproxy.crypto.certs import load_certified_key  # noqa: E402
from pqproxy.crypto.tickets import RotatingTicketKeys  # noqa: E402
from pqproxy.devcert import generate_dev_certs  # noqa: E402
from pqproxy.tls.enums import NamedGroup  # noqa: E402
from pqproxy.tls.events import HandshakeComplete  # noqa: E402
from pqproxy.tls.server import ServerConfig, ServerConnection, resolve_inline  # noqa: E402
from tests.peers import client_context, drain_bio, memory_client  # noqa: E402

BATCHES = 5
WARMUP = 50
HEADING = "## Session resumption: server CPU per handshake"


@dataclass
class Outcome:
    server_cpu: float
    resumed: bool
    session: SSL.Session


def handshake(
    config: ServerConfig,
    provider: OpenSSLProvider,
    ctx: SSL.Context,
    session: SSL.Session | None,
) -> Outcome:
    client = memory_client(ctx)
    if session is not None:
        client.set_session(session)
    server = ServerConnection(config, provider, os.urandom, clock=time.time)
    cpu = 0.0
    done: HandshakeComplete | None = None
    for _ in range(6):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        data = drain_bio(client)
        if not data:
            break
        started = time.process_time()
        server.receive_data(data)
        events = resolve_inline(server)
        out = server.data_to_send()
        cpu += time.process_time() - started
        done = done or next((e for e in events if isinstance(e, HandshakeComplete)), None)
        if out:
            client.bio_write(out)
    if done is None:
        raise RuntimeError("handshake did not complete")
    # The tickets came after the server's last flight; a read makes the client take them in.
    try:
        client.recv(1)
    except SSL.WantReadError:
        pass
    if bool(_lib.SSL_session_reused(client._ssl)) != done.resumed:
        raise RuntimeError("client and server disagree about resumption")
    if done.group != NamedGroup.X25519MLKEM768:
        raise RuntimeError(f"negotiated 0x{done.group:04x}, not X25519MLKEM768")
    new_session = client.get_session()
    assert new_session is not None
    # OpenSSL keeps a session resumable only after a clean shutdown.
    client.shutdown()
    return Outcome(cpu, done.resumed, new_session)


def batches(run: Callable[[], float], per_batch: int) -> list[float]:
    results = []
    for _ in range(BATCHES):
        total = sum(run() for _ in range(per_batch))
        results.append(total / per_batch * 1e6)
    return results


def measure(key_type: str, count: int) -> tuple[list[float], list[float]]:
    """(full, resumed) server CPU µs per handshake, one value per batch."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate_dev_certs(Path(tmp), key_type=key_type)
        config = ServerConfig(
            certificates=(load_certified_key(paths.cert, paths.key),),
            groups=(NamedGroup.X25519MLKEM768,),
            tickets=RotatingTicketKeys(os.urandom(32)),
            tickets_per_handshake=2,
        )
        provider = OpenSSLProvider()
        ctx = client_context(paths.ca, groups="X25519MLKEM768")
        ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
        per_batch = max(1, count // BATCHES)

        def full() -> float:
            outcome = handshake(config, provider, ctx, None)
            if outcome.resumed:
                raise RuntimeError("a handshake without a session resumed")
            return outcome.server_cpu

        chain = [handshake(config, provider, ctx, None).session]

        def resumed() -> float:
            outcome = handshake(config, provider, ctx, chain[0])
            if not outcome.resumed:
                raise RuntimeError("the ticket did not resume")
            chain[0] = outcome.session
            return outcome.server_cpu

        for _ in range(WARMUP):
            full()
            resumed()
        return batches(full, per_batch), batches(resumed, per_batch)


def section(rows: list[tuple[str, list[float], list[float]]], count: int, command: str) -> str:
    lines = [
        HEADING,
        "",
        "`bench/resumption.py`: pqproxy's engine in-process against pyOpenSSL memory-BIO "
        "clients, server CPU only (process time around the engine and the crypto it asks "
        "for), both X25519MLKEM768, 2 tickets issued per handshake in both columns. A "
        "resumed handshake (psk_dhe_ke) still runs the hybrid key exchange; it saves the "
        "certificate and the CertificateVerify signature. Each resumption uses the ticket "
        f"the previous one received (OpenSSL offers a ticket once). {count:,} handshakes of "
        f"each kind per key type; medians of {BATCHES} batches.",
        "",
        "| server key | full handshake (µs CPU) | resumed handshake (µs CPU) | resumed / full |",
        "|---|---:|---:|---:|",
    ]
    for key_type, full, resumed in rows:
        f, r = statistics.median(full), statistics.median(resumed)
        lines.append(f"| {key_type} | {f:.0f} | {r:.0f} | {r / f:.2f} |")
    lines += ["", "Per batch (µs):", ""]
    for key_type, full, resumed in rows:
        lines.append(
            f"- {key_type}: full {', '.join(f'{v:.0f}' for v in full)}; "
            f"resumed {', '.join(f'{v:.0f}' for v in resumed)}"
        )
    lines += ["", "Command:", "", f"- `{command}`", ""]
    return "\n".join(lines)


def append_section(path: Path, text: str) -> None:
    """Replace this script's section in ``path``, or append it."""
    replace_section(path, HEADING, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="handshakes of each kind")
    parser.add_argument(
        "--key-type",
        action="append",
        help="server key type (repeatable; default: ecdsa-p256 and mldsa65)",
    )
    parser.add_argument("--append-results", type=Path, help="write the section into this file")
    args = parser.parse_args()
    key_types = args.key_type or ["ecdsa-p256", "mldsa65"]
    rows = []
    for key_type in key_types:
        full, resumed = measure(key_type, args.count)
        rows.append((key_type, full, resumed))
        print(
            f"key={key_type} full_us={statistics.median(full):.1f} "
            f"resumed_us={statistics.median(resumed):.1f} "
            f"full_batches={[round(v, 1) for v in full]} "
            f"resumed_batches={[round(v, 1) for v in resumed]}",
            flush=True,
        )
    command = ".venv/bin/python bench/resumption.py --count " + str(args.count)
    command += "".join(f" --key-type {k}" for k in key_types)
    if args.append_results is not None:
        command += " --append-results bench/RESULTS.md"
        append_section(args.append_results, section(rows, args.count, command))


if __name__ == "__main__":
    main()
