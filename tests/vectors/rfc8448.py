"""RFC 8448 ("Example Handshake Traces for TLS 1.3") parsed from its own text.

``rfc8448_simple_1rtt.txt`` beside this file holds sections 2 ("Private Keys") and
3 ("Simple 1-RTT Handshake") of RFC 8448 verbatim, page headers and footers
included (RFC text is public IETF material). Every value a test uses is parsed from
that text; no hex is pasted into Python, and every parsed value must be as long as
the octet count the RFC prints beside it, so a damaged file fails loudly.

``load_simple_1rtt()`` returns ``dict[str, bytes]`` with these keys:

Inputs
    client_x25519_private, client_x25519_public,
    server_x25519_private, server_x25519_public,
    server_rsa_modulus, server_rsa_public_exponent, server_rsa_private_exponent,
    server_rsa_prime1, server_rsa_prime2, server_rsa_exponent1, server_rsa_exponent2,
    server_rsa_coefficient (big-endian integers, for ``RSAPrivateNumbers``)
Handshake messages (each with its 4-byte handshake header)
    client_hello, server_hello, encrypted_extensions, certificate, certificate_verify,
    server_finished, client_finished, new_session_ticket
Randoms (sliced from the hellos)
    client_random, server_random
Key schedule
    early_secret, handshake_derived (Derive-Secret(early, "derived", "")),
    shared_secret (the (EC)DHE input of the handshake secret), handshake_secret,
    hello_hash (Transcript-Hash(ClientHello, ServerHello)), c_hs_traffic, s_hs_traffic,
    master_derived, master_secret,
    server_finished_hash (Transcript-Hash(ClientHello..server Finished)),
    c_ap_traffic, s_ap_traffic, exp_master,
    client_finished_hash (Transcript-Hash(ClientHello..client Finished)), res_master,
    resumption_psk (the "tls13 resumption" output for the ticket)
Finished
    server_finished_key, server_finished_verify_data,
    client_finished_key, client_finished_verify_data
Traffic keys
    server_hs_key, server_hs_iv, client_hs_key, client_hs_iv,
    server_ap_key, server_ap_iv, client_ap_key, client_ap_iv
Records (``*_record`` is the complete record as sent, header included)
    client_hello_record, server_hello_record,
    server_encrypted_flight (EE..Finished, the plaintext), server_encrypted_flight_record,
    client_finished_record, new_session_ticket_record,
    client_app_data_payload, client_app_data_record,
    server_app_data_payload, server_app_data_record,
    client_alert_payload, client_alert_record, server_alert_payload, server_alert_record
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

__all__ = ["Step", "load_simple_1rtt", "parse_trace", "SIMPLE_1RTT_PATH"]

SIMPLE_1RTT_PATH = Path(__file__).with_name("rfc8448_simple_1rtt.txt")

# RFC page furniture, which may fall in the middle of a hex block.
_PAGE_LINE = re.compile(
    r"^(Thomson\s+Informational\s+\[Page \d+\]|RFC 8448\s+TLS 1\.3 Traces\s+.*)$"
)
# "   {server}  derive secret "tls13 c hs traffic":"
_STEP = re.compile(r"^   \{(client|server)\}  (.*?):?$")
# "      expanded (32 octets):  6f 26 ..." and "      hash (0 octets):  (empty)"
_ITEM = re.compile(r"^ {6}(\S.*?) \((\d+) octets\):  (.*)$")
# Section 2: "   prime1:  e4 35 ..." (no octet count)
_KEY_ITEM = re.compile(r"^   ([a-z][a-z0-9 ()]*?):  ((?:[0-9a-f]{2} ?)+)$")
_HEX_LINE = re.compile(r"^ +((?:[0-9a-f]{2} ?)+)$")
_EMPTY = "(empty)"


@dataclass
class Step:
    """One "{party}  title:" step of the trace and its labelled values."""

    party: str
    title: str
    items: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Open:
    label: str
    declared: int | None
    hex_parts: list[str]


def _close(item: _Open | None, into: dict[str, bytes]) -> None:
    if item is None:
        return
    value = bytes.fromhex("".join(item.hex_parts))
    if item.declared is not None and len(value) != item.declared:
        raise ValueError(f"{item.label}: {len(value)} bytes parsed, RFC says {item.declared}")
    if item.label in into:
        raise ValueError(f"{item.label} appears twice in one step")
    into[item.label] = value


def parse_trace(text: str) -> tuple[dict[str, bytes], list[Step]]:
    """(section 2 private key values, section 3 steps in order)."""
    keys: dict[str, bytes] = {}
    steps: list[Step] = []
    target: dict[str, bytes] = keys
    item: _Open | None = None
    for raw in text.splitlines():
        line = raw.rstrip().replace("\f", "")
        if not line or _PAGE_LINE.match(line):
            # A value may run across a blank line or a page break; only a new
            # item or step ends it.
            continue
        if m := _STEP.match(line):
            _close(item, target)
            item = None
            steps.append(Step(m.group(1), m.group(2)))
            target = steps[-1].items
        elif m := _ITEM.match(line):
            _close(item, target)
            value = m.group(3)
            if value == _EMPTY:
                item = _Open(m.group(1), int(m.group(2)), [])
            elif _HEX_LINE.match(" " + value):
                item = _Open(m.group(1), int(m.group(2)), [value])
            else:
                item = None
        elif not steps and (m := _KEY_ITEM.match(line)):
            _close(item, target)
            item = _Open(m.group(1), None, [m.group(2)])
        elif item is not None and (m := _HEX_LINE.match(line)):
            item.hex_parts.append(m.group(1))
        else:
            # Prose, a step title running onto a second line, or "salt:  0 (all
            # zero octets)": none of them carry a value the tests use.
            _close(item, target)
            item = None
    _close(item, target)
    return keys, steps


def _step(steps: list[Step], party: str, title: str, occurrence: int = 0) -> dict[str, bytes]:
    found = [s for s in steps if s.party == party and s.title == title]
    if len(found) <= occurrence:
        raise KeyError(f"{{{party}}} {title!r} #{occurrence} not in the trace")
    return found[occurrence].items


@cache
def _load_simple_1rtt() -> dict[str, bytes]:
    keys, steps = parse_trace(SIMPLE_1RTT_PATH.read_text(encoding="ascii"))

    def s(party: str, title: str, occurrence: int = 0) -> dict[str, bytes]:
        return _step(steps, party, title, occurrence)

    out: dict[str, bytes] = {}
    rsa_names = {
        "modulus (public)": "modulus",
        "public exponent": "public_exponent",
        "private exponent": "private_exponent",
        "prime1": "prime1",
        "prime2": "prime2",
        "exponent1": "exponent1",
        "exponent2": "exponent2",
        "coefficient": "coefficient",
    }
    for label, name in rsa_names.items():
        out[f"server_rsa_{name}"] = keys[label]

    for party in ("client", "server"):
        pair = s(party, "create an ephemeral x25519 key pair")
        out[f"{party}_x25519_private"] = pair["private key"]
        out[f"{party}_x25519_public"] = pair["public key"]

    out["client_hello"] = s("client", "construct a ClientHello handshake message")["ClientHello"]
    ch_record = s("client", "send handshake record", 0)
    out["client_hello_record"] = ch_record["complete record"]
    out["server_hello"] = s("server", "construct a ServerHello handshake message")["ServerHello"]
    out["server_hello_record"] = s("server", "send handshake record", 0)["complete record"]
    # Hello layout: type(1) length(3) legacy_version(2) random(32).
    out["client_random"] = out["client_hello"][6:38]
    out["server_random"] = out["server_hello"][6:38]

    out["early_secret"] = s("server", 'extract secret "early"')["secret"]
    out["handshake_derived"] = s("server", 'derive secret for handshake "tls13 derived"')[
        "expanded"
    ]
    handshake = s("server", 'extract secret "handshake"')
    out["shared_secret"] = handshake["IKM"]
    out["handshake_secret"] = handshake["secret"]
    c_hs = s("server", 'derive secret "tls13 c hs traffic"')
    out["hello_hash"] = c_hs["hash"]
    out["c_hs_traffic"] = c_hs["expanded"]
    out["s_hs_traffic"] = s("server", 'derive secret "tls13 s hs traffic"')["expanded"]
    out["master_derived"] = s("server", 'derive secret for master "tls13 derived"')["expanded"]
    out["master_secret"] = s("server", 'extract secret "master"')["secret"]
    c_ap = s("server", 'derive secret "tls13 c ap traffic"')
    out["server_finished_hash"] = c_ap["hash"]
    out["c_ap_traffic"] = c_ap["expanded"]
    out["s_ap_traffic"] = s("server", 'derive secret "tls13 s ap traffic"')["expanded"]
    out["exp_master"] = s("server", 'derive secret "tls13 exp master"')["expanded"]
    res = s("client", 'derive secret "tls13 res master"')
    out["client_finished_hash"] = res["hash"]
    out["res_master"] = res["expanded"]
    out["resumption_psk"] = s("server", 'generate resumption secret "tls13 resumption"')["expanded"]

    for name, party, title in (
        ("server_hs", "server", "derive write traffic keys for handshake data"),
        ("client_hs", "server", "derive read traffic keys for handshake data"),
        ("server_ap", "server", "derive write traffic keys for application data"),
        ("client_ap", "client", "derive write traffic keys for application data"),
    ):
        keys_step = s(party, title)
        out[f"{name}_key"] = keys_step["key expanded"]
        out[f"{name}_iv"] = keys_step["iv expanded"]

    out["encrypted_extensions"] = s("server", "construct an EncryptedExtensions handshake message")[
        "EncryptedExtensions"
    ]
    out["certificate"] = s("server", "construct a Certificate handshake message")["Certificate"]
    out["certificate_verify"] = s("server", "construct a CertificateVerify handshake message")[
        "CertificateVerify"
    ]
    for party in ("server", "client"):
        finished = s(party, 'calculate finished "tls13 finished"')
        out[f"{party}_finished_key"] = finished["expanded"]
        out[f"{party}_finished_verify_data"] = finished["finished"]
        out[f"{party}_finished"] = s(party, "construct a Finished handshake message")["Finished"]

    flight = s("server", "send handshake record", 1)
    out["server_encrypted_flight"] = flight["payload"]
    out["server_encrypted_flight_record"] = flight["complete record"]
    out["client_finished_record"] = s("client", "send handshake record", 1)["complete record"]
    out["new_session_ticket"] = s("server", "construct a NewSessionTicket handshake message")[
        "NewSessionTicket"
    ]
    out["new_session_ticket_record"] = s("server", "send handshake record", 2)["complete record"]

    for party in ("client", "server"):
        app = s(party, "send application_data record")
        out[f"{party}_app_data_payload"] = app["payload"]
        out[f"{party}_app_data_record"] = app["complete record"]
        alert = s(party, "send alert record")
        out[f"{party}_alert_payload"] = alert["payload"]
        out[f"{party}_alert_record"] = alert["complete record"]
    return out


def load_simple_1rtt() -> dict[str, bytes]:
    """The RFC 8448 §3 values under the keys listed in this module's docstring."""
    return dict(_load_simple_1rtt())
