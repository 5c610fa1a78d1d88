"""RotatingTicketKeys and the master secret it is derived from."""

from __future__ import annotations

import math
import multiprocessing
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqproxy.crypto.provider import TicketProtector
from pqproxy.crypto.tickets import (
    KEY_ID_LENGTH,
    MASTER_SECRET_LENGTH,
    MIN_TICKET_LENGTH,
    NONCE_LENGTH,
    TAG_LENGTH,
    TICKET_VERSION,
    RotatingTicketKeys,
    load_or_create_master_secret,
)

MASTER = bytes(range(32))
OTHER_MASTER = bytes(range(1, 33))
ROTATION = 3600.0
T0 = 1_800_000_000.0  # an exact multiple of ROTATION: the first second of an epoch
STATE = b"session state: suite, psk, lifetime, identity" * 3


def test_round_trip_and_layout() -> None:
    keys = RotatingTicketKeys(MASTER, rotation=ROTATION)
    checked: TicketProtector = keys  # mypy checks the structural match
    ticket = checked.seal(STATE, T0)
    assert len(ticket) == 1 + KEY_ID_LENGTH + NONCE_LENGTH + len(STATE) + TAG_LENGTH
    assert ticket[0] == TICKET_VERSION
    assert STATE not in ticket
    assert keys.open(ticket, T0) == STATE
    assert keys.open(keys.seal(b"", T0), T0) == b""


def test_each_ticket_has_its_own_nonce() -> None:
    keys = RotatingTicketKeys(MASTER)
    tickets = {keys.seal(STATE, T0) for _ in range(50)}
    assert len(tickets) == 50
    assert len({t[1 + KEY_ID_LENGTH : 1 + KEY_ID_LENGTH + NONCE_LENGTH] for t in tickets}) == 50


def test_another_master_secret_cannot_open() -> None:
    ticket = RotatingTicketKeys(MASTER).seal(STATE, T0)
    assert RotatingTicketKeys(OTHER_MASTER).open(ticket, T0) is None


def test_workers_with_the_same_master_open_each_others_tickets() -> None:
    # Two worker processes (or hosts) derive the same keys without talking to each other.
    worker_a = RotatingTicketKeys(MASTER, rotation=ROTATION)
    worker_b = RotatingTicketKeys(bytes(MASTER), rotation=ROTATION)
    from_a = worker_a.seal(STATE, T0 + 10)
    from_b = worker_b.seal(STATE, T0 + 20)
    assert worker_b.open(from_a, T0 + 30) == STATE
    assert worker_a.open(from_b, T0 + 30) == STATE
    # Also when B first meets the epoch in open() and A sealed in a later second of it.
    worker_c = RotatingTicketKeys(MASTER, rotation=ROTATION)
    assert worker_c.open(worker_a.seal(STATE, T0 + ROTATION - 1), T0 + ROTATION + 5) == STATE


def test_every_tampered_byte_is_refused() -> None:
    keys = RotatingTicketKeys(MASTER)
    ticket = keys.seal(STATE, T0)
    for index in range(len(ticket)):
        for flip in (0x01, 0x80):
            damaged = bytearray(ticket)
            damaged[index] ^= flip
            assert keys.open(bytes(damaged), T0) is None, f"byte {index} ^ {flip:#x}"


def test_truncated_and_extended_tickets_are_refused() -> None:
    keys = RotatingTicketKeys(MASTER)
    ticket = keys.seal(STATE, T0)
    for length in range(len(ticket)):
        assert keys.open(ticket[:length], T0) is None
    assert keys.open(ticket + b"\x00", T0) is None
    assert keys.open(b"", T0) is None


@pytest.mark.parametrize("keep", [0, 1, 2, 5])
def test_rotation_window(keep: int) -> None:
    keys = RotatingTicketKeys(MASTER, rotation=ROTATION, keep=keep)
    sealed_at = T0 + ROTATION / 2
    ticket = keys.seal(STATE, sealed_at)
    # Opens in its own epoch and the `keep` after it, to the last second ...
    for epochs_later in range(keep + 1):
        assert keys.open(ticket, T0 + epochs_later * ROTATION) == STATE
        assert keys.open(ticket, T0 + (epochs_later + 1) * ROTATION - 0.001) == STATE
    # ... and not from the first second of the next one, nor ever after.
    for epochs_later in (keep + 1, keep + 2, keep + 100):
        assert keys.open(ticket, T0 + epochs_later * ROTATION) is None


def test_rotated_out_on_a_fresh_instance_too() -> None:
    # A worker started later has never cached the old key: the window is the same.
    ticket = RotatingTicketKeys(MASTER, keep=2).seal(STATE, T0)
    late = RotatingTicketKeys(MASTER, keep=2)
    assert late.open(ticket, T0 + 3 * 3600) is None
    assert late.open(ticket, T0 + 2 * 3600) == STATE


def test_a_ticket_from_a_later_epoch_is_refused() -> None:
    # Sealed by a host whose clock is ahead, across an epoch boundary: the ticket does not
    # resume (a full handshake follows), it is never an error.
    keys = RotatingTicketKeys(MASTER)
    ticket = keys.seal(STATE, T0 + 3600)
    assert keys.open(ticket, T0 + 3599) is None


