"""One suite, run against every backend in ``BACKEND_MODULES``.

A backend whose library is missing is skipped with its own reason (see
conftest.py for the one that must not be). The layouts below are written out
from draft-ietf-tls-ecdhe-mlkem §3.1, and the ML-KEM sizes from FIPS 203, rather
than taken from ``pqproxy.crypto``, so they check the implementation instead of
restating it. Where two backends are installed, what one produces the other
must accept: the cross-checks at the end.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import pytest

from pqproxy.crypto.backends import BACKEND_MODULES
from pqproxy.crypto.provider import (
    CryptoProvider,
    InvalidKeyShare,
    Kem,
    KxGroup,
    SharedSecret,
)
from tests.backends.conftest import BackendLoader


@dataclass(frozen=True)
class Part:
    kind: str  # "mlkem", "x25519" or "ecdh"
    client_length: int
    server_length: int


# Component layout in wire order, and the shared secret length.
LAYOUTS: dict[int, tuple[tuple[Part, ...], int]] = {
    0x11EC: ((Part("mlkem", 1184, 1088), Part("x25519", 32, 32)), 64),  # X25519MLKEM768
    0x11EB: ((Part("ecdh", 65, 65), Part("mlkem", 1184, 1088)), 64),  # SecP256r1MLKEM768
    0x11ED: ((Part("ecdh", 97, 97), Part("mlkem", 1568, 1568)), 80),  # SecP384r1MLKEM1024
    0x001D: ((Part("x25519", 32, 32),), 32),
    0x0017: ((Part("ecdh", 65, 65),), 32),
    0x0018: ((Part("ecdh", 97, 97),), 48),
    0x0019: ((Part("ecdh", 133, 133),), 66),
}

# (1, 1) is on none of the NIST curves.
OFF_CURVE = {n: b"\x04" + (1).to_bytes(n // 2, "big") * 2 for n in (65, 97, 133)}


def _with(kind: str) -> list[int]:
    """The groups that have a component of ``kind``."""
    return [code for code, (parts, _) in LAYOUTS.items() if any(p.kind == kind for p in parts)]


def _get(provider: CryptoProvider, code: int) -> KxGroup:
    if code not in provider.groups:
        pytest.skip(f"{provider.name} does not offer group {code:#06x}")
    return provider.groups[code]


def _locate(code: int, kind: str, side: str = "client") -> tuple[int, int]:
    """(offset, length) of the ``kind`` component in a client or server share."""
    offset = 0
    for part in LAYOUTS[code][0]:
        length = part.client_length if side == "client" else part.server_length
        if part.kind == kind:
            return offset, length
        offset += length
    raise AssertionError(f"group {code:#06x} has no {kind} part")


def _replace(share: bytes, where: tuple[int, int], replacement: bytes) -> bytes:
    offset, length = where
    assert len(replacement) == length
    return share[:offset] + replacement + share[offset + length :]


def _ids(code: int) -> str:
    return f"{code:#06x}"


@pytest.fixture(params=sorted(LAYOUTS), ids=_ids)
def group(request: pytest.FixtureRequest, provider: CryptoProvider) -> KxGroup:
    code: int = request.param
    return _get(provider, code)


def test_backend_self_test_passes(backend: Any) -> None:
    backend.self_test()
    caps: dict[str, list[str]] = backend.capabilities()
    assert "X25519MLKEM768" in caps["groups"]


def test_provider_offers_the_three_hybrids(provider: CryptoProvider) -> None:
    assert {0x11EC, 0x11EB, 0x11ED} <= set(provider.groups)
    for code, group in provider.groups.items():
        assert group.group == code


def test_round_trip_gives_equal_secrets_of_the_right_length(group: KxGroup) -> None:
    parts, secret_length = LAYOUTS[group.group]
    client = group.start()
    server_share, server_secret = group.server_exchange(client.share)
    client_secret = client.complete(server_share)

    assert isinstance(server_secret, SharedSecret)
    assert isinstance(client_secret, SharedSecret)
    assert client_secret == server_secret
    assert len(server_secret) == secret_length
    assert len(client.share) == group.client_share_length == sum(p.client_length for p in parts)
    assert len(server_share) == group.server_share_length == sum(p.server_length for p in parts)


def test_each_exchange_is_fresh(group: KxGroup) -> None:
    client = group.start()
    share1, secret1 = group.server_exchange(client.share)
    share2, secret2 = group.server_exchange(client.share)
    assert share1 != share2
    assert secret1 != secret2
    assert group.start().share != client.share


@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_length_client_share_is_invalid(group: KxGroup, delta: int) -> None:
    share = group.start().share
    bad = share[:delta] if delta < 0 else share + b"\x00"
    with pytest.raises(InvalidKeyShare):
        group.server_exchange(bad)


def test_empty_client_share_is_invalid(group: KxGroup) -> None:
    with pytest.raises(InvalidKeyShare):
        group.server_exchange(b"")


@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_length_server_share_is_invalid(group: KxGroup, delta: int) -> None:
    client = group.start()
    server_share, _ = group.server_exchange(client.share)
    bad = server_share[:delta] if delta < 0 else server_share + b"\x00"
    with pytest.raises(InvalidKeyShare):
        client.complete(bad)


@pytest.mark.parametrize("code", _with("mlkem"), ids=_ids)
def test_invalid_mlkem_key_is_invalid(provider: CryptoProvider, code: int) -> None:
    # FIPS 203 §7.2: every 12-bit coefficient of 0xFF bytes is 4095 ≥ q = 3329.
    group = _get(provider, code)
    where = _locate(code, "mlkem")
    bad = _replace(group.start().share, where, b"\xff" * where[1])
    with pytest.raises(InvalidKeyShare):
        group.server_exchange(bad)


@pytest.mark.parametrize("code", _with("x25519"), ids=_ids)
@pytest.mark.parametrize("point", [bytes(32), (1).to_bytes(32, "little")], ids=["zero", "one"])
def test_low_order_x25519_point_is_invalid(
    provider: CryptoProvider, code: int, point: bytes
) -> None:
    # RFC 8446 §7.4.2: an all-zero X25519 output must be rejected; u = 0 and
    # u = 1 are low-order points that both give it.
    group = _get(provider, code)
    bad = _replace(group.start().share, _locate(code, "x25519"), point)
    with pytest.raises(InvalidKeyShare):
        group.server_exchange(bad)


@pytest.mark.parametrize("code", _with("x25519"), ids=_ids)
def test_low_order_x25519_point_from_server_is_invalid(provider: CryptoProvider, code: int) -> None:
    group = _get(provider, code)
    client = group.start()
    server_share, _ = group.server_exchange(client.share)
    with pytest.raises(InvalidKeyShare):
        client.complete(_replace(server_share, _locate(code, "x25519", "server"), bytes(32)))


@pytest.mark.parametrize("code", _with("ecdh"), ids=_ids)
def test_off_curve_point_is_invalid(provider: CryptoProvider, code: int) -> None:
    group = _get(provider, code)
    where = _locate(code, "ecdh")
    bad = _replace(group.start().share, where, OFF_CURVE[where[1]])
    with pytest.raises(InvalidKeyShare):
        group.server_exchange(bad)


@pytest.mark.parametrize("code", _with("ecdh"), ids=_ids)
def test_off_curve_point_from_server_is_invalid(provider: CryptoProvider, code: int) -> None:
    group = _get(provider, code)
    client = group.start()
    server_share, _ = group.server_exchange(client.share)
    where = _locate(code, "ecdh", "server")
    with pytest.raises(InvalidKeyShare):
        client.complete(_replace(server_share, where, OFF_CURVE[where[1]]))


@pytest.mark.parametrize("code", _with("ecdh"), ids=_ids)
def test_compressed_point_is_invalid(provider: CryptoProvider, code: int) -> None:
    # RFC 8446 §4.2.8.2: uncompressed points only. A valid point with the
    # compressed-form prefix: right length, wrong format.
    group = _get(provider, code)
    share = group.start().share
    offset, length = _locate(code, "ecdh")
    point = share[offset : offset + length]
    with pytest.raises(InvalidKeyShare):
        group.server_exchange(_replace(share, (offset, length), b"\x02" + point[1:]))


def test_shared_secret_repr_hides_the_bytes(group: KxGroup) -> None:
    _, secret = group.server_exchange(group.start().share)
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}"):
        assert secret.hex() not in text
        assert repr(bytes(secret)) not in text
        assert f"{len(secret)} bytes" in text


# --- ML-KEM on its own (FIPS 203) -----------------------------------------------------------

# FIPS 203 Table 3 (via §8): k, encapsulation key and ciphertext lengths; secrets are 32 bytes.
MLKEM: dict[str, tuple[int, int, int]] = {
    "ML-KEM-512": (2, 800, 768),
    "ML-KEM-768": (3, 1184, 1088),
    "ML-KEM-1024": (4, 1568, 1568),
}
Q = 3329


def _kems_of(module: Any) -> dict[str, Kem]:
    kems = getattr(module, "kems", None)
    return dict(kems()) if kems is not None else {}


def _kem_of(module: Any, name: str) -> Kem:
    found = _kems_of(module).get(name)
    if found is None:
        why = {
            # A token with ML-KEM cannot be installed here: SoftHSM 2.6 has no CKM_ML_KEM.
            "pkcs11": "the test token (SoftHSM 2.6) has no CKM_ML_KEM",
            # cryptography 50 offers ML-KEM-768 and -1024 only.
            "openssl": "cryptography 50 has no ML-KEM-512",
        }.get(module.NAME, "not offered")
        pytest.skip(f"backend {module.NAME} has no {name}: {why}")
    return found


@pytest.fixture(params=sorted(MLKEM))
def kem(request: pytest.FixtureRequest, backend: Any) -> Kem:
    return _kem_of(backend, request.param)


def _coefficient(key: bytes, index: int) -> int:
    """Coefficient ``index`` of ByteEncode12(t̂) (FIPS 203 Algorithm 5): two
    12-bit values per three bytes, least significant bits first."""
    b0, b1, b2 = key[3 * (index // 2) : 3 * (index // 2) + 3]
    return (b0 | (b1 & 0x0F) << 8) if index % 2 == 0 else (b1 >> 4 | b2 << 4)


def _set_coefficient(key: bytes, index: int, value: int) -> bytes:
    out = bytearray(key)
    at = 3 * (index // 2)
    if index % 2 == 0:
        out[at] = value & 0xFF
        out[at + 1] = (out[at + 1] & 0xF0) | value >> 8
    else:
        out[at + 1] = (out[at + 1] & 0x0F) | (value & 0x0F) << 4
        out[at + 2] = value >> 4
    changed = bytes(out)
    assert _coefficient(changed, index) == value
    assert all(
        _coefficient(changed, i) == _coefficient(key, i) for i in {0, 1, index ^ 1} - {index}
    )
    return changed


def test_kem_round_trip(kem: Kem) -> None:
    _, key_length, ciphertext_length = MLKEM[kem.name]
    assert (kem.encapsulation_key_length, kem.ciphertext_length) == (key_length, ciphertext_length)
    decapsulator = kem.generate()
    assert len(decapsulator.encapsulation_key) == key_length
    ciphertext, secret = kem.encapsulate(decapsulator.encapsulation_key)
    # (ciphertext, secret) whatever order the library uses.
    assert len(ciphertext) == ciphertext_length
    assert isinstance(secret, SharedSecret) and len(secret) == 32
    recovered = decapsulator.decapsulate(ciphertext)
    assert isinstance(recovered, SharedSecret)
    assert recovered == secret


def test_kem_encapsulations_and_keys_are_fresh(kem: Kem) -> None:
    key = kem.generate().encapsulation_key
    (ct1, s1), (ct2, s2) = kem.encapsulate(key), kem.encapsulate(key)
    assert ct1 != ct2 and s1 != s2
    assert kem.generate().encapsulation_key != key


@pytest.mark.parametrize("delta", [-1, 1])
def test_kem_wrong_length_key_and_ciphertext_are_invalid(kem: Kem, delta: int) -> None:
    decapsulator = kem.generate()
    key = decapsulator.encapsulation_key
    ciphertext, _ = kem.encapsulate(key)
    with pytest.raises(InvalidKeyShare):
        kem.encapsulate(key[:delta] if delta < 0 else key + b"\x00")
    with pytest.raises(InvalidKeyShare):
        decapsulator.decapsulate(ciphertext[:delta] if delta < 0 else ciphertext + b"\x00")


@pytest.mark.parametrize("where", ["first", "second", "last"])
def test_kem_modulus_check_is_exact(kem: Kem, where: str) -> None:
    # FIPS 203 §7.2: a key with one coefficient ≥ q is refused; q − 1 is fine.
    k = MLKEM[kem.name][0]
    index = {"first": 0, "second": 1, "last": 256 * k - 1}[where]
    key = kem.generate().encapsulation_key
    ciphertext, secret = kem.encapsulate(_set_coefficient(key, index, Q - 1))
    assert len(ciphertext) == kem.ciphertext_length and len(secret) == 32
    for value in (Q, 4095):
        with pytest.raises(InvalidKeyShare):
            kem.encapsulate(_set_coefficient(key, index, value))


def test_kem_tampered_ciphertext_gives_another_secret(kem: Kem) -> None:
    # FIPS 203 Algorithm 18: implicit rejection, never an error.
    decapsulator = kem.generate()
    ciphertext, secret = kem.encapsulate(decapsulator.encapsulation_key)
    tampered = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    other = decapsulator.decapsulate(tampered)
    assert len(other) == 32 and other != secret
    assert decapsulator.decapsulate(tampered) == other


# --- cross-checks between installed backends ------------------------------------------------

PAIRS = list(itertools.permutations(sorted(BACKEND_MODULES), 2))


def _pair_id(pair: tuple[str, str]) -> str:
    return f"{pair[0]}-to-{pair[1]}"


@pytest.mark.parametrize("name", ["ML-KEM-768", "ML-KEM-1024"])
@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
def test_one_backend_encapsulates_the_other_decapsulates(
    backend_loader: BackendLoader, pair: tuple[str, str], name: str
) -> None:
    sender = _kem_of(backend_loader(pair[0]), name)
    receiver = _kem_of(backend_loader(pair[1]), name)
    for _ in range(3):
        decapsulator = receiver.generate()
        ciphertext, secret = sender.encapsulate(decapsulator.encapsulation_key)
        assert decapsulator.decapsulate(ciphertext) == secret


@pytest.mark.parametrize("code", [0x11EC, 0x11EB, 0x11ED], ids=_ids)
@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
def test_hybrid_client_on_one_backend_server_on_the_other(
    backend_loader: BackendLoader, pair: tuple[str, str], code: int
) -> None:
    client_provider: CryptoProvider = backend_loader(pair[0]).create_provider()
    server_provider: CryptoProvider = backend_loader(pair[1]).create_provider()
    client = _get(client_provider, code).start()
    server_share, server_secret = _get(server_provider, code).server_exchange(client.share)
    assert client.complete(server_share) == server_secret
    assert len(server_secret) == LAYOUTS[code][1]
