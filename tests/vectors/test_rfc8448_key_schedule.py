"""The key schedule and the record layer replay RFC 8448 §3 ("Simple 1-RTT
Handshake", TLS_AES_128_GCM_SHA256 over X25519) byte for byte.

Every transcript hash is computed here from the trace's own handshake messages; the
hashes the RFC prints are only compared against, never fed in.
"""

from __future__ import annotations

import hmac

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from pqproxy.tls.enums import CipherSuite, ContentType, HandshakeType
from pqproxy.tls.key_schedule import (
    SUITES,
    KeySchedule,
    SuiteParams,
    derive_secret,
    empty_hash,
    hash_transcript,
    hkdf_expand_label,
    traffic_keys,
)
from pqproxy.tls.record import (
    RECORD_HEADER,
    RecordProtection,
    RecordReader,
    encode_plaintext_records,
)
from tests.vectors.rfc8448 import SIMPLE_1RTT_PATH, load_simple_1rtt, parse_trace

V = load_simple_1rtt()
PARAMS: SuiteParams = SUITES[CipherSuite.TLS_AES_128_GCM_SHA256]
SHA = PARAMS.hash_name


def _th(*names: str) -> bytes:
    return hash_transcript(SHA, *(V[n] for n in names))


HELLO = ("client_hello", "server_hello")
THROUGH_CV = (*HELLO, "encrypted_extensions", "certificate", "certificate_verify")
THROUGH_SERVER_FINISHED = (*THROUGH_CV, "server_finished")
THROUGH_CLIENT_FINISHED = (*THROUGH_SERVER_FINISHED, "client_finished")


def test_parser_rejects_a_value_shorter_than_its_octet_count() -> None:
    text = SIMPLE_1RTT_PATH.read_text(encoding="ascii")
    damaged = text.replace(
        "iv expanded (12 octets):  5d 31 3e b2 67 12 76 ee 13 00 0b 30",
        ("iv expanded (12 octets):  5d 31 3e b2 67 12 76 ee 13 00 0b"),
    )
    assert damaged != text
    with pytest.raises(ValueError, match="iv expanded"):
        parse_trace(damaged)


def test_x25519_shared_secret_matches_both_ways() -> None:
    server = X25519PrivateKey.from_private_bytes(V["server_x25519_private"])
    client = X25519PrivateKey.from_private_bytes(V["client_x25519_private"])
    assert server.public_key().public_bytes_raw() == V["server_x25519_public"]
    assert client.public_key().public_bytes_raw() == V["client_x25519_public"]
    from_server = server.exchange(X25519PublicKey.from_public_bytes(V["client_x25519_public"]))
    from_client = client.exchange(X25519PublicKey.from_public_bytes(V["server_x25519_public"]))
    assert from_server == from_client == V["shared_secret"]


def test_transcript_hashes_match_the_trace() -> None:
    assert _th(*HELLO) == V["hello_hash"]
    assert _th(*THROUGH_SERVER_FINISHED) == V["server_finished_hash"]
    assert _th(*THROUGH_CLIENT_FINISHED) == V["client_finished_hash"]


def test_early_secret_and_derived_steps() -> None:
    ks = KeySchedule(PARAMS)
    assert ks.early_secret == V["early_secret"]
    assert (
        derive_secret(SHA, ks.early_secret, b"derived", empty_hash(SHA)) == (V["handshake_derived"])
    )
    assert (
        derive_secret(SHA, V["handshake_secret"], b"derived", empty_hash(SHA))
        == (V["master_derived"])
    )


def test_handshake_traffic_secrets() -> None:
    ks = KeySchedule(PARAMS)
    c_hs, s_hs = ks.handshake_secrets(V["shared_secret"], _th(*HELLO))
    assert ks.handshake_secret == V["handshake_secret"]
    assert c_hs == V["c_hs_traffic"]
    assert s_hs == V["s_hs_traffic"]


