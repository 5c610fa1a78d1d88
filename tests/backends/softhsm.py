"""SoftHSM2 as a real PKCS#11 token for the tests, set up from nothing in a temporary directory.

``softhsm_token(directory)`` writes a SoftHSM2 configuration whose token store is inside
``directory``, points ``SOFTHSM2_CONF`` at it, initialises a token with ``softhsm2-util
--init-token`` and, on exit, unloads the module and restores the environment, so nothing
outside the directory is read or written. Keys go in the way an operator would put them
there: generated inside the token (PKCS#11 ``C_GenerateKeyPair``) or imported from a PKCS#8
file with ``softhsm2-util --import``.

SoftHSM2 comes from `make peers` (Debian package softhsm2); a missing one is a failure, not a
skip, like every other independent peer (see tests/conftest.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from pqproxy.crypto.backends.pkcs11 import Pkcs11Config, unload_module

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)
TOKEN_LABEL = "pqproxy-test"
# Test-only secrets for a throwaway token.
USER_PIN = "4711-pqproxy"
SO_PIN = "0815-pqproxy-so"

# CKA_EC_PARAMS for the curves the tests use (DER named-curve OIDs, RFC 5480).
_EC_PARAMS = {
    "secp256r1": (bytes.fromhex("06082a8648ce3d030107"), ec.SECP256R1()),
    "secp384r1": (bytes.fromhex("06052b81040022"), ec.SECP384R1()),
}


def find_module() -> str:
    for candidate in MODULE_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    pytest.fail(
        f"SoftHSM2 PKCS#11 module missing (looked in {', '.join(MODULE_CANDIDATES)}): "
        "run `make peers`",
        pytrace=False,
    )


def find_util() -> str:
    found = shutil.which("softhsm2-util")
    if found is None:
        pytest.fail(
            "softhsm2-util missing (Debian package softhsm2): run `make peers`", pytrace=False
        )
    return found


@dataclass(frozen=True)
class KeyFacts:
    """What the token says about a private key object: how it got there and whether it
    could ever leave."""

    local: bool  # CKA_LOCAL: generated inside the token
    sensitive: bool
    extractable: bool
    never_extractable: bool


@dataclass(frozen=True)
class SoftHsmToken:
    directory: Path
    conf: Path
    module: str
    util: str
    label: str
    pin: str
    pin_file: Path

    def config(
        self,
        operations: frozenset[str] = frozenset(),
        key_label: str | None = None,
        pin: str | None = None,
    ) -> Pkcs11Config:
        return Pkcs11Config(
            module=self.module,
            token_label=self.label,
            pin=self.pin if pin is None else pin,
            key_label=key_label,
            operations=operations,
        )

    def uri(self, key_label: str) -> str:
        return f"pkcs11:token={self.label};object={key_label};type=private"

    def _session(self) -> Any:
        import pkcs11

        token = pkcs11.lib(self.module).get_token(token_label=self.label)
        return token.open(rw=True, user_pin=self.pin)

    def generate_ec_key(self, key_label: str, key_id: bytes, curve: str) -> PublicKeyTypes:
        """An EC key pair generated inside the token (token objects, the private half
        sensitive and never extractable); returns its public key as the token shows it.

        Must run while pqproxy holds no session on this token: PKCS#11 login state is
        per application, so a second login would fail."""
        import pkcs11
        from pkcs11 import Attribute

        params, curve_obj = _EC_PARAMS[curve]
        session = self._session()
        try:
            public, _private = session.generate_keypair(
                pkcs11.KeyType.EC,
                store=True,
                label=key_label,
                id=key_id,
                public_template={Attribute.EC_PARAMS: params},
                private_template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                    Attribute.DERIVE: False,
                },
            )
            point = bytes(public[Attribute.EC_POINT])
        finally:
            session.close()
        # CKA_EC_POINT is a DER OCTET STRING around the point (short form for P-256/P-384).
        assert point[0] == 0x04 and point[1] == len(point) - 2, point[:4].hex()
        return ec.EllipticCurvePublicKey.from_encoded_point(curve_obj, point[2:])

    def import_key(
        self, key: PrivateKeyTypes, key_label: str, key_id: bytes, with_public_key: bool = True
    ) -> None:
        """Import a private key with ``softhsm2-util --import`` from a PKCS#8 file that is
        deleted again once the token has it."""
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = self.directory / f"{key_label}.pk8"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        command = [
            self.util,
            "--import",
            str(path),
            "--token",
            self.label,
            "--label",
            key_label,
            "--id",
            key_id.hex(),
            "--pin",
            self.pin,
        ]
        if not with_public_key:
            command.append("--no-public-key")
        try:
            self._run(command)
        finally:
            path.unlink()

    def key_facts(self, key_label: str) -> KeyFacts:
        import pkcs11
        from pkcs11 import Attribute

        session = self._session()
        try:
            key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=key_label)
            return KeyFacts(
                local=bool(key[Attribute.LOCAL]),
                sensitive=bool(key[Attribute.SENSITIVE]),
                extractable=bool(key[Attribute.EXTRACTABLE]),
                never_extractable=bool(key[Attribute.NEVER_EXTRACTABLE]),
            )
        finally:
            session.close()

    def _run(self, command: list[str]) -> None:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            check=False,
        )
        if result.returncode != 0:
            shown = [c if c != self.pin else "<pin>" for c in command]
            raise RuntimeError(
                f"{' '.join(shown)} failed ({result.returncode}): {result.stdout}{result.stderr}"
            )


@contextmanager
def softhsm_token(directory: Path, label: str = TOKEN_LABEL) -> Iterator[SoftHsmToken]:
    """A freshly initialised SoftHSM2 token whose whole state lives in ``directory``."""
    if importlib.util.find_spec("pkcs11") is None:
        pytest.fail(
            "python-pkcs11 missing: install pqproxy[pkcs11] (the dev install includes it)",
            pytrace=False,
        )
    module = find_module()
    util = find_util()
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
        "slots.mechanisms = ALL\n"
    )
    pin_file = directory / "user.pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(USER_PIN + "\n")
    hsm = SoftHsmToken(directory, conf, module, util, label, USER_PIN, pin_file)

    previous = os.environ.get("SOFTHSM2_CONF")
    # SoftHSM2 reads SOFTHSM2_CONF in C_Initialize, so a module still loaded with another
    # configuration (an earlier test module's token) is unloaded first.
    unload_module(module)
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        hsm._run(
            [
                util,
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                SO_PIN,
                "--pin",
                USER_PIN,
            ]
        )
        yield hsm
    finally:
        unload_module(module)
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
