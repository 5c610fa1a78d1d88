"""One suite, run against every backend in ``BACKEND_MODULES``.

A backend whose library is missing is skipped with its own reason. The layouts
below are written out from draft-ietf-tls-ecdhe-mlkem §3.1 rather than taken
from ``pqproxy.crypto.hybrid``, so they check the implementation instead of
restating it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import pytest

from pqproxy.crypto.backends import BACKEND_MODULES
from pqproxy.crypto.provider import CryptoProvider, InvalidKeyShare, KxGroup, SharedSecret


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


def _load_provider(name: str) -> CryptoProvider:
    module: Any = importlib.import_module(BACKEND_MODULES[name])
    if not module.is_available():
        pytest.skip(f"backend {name} unavailable: {module.unavailable_reason()}")
    provider: CryptoProvider = module.create_provider()
    return provider


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


@pytest.fixture(params=sorted(BACKEND_MODULES), scope="module")
def provider(request: pytest.FixtureRequest) -> CryptoProvider:
    return _load_provider(request.param)


@pytest.fixture(params=sorted(LAYOUTS), ids=_ids)
def group(request: pytest.FixtureRequest, provider: CryptoProvider) -> KxGroup:
    code: int = request.param
    return _get(provider, code)


@pytest.mark.parametrize("name", sorted(BACKEND_MODULES))
def test_backend_self_test_passes(name: str) -> None:
    module: Any = importlib.import_module(BACKEND_MODULES[name])
    if not module.is_available():
        pytest.skip(f"backend {name} unavailable: {module.unavailable_reason()}")
    module.self_test()
    caps: dict[str, list[str]] = module.capabilities()
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