def test_application_secrets_and_master_secrets() -> None:
    ks = KeySchedule(PARAMS)
    ks.handshake_secrets(V["shared_secret"], _th(*HELLO))
    c_ap, s_ap = ks.application_secrets(_th(*THROUGH_SERVER_FINISHED))
    assert ks.master_secret == V["master_secret"]
    assert c_ap == V["c_ap_traffic"]
    assert s_ap == V["s_ap_traffic"]
    assert ks.exporter_master_secret == V["exp_master"]
    assert ks.resumption_master_secret(_th(*THROUGH_CLIENT_FINISHED)) == V["res_master"]


def test_resumption_psk_for_the_ticket_nonce() -> None:
    ticket = V["new_session_ticket"]
    # NewSessionTicket body: lifetime(4) age_add(4) nonce<0..255> ...
    nonce_len = ticket[12]
    nonce = ticket[13 : 13 + nonce_len]
    psk = hkdf_expand_label(SHA, V["res_master"], b"resumption", nonce, PARAMS.hash_len)
    assert psk == V["resumption_psk"]


@pytest.mark.parametrize(
    ("secret", "prefix"),
    [
        ("s_hs_traffic", "server_hs"),
        ("c_hs_traffic", "client_hs"),
        ("s_ap_traffic", "server_ap"),
        ("c_ap_traffic", "client_ap"),
    ],
)
def test_traffic_keys(secret: str, prefix: str) -> None:
    key, iv = traffic_keys(PARAMS, V[secret])
    assert key == V[f"{prefix}_key"]
    assert iv == V[f"{prefix}_iv"]


def test_finished_verify_data_both_directions() -> None:
    ks = KeySchedule(PARAMS)
    c_hs, s_hs = ks.handshake_secrets(V["shared_secret"], _th(*HELLO))
    server_vd = ks.finished_verify_data(s_hs, _th(*THROUGH_CV))
    client_vd = ks.finished_verify_data(c_hs, _th(*THROUGH_SERVER_FINISHED))
    assert server_vd == V["server_finished_verify_data"]
    assert client_vd == V["client_finished_verify_data"]
    assert hkdf_expand_label(SHA, s_hs, b"finished", b"", 32) == V["server_finished_key"]
    assert hkdf_expand_label(SHA, c_hs, b"finished", b"", 32) == V["client_finished_key"]
    finished_header = bytes((HandshakeType.FINISHED, 0, 0, PARAMS.hash_len))
    assert finished_header + server_vd == V["server_finished"]
    assert finished_header + client_vd == V["client_finished"]
    assert not hmac.compare_digest(server_vd, client_vd)


def test_server_flight_is_the_concatenated_messages() -> None:
    assert (
        V["server_encrypted_flight"]
        == b"".join(V[n] for n in ("encrypted_extensions", "certificate", "certificate_verify"))
        + V["server_finished"]
    )


def test_server_flight_record_decrypts_and_reseals_byte_for_byte() -> None:
    record = V["server_encrypted_flight_record"]
    opener = RecordProtection(PARAMS, V["s_hs_traffic"])
    content_type, plaintext = opener.open(record[:RECORD_HEADER], record[RECORD_HEADER:])
    assert content_type == ContentType.HANDSHAKE
    assert plaintext == V["server_encrypted_flight"]
    assert opener.seq == 1

    sealer = RecordProtection(PARAMS, V["s_hs_traffic"])
    assert sealer.seal(ContentType.HANDSHAKE, plaintext) == record


def test_client_finished_record_decrypts_and_reseals() -> None:
    record = V["client_finished_record"]
    opener = RecordProtection(PARAMS, V["c_hs_traffic"])
    assert opener.open(record[:RECORD_HEADER], record[RECORD_HEADER:]) == (
        ContentType.HANDSHAKE,
        V["client_finished"],
    )
    sealer = RecordProtection(PARAMS, V["c_hs_traffic"])
    assert sealer.seal(ContentType.HANDSHAKE, V["client_finished"]) == record


