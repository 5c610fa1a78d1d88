"""One generic hybrid composition of key-exchange groups.

A hybrid group is data: a code point and its two components in wire order.
Everything about the hybrid (share lengths, where each half sits, how the
secrets are joined) follows from that order, so it is written down once, in
``HYBRID_LAYOUTS``, and nowhere else.

The order comes from draft-ietf-tls-ecdhe-mlkem (-00 .. -04 agree):

- §3: "we put the ML-KEM shared secret first in X25519MLKEM768, and the ECDH
  shared secret first in SecP256r1MLKEM768 and SecP384r1MLKEM1024" (the name
  X25519MLKEM768 is reversed relative to the content for historical reasons).
- §3.1.1 client share: X25519MLKEM768 = ML-KEM-768 encapsulation key (1184)
  ‖ X25519 share (32); SecP256r1MLKEM768 = uncompressed P-256 point (65) ‖
  ML-KEM-768 key (1184); SecP384r1MLKEM1024 = P-384 point (97) ‖ ML-KEM-1024
  key (1568).
- §3.1.2 server share: the same order with the ML-KEM ciphertext in place of
  the key (1088 for ML-KEM-768, 1568 for ML-KEM-1024).
- §3.1.3 shared secret: the component secrets concatenated in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..tls.enums import NamedGroup, group_name
from .provider import (
    ClientKeyExchange,
    Kem,
    KemDecapsulator,
    KxGroup,
    SharedSecret,
    check_share_length,
)

# draft-ietf-tls-ecdhe-mlkem §3 and §3.1: component names in wire order. The
# names are the keys of the mappings given to ``compose_groups``.
HYBRID_LAYOUTS: dict[int, tuple[str, str]] = {
    NamedGroup.X25519MLKEM768: ("ML-KEM-768", "x25519"),
    NamedGroup.SecP256r1MLKEM768: ("secp256r1", "ML-KEM-768"),
    NamedGroup.SecP384r1MLKEM1024: ("secp384r1", "ML-KEM-1024"),
}

# draft-ietf-tls-mlkem code points for ML-KEM on its own. Not offered by
# ``compose_groups`` (pure post-quantum groups are not part of this proxy's
# policy); they only give a bare KemGroup an honest ``group`` value.
MLKEM_GROUPS: dict[str, int] = {
    "ML-KEM-512": 0x0200,
    "ML-KEM-768": 0x0201,
    "ML-KEM-1024": 0x0202,
}


class KemGroup:
    """A ``Kem`` seen as a ``KxGroup``: the client share is an encapsulation
    key, the server share a ciphertext. The server only encapsulates."""

    __slots__ = ("_kem", "_group", "_name")

    def __init__(self, kem: Kem, group: int) -> None:
        self._kem = kem
        self._group = group
        self._name = kem.name

    @property
    def group(self) -> int:
        return self._group

    @property
    def backend(self) -> str:
        return self._kem.backend

    @property
    def kem(self) -> Kem:
        return self._kem

    @property
    def client_share_length(self) -> int:
        return self._kem.encapsulation_key_length

    @property
    def server_share_length(self) -> int:
        return self._kem.ciphertext_length

    def server_exchange(self, client_share: bytes) -> tuple[bytes, SharedSecret]:
        check_share_length(
            f"{self._name} encapsulation key", client_share, self.client_share_length
        )
        return self._kem.encapsulate(client_share)

    def start(self) -> ClientKeyExchange:
        return _KemClient(self._name, self._kem.generate(), self._kem.ciphertext_length)

    def __repr__(self) -> str:
        return f"<KemGroup {self._name} backend={self.backend}>"


class _KemClient:
    __slots__ = ("_name", "_decapsulator", "_ciphertext_length")

    def __init__(self, name: str, decapsulator: KemDecapsulator, ciphertext_length: int) -> None:
        self._name = name
        self._decapsulator = decapsulator
        self._ciphertext_length = ciphertext_length

    @property
    def share(self) -> bytes:
        return self._decapsulator.encapsulation_key

    def complete(self, server_share: bytes) -> SharedSecret:
        # draft-ietf-tls-ecdhe-mlkem §3.1.2: a ciphertext of the wrong length
        # is illegal_parameter; any other decapsulation failure is internal.
        check_share_length(f"{self._name} ciphertext", server_share, self._ciphertext_length)
        return self._decapsulator.decapsulate(server_share)

    def __repr__(self) -> str:
        return f"<KemClient {self._name}>"


class HybridGroup:
    """Two groups run side by side; shares and secrets are concatenated in
    component order. The only length check needed is the total: once it
    holds, every slice handed to a component has that component's length."""

    __slots__ = (
        "_group",
        "_first",
        "_second",
        "_backend",
        "_client_split",
        "_server_split",
        "_client_length",
        "_server_length",
        "_name",
    )

    def __init__(self, group: int, components: tuple[KxGroup, KxGroup]) -> None:
        self._group = group
        self._first, self._second = components
        self._name = group_name(group)
        backends = dict.fromkeys((self._first.backend, self._second.backend))
        self._backend = "+".join(backends)
        self._client_split = self._first.client_share_length
        self._server_split = self._first.server_share_length
        self._client_length = self._client_split + self._second.client_share_length
        self._server_length = self._server_split + self._second.server_share_length

    @property
    def group(self) -> int:
        return self._group

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def components(self) -> tuple[KxGroup, KxGroup]:
        return (self._first, self._second)

    @property
    def client_share_length(self) -> int:
        return self._client_length

    @property
    def server_share_length(self) -> int:
        return self._server_length

    def server_exchange(self, client_share: bytes) -> tuple[bytes, SharedSecret]:
        check_share_length(f"{self._name} client share", client_share, self._client_length)
        split = self._client_split
        share1, secret1 = self._first.server_exchange(client_share[:split])
        share2, secret2 = self._second.server_exchange(client_share[split:])
        return share1 + share2, SharedSecret(secret1 + secret2)

    def start(self) -> ClientKeyExchange:
        return _HybridClient(
            self._name,
            self._first.start(),
            self._second.start(),
            self._server_split,
            self._server_length,
        )

    def __repr__(self) -> str:
        return f"<HybridGroup {self._name} backend={self._backend}>"


