"""In-process handshake loop: pqproxy's engine against a pyOpenSSL memory-BIO
client, timing only the server's side.

    .venv/bin/python bench/profile_handshake.py --count 2000 [--group X25519MLKEM768] [--profile]

Prints server CPU µs per handshake (median of 5 batches) for the chosen group
and, with --profile, the top cProfile entries of the server side.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

from OpenSSL import SSL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pqproxy.crypto.backends.openssl import OpenSSLProvider  # noqa: E402
from pqproxy.crypto.certs import load_certified_key  # noqa: E402
from pqproxy.devcert import generate_dev_certs  # noqa: E402
from pqproxy.tls.enums import NamedGroup  # noqa: E402
from pqproxy.tls.events import HandshakeComplete  # noqa: E402
from pqproxy.tls.server import ServerConfig, ServerConnection, resolve_inline  # noqa: E402
from tests.peers import OPENSSL_GROUP_NAMES, client_context, drain_bio, memory_client  # noqa: E402


def one_handshake(
    config: ServerConfig, provider: OpenSSLProvider, ctx: SSL.Context
) -> tuple[float, float]:
    """Returns (server CPU seconds, server wall seconds) for one full handshake."""
    client = memory_client(ctx)
    server = ServerConnection(config, provider, os.urandom)
    server_cpu = 0.0
    server_wall = 0.0
    done = False
    for _ in range(6):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        data = drain_bio(client)
        if not data:
            break
        c0, w0 = time.process_time(), time.perf_counter()
        server.receive_data(data)
        events = resolve_inline(server)
        out = server.data_to_send()
        server_cpu += time.process_time() - c0
        server_wall += time.perf_counter() - w0
        done = done or any(isinstance(e, HandshakeComplete) for e in events)
        if out:
            client.bio_write(out)
    if not done:
        raise RuntimeError("handshake did not complete")
    return server_cpu, server_wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--group", default="X25519MLKEM768")
    parser.add_argument("--key-type", default="ecdsa-p256")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    group = NamedGroup[args.group]
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate_dev_certs(Path(tmp), key_type=args.key_type)
        certified = load_certified_key(paths.cert, paths.key)
        config = ServerConfig(certificates=(certified,), groups=(group,))
        provider = OpenSSLProvider()
        ctx = client_context(paths.ca, groups=OPENSSL_GROUP_NAMES[group])
        for _ in range(50):
            one_handshake(config, provider, ctx)
        profiler = cProfile.Profile() if args.profile else None
        batches = []
        per_batch = max(1, args.count // 5)
        for _ in range(5):
            cpu = 0.0
            if profiler:
                profiler.enable()
            for _ in range(per_batch):
                cpu += one_handshake(config, provider, ctx)[0]
            if profiler:
                profiler.disable()
            batches.append(cpu / per_batch * 1e6)
        print(
            f"group={args.group} key={args.key_type} handshakes={per_batch * 5} "
            f"server_cpu_us_median={statistics.median(batches):.1f} "
            f"batches={[round(b, 1) for b in batches]}"
        )
        if profiler:
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