def test_application_keys_carry_ticket_data_and_alerts_in_sequence() -> None:
    # One RecordProtection per direction across several records: the nonce must
    # follow the sequence number for each later record to open.
    server_in = RecordProtection(PARAMS, V["s_ap_traffic"])
    client_in = RecordProtection(PARAMS, V["c_ap_traffic"])

    def open_record(protection: RecordProtection, record: bytes) -> tuple[int, bytes]:
        return protection.open(record[:RECORD_HEADER], record[RECORD_HEADER:])

    assert open_record(server_in, V["new_session_ticket_record"]) == (
        ContentType.HANDSHAKE,
        V["new_session_ticket"],
    )
    assert open_record(client_in, V["client_app_data_record"]) == (
        ContentType.APPLICATION_DATA,
        V["client_app_data_payload"],
    )
    assert open_record(server_in, V["server_app_data_record"]) == (
        ContentType.APPLICATION_DATA,
        V["server_app_data_payload"],
    )
    assert open_record(client_in, V["client_alert_record"]) == (
        ContentType.ALERT,
        V["client_alert_payload"],
    )
    assert open_record(server_in, V["server_alert_record"]) == (
        ContentType.ALERT,
        V["server_alert_payload"],
    )
    assert (server_in.seq, client_in.seq) == (3, 2)

    server_out = RecordProtection(PARAMS, V["s_ap_traffic"])
    sealed = [
        server_out.seal(ContentType.HANDSHAKE, V["new_session_ticket"]),
        server_out.seal(ContentType.APPLICATION_DATA, V["server_app_data_payload"]),
        server_out.seal(ContentType.ALERT, V["server_alert_payload"]),
    ]
    assert sealed == [
        V["new_session_ticket_record"],
        V["server_app_data_record"],
        V["server_alert_record"],
    ]


def test_plaintext_hello_records_are_reproduced_and_read_back() -> None:
    ch_record = encode_plaintext_records(
        ContentType.HANDSHAKE, V["client_hello"], legacy_version=0x0301
    )
    sh_record = encode_plaintext_records(ContentType.HANDSHAKE, V["server_hello"])
    assert ch_record == V["client_hello_record"]
    assert sh_record == V["server_hello_record"]

    reader = RecordReader()
    reader.feed(V["client_hello_record"] + V["server_hello_record"])
    assert reader.next_record() == (ContentType.HANDSHAKE, 0x0301, V["client_hello"])
    assert reader.next_record() == (ContentType.HANDSHAKE, 0x0303, V["server_hello"])
    assert reader.next_record() is None


def test_rsa_key_signs_the_certificate_verify() -> None:
    def n(name: str) -> int:
        return int.from_bytes(V[f"server_rsa_{name}"], "big")

    public = rsa.RSAPublicNumbers(n("public_exponent"), n("modulus"))
    private = rsa.RSAPrivateNumbers(
        p=n("prime1"),
        q=n("prime2"),
        d=n("private_exponent"),
        dmp1=n("exponent1"),
        dmq1=n("exponent2"),
        iqmp=n("coefficient"),
        public_numbers=public,
    ).private_key()

    # Certificate: header(4) context<0..255>(1) list<3> entry: cert_data<3> ...
    cert_msg = V["certificate"]
    cert_len = int.from_bytes(cert_msg[8:11], "big")
    cert = x509.load_der_x509_certificate(cert_msg[11 : 11 + cert_len])
    cert_key = cert.public_key()
    assert isinstance(cert_key, rsa.RSAPublicKey)
    assert cert_key.public_numbers() == public

    # CertificateVerify: header(4) scheme(2) signature<2>.
    cv = V["certificate_verify"]
    assert int.from_bytes(cv[4:6], "big") == 0x0804  # rsa_pss_rsae_sha256
    signature = cv[8 : 8 + int.from_bytes(cv[6:8], "big")]
    # RFC 8446 §4.4.3: 64 spaces, the context string, a zero byte, the transcript hash.
    signed = (
        b" " * 64
        + b"TLS 1.3, server CertificateVerify\0"
        + _th(*HELLO, "encrypted_extensions", "certificate")
    )
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    private.public_key().verify(signature, signed, pss, hashes.SHA256())