class _HybridClient:
    __slots__ = ("_name", "_first", "_second", "_split", "_server_length", "_share")

    def __init__(
        self,
        name: str,
        first: ClientKeyExchange,
        second: ClientKeyExchange,
        split: int,
        server_length: int,
    ) -> None:
        self._name = name
        self._first = first
        self._second = second
        self._split = split
        self._server_length = server_length
        self._share = first.share + second.share

    @property
    def share(self) -> bytes:
        return self._share

    def complete(self, server_share: bytes) -> SharedSecret:
        check_share_length(f"{self._name} server share", server_share, self._server_length)
        split = self._split
        secret1 = self._first.complete(server_share[:split])
        secret2 = self._second.complete(server_share[split:])
        return SharedSecret(secret1 + secret2)

    def __repr__(self) -> str:
        return f"<HybridClient {self._name}>"


def compose_groups(kems: Mapping[str, Kem], classical: Mapping[str, KxGroup]) -> dict[int, KxGroup]:
    """Every group the given primitives allow: each hybrid of
    ``HYBRID_LAYOUTS`` whose two components are present, then the classical
    groups. ``kems`` is keyed by KEM name ("ML-KEM-768"), ``classical`` by
    NamedGroup name ("x25519"). Hybrids come first, in ``HYBRID_LAYOUTS``
    order, so a caller that reads the mapping as a preference list prefers
    post-quantum protection."""
    components: dict[str, KxGroup] = dict(classical)
    for name, kem in kems.items():
        components[name] = KemGroup(kem, MLKEM_GROUPS.get(name, 0))
    groups: dict[int, KxGroup] = {}
    for code, (first, second) in HYBRID_LAYOUTS.items():
        a, b = components.get(first), components.get(second)
        if a is not None and b is not None:
            groups[code] = HybridGroup(code, (a, b))
    for group in classical.values():
        groups[group.group] = group
    return groups
