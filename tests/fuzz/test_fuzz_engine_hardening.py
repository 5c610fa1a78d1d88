"""Hypothesis on ``receive_data`` for the cases of issue 12: rejected early data, a second
ClientHello that differs from the first, change_cipher_spec anywhere, and oversized
handshake messages. Each property says what must happen, not only that nothing escapes."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.provider import CertifiedKey
from pqproxy.tls.enums import AlertDescription as A
from pqproxy.tls.enums import ExtensionType as X
from pqproxy.tls.enums import NamedGroup
from pqproxy.tls.events import HandshakeComplete
from pqproxy.tls.hello_checks import MAX_CLIENT_HELLO, MAX_HANDSHAKE_MESSAGE
from pqproxy.tls.record import MAX_PLAINTEXT, RecordProtection
from pqproxy.tls.server import (
    MAX_SKIPPED_EARLY_DATA,
    ServerConfig,
)
from tests.early_data_peer import (
    early_data_client_context,
    ticket_from_other_server,
    write_early_data,
)
from tests.engine_harness import (
    AES128,
    CCS,
    P256_SHARE,
    X25519_SHARE,
    Extension,
    Run,
    alpn,
    early_data,
    groups,
    hello,
    key_share,
    padding,
    pre_shared_key,
    psk_modes,
    records,
    sigalgs,
    sni,
    versions,
)
from tests.peers import client_context, drain_bio, memory_client

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def certified(dev_certs_factory: Callable[[str], Any]) -> CertifiedKey:
    certs = dev_certs_factory("ecdsa-p256")
    return load_certified_key(certs.cert, certs.key)


@pytest.fixture(scope="module")
def config(certified: CertifiedKey) -> ServerConfig:
    return ServerConfig(certificates=(certified,))


def _chunks(data: st.DataObject, wire: bytes) -> list[bytes]:
    """``wire`` cut where Hypothesis likes: framing must not depend on TCP segmentation."""
    out, position = [], 0
    while position < len(wire):
        step = data.draw(st.integers(1, 20000), label="chunk")
        out.append(wire[position : position + step])
        position += step
    return out


def _split_records(wire: bytes) -> list[bytes]:
    out, position = [], 0
    while position < len(wire):
        end = position + 5 + int.from_bytes(wire[position + 3 : position + 5], "big")
        out.append(wire[position:end])
        position = end
    return out


# --- early data ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def early_client(dev_certs: Any) -> Callable[[], SSL.Connection]:
    """A new client holding a new 0-RTT ticket from another OpenSSL server, per example:
    OpenSSL makes a session unresumable once a connection that used it is freed unfinished."""
    ctx = early_data_client_context(dev_certs.ca)

    def make() -> SSL.Connection:
        client = memory_client(ctx)
        client.set_session(ticket_from_other_server(ctx, dev_certs.cert, dev_certs.key))
        return client

    return make


@FUZZ
@given(data=st.data())
def test_rejected_early_data_of_any_shape_still_completes(
    config: ServerConfig, early_client: Callable[[], SSL.Connection], data: st.DataObject
) -> None:
    """Whatever 0-RTT records follow the ClientHello (any sizes, any keys, within the skip
    bound), a real client's 1-RTT handshake completes; past the bound it is refused."""
    client = early_client()
    write_early_data(client, data.draw(st.binary(min_size=1, max_size=3000), label="0-rtt"))
    stranger = RecordProtection(AES128, os.urandom(32))
    sizes = data.draw(st.lists(st.integers(0, MAX_PLAINTEXT), max_size=6), label="sizes")
    extra = [stranger.seal(23, os.urandom(n)) for n in sizes]
    flight = drain_bio(client) + b"".join(extra)
    run = Run(config)
    run.feed(*_chunks(data, flight))
    skipped = sum(len(r) - 5 for r in _split_records(flight) if r[0] == 23)
    if skipped > MAX_SKIPPED_EARLY_DATA:
        assert run.terminated is not None and run.terminated.alert == A.unexpected_message
        return
    assert run.terminated is None
    client.bio_write(run.out)
    client.do_handshake()
    run.feed(*_chunks(data, drain_bio(client)))
    assert any(isinstance(e, HandshakeComplete) for e in run.events), run.events


# --- HRR with a changed second ClientHello ------------------------------------------------


