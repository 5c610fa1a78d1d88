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
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pqproxy.crypto.backends import BACKEND_MODULES
from pqproxy.crypto.provider import CryptoProvider

BackendLoader = Callable[[str], Any]


def _required(name: str) -> bool:
    if name == "liboqs":
        return importlib.util.find_spec("oqs") is not None
    if name == "pkcs11":
        # python-pkcs11 is in the dev install and SoftHSM2 in `make peers`.
        return importlib.util.find_spec("pkcs11") is not None
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
def backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "pkcs11" and not os.environ.get("PQPROXY_PKCS11_MODULE"):
        # No token configured by the environment: run the suite on a SoftHSM2 token of
        # its own (SoftHSM2 comes with `make peers`), so pkcs11 is tested, not skipped.
        from tests.backends.softhsm import softhsm_token

        directory = request.getfixturevalue("tmp_path_factory").mktemp("softhsm-suite")
        with softhsm_token(directory) as token, pytest.MonkeyPatch.context() as patch:
            patch.setenv("PQPROXY_PKCS11_MODULE", token.module)
            patch.setenv("PQPROXY_PKCS11_TOKEN", token.label)
            patch.setenv("PQPROXY_PKCS11_PIN_FILE", str(token.pin_file))
            module = load_backend(request.param)
            yield module
            closer = getattr(module, "close_providers", None)
            if closer is not None:
                closer()
        return
    yield load_backend(request.param)


@pytest.fixture(scope="module")
def provider(backend: Any) -> CryptoProvider:
    created: CryptoProvider = backend.create_provider()
    return created
