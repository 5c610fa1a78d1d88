"""Key schedule checks beyond RFC 8448 (which only covers SHA-256): the HKDF
helpers against cryptography's own HKDF/HMAC, the SHA-384 suite against an
independent walk of RFC 8446 §7.1, the stage order, and secret hygiene."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from pqproxy.tls.enums import CipherSuite, HandshakeType
from pqproxy.tls.key_schedule import (
    SUITES,
    KeySchedule,
    derive_secret,
    empty_hash,
    hash_transcript,
    hkdf_expand_label,
    hkdf_extract,
    hrr_message_hash,
    next_traffic_secret,
    traffic_keys,
)

_HASHES: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384()}


def _ref_extract(hash_name: str, salt: bytes, ikm: bytes) -> bytes:
    h = crypto_hmac.HMAC(salt, _HASHES[hash_name])
    h.update(ikm)
    return h.finalize()


def _ref_expand_label(
    hash_name: str, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    # HkdfLabel as RFC 8446 §7.1 spells it, expanded by cryptography's HKDF.
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    return HKDFExpand(_HASHES[hash_name], length, info).derive(secret)


def test_suite_table() -> None:
    aes128 = SUITES[CipherSuite.TLS_AES_128_GCM_SHA256]
    aes256 = SUITES[CipherSuite.TLS_AES_256_GCM_SHA384]
    chacha = SUITES[CipherSuite.TLS_CHACHA20_POLY1305_SHA256]
    assert (aes128.hash_name, aes128.hash_len, aes128.key_len, aes128.aead) == (
        "sha256",
        32,
        16,
        AESGCM,
    )
    assert (aes256.hash_name, aes256.hash_len, aes256.key_len, aes256.aead) == (
        "sha384",
        48,
        32,
        AESGCM,
    )
    assert (chacha.hash_name, chacha.hash_len, chacha.key_len, chacha.aead) == (
        "sha256",
        32,
        32,
        ChaCha20Poly1305,
    )
    for params in (aes128, aes256, chacha):
        assert params.iv_len == 12
        assert hashlib.new(params.hash_name).digest_size == params.hash_len


@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
def test_extract_matches_hmac_and_empty_salt_is_zeros(hash_name: str) -> None:
    size = hashlib.new(hash_name).digest_size
    ikm = bytes(range(40))
    assert hkdf_extract(hash_name, b"salt", ikm) == _ref_extract(hash_name, b"salt", ikm)
    assert hkdf_extract(hash_name, b"", ikm) == _ref_extract(hash_name, bytes(size), ikm)


@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
@pytest.mark.parametrize("length", [1, 12, 16, 32, 33, 48, 49, 64, 100, 255])
def test_expand_label_matches_cryptography_hkdf(hash_name: str, length: int) -> None:
    secret = hashlib.new(hash_name, b"secret").digest()
    context = hashlib.new(hash_name, b"context").digest()
    ours = hkdf_expand_label(hash_name, secret, b"c hs traffic", context, length)
    assert len(ours) == length
    assert ours == _ref_expand_label(hash_name, secret, b"c hs traffic", context, length)


@pytest.mark.parametrize(
    ("label", "context", "length"),
    [
        (b"x" * 250, b"", 32),
        (b"key", b"c" * 256, 32),
        (b"key", b"", 0),
        (b"key", b"", 255 * 32 + 1),
    ],
)
def test_expand_label_rejects_out_of_range(label: bytes, context: bytes, length: int) -> None:
    with pytest.raises(ValueError):
        hkdf_expand_label("sha256", bytes(32), label, context, length)


def test_empty_hash_and_transcript_hash() -> None:
    assert empty_hash("sha384") == hashlib.sha384(b"").digest()
    assert hash_transcript("sha256", b"ab", b"cd") == hashlib.sha256(b"abcd").digest()
    assert hash_transcript("sha256") == empty_hash("sha256")


@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
def test_hrr_message_hash_layout(hash_name: str) -> None:
    ch1 = b"\x01\x00\x00\x04abcd"
    digest = hashlib.new(hash_name, ch1).digest()
    message = hrr_message_hash(hash_name, ch1)
    assert message[0] == 254  # RFC 8446 §4.4.1: message_hash
    assert message[0] == HandshakeType.MESSAGE_HASH
    assert int.from_bytes(message[1:4], "big") == len(digest) == len(message) - 4
    assert message[4:] == digest


def test_sha384_suite_walks_rfc8446_schedule() -> None:
    """The whole schedule for TLS_AES_256_GCM_SHA384 against a from-scratch walk
    of RFC 8446 §7.1 built on cryptography's HKDF, with a PSK in the early secret."""
    params = SUITES[CipherSuite.TLS_AES_256_GCM_SHA384]
    name, n = "sha384", 48
    psk = bytes(range(48))
    shared = bytes(range(100, 132))
    hello = hashlib.sha384(b"hello").digest()
    server_fin = hashlib.sha384(b"server finished").digest()
    client_fin = hashlib.sha384(b"client finished").digest()
    empty = hashlib.sha384(b"").digest()

    early = _ref_extract(name, bytes(n), psk)
    hs = _ref_extract(name, _ref_expand_label(name, early, b"derived", empty, n), shared)
    master = _ref_extract(name, _ref_expand_label(name, hs, b"derived", empty, n), bytes(n))

    ks = KeySchedule(params, psk=psk)
    assert ks.early_secret == early
    c_hs, s_hs = ks.handshake_secrets(shared, hello)
    assert ks.handshake_secret == hs
    assert c_hs == _ref_expand_label(name, hs, b"c hs traffic", hello, n)
    assert s_hs == _ref_expand_label(name, hs, b"s hs traffic", hello, n)
    c_ap, s_ap = ks.application_secrets(server_fin)
    assert ks.master_secret == master
    assert c_ap == _ref_expand_label(name, master, b"c ap traffic", server_fin, n)
    assert s_ap == _ref_expand_label(name, master, b"s ap traffic", server_fin, n)
    assert ks.exporter_master_secret == _ref_expand_label(
        name, master, b"exp master", server_fin, n
    )
    assert ks.resumption_master_secret(client_fin) == _ref_expand_label(
        name, master, b"res master", client_fin, n
    )

    finished_key = _ref_expand_label(name, s_hs, b"finished", b"", n)
    mac = crypto_hmac.HMAC(finished_key, hashes.SHA384())
    mac.update(hello)
    assert ks.finished_verify_data(s_hs, hello) == mac.finalize()

    key, iv = traffic_keys(params, s_ap)
    assert key == _ref_expand_label(name, s_ap, b"key", b"", 32)
    assert iv == _ref_expand_label(name, s_ap, b"iv", b"", 12)
    updated = next_traffic_secret(params, s_ap)
    assert updated == _ref_expand_label(name, s_ap, b"traffic upd", b"", n)
    assert derive_secret(name, hs, b"derived", empty) == _ref_expand_label(
        name, hs, b"derived", empty, n
    )


