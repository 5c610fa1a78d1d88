"""Which backends the suite runs against, and how a missing one is reported.

A backend whose library is absent is skipped with its own reason, except where
the environment promises it: liboqs-python is in the dev install and `make test`
builds liboqs first (`make liboqs`), so an installed liboqs-python whose backend
is unavailable means a broken environment, and a skip would hide that the
liboqs half of the suite proved nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import pytest

from pqproxy.crypto.backends import BACKEND_MODULES
from pqproxy.crypto.provider import CryptoProvider

BackendLoader = Callable[[str], Any]


def _required(name: str) -> bool:
    if name == "liboqs":
        return importlib.util.find_spec("oqs") is not None
    return False


def load_backend(name: str) -> Any:
    """The backend's module, or a skip (a failure if required) saying why not."""
    module: Any = importlib.import_module(BACKEND_MODULES[name])
    if not module.is_available():
        reason = f"backend {name} unavailable: {module.unavailable_reason()}"
        if _required(name):
            pytest.fail(f"{reason} (liboqs-python is installed: run `make liboqs`)", pytrace=False)
        pytest.skip(reason)
    return module


@pytest.fixture(scope="session")
def backend_loader() -> BackendLoader:
    return load_backend


@pytest.fixture(params=sorted(BACKEND_MODULES), scope="module")
def backend(request: pytest.FixtureRequest) -> Any:
    return load_backend(request.param)


@pytest.fixture(scope="module")
def provider(backend: Any) -> CryptoProvider:
    created: CryptoProvider = backend.create_provider()
    return created
