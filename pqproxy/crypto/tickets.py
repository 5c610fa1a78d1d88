"""Session tickets sealed under rotating keys that every worker derives alike.

Time is cut into epochs of ``rotation`` seconds; epoch e's key is
HKDF-SHA256(master_secret, info = "pqproxy ticket key" ‖ e as 8 signed big-endian bytes).
The derivation is deterministic, so every worker process, and every host given the same
master secret file, holds the same keys without talking to the others, and a ticket issued
by one opens on all.

A ticket is

    version (1) ‖ key id (4) ‖ nonce (12) ‖ AES-256-GCM(state) with its 16-byte tag

with the version byte and key id as associated data. The key id is derived from the epoch
under the master secret (not the epoch itself): the ticket travels in the clear in the
next ClientHello (RFC 8446 §4.2.11), and a bare epoch would tell an observer when the
session began. Nonces are random (os.urandom): AES-GCM stays within its bounds up to 2^32
tickets per key (NIST SP 800-38D §8.3), and every worker on every host shares the key, but
that is still over a million tickets a second for an hour.

``open`` accepts the current epoch and the ``keep`` before it; anything else - forged,
damaged, truncated, from another master secret, rotated out, or from an epoch ahead of this
host's clock - is None, never an exception. The engine checks a ticket's lifetime itself.
"""

from __future__ import annotations

import hmac
import math
import os
import stat
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TICKET_VERSION: Final = 1
KEY_ID_LENGTH: Final = 4
NONCE_LENGTH: Final = 12
TAG_LENGTH: Final = 16
_HEADER_LENGTH: Final = 1 + KEY_ID_LENGTH
# The smallest ticket that can be genuine: header, nonce and the tag of an empty state.
MIN_TICKET_LENGTH: Final = _HEADER_LENGTH + NONCE_LENGTH + TAG_LENGTH

MASTER_SECRET_LENGTH: Final = 32  # 256 bits: the AES-256 keys cannot be stronger than this
# A master secret file larger than this is almost certainly the wrong file (a certificate,
# a log) rather than a secret someone chose to make long.
MAX_MASTER_SECRET_FILE: Final = 4096

_KEY_INFO: Final = b"pqproxy ticket key"
_KEY_ID_INFO: Final = b"pqproxy ticket key id"


def _epoch_bytes(epoch: int) -> bytes:
    # Signed: a clock before 1970 is a broken clock, but still a well-defined epoch.
    return epoch.to_bytes(8, "big", signed=True)


class _EpochKey:
    __slots__ = ("key_id", "aead")

    def __init__(self, key_id: bytes, aead: AESGCM) -> None:
        self.key_id = key_id
        self.aead = aead

    def __repr__(self) -> str:
        return "<_EpochKey>"