def test_no_psk_means_zero_ikm() -> None:
    params = SUITES[CipherSuite.TLS_CHACHA20_POLY1305_SHA256]
    assert KeySchedule(params).early_secret == KeySchedule(params, psk=bytes(32)).early_secret
    assert KeySchedule(params).early_secret != KeySchedule(params, psk=b"\x01" * 32).early_secret


def test_stages_must_run_in_order() -> None:
    params = SUITES[CipherSuite.TLS_AES_128_GCM_SHA256]
    ks = KeySchedule(params)
    with pytest.raises(RuntimeError):
        ks.application_secrets(bytes(32))
    with pytest.raises(RuntimeError):
        ks.resumption_master_secret(bytes(32))
    ks.handshake_secrets(bytes(32), bytes(32))
    with pytest.raises(RuntimeError):
        ks.handshake_secrets(bytes(32), bytes(32))
    ks.application_secrets(bytes(32))
    with pytest.raises(RuntimeError):
        ks.application_secrets(bytes(32))


def test_repr_shows_no_secret() -> None:
    params = SUITES[CipherSuite.TLS_AES_128_GCM_SHA256]
    ks = KeySchedule(params, psk=b"\x42" * 32)
    c_hs, s_hs = ks.handshake_secrets(b"\x17" * 32, bytes(32))
    c_ap, s_ap = ks.application_secrets(bytes(32))
    text = repr(ks)
    assert "stage=application" in text
    secrets = [
        ks.early_secret,
        ks.handshake_secret,
        ks.master_secret,
        ks.exporter_master_secret,
        c_hs,
        s_hs,
        c_ap,
        s_ap,
    ]
    for secret in secrets:
        assert secret is not None
        assert secret.hex() not in text
        assert repr(secret) not in text
        assert repr(secret)[2:12] not in text
