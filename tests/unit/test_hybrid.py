"""The hybrid composition, checked against the draft and against hybrids built
by hand from cryptography's primitives (the independent implementation of the
order: if ``HYBRID_LAYOUTS`` put a half in the wrong place, these break)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519

from pqproxy.crypto.backends import openssl
from pqproxy.crypto.hybrid import (
    HYBRID_LAYOUTS,
    MLKEM_GROUPS,
    HybridGroup,
    KemGroup,
    compose_groups,
)
from pqproxy.crypto.provider import ClientKeyExchange, InvalidKeyShare, KxGroup, SharedSecret
from pqproxy.tls.enums import NamedGroup

X962 = serialization.Encoding.X962
UNCOMPRESSED = serialization.PublicFormat.UncompressedPoint

_Generate = Callable[[], mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey]
_LoadPublic = Callable[[bytes], mlkem.MLKEM768PublicKey | mlkem.MLKEM1024PublicKey]
MLKEM768 = (mlkem.MLKEM768PrivateKey.generate, mlkem.MLKEM768PublicKey.from_public_bytes)
MLKEM1024 = (mlkem.MLKEM1024PrivateKey.generate, mlkem.MLKEM1024PublicKey.from_public_bytes)


class RenamedBackend:
    """A real group reported under another backend name, the way a liboqs
    ML-KEM and an OpenSSL X25519 would sit side by side in one hybrid."""

    def __init__(self, inner: KxGroup, backend: str) -> None:
        self._inner = inner
        self._backend = backend
        self.server_exchanges = 0

    @property
    def group(self) -> int:
        return self._inner.group

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def client_share_length(self) -> int:
        return self._inner.client_share_length

    @property
    def server_share_length(self) -> int:
        return self._inner.server_share_length

    def server_exchange(self, client_share: bytes) -> tuple[bytes, SharedSecret]:
        self.server_exchanges += 1
        return self._inner.server_exchange(client_share)

    def start(self) -> ClientKeyExchange:
        return self._inner.start()


@pytest.fixture(scope="module")
def groups() -> Mapping[int, KxGroup]:
    return compose_groups(openssl.kems(), openssl.classical_groups())


def test_layouts_follow_the_draft() -> None:
    # draft-ietf-tls-ecdhe-mlkem §3: ML-KEM first only in X25519MLKEM768.
    assert HYBRID_LAYOUTS == {
        0x11EC: ("ML-KEM-768", "x25519"),
        0x11EB: ("secp256r1", "ML-KEM-768"),
        0x11ED: ("secp384r1", "ML-KEM-1024"),
    }


@pytest.mark.parametrize(
    ("code", "client", "server"),
    [
        (0x11EC, 1184 + 32, 1088 + 32),
        (0x11EB, 65 + 1184, 65 + 1088),
        (0x11ED, 97 + 1568, 97 + 1568),
    ],
)
def test_hybrid_share_lengths(
    groups: Mapping[int, KxGroup], code: int, client: int, server: int
) -> None:
    group = groups[code]
    assert isinstance(group, HybridGroup)
    assert (group.client_share_length, group.server_share_length) == (client, server)
    assert group.group == code
    assert group.backend == "openssl"


def test_compose_groups_offers_hybrids_first(groups: Mapping[int, KxGroup]) -> None:
    assert list(groups) == [0x11EC, 0x11EB, 0x11ED, 0x001D, 0x0017, 0x0018, 0x0019]


def test_compose_groups_leaves_out_hybrids_missing_a_component() -> None:
    classical = dict(openssl.classical_groups())
    del classical["x25519"]
    kems = {"ML-KEM-768": openssl.kems()["ML-KEM-768"]}
    assert list(compose_groups(kems, classical)) == [0x11EB, 0x0017, 0x0018, 0x0019]
    assert list(compose_groups({}, classical)) == [0x0017, 0x0018, 0x0019]


def test_backend_names_both_libraries_when_they_differ() -> None:
    x25519_group = openssl.classical_groups()["x25519"]
    kem = KemGroup(openssl.kems()["ML-KEM-768"], MLKEM_GROUPS["ML-KEM-768"])
    pq = RenamedBackend(kem, "liboqs")
    hybrid = HybridGroup(NamedGroup.X25519MLKEM768, (pq, x25519_group))
    assert hybrid.backend == "liboqs+openssl"
    client = hybrid.start()
    share, secret = hybrid.server_exchange(client.share)
    assert client.complete(share) == secret
    assert pq.server_exchanges == 1


def test_kem_group_is_a_kx_group() -> None:
    kem = openssl.kems()["ML-KEM-1024"]
    group = KemGroup(kem, MLKEM_GROUPS["ML-KEM-1024"])
    assert isinstance(group, KxGroup)
    assert group.group == 0x0202
    assert (group.client_share_length, group.server_share_length) == (1568, 1568)
    client = group.start()
    ciphertext, secret = group.server_exchange(client.share)
    assert len(ciphertext) == 1568
    assert client.complete(ciphertext) == secret
    with pytest.raises(InvalidKeyShare):
        client.complete(ciphertext[:-1])
    with pytest.raises(InvalidKeyShare):
        group.server_exchange(client.share + b"\x00")


def test_wrong_total_length_is_rejected_before_any_component_runs() -> None:
    # The ML-KEM half is complete and valid; only the X25519 half is short.
    # Checking halves one by one would have run the encapsulation first.
    kem = RenamedBackend(KemGroup(openssl.kems()["ML-KEM-768"], 0x0201), "openssl")
    hybrid = HybridGroup(NamedGroup.X25519MLKEM768, (kem, openssl.classical_groups()["x25519"]))
    share = hybrid.start().share
    with pytest.raises(InvalidKeyShare, match="expected 1216 bytes, got 1215"):
        hybrid.server_exchange(share[:-1])
    assert kem.server_exchanges == 0


def test_client_rejects_wrong_server_share_length(groups: Mapping[int, KxGroup]) -> None:
    group = groups[0x11EC]
    client = group.start()
    share, _ = group.server_exchange(client.share)
    with pytest.raises(InvalidKeyShare, match="expected 1120 bytes, got 1121"):
        client.complete(share + b"\x00")


def test_reprs_name_the_group_not_the_keys(groups: Mapping[int, KxGroup]) -> None:
    group = groups[0x11EC]
    client = group.start()
    assert repr(group) == "<HybridGroup X25519MLKEM768 backend=openssl>"
    assert client.share.hex()[:16] not in repr(client)
    assert "X25519MLKEM768" in repr(client)


# --- order against hand-built hybrids (draft-ietf-tls-ecdhe-mlkem §3.1) -------------------


def test_x25519mlkem768_client_share_is_mlkem_then_x25519(groups: Mapping[int, KxGroup]) -> None:
    group = groups[0x11EC]
    client = group.start()
    share = client.share
    assert len(share) == 1184 + 32
    # The first 1184 bytes are an ML-KEM-768 encapsulation key: encapsulate to
    # it independently, and pair it with an independent X25519 key.
    ek = mlkem.MLKEM768PublicKey.from_public_bytes(share[:1184])
    client_x25519 = x25519.X25519PublicKey.from_public_bytes(share[1184:])
    mlkem_secret, ciphertext = ek.encapsulate()
    server_x25519 = x25519.X25519PrivateKey.generate()
    server_share = ciphertext + server_x25519.public_key().public_bytes_raw()

    expected = mlkem_secret + server_x25519.exchange(client_x25519)
    assert client.complete(server_share) == expected


def test_x25519mlkem768_server_share_is_ciphertext_then_x25519(
    groups: Mapping[int, KxGroup],
) -> None:
    dk = mlkem.MLKEM768PrivateKey.generate()
    client_x25519 = x25519.X25519PrivateKey.generate()
    client_share = (
        dk.public_key().public_bytes_raw() + client_x25519.public_key().public_bytes_raw()
    )

    server_share, secret = groups[0x11EC].server_exchange(client_share)

    assert len(server_share) == 1088 + 32
    ciphertext, server_x25519 = server_share[:1088], server_share[1088:]
    expected = dk.decapsulate(ciphertext) + client_x25519.exchange(
        x25519.X25519PublicKey.from_public_bytes(server_x25519)
    )
    assert secret == expected
    assert len(secret) == 64


@pytest.mark.parametrize(
    ("code", "curve", "point_length", "kem", "ek_length", "ct_length"),
    [
        (0x11EB, ec.SECP256R1(), 65, MLKEM768, 1184, 1088),
        (0x11ED, ec.SECP384R1(), 97, MLKEM1024, 1568, 1568),
    ],
    ids=["SecP256r1MLKEM768", "SecP384r1MLKEM1024"],
)
def test_nist_hybrids_put_ecdh_first(
    groups: Mapping[int, KxGroup],
    code: int,
    curve: ec.EllipticCurve,
    point_length: int,
    kem: tuple[_Generate, _LoadPublic],
    ek_length: int,
    ct_length: int,
) -> None:
    kem_generate, kem_public = kem
    dk = kem_generate()
    client_ec = ec.generate_private_key(curve)
    client_share = client_ec.public_key().public_bytes(X962, UNCOMPRESSED)
    client_share += dk.public_key().public_bytes_raw()
    assert len(client_share) == point_length + ek_length

    server_share, secret = groups[code].server_exchange(client_share)

    assert len(server_share) == point_length + ct_length
    server_point, ciphertext = server_share[:point_length], server_share[point_length:]
    server_ec = ec.EllipticCurvePublicKey.from_encoded_point(curve, server_point)
    expected = client_ec.exchange(ec.ECDH(), server_ec) + dk.decapsulate(ciphertext)
    assert secret == expected

    # The other direction: our client's share splits the same way, and its
    # secret joins the halves in the same order.
    client = groups[code].start()
    client_point = ec.EllipticCurvePublicKey.from_encoded_point(curve, client.share[:point_length])
    ek = kem_public(client.share[point_length:])
    mlkem_secret, ciphertext = ek.encapsulate()
    server_ec_key = ec.generate_private_key(curve)
    reply = server_ec_key.public_key().public_bytes(X962, UNCOMPRESSED) + ciphertext
    assert client.complete(reply) == server_ec_key.exchange(ec.ECDH(), client_point) + mlkem_secret
