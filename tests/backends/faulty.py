"""A deliberately faulty crypto backend, for fault injection into the offload layer.

It is the openssl backend's groups and signing behind a switch: ``ok`` passes every call
through, ``fail`` raises BackendError, ``stall`` blocks the call until the switch changes
(at most ``STALL_LIMIT``, so a forgotten switch cannot hang a test run). The switch is a
file named by ``PQPROXY_FAULT_SWITCH``, so that the worker processes of process mode, which
build this backend from its module name (``tests.backends.faulty``), obey it too.

It follows the backend module convention (``unavailable_reason``, ``is_available``,
``create_provider``); ``NAME`` is what the offload settings call it.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

from pqproxy.crypto.backends import openssl
from pqproxy.crypto.provider import (
    BackendError,
    ClientKeyExchange,
    KxGroup,
    SharedSecret,
    Signer,
)

NAME: Final = "tests.backends.faulty"
ENV_SWITCH: Final = "PQPROXY_FAULT_SWITCH"
STATES: Final = ("ok", "fail", "stall")
STALL_LIMIT: Final = 30.0
# How often a stalled call looks at the switch again.
STALL_POLL: Final = 0.005


class FaultSwitch:
    """The switch, a one-word file; written atomically so a reader never sees it half-done."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def from_env(cls) -> FaultSwitch:
        value = os.environ.get(ENV_SWITCH)
        if not value:
            raise BackendError(f"faulty backend: {ENV_SWITCH} is not set")
        return cls(Path(value))

    def set(self, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}")
        fd, tmp = tempfile.mkstemp(dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(state)
        os.replace(tmp, self.path)

    def get(self) -> str:
        try:
            return self.path.read_text().strip() or "ok"
        except FileNotFoundError:
            return "ok"

    def obey(self, what: str) -> None:
        """Act out the current state for one call."""
        state = self.get()
        if state == "fail":
            raise BackendError(f"faulty backend: injected failure in {what}")
        if state == "stall":
            deadline = time.monotonic() + STALL_LIMIT
            while self.get() == "stall" and time.monotonic() < deadline:
                time.sleep(STALL_POLL)


class FaultyGroup:
    def __init__(self, inner: KxGroup, switch: FaultSwitch) -> None:
        self._inner = inner
        self._switch = switch

    @property
    def group(self) -> int:
        return self._inner.group

    @property
    def backend(self) -> str:
        return NAME

    @property
    def client_share_length(self) -> int:
        return self._inner.client_share_length

    @property
    def server_share_length(self) -> int:
        return self._inner.server_share_length

    def server_exchange(self, client_share: bytes) -> tuple[bytes, SharedSecret]:
        self._switch.obey("key exchange")
        return self._inner.server_exchange(client_share)

    def start(self) -> ClientKeyExchange:
        return self._inner.start()


class FaultySigner:
    """Wraps a real signer: the key is real, the failures are injected."""

    def __init__(self, inner: Signer, switch: FaultSwitch) -> None:
        self._inner = inner
        self._switch = switch

    @property
    def schemes(self) -> tuple[int, ...]:
        return self._inner.schemes

    @property
    def backend(self) -> str:
        return NAME

    def sign(self, scheme: int, message: bytes) -> bytes:
        self._switch.obey("signature")
        return self._inner.sign(scheme, message)


class FaultyProvider:
    def __init__(self, switch: FaultSwitch) -> None:
        self.switch = switch
        inner = openssl.OpenSSLProvider()
        self._groups: Mapping[int, KxGroup] = MappingProxyType(
            {code: FaultyGroup(group, switch) for code, group in inner.groups.items()}
        )

    @property
    def name(self) -> str:
        return NAME

    @property
    def groups(self) -> Mapping[int, KxGroup]:
        return self._groups


def unavailable_reason() -> str | None:
    if not os.environ.get(ENV_SWITCH):
        return f"{ENV_SWITCH} is not set"
    return openssl.unavailable_reason()


def is_available() -> bool:
    return unavailable_reason() is None


def create_provider() -> FaultyProvider:
    return FaultyProvider(FaultSwitch.from_env())
