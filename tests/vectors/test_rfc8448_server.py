"""RFC 8448 §3 "Simple 1-RTT Handshake" run through ServerConnection with the
trace's fixed randomness: the server's flight must match byte for byte."""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from pqproxy.crypto.provider import CertifiedKey, ClientKeyExchange, KxGroup, SharedSecret
from pqproxy.tls.enums import NamedGroup, SignatureScheme
from pqproxy.tls.events import (
    ApplicationData,
    HandshakeComplete,
    KeyExchangeNeeded,
    PeerClosed,
    SignatureNeeded,
)
from pqproxy.tls.key_schedule import SUITES
from pqproxy.tls.record import RecordProtection
from pqproxy.tls.server import ServerConfig, ServerConnection
from tests.vectors.rfc8448 import load_simple_1rtt


class FixedX25519:
    """X25519 with the trace's server private key: the real primitive, the
    RFC's randomness."""

    group = NamedGroup.x25519
    backend = "openssl-fixed-key"
    client_share_length = 32
    server_share_length = 32

    def __init__(self, private: bytes) -> None:
        self._key = X25519PrivateKey.from_private_bytes(private)

    def server_exchange(self, client_share: bytes) -> tuple[bytes, SharedSecret]:
        public = self._key.public_key().public_bytes_raw()
        secret = self._key.exchange(X25519PublicKey.from_public_bytes(client_share))
        return public, SharedSecret(secret)

    def start(self) -> ClientKeyExchange:
        raise NotImplementedError("server side only")


class TraceSigner:
    """The trace's 1024-bit RSA key, which pqproxy's own loader rightly refuses
    (< 2048 bits). The tests resolve SignatureNeeded with the trace's signature."""

    schemes = (SignatureScheme.rsa_pss_rsae_sha256,)
    backend = "rfc8448"

    def sign(self, scheme: int, message: bytes) -> bytes:
        raise AssertionError("the trace's signature is supplied by the test")


class TraceProvider:
    name = "rfc8448"

    def __init__(self, private: bytes) -> None:
        self.groups: Mapping[int, KxGroup] = {NamedGroup.x25519: FixedX25519(private)}


def _int(value: bytes) -> int:
    return int.from_bytes(value, "big")


def _rsa_key(v: dict[str, bytes]) -> rsa.RSAPrivateKey:
    public = rsa.RSAPublicNumbers(
        _int(v["server_rsa_public_exponent"]), _int(v["server_rsa_modulus"])
    )
    return rsa.RSAPrivateNumbers(
        p=_int(v["server_rsa_prime1"]),
        q=_int(v["server_rsa_prime2"]),
        d=_int(v["server_rsa_private_exponent"]),
        dmp1=_int(v["server_rsa_exponent1"]),
        dmq1=_int(v["server_rsa_exponent2"]),
        iqmp=_int(v["server_rsa_coefficient"]),
        public_numbers=public,
    ).private_key()


def _certificate_der(message: bytes) -> bytes:
    # Certificate: type(1) len(3) context<0>(1) list<3> [cert_data<3> extensions<2>]
    length = _int(message[8:11])
    return message[11 : 11 + length]


def _trace_server(
    server_random: bytes | None = None,
) -> tuple[ServerConnection, dict[str, bytes], rsa.RSAPrivateKey]:
    v = load_simple_1rtt()
    key = _rsa_key(v)
    certified = CertifiedKey(chain=(_certificate_der(v["certificate"]),), signer=TraceSigner())
    ee = v["encrypted_extensions"]
    # The trace's server (NSS) tells the client its groups in EncryptedExtensions;
    # take that list from the trace as data.
    # type(1) length(3) extensions<2> | supported_groups: type(2) length(2) list<2>
    groups_block = ee[12 : 12 + _int(ee[10:12])]
    advertised = tuple(_int(groups_block[i : i + 2]) for i in range(0, len(groups_block), 2))
    config = ServerConfig(
        certificates=(certified,), groups=(NamedGroup.x25519,), advertised_groups=advertised
    )
    randoms = iter([server_random or v["server_random"]])
    server = ServerConnection(
        config, TraceProvider(v["server_x25519_private"]), lambda n: next(randoms)
    )
    return server, v, key


def test_simple_1rtt_server_flight_matches_byte_for_byte() -> None:
    server, v, key = _trace_server()
    server.receive_data(v["client_hello_record"])
    event = server.next_event()
    assert isinstance(event, KeyExchangeNeeded)
    assert event.group == NamedGroup.x25519
    assert event.client_share == v["client_x25519_public"]
    share, secret = event.exchange.server_exchange(event.client_share)
    assert share == v["server_x25519_public"] and secret == v["shared_secret"]
    assert server.data_to_send() == b""
    server.complete_key_exchange(share, secret)
    assert server.data_to_send() == v["server_hello_record"]

    event = server.next_event()
    assert isinstance(event, SignatureNeeded)
    assert event.scheme == SignatureScheme.rsa_pss_rsae_sha256
    # RSA-PSS is randomised, so the trace's own signature is the one to send;
    # it verifies over the engine's CertificateVerify input, which proves the
    # input (context string + transcript hash) is exactly the RFC's.
    trace_signature = v["certificate_verify"][8:]
    key.public_key().verify(
        trace_signature,
        event.message,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )
    server.complete_signature(trace_signature)
    assert server.data_to_send() == v["server_encrypted_flight_record"]
    assert server.next_event() is None

    server.receive_data(v["client_finished_record"])
    done = server.next_event()
    assert isinstance(done, HandshakeComplete)
    assert (done.group, done.cipher_suite, done.server_name) == (0x001D, 0x1301, "server")

    server.receive_data(v["client_app_data_record"])
    assert server.next_event() == ApplicationData(v["client_app_data_payload"])

    # The trace's server sends a NewSessionTicket first (seq 0), so its data
    # record is at seq 1; ours is at seq 0 under the same key: check it opens
    # under the RFC's server application traffic secret.
    server.send_data(v["server_app_data_payload"])
    record = server.data_to_send()
    opener = RecordProtection(SUITES[0x1301], v["s_ap_traffic"])
    assert opener.open(record[:5], record[5:]) == (23, v["server_app_data_payload"])

    server.receive_data(v["client_alert_record"])
    assert server.next_event() == PeerClosed()


def test_signature_input_is_bound_to_the_transcript() -> None:
    """A different server random changes the transcript, so the trace's
    signature must no longer verify over the engine's input."""
    v = load_simple_1rtt()
    server, _, key = _trace_server(server_random=bytes(32))
    server.receive_data(v["client_hello_record"])
    event = server.next_event()
    assert isinstance(event, KeyExchangeNeeded)
    server.complete_key_exchange(*event.exchange.server_exchange(event.client_share))
    sign = server.next_event()
    assert isinstance(sign, SignatureNeeded)
    try:
        key.public_key().verify(
            v["certificate_verify"][8:],
            sign.message,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
            hashes.SHA256(),
        )
    except Exception as error:  # noqa: BLE001 - InvalidSignature is the expected outcome
        assert type(error).__name__ == "InvalidSignature"
    else:
        raise AssertionError("signature verified over a different transcript")
