"""Where each listener's session-ticket keys come from.

Rules this module keeps:

- One master secret per ``tickets.key_file``, and one generated secret for the listeners
  without a file. ``TicketMasters.start`` makes them once, in the process that forks the
  workers and before it forks: every worker inherits the same bytes, so a ticket issued by
  one worker opens on every other (the kernel spreads a client's connections over them).
- A reload keeps every secret whose ``key_file`` is unchanged, and the generated one always:
  reloading never makes the tickets already handed out useless. A ``key_file`` that is new
  in the configuration is read (or created) then. The parent applies the same rule to the
  configuration it keeps, so a worker it restarts later holds the same secrets as the rest.
- Each listener's keys derive from the master secret, its name and its client-auth settings
  (mode and CA bundle). A ticket therefore resumes only on the listener that issued it and
  only while that listener trusts the same client CAs: a ticket from a listener without
  client certificates cannot open a session on one that requires them, and replacing the CA
  bundle retires the sessions of clients the old one admitted.
- No secret is ever logged or shown by a repr.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..config import ClientAuthConfig, Config, ListenerConfig
from ..crypto.tickets import MASTER_SECRET_LENGTH, RotatingTicketKeys, load_or_create_master_secret

_LISTENER_INFO = b"pqproxy listener ticket secret"


class TicketKeyError(ValueError):
    """A ticket key file cannot be used; the message names the file and what is wrong."""


class TicketMasters:
    """The master secrets of one process: the generated one and one per key file."""

    __slots__ = ("_generated", "_files")

    def __init__(self, generated: bytes, files: Mapping[Path, bytes]) -> None:
        self._generated = generated
        self._files = dict(files)

    def __repr__(self) -> str:
        return f"<TicketMasters files={sorted(str(p) for p in self._files)}>"

    @classmethod
    def start(cls, config: Config) -> TicketMasters:
        """Fresh: a generated secret, and every key file the configuration names read (or
        created). Raises TicketKeyError."""
        return cls(load_or_create_master_secret(None), {}).for_config(config)

    def for_config(self, config: Config) -> TicketMasters:
        """The secrets for ``config``: these kept, files new to it read (TicketKeyError)."""
        files: dict[Path, bytes] = {}
        for listener in config.listeners:
            tickets = listener.tls.tickets
            path = tickets.key_file
            if not tickets.enabled or path is None or path in files:
                continue
            kept = self._files.get(path)
            if kept is None:
                try:
                    kept = load_or_create_master_secret(path)
                except ValueError as exc:
                    raise TicketKeyError(f"listener {listener.name}: {exc}") from None
            files[path] = kept
        return TicketMasters(self._generated, files)

    def master(self, key_file: Path | None) -> bytes:
        if key_file is None:
            return self._generated
        return self._files[key_file]


def client_auth_fingerprint(client_auth: ClientAuthConfig, ca_pem: bytes | None) -> bytes:
    """What a ticket's validity depends on besides the listener's name."""
    digest = hashlib.sha256(client_auth.mode.value.encode("ascii") + b"\0")
    if ca_pem is not None:
        digest.update(hashlib.sha256(ca_pem).digest())
    return digest.digest()


def listener_ticket_keys(
    masters: TicketMasters, listener: ListenerConfig, ca_pem: bytes | None
) -> RotatingTicketKeys | None:
    """The listener's ticket protector, or None when it issues no tickets."""
    tickets = listener.tls.tickets
    if not tickets.enabled or tickets.per_handshake == 0:
        return None
    name = listener.name.encode("utf-8")
    context = (
        len(name).to_bytes(2, "big")
        + name
        + client_auth_fingerprint(listener.tls.client_auth, ca_pem)
    )
    secret = HKDF(
        algorithm=hashes.SHA256(),
        length=MASTER_SECRET_LENGTH,
        salt=None,
        info=_LISTENER_INFO + context,
    ).derive(masters.master(tickets.key_file))
    return RotatingTicketKeys(secret, rotation=tickets.rotation, keep=tickets.keys_kept)


__all__ = [
    "TicketKeyError",
    "TicketMasters",
    "client_auth_fingerprint",
    "listener_ticket_keys",
]