def test_key_ids_do_not_reveal_the_epoch() -> None:
    keys = RotatingTicketKeys(MASTER)
    ids = {keys.seal(STATE, T0 + e * 3600)[1 : 1 + KEY_ID_LENGTH] for e in range(24)}
    assert len(ids) == 24  # a new id every epoch
    epoch = int(T0 // 3600)
    for n in range(epoch - 24, epoch + 24):
        for width in (4, 8):
            raw = n.to_bytes(width, "big")
            assert all(raw[-KEY_ID_LENGTH:] != i for i in ids)
    other = RotatingTicketKeys(OTHER_MASTER).seal(STATE, T0)[1 : 1 + KEY_ID_LENGTH]
    assert other != keys.seal(STATE, T0)[1 : 1 + KEY_ID_LENGTH]


def test_cache_stays_bounded() -> None:
    keys = RotatingTicketKeys(MASTER, keep=2)
    for epoch in range(200):
        keys.open(keys.seal(STATE, T0 + epoch * 3600), T0 + epoch * 3600)
    assert len(keys._keys) <= 3


def test_repr_shows_no_secret() -> None:
    keys = RotatingTicketKeys(MASTER, rotation=600, keep=3)
    keys.seal(STATE, T0)
    text = repr(keys) + str(keys) + repr(keys._keys)
    assert text.startswith("<RotatingTicketKeys rotation=600s keep=3>")
    for needle in (MASTER.hex(), repr(MASTER)[2:-1], MASTER.hex()[:16]):
        assert needle not in text


@pytest.mark.parametrize(
    ("master", "rotation", "keep", "message"),
    [
        (b"\x01" * 31, 3600.0, 2, "at least 32"),
        (MASTER, 0.0, 2, "positive"),
        (MASTER, -1.0, 2, "positive"),
        (MASTER, math.nan, 2, "positive"),
        (MASTER, math.inf, 2, "positive"),
        (MASTER, 3600.0, -1, "non-negative"),
    ],
)
def test_bad_parameters(master: bytes, rotation: float, keep: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RotatingTicketKeys(master, rotation=rotation, keep=keep)


def test_bad_time() -> None:
    keys = RotatingTicketKeys(MASTER)
    ticket = keys.seal(STATE, T0)
    with pytest.raises(ValueError, match="finite"):
        keys.seal(STATE, math.nan)
    for now in (math.nan, math.inf, -math.inf):
        assert keys.open(ticket, now) is None


@settings(max_examples=500, deadline=None)
@given(
    ticket=st.binary(max_size=200),
    now=st.floats(allow_nan=True, allow_infinity=True) | st.just(T0),
)
def test_random_bytes_never_raise(ticket: bytes, now: float) -> None:
    keys = RotatingTicketKeys(MASTER)
    assert keys.open(ticket, now) is None


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_forgeries_with_a_valid_header_never_open(data: st.DataObject) -> None:
    keys = RotatingTicketKeys(MASTER)
    header = keys.seal(b"", T0)[: 1 + KEY_ID_LENGTH]  # the right version and key id
    body = data.draw(st.binary(min_size=MIN_TICKET_LENGTH - len(header), max_size=200))
    assert keys.open(header + body, T0) is None


# --- the master secret -----------------------------------------------------------------------


def test_in_memory_master_secret() -> None:
    first, second = load_or_create_master_secret(None), load_or_create_master_secret(None)
    assert len(first) == MASTER_SECRET_LENGTH and first != second


def test_created_then_loaded(tmp_path: Path) -> None:
    path = tmp_path / "ticket.key"
    created = load_or_create_master_secret(path)
    assert len(created) == MASTER_SECRET_LENGTH
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == created
    assert load_or_create_master_secret(path) == created
    assert [p.name for p in tmp_path.iterdir()] == ["ticket.key"]  # no temporary left over
    # Tickets survive a restart: a new instance from the file opens the old tickets.
    ticket = RotatingTicketKeys(created).seal(STATE, T0)
    assert RotatingTicketKeys(load_or_create_master_secret(path)).open(ticket, T0) == STATE


def test_created_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        load_or_create_master_secret(tmp_path / "ticket.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ticket.key").stat().st_mode) == 0o600


def test_existing_file_is_used_as_is(tmp_path: Path) -> None:
    path = tmp_path / "ticket.key"
    secret = os.urandom(64)
    path.write_bytes(secret)
    path.chmod(0o400)
    assert load_or_create_master_secret(path) == secret
    link = tmp_path / "link.key"
    link.symlink_to(path)  # as a Kubernetes secret mount presents it
    assert load_or_create_master_secret(link) == secret


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "ticket.key"
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    with pytest.raises(ValueError, match=f"{path}: mode 0{mode:o}.*chmod 600"):
        load_or_create_master_secret(path)


def test_short_and_oversized_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ticket.key"
    path.write_bytes(b"\x00" * 31)
    path.chmod(0o600)
    with pytest.raises(ValueError, match="31 bytes; at least 32"):
        load_or_create_master_secret(path)
    path.write_bytes(b"-----BEGIN CERTIFICATE-----" * 200)
    with pytest.raises(ValueError, match="right file"):
        load_or_create_master_secret(path)


def test_unusable_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot create"):
        load_or_create_master_secret(tmp_path / "missing-dir" / "ticket.key")
    directory = tmp_path / "a-directory"
    directory.mkdir(mode=0o700)
    with pytest.raises(ValueError, match="not a regular file"):
        load_or_create_master_secret(directory)


def test_workers_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    # Every worker calls load_or_create at start-up; exactly one creation may win, and all
    # must end up with the secret that is in the file.
    path = tmp_path / "ticket.key"
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=6, mp_context=context) as pool:
        secrets = list(pool.map(load_or_create_master_secret, [path] * 24))
    assert set(secrets) == {path.read_bytes()}
    assert [p.name for p in tmp_path.iterdir()] == ["ticket.key"]
