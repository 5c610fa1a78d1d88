"""Record layer: AEAD round trips for every suite, the alerts RFC 8446 §5 names for
malformed records, fragmentation, and incremental reading."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from pqproxy.tls import alerts
from pqproxy.tls.enums import CipherSuite, ContentType
from pqproxy.tls.key_schedule import SUITES, SuiteParams, traffic_keys
from pqproxy.tls.record import (
    MAX_CIPHERTEXT,
    MAX_PLAINTEXT,
    MAX_PLAINTEXT_RECORD_LENGTH,
    MAX_SEQUENCE,
    RECORD_HEADER,
    RecordProtection,
    RecordReader,
    encode_header,
    encode_plaintext_records,
    encode_protected_records,
)

AES128 = SUITES[CipherSuite.TLS_AES_128_GCM_SHA256]
SECRET = bytes(range(32))
HANDSHAKE = int(ContentType.HANDSHAKE)
APPDATA = int(ContentType.APPLICATION_DATA)
ALERT = int(ContentType.ALERT)


def _split(record: bytes) -> tuple[bytes, bytes]:
    return record[:RECORD_HEADER], record[RECORD_HEADER:]


def _raw_record(inner: bytes, secret: bytes = SECRET, seq: int = 0) -> bytes:
    """A protected record around an arbitrary TLSInnerPlaintext, built with the AEAD
    directly so that it can hold what ``seal`` refuses to produce."""
    key, iv = traffic_keys(AES128, secret)
    nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")
    header = encode_header(APPDATA, len(inner) + 16)
    return header + AESGCM(key).encrypt(nonce, inner, header)


def _read_all(reader: RecordReader) -> list[tuple[int, int, bytes]]:
    records = []
    while (record := reader.next_record()) is not None:
        records.append(record)
    return records


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_round_trip_every_suite(suite: int) -> None:
    params = SUITES[suite]
    sender, receiver = RecordProtection(params, SECRET), RecordProtection(params, SECRET)
    messages = [
        (HANDSHAKE, b"\x08\x00\x00\x02\x00\x00"),
        (APPDATA, b"x" * 1000),
        (ALERT, b"\x01\x00"),
    ]
    reader = RecordReader()
    reader.feed(b"".join(sender.seal(ct, data) for ct, data in messages))
    received = []
    for outer_type, version, payload in _read_all(reader):
        assert (outer_type, version) == (APPDATA, 0x0303)
        received.append(receiver.open(encode_header(outer_type, len(payload), version), payload))
    assert received == messages
    assert sender.seq == receiver.seq == 3


def test_record_layout() -> None:
    record = RecordProtection(AES128, SECRET).seal(HANDSHAKE, b"abc")
    header, body = _split(record)
    # Outer type application_data, legacy version 0x0303, content + type byte + 16-byte tag.
    assert header == bytes([23, 3, 3, 0, 3 + 1 + 16])
    assert len(body) == 20


def test_keys_differ_per_suite_and_secret() -> None:
    record = RecordProtection(AES128, SECRET).seal(APPDATA, b"data")
    with pytest.raises(alerts.BadRecordMac):
        RecordProtection(AES128, bytes(32)).open(*_split(record))
    chacha = SUITES[CipherSuite.TLS_CHACHA20_POLY1305_SHA256]
    with pytest.raises(alerts.BadRecordMac):
        RecordProtection(chacha, SECRET).open(*_split(record))


def test_nonce_follows_the_sequence_number() -> None:
    sender = RecordProtection(AES128, SECRET)
    first, second = sender.seal(APPDATA, b"same"), sender.seal(APPDATA, b"same")
    assert first != second
    assert sender.seq == 2
    receiver = RecordProtection(AES128, SECRET)
    # Opening out of order uses the wrong nonce.
    with pytest.raises(alerts.BadRecordMac):
        receiver.open(*_split(second))


def test_padding_is_hidden_and_stripped() -> None:
    sender, receiver = RecordProtection(AES128, SECRET), RecordProtection(AES128, SECRET)
    plain = sender.seal(APPDATA, b"hello")
    padded = sender.seal(APPDATA, b"hello", padding=100)
    assert len(padded) == len(plain) + 100
    assert receiver.open(*_split(plain)) == (APPDATA, b"hello")
    assert receiver.open(*_split(padded)) == (APPDATA, b"hello")


def test_padding_up_to_the_inner_plaintext_limit() -> None:
    sender, receiver = RecordProtection(AES128, SECRET), RecordProtection(AES128, SECRET)
    full = sender.seal(APPDATA, b"z" * 10, padding=MAX_PLAINTEXT - 10)
    assert receiver.open(*_split(full)) == (APPDATA, b"z" * 10)
    with pytest.raises(ValueError):
        sender.seal(APPDATA, b"z" * 10, padding=MAX_PLAINTEXT - 9)
    with pytest.raises(ValueError):
        sender.seal(APPDATA, b"z" * (MAX_PLAINTEXT + 1))


def test_content_with_trailing_zeros_survives_padding() -> None:
    sender, receiver = RecordProtection(AES128, SECRET), RecordProtection(AES128, SECRET)
    data = b"\x00\x01\x00\x00"
    assert receiver.open(*_split(sender.seal(APPDATA, data, padding=7))) == (APPDATA, data)


@pytest.mark.parametrize("where", [RECORD_HEADER, -1, -17])
def test_tampering_is_bad_record_mac(where: int) -> None:
    record = bytearray(RecordProtection(AES128, SECRET).seal(APPDATA, b"payload" * 4))
    record[where] ^= 0x01
    with pytest.raises(alerts.BadRecordMac):
        RecordProtection(AES128, SECRET).open(*_split(bytes(record)))


def test_tampered_header_is_bad_record_mac() -> None:
    header, body = _split(RecordProtection(AES128, SECRET).seal(APPDATA, b"payload"))
    with pytest.raises(alerts.BadRecordMac):
        RecordProtection(AES128, SECRET).open(encode_header(APPDATA, len(body), 0x0301), body)


def test_truncated_ciphertext_is_bad_record_mac() -> None:
    with pytest.raises(alerts.BadRecordMac):
        RecordProtection(AES128, SECRET).open(encode_header(APPDATA, 3), b"abc")


def test_all_zero_inner_plaintext_is_unexpected_message() -> None:
    with pytest.raises(alerts.UnexpectedMessage, match="content type"):
        RecordProtection(AES128, SECRET).open(*_split(_raw_record(bytes(10))))


def test_decrypted_plaintext_over_limit_is_record_overflow() -> None:
    record = _raw_record(b"a" * (MAX_PLAINTEXT + 1) + bytes([APPDATA]))
    with pytest.raises(alerts.RecordOverflow):
        RecordProtection(AES128, SECRET).open(*_split(record))


def test_inner_limit_itself_is_accepted() -> None:
    record = _raw_record(b"a" * MAX_PLAINTEXT + bytes([APPDATA]))
    assert RecordProtection(AES128, SECRET).open(*_split(record)) == (APPDATA, b"a" * MAX_PLAINTEXT)


@pytest.mark.parametrize(
    "inner",
    [
        bytes([ContentType.CHANGE_CIPHER_SPEC]),  # only ever sent in the clear
        b"\x01" + bytes([99]),  # unknown type
        bytes([HANDSHAKE]),  # zero-length handshake fragment
        bytes([ALERT, 0, 0]),  # zero-length alert fragment, padded
    ],
)
def test_bad_inner_content_is_unexpected_message(inner: bytes) -> None:
    with pytest.raises(alerts.UnexpectedMessage):
        RecordProtection(AES128, SECRET).open(*_split(_raw_record(inner)))


def test_zero_length_application_data_is_allowed() -> None:
    sender, receiver = RecordProtection(AES128, SECRET), RecordProtection(AES128, SECRET)
    assert receiver.open(*_split(sender.seal(APPDATA, b"", padding=5))) == (APPDATA, b"")


def test_open_refuses_a_plaintext_outer_type() -> None:
    header, body = _split(RecordProtection(AES128, SECRET).seal(HANDSHAKE, b"abc"))
    with pytest.raises(alerts.UnexpectedMessage):
        RecordProtection(AES128, SECRET).open(encode_header(HANDSHAKE, len(body)), body)


def test_seal_refuses_unknown_or_cleartext_types() -> None:
    sender = RecordProtection(AES128, SECRET)
    with pytest.raises(ValueError):
        sender.seal(ContentType.CHANGE_CIPHER_SPEC, b"\x01")
    with pytest.raises(ValueError):
        sender.seal(0, b"x")
    assert sender.seq == 0


def test_sequence_number_never_wraps() -> None:
    sender = RecordProtection(AES128, SECRET)
    sender.seq = MAX_SEQUENCE - 1
    sender.seal(APPDATA, b"last")
    assert sender.seq == MAX_SEQUENCE
    with pytest.raises(alerts.InternalError):
        sender.seal(APPDATA, b"one too many")


def test_seal_and_open_accept_memoryviews() -> None:
    sender, receiver = RecordProtection(AES128, SECRET), RecordProtection(AES128, SECRET)
    data = bytearray(b"view" * 100)
    record = sender.seal(APPDATA, memoryview(data)[4:])
    header, body = _split(record)
    assert receiver.open(header, memoryview(body)) == (APPDATA, bytes(data[4:]))


def test_repr_hides_keys() -> None:
    key, iv = traffic_keys(AES128, SECRET)
    protection = RecordProtection(AES128, SECRET)
    text = repr(protection)
    assert "seq=0" in text
    for secret in (SECRET, key, iv):
        assert secret.hex() not in text
        assert repr(secret) not in text


# --- reader -----------------------------------------------------------------------


def test_oversized_protected_header_overflows_before_the_body() -> None:
    reader = RecordReader()
    reader.feed(encode_header(APPDATA, MAX_CIPHERTEXT + 1))
    with pytest.raises(alerts.RecordOverflow):
        reader.next_record()


def test_oversized_plaintext_header_overflows_before_the_body() -> None:
    reader = RecordReader()
    reader.feed(encode_header(HANDSHAKE, MAX_PLAINTEXT_RECORD_LENGTH + 1))
    with pytest.raises(alerts.RecordOverflow):
        reader.next_record()


def test_maximal_headers_wait_for_their_body() -> None:
    for content_type, length in ((APPDATA, MAX_CIPHERTEXT), (HANDSHAKE, MAX_PLAINTEXT)):
        reader = RecordReader()
        reader.feed(encode_header(content_type, length) + b"\x01" * (length - 1))
        assert reader.next_record() is None
        reader.feed(b"\x01")
        assert reader.next_record() == (content_type, 0x0303, b"\x01" * length)
        assert reader.pending == 0


def test_reader_fed_one_byte_at_a_time() -> None:
    sender = RecordProtection(AES128, SECRET)
    stream = encode_plaintext_records(HANDSHAKE, b"\x01" * 300, max_fragment=128) + b"".join(
        sender.seal(APPDATA, bytes([i]) * i) for i in range(1, 6)
    )
    reader = RecordReader()
    records = []
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1])
        records.extend(_read_all(reader))
    assert reader.pending == 0
    assert [len(payload) for _, _, payload in records] == [128, 128, 44] + [
        i + 1 + 16 for i in range(1, 6)
    ]
    receiver = RecordProtection(AES128, SECRET)
    opened = [receiver.open(encode_header(t, len(p), v), p) for t, v, p in records[3:]]
    assert opened == [(APPDATA, bytes([i]) * i) for i in range(1, 6)]


def test_incomplete_record_stays_pending() -> None:
    reader = RecordReader()
    record = encode_plaintext_records(HANDSHAKE, b"\x02" * 50)
    reader.feed(record[:30])
    assert reader.next_record() is None
    assert reader.pending == 30
    reader.feed(record[30:])
    assert reader.next_record() == (HANDSHAKE, 0x0303, b"\x02" * 50)


@pytest.mark.parametrize(
    ("header", "alert"),
    [
        (b"GET /", alerts.UnexpectedMessage),  # HTTP on the TLS port
        (bytes([24, 3, 3, 0, 1]), alerts.UnexpectedMessage),  # heartbeat: not in TLS 1.3
        (bytes([0, 3, 3, 0, 1]), alerts.UnexpectedMessage),
        (bytes([HANDSHAKE, 2, 0, 0, 1]), alerts.ProtocolVersion),  # SSL 2-era major byte
        (bytes([HANDSHAKE, 3, 3, 0, 0]), alerts.UnexpectedMessage),  # empty handshake
        (bytes([ALERT, 3, 3, 0, 0]), alerts.UnexpectedMessage),  # empty alert
    ],
)
def test_bad_headers(header: bytes, alert: type[alerts.TLSAlert]) -> None:
    reader = RecordReader()
    reader.feed(header)
    with pytest.raises(alert):
        reader.next_record()


def test_any_tls_minor_version_is_accepted() -> None:
    reader = RecordReader()
    reader.feed(bytes([HANDSHAKE, 3, 1, 0, 1, 7]) + bytes([APPDATA, 3, 0, 0, 0]))
    assert _read_all(reader) == [(HANDSHAKE, 0x0301, b"\x07"), (APPDATA, 0x0300, b"")]


def test_reader_buffer_cap() -> None:
    with pytest.raises(ValueError):
        RecordReader(max_buffer=MAX_CIPHERTEXT)
    reader = RecordReader(max_buffer=RECORD_HEADER + MAX_CIPHERTEXT)
    reader.feed(bytes(RECORD_HEADER + MAX_CIPHERTEXT))
    with pytest.raises(alerts.InternalError):
        reader.feed(b"\x00")


def test_many_small_records_across_compaction() -> None:
    reader = RecordReader(max_buffer=1 << 20)
    count = 10_000  # 150 kB of 15-byte records: consumed bytes get compacted away.
    stream = b"".join(
        encode_plaintext_records(HANDSHAKE, i.to_bytes(10, "big")) for i in range(count)
    )
    tail = encode_plaintext_records(HANDSHAKE, b"tail")
    reader.feed(stream + tail[:3])
    payloads = [payload for _, _, payload in _read_all(reader)]
    assert payloads == [i.to_bytes(10, "big") for i in range(count)]
    assert reader.pending == 3
    reader.feed(tail[3:])
    assert reader.next_record() == (HANDSHAKE, 0x0303, b"tail")
    assert reader.pending == 0


# --- fragmentation ----------------------------------------------------------------


@pytest.mark.parametrize(("size", "fragment", "count"), [(1000, 300, 4), (900, 300, 3), (1, 1, 1)])
def test_protected_fragmentation(size: int, fragment: int, count: int) -> None:
    data = bytes(i % 251 for i in range(size))
    sender, receiver = RecordProtection(AES128, SECRET), RecordProtection(AES128, SECRET)
    reader = RecordReader()
    reader.feed(encode_protected_records(sender, APPDATA, data, fragment))
    records = _read_all(reader)
    assert len(records) == count == sender.seq
    opened = [receiver.open(encode_header(t, len(p), v), p) for t, v, p in records]
    assert all(len(content) <= fragment for _, content in opened)
    assert b"".join(content for _, content in opened) == data


def test_plaintext_fragmentation_at_the_protocol_maximum() -> None:
    data = b"h" * (2 * MAX_PLAINTEXT + 1)
    reader = RecordReader()
    reader.feed(encode_plaintext_records(HANDSHAKE, data))
    assert [len(p) for _, _, p in _read_all(reader)] == [MAX_PLAINTEXT, MAX_PLAINTEXT, 1]


def test_empty_data_makes_no_records() -> None:
    sender = RecordProtection(AES128, SECRET)
    assert encode_plaintext_records(HANDSHAKE, b"") == b""
    assert encode_protected_records(sender, APPDATA, b"", 100) == b""
    assert sender.seq == 0


@pytest.mark.parametrize("fragment", [0, MAX_PLAINTEXT + 1])
def test_fragment_size_out_of_range(fragment: int) -> None:
    with pytest.raises(ValueError):
        encode_plaintext_records(HANDSHAKE, b"x", fragment)
    with pytest.raises(ValueError):
        encode_protected_records(RecordProtection(AES128, SECRET), APPDATA, b"x", fragment)


@settings(max_examples=60, deadline=None)
@given(
    suite=st.sampled_from(sorted(SUITES)),
    data=st.binary(max_size=3000),
    fragment=st.integers(min_value=1, max_value=MAX_PLAINTEXT),
    chunk=st.integers(min_value=1, max_value=4096),
)
def test_fragment_read_open_round_trip(suite: int, data: bytes, fragment: int, chunk: int) -> None:
    params: SuiteParams = SUITES[suite]
    sender, receiver = RecordProtection(params, SECRET), RecordProtection(params, SECRET)
    stream = encode_protected_records(sender, APPDATA, data, fragment)
    reader = RecordReader()
    out = []
    for start in range(0, len(stream), chunk):
        reader.feed(stream[start : start + chunk])
        for t, v, p in _read_all(reader):
            out.append(receiver.open(encode_header(t, len(p), v), p)[1])
    assert b"".join(out) == data
    assert reader.pending == 0
