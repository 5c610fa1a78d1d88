"""Crypto backends, one module per library.

Each module exposes the same functions: ``is_available()``,
``unavailable_reason()``, ``capabilities()``, ``self_test()`` and
``create_provider()``. A backend imports its library itself, so importing this
package costs nothing and never fails because some library is missing.
"""

from __future__ import annotations

# Backend names accepted in the configuration, mapped to their modules. The
# modules are imported on demand by whoever picks a backend.
BACKEND_MODULES: dict[str, str] = {
    "openssl": "pqproxy.crypto.backends.openssl",
    "liboqs": "pqproxy.crypto.backends.liboqs",
    "pkcs11": "pqproxy.crypto.backends.pkcs11",
}