class RotatingTicketKeys:
    """Implements provider.TicketProtector with keys that rotate every ``rotation`` seconds;
    tickets stay openable for ``keep`` further epochs."""

    __slots__ = ("_master", "_rotation", "_keep", "_keys")

    def __init__(self, master_secret: bytes, *, rotation: float = 3600.0, keep: int = 2) -> None:
        if len(master_secret) < MASTER_SECRET_LENGTH:
            raise ValueError(
                f"ticket master secret is {len(master_secret)} bytes; "
                f"at least {MASTER_SECRET_LENGTH} required"
            )
        if not math.isfinite(rotation) or rotation <= 0:
            raise ValueError(
                f"ticket key rotation must be a positive number of seconds, not {rotation!r}"
            )
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError(f"keep must be a non-negative integer, not {keep!r}")
        self._master = bytes(master_secret)
        self._rotation = float(rotation)
        self._keep = keep
        # epoch → derived key; pruned to the open window, so it never holds more than
        # keep + 1 entries (plus the one being added).
        self._keys: dict[int, _EpochKey] = {}

    @property
    def rotation(self) -> float:
        return self._rotation

    @property
    def keep(self) -> int:
        return self._keep

    def __repr__(self) -> str:
        return f"<RotatingTicketKeys rotation={self._rotation:g}s keep={self._keep}>"

    def _epoch(self, now: float) -> int | None:
        if not math.isfinite(now):
            return None
        return math.floor(now / self._rotation)

    def _key(self, epoch: int, current: int) -> _EpochKey:
        key = self._keys.get(epoch)
        if key is None:
            key = _EpochKey(
                self._derive(_KEY_ID_INFO, epoch, KEY_ID_LENGTH),
                AESGCM(self._derive(_KEY_INFO, epoch, 32)),
            )
            # Drop keys that have left the window (rotated out, or left behind by a clock
            # that jumped); only epochs inside it are ever derived, so a forged key id
            # cannot make us derive (or cache) anything.
            # (A snapshot and pop(): harmless if another thread prunes at the same time.)
            for old in [e for e in list(self._keys) if not current - self._keep <= e <= current]:
                self._keys.pop(old, None)
            self._keys[epoch] = key
        return key

    def _derive(self, info: bytes, epoch: int, length: int) -> bytes:
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=length, salt=None, info=info + _epoch_bytes(epoch)
        )
        return hkdf.derive(self._master)

    def seal(self, plaintext: bytes, now: float) -> bytes:
        epoch = self._epoch(now)
        if epoch is None:
            raise ValueError(f"now must be a finite Unix time, got {now!r}")
        key = self._key(epoch, epoch)
        header = bytes((TICKET_VERSION,)) + key.key_id
        nonce = os.urandom(NONCE_LENGTH)
        return header + nonce + key.aead.encrypt(nonce, plaintext, header)

    def open(self, ticket: bytes, now: float) -> bytes | None:
        current = self._epoch(now)
        if current is None or len(ticket) < MIN_TICKET_LENGTH or ticket[0] != TICKET_VERSION:
            return None
        header = bytes(ticket[:_HEADER_LENGTH])
        key_id = header[1:]
        nonce = bytes(ticket[_HEADER_LENGTH : _HEADER_LENGTH + NONCE_LENGTH])
        sealed = bytes(ticket[_HEADER_LENGTH + NONCE_LENGTH :])
        for epoch in range(current, current - self._keep - 1, -1):
            key = self._key(epoch, current)
            if not hmac.compare_digest(key.key_id, key_id):
                continue
            try:
                return key.aead.decrypt(nonce, sealed, header)
            except InvalidTag:
                # Two epochs' ids may collide (2^-32); try the others before giving up.
                continue
        return None


def _read_master_secret(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise  # the caller creates it
    except OSError as exc:
        raise ValueError(
            f"ticket master secret {path}: cannot open: {exc.strerror or exc}"
        ) from None
    try:
        # The file actually opened (a symlink, as a Kubernetes secret mount is, resolved).
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"ticket master secret {path}: not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise ValueError(
                f"ticket master secret {path}: mode {mode:04o} is open to group or others; "
                f"it must be 0600 (chmod 600 {path})"
            )
        data = b""
        while len(data) <= MAX_MASTER_SECRET_FILE:
            chunk = os.read(fd, MAX_MASTER_SECRET_FILE + 1 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) < MASTER_SECRET_LENGTH:
        raise ValueError(
            f"ticket master secret {path}: {len(data)} bytes; at least {MASTER_SECRET_LENGTH} "
            "required"
        )
    if len(data) > MAX_MASTER_SECRET_FILE:
        raise ValueError(
            f"ticket master secret {path}: larger than {MAX_MASTER_SECRET_FILE} bytes; "
            "is this the right file?"
        )
    return data


def _create_master_secret(path: Path) -> None:
    # Written whole under a temporary name, then linked into place: link() fails if the
    # name exists, so when several workers start at once exactly one secret wins and no
    # one ever reads a half-written file. (rename() would silently replace a secret that
    # another worker has already loaded.)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ValueError(
            f"ticket master secret {path}: cannot create: {exc.strerror or exc}"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(os.urandom(MASTER_SECRET_LENGTH))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another worker created it first: use theirs
        except OSError as exc:
            raise ValueError(
                f"ticket master secret {path}: cannot create: {exc.strerror or exc}"
            ) from None
    finally:
        temporary.unlink(missing_ok=True)


def load_or_create_master_secret(path: Path | None) -> bytes:
    """The master secret for RotatingTicketKeys.

    None: 32 fresh random bytes, kept in memory only - tickets then open only in this
    process, and not after a restart. A path: the file's bytes (at least 32, readable by
    its owner only); a missing file is created with 32 random bytes and mode 0600. Every
    problem is a ValueError naming the file.
    """
    if path is None:
        return os.urandom(MASTER_SECRET_LENGTH)
    path = Path(path)
    try:
        return _read_master_secret(path)
    except FileNotFoundError:
        pass
    _create_master_secret(path)
    try:
        return _read_master_secret(path)
    except FileNotFoundError:
        raise ValueError(f"ticket master secret {path}: vanished right after creation") from None
