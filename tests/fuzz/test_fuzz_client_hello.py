"""Hypothesis on the ClientHello parser and on the engine's front door: only
TLSAlert may escape a parser, and nothing escapes ``receive_data``."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqproxy.crypto.backends.openssl import OpenSSLProvider
from pqproxy.crypto.certs import load_certified_key
from pqproxy.tls.alerts import TLSAlert
from pqproxy.tls.events import ConnectionTerminated
from pqproxy.tls.messages import pull_client_hello
from pqproxy.tls.server import ServerConfig, ServerConnection, resolve_inline
from tests.hello_builder import HelloSpec, client_hello_body, handshake, record

VALID_BODY = client_hello_body(
    HelloSpec(
        groups=(0x11EC, 0x001D),
        shares=((0x001D, b"\x09" + bytes(31)),),
        extra=[(0x0010, b"\x00\x09\x08http/1.1"), (0x002D, b"\x01\x01"), (0x001C, b"\x40\x01")],
    )
)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse(data: bytes) -> None:
    try:
        pull_client_hello(data)
    except TLSAlert:
        pass


@FUZZ
@given(st.binary(max_size=600))
def test_parser_random_bytes(data: bytes) -> None:
    _parse(data)


@FUZZ
@given(st.data())
def test_parser_mutated_valid_hello(data: st.DataObject) -> None:
    body = bytearray(VALID_BODY)
    for _ in range(data.draw(st.integers(1, 8))):
        index = data.draw(st.integers(0, len(body) - 1))
        body[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    _parse(bytes(body[:cut]) if data.draw(st.booleans()) else bytes(body))


def test_parser_accepts_the_valid_hello() -> None:
    hello = pull_client_hello(VALID_BODY)
    assert hello.supported_groups == (0x11EC, 0x001D)
    assert hello.alpn_protocols == (b"http/1.1",)
    assert hello.record_size_limit == 0x4001


@pytest.fixture(scope="module")
def config(dev_certs_factory: Callable[[str], object]) -> ServerConfig:
    certs = dev_certs_factory("ecdsa-p256")
    return ServerConfig(certificates=(load_certified_key(certs.cert, certs.key),))  # type: ignore[attr-defined]


@FUZZ
@given(data=st.data())
def test_engine_never_raises_on_mutated_records(config: ServerConfig, data: st.DataObject) -> None:
    wire = bytearray(record(22, handshake(1, VALID_BODY)))
    for _ in range(data.draw(st.integers(0, 6))):
        index = data.draw(st.integers(0, len(wire) - 1))
        wire[index] = data.draw(st.integers(0, 255))
    server = ServerConnection(config, OpenSSLProvider(), os.urandom)
    # Split into arbitrary chunks: framing must not depend on TCP segmentation.
    position = 0
    while position < len(wire):
        step = data.draw(st.integers(1, 400))
        server.receive_data(bytes(wire[position : position + step]))
        events = resolve_inline(server)
        position += step
        for event in events:
            if isinstance(event, ConnectionTerminated):
                assert event.sent and event.alert is not None
    server.data_to_send()