def _first_hello() -> list[Extension]:
    return [
        sni(b"localhost"),
        versions(),
        groups(0x001D, 0x0017),
        sigalgs(),
        alpn(b"h2", b"http/1.1"),
        psk_modes(),
        (0x2A2A, b""),  # GREASE: kept and compared like any other extension
        key_share((0x001D, X25519_SHARE)),
        early_data(),
        padding(17),
        pre_shared_key([b"ticket one", b"ticket two", b"ticket three"]),
    ]


# Extensions a retry may change (RFC 8446 §4.1.2); every other byte is fixed.
_EXEMPT = frozenset({X.KEY_SHARE, X.PADDING, X.EARLY_DATA, X.PRE_SHARED_KEY})


def _allowed_retry(data: st.DataObject, first: list[Extension]) -> list[Extension]:
    """A second ClientHello as §4.1.2 allows it to differ, with Hypothesis choosing how."""
    out: list[Extension] = []
    for ext_type, body in first:
        if ext_type == X.KEY_SHARE:
            out.append(key_share((0x0017, P256_SHARE)))
        elif ext_type == X.EARLY_DATA:
            continue
        elif ext_type == X.PADDING:
            if data.draw(st.booleans(), label="keep padding"):
                out.append(padding(data.draw(st.integers(0, 600), label="padding")))
        elif ext_type == X.PRE_SHARED_KEY:
            names = [b"ticket one", b"ticket two", b"ticket three"]
            kept = [n for n in names if data.draw(st.booleans(), label=f"keep {n!r}")]
            if kept:
                age = data.draw(st.integers(0, 2**32 - 1), label="age")
                out.append(pre_shared_key(kept, age=age, binder=os.urandom(1)))
        else:
            out.append((ext_type, body))
    return out


def _forbidden_change(
    data: st.DataObject, extensions: list[Extension], fields: dict[str, Any]
) -> list[Extension]:
    fixed = [i for i, (t, _) in enumerate(extensions) if t not in _EXEMPT]
    kind = data.draw(
        st.sampled_from(["flip", "swap", "drop", "insert", "random", "session_id", "suites"]),
        label="change",
    )
    out = list(extensions)
    if kind == "flip":
        candidates = [i for i in fixed if extensions[i][1]]
        index = data.draw(st.sampled_from(candidates), label="extension")
        ext_type, body = out[index]
        at = data.draw(st.integers(0, len(body) - 1), label="byte")
        flipped = bytearray(body)
        flipped[at] ^= data.draw(st.integers(1, 255), label="xor")
        out[index] = (ext_type, bytes(flipped))
    elif kind == "swap":
        i = data.draw(st.integers(0, len(out) - 2), label="swap at")
        out[i], out[i + 1] = out[i + 1], out[i]
    elif kind == "drop":
        index = data.draw(st.sampled_from(fixed), label="drop")
        del out[index]
    elif kind == "insert":
        ext_type = data.draw(
            st.integers(0, 0xFFFF).filter(lambda t: t != X.PADDING), label="new type"
        )
        at = data.draw(st.integers(0, len(out)), label="insert at")
        out.insert(at, (ext_type, data.draw(st.binary(max_size=8), label="new body")))
    elif kind == "random":
        fields["random"] = bytes(range(1, 33))
    elif kind == "session_id":
        fields["session_id"] = b"\x01"
    else:
        fields["suites"] = (0x1301, 0x1303)
    return out


def _is_padding_swap(before: list[Extension], after: list[Extension]) -> bool:
    """A swap of padding with its neighbour is not a change §4.1.2 forbids (padding may
    come and go anywhere), so such a draw proves nothing."""
    strip = [e for e in before if e[0] != X.PADDING]
    psk_stays_last = all(e[0] != X.PRE_SHARED_KEY for e in after[:-1])  # §4.2.11
    return psk_stays_last and strip == [e for e in after if e[0] != X.PADDING]


