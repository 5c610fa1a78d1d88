"""Timing at the provider seam: a provider whose groups report every backend call.

``TimedProvider(provider, observe)`` hands the engine the same groups, each wrapped so that
``server_exchange`` (and the client's keygen and completion) call
``observe(backend, op, result, seconds)`` once. The backends stay untouched, and the time is
that of the call itself, wherever an offload layer runs it (inline, on a pool); queueing in
front of it is the handshake's business (``pqproxy_tls_key_exchange_seconds``).

Every group is seen as a KEM, as the hybrid design does (draft-ietf-tls-hybrid-design): the
server's side of a key exchange is an encapsulation, the client's a keygen then a
decapsulation.

No prometheus here: ``observe`` is whatever the I/O layer passes (crypto/ never counts).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import MappingProxyType

from .provider import ClientKeyExchange, CryptoProvider, InvalidKeyShare, KxGroup, SharedSecret

# (backend, op, result, seconds); op is "encapsulate", "keygen" or "decapsulate", result "ok",
# "invalid_share" (the peer's fault) or "error" (the backend's).
Observer = Callable[[str, str, str, float], None]

ENCAPSULATE = "encapsulate"
KEYGEN = "keygen"
DECAPSULATE = "decapsulate"


def _result(error: BaseException) -> str:
    return "invalid_share" if isinstance(error, InvalidKeyShare) else "error"


class TimedKxGroup:
    """A ``KxGroup`` that reports the time and result of each call to ``observe``."""

    __slots__ = ("_inner", "_observe", "_backend")

    def __init__(self, inner: KxGroup, observe: Observer) -> None:
        self._inner = inner
        self._observe = observe
        # Read once: a backend name is fixed, and this is the hot path.
        self._backend = inner.backend

    @property
    def inner(self) -> KxGroup:
        """The wrapped group (an offload layer may want the backend's own object)."""
        return self._inner

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
        started = time.perf_counter()
        try:
            result = self._inner.server_exchange(client_share)
        except Exception as exc:
            self._observe(self._backend, ENCAPSULATE, _result(exc), time.perf_counter() - started)
            raise
        self._observe(self._backend, ENCAPSULATE, "ok", time.perf_counter() - started)
        return result

    def start(self) -> ClientKeyExchange:
        started = time.perf_counter()
        try:
            client = self._inner.start()
        except Exception as exc:
            self._observe(self._backend, KEYGEN, _result(exc), time.perf_counter() - started)
            raise
        self._observe(self._backend, KEYGEN, "ok", time.perf_counter() - started)
        return _TimedClient(client, self._backend, self._observe)

    def __repr__(self) -> str:
        return f"<TimedKxGroup {self._inner!r}>"


class _TimedClient:
    __slots__ = ("_inner", "_backend", "_observe")

    def __init__(self, inner: ClientKeyExchange, backend: str, observe: Observer) -> None:
        self._inner = inner
        self._backend = backend
        self._observe = observe

    @property
    def share(self) -> bytes:
        return self._inner.share

    def complete(self, server_share: bytes) -> SharedSecret:
        started = time.perf_counter()
        try:
            secret = self._inner.complete(server_share)
        except Exception as exc:
            self._observe(self._backend, DECAPSULATE, _result(exc), time.perf_counter() - started)
            raise
        self._observe(self._backend, DECAPSULATE, "ok", time.perf_counter() - started)
        return secret

    def __repr__(self) -> str:
        return f"<TimedClient {self._inner!r}>"


class TimedProvider:
    """``provider`` with every group wrapped in a ``TimedKxGroup``."""

    __slots__ = ("_inner", "_groups")

    def __init__(self, inner: CryptoProvider, observe: Observer) -> None:
        self._inner = inner
        self._groups: Mapping[int, KxGroup] = MappingProxyType(
            {code: TimedKxGroup(group, observe) for code, group in inner.groups.items()}
        )

    @property
    def inner(self) -> CryptoProvider:
        return self._inner

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def groups(self) -> Mapping[int, KxGroup]:
        return self._groups

    def __repr__(self) -> str:
        return f"<TimedProvider {self._inner!r}>"


__all__ = ["Observer", "TimedKxGroup", "TimedProvider"]