@FUZZ
@given(data=st.data())
def test_second_client_hello_is_accepted_exactly_when_section_4_1_2_allows(
    certified: CertifiedKey, data: st.DataObject
) -> None:
    config = ServerConfig(
        certificates=(certified,),
        groups=(NamedGroup.secp256r1, NamedGroup.x25519),
        alpn_protocols=("h2",),
    )
    first = _first_hello()
    second = _allowed_retry(data, first)
    fields: dict[str, Any] = {}
    forbidden = data.draw(st.booleans(), label="forbidden change")
    if forbidden:
        changed = _forbidden_change(data, second, fields)
        if not fields and _is_padding_swap(second, changed):
            forbidden = False
        second = changed
    run = Run(config)
    run.feed(*_chunks(data, records(hello(first))))
    assert run.terminated is None
    run.feed(*_chunks(data, records(hello(second, **fields))))
    if forbidden:
        end = run.terminated
        assert end is not None and end.sent and end.alert is not None, "changed CH2 accepted"
    else:
        assert run.terminated is None, run.terminated
        assert run.server.hello_retry and run.server.group == NamedGroup.secp256r1


# --- change_cipher_spec anywhere ----------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_change_cipher_spec_is_dropped_once_and_refused_anywhere_else(
    config: ServerConfig, dev_certs: Any, data: st.DataObject
) -> None:
    """A real OpenSSL client (middlebox compatibility mode: one CCS). Its ClientHello is cut
    into fragments, its CCS moved to any record boundary, and more CCS records (well formed
    or not) put at others. Only one well-formed CCS, after the ClientHello and before the
    Finished, completes the handshake; anything else is unexpected_message."""
    client = memory_client(client_context(dev_certs.ca, groups="X25519"))
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    first = drain_bio(client)
    message = first[5:]
    fragment = data.draw(st.integers(40, MAX_PLAINTEXT), label="fragment")
    hello_records = _split_records(records(message, fragment))
    # Boundaries: 0..n-1 are before the ClientHello is complete, n right after it, n + 1
    # just before the Finished.
    boundaries = len(hello_records) + 2
    ccs_at = data.draw(st.integers(0, boundaries - 1), label="client ccs at")
    extras = data.draw(
        st.lists(
            st.tuples(
                st.integers(0, boundaries - 1),
                st.sampled_from(
                    [CCS, b"\x14\x03\x03\x00\x01\x02", b"\x14\x03\x03\x00\x02\x01\x01"]
                ),
            ),
            max_size=2,
        ),
        label="extra ccs",
    )
    placed = [(ccs_at, CCS), *extras]

    def at(position: int) -> bytes:
        return b"".join(ccs for where, ccs in placed if where == position)

    flight1 = b"".join(at(i) + r for i, r in enumerate(hello_records)) + at(len(hello_records))
    run = Run(config)
    run.feed(*_chunks(data, flight1))
    legal = not extras and ccs_at >= len(hello_records)
    if run.terminated is None:
        client.bio_write(run.out)
        client.do_handshake()
        flight2 = drain_bio(client)
        assert flight2.startswith(CCS)  # OpenSSL's own, moved above
        run.feed(*_chunks(data, at(boundaries - 1) + flight2[len(CCS) :]))
    if legal:
        assert run.terminated is None, run.terminated
        assert any(isinstance(e, HandshakeComplete) for e in run.events)
    else:
        end = run.terminated
        assert end is not None and end.sent and end.alert == A.unexpected_message, end
        assert not any(isinstance(e, HandshakeComplete) for e in run.events)


# --- oversized handshake messages ---------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_handshake_message_length_is_checked_from_its_header(
    config: ServerConfig, data: st.DataObject
) -> None:
    """Over its cap (2^17 for a ClientHello, 2^16 for anything else): decode_error as soon
    as the header is in. At or under it: the engine waits for the rest of the body."""
    msg_type = data.draw(st.sampled_from([1, 1, 2, 4, 8, 11, 13, 15, 20, 24, 254]), label="type")
    cap = MAX_CLIENT_HELLO if msg_type == 1 else MAX_HANDSHAKE_MESSAGE
    over = data.draw(st.booleans(), label="over")
    length = data.draw(
        st.integers(cap + 1, (1 << 24) - 1) if over else st.integers(200, cap), label="length"
    )
    body = data.draw(st.binary(min_size=0, max_size=150), label="body prefix")
    run = Run(config)
    run.feed(*_chunks(data, records(bytes((msg_type,)) + length.to_bytes(3, "big") + body)))
    if over:
        end = run.terminated
        assert end is not None and end.sent and end.alert == A.decode_error, end
    else:
        assert run.terminated is None, run.terminated
