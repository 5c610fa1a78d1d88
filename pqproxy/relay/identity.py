"""The client certificate's identity (mutual TLS) outside the TLS engine: the names of the
headers that carry it upstream (`IdentityHeaders`), their values (RFC 4514 subject escaped,
SANs percent-encoded), the allow-list check, and its forms for log lines.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..crypto.provider import PeerIdentity
from .fields import HeaderList


@dataclass(frozen=True)
class IdentityHeaders:
    """Names of the request headers that carry the client certificate's identity upstream;
    None: that part is not sent. Whatever the client sent under these names is always
    removed first, whether or not the connection has an identity."""

    subject: str | None = "X-Client-Subject"
    uris: str | None = "X-Client-URI"
    dns: str | None = "X-Client-DNS"

    def lowered(self) -> frozenset[bytes]:
        return frozenset(
            n.lower().encode("ascii") for n in (self.subject, self.uris, self.dns) if n
        )


def identity_header_fields(names: IdentityHeaders, identity: PeerIdentity) -> HeaderList:
    """The identity as request headers. The subject is the RFC 4514 string with every byte
    that is not printable ASCII escaped as RFC 4514 §2.4 allows (``\\0d``, ``\\c3\\a9``), so it
    still names the same DN; URIs and DNS names are joined with ", ", with a comma or an
    unprintable byte inside one percent-encoded."""
    out: HeaderList = []
    if names.subject is not None and identity.subject:
        out.append((names.subject.lower().encode("ascii"), escape_dn(identity.subject)))
    if names.uris is not None and identity.uris:
        out.append((names.uris.lower().encode("ascii"), _join_values(identity.uris)))
    if names.dns is not None and identity.dns_names:
        out.append((names.dns.lower().encode("ascii"), _join_values(identity.dns_names)))
    return out


def escape_dn(subject: str) -> bytes:
    """An RFC 4514 string made a safe header value: no CR, LF, NUL or other control byte, no
    non-ASCII byte, no whitespace at either end; the DN it names is unchanged."""
    out = bytearray()
    for char in subject:
        if 0x20 <= ord(char) < 0x7F:
            out += char.encode("ascii")
        else:
            for byte in char.encode("utf-8", "surrogatepass"):
                out += b"\\%02x" % byte
    # h11 refuses a value with whitespace at either end (RFC 9110 §5.5); cryptography escapes
    # a DN's leading and trailing spaces already, this keeps it so for any input.
    if out[:1] == b" ":
        out[:1] = b"\\20"
    if out[-1:] == b" ":
        # Already escaped ("\\ ", as cryptography writes it) when an odd number of
        # backslashes precedes it: then only the space itself becomes its hex pair.
        backslashes = len(out) - 1 - len(out[:-1].rstrip(b"\\"))
        out[-1:] = b"20" if backslashes % 2 else b"\\20"
    return bytes(out)


def _join_values(values: Iterable[str]) -> bytes:
    return b", ".join(_percent_encode(v) for v in values)


def _percent_encode(value: str) -> bytes:
    return b"".join(
        bytes((b,)) if 0x21 <= b <= 0x7E and b != 0x2C else b"%%%02X" % b
        for b in value.encode("utf-8", "surrogatepass")
    )


def identity_allowed(identity: PeerIdentity | None, allow: frozenset[str]) -> bool:
    """Whether any name of ``identity`` is on ``allow``: a URI SAN or the RFC 4514 subject
    exactly, a DNS SAN case-insensitively (the verifier lower-cases them). No identity (no
    certificate under client_auth: optional) is never allowed."""
    if identity is None:
        return False
    if identity.subject in allow or any(uri in allow for uri in identity.uris):
        return True
    lowered = {entry.lower() for entry in allow}
    return any(name in lowered for name in identity.dns_names)


def identity_label(identity: PeerIdentity | None) -> str:
    """One word for a key=value log line: the first URI SAN, else the first DNS SAN, else the
    subject, percent-encoded so that it holds no space or control character; "-" for none."""
    if identity is None:
        return "-"
    first = (identity.uris or identity.dns_names or (identity.subject,))[0]
    return _percent_encode(first).decode("ascii") or "-"


def describe_identity(identity: PeerIdentity | None) -> str:
    """The identity for a log line, with every name made printable."""
    if identity is None:
        return "no client certificate"
    parts = [f"subject={escape_dn(identity.subject).decode('ascii')}"]
    if identity.uris:
        parts.append(f"uris={_join_values(identity.uris).decode('ascii')}")
    if identity.dns_names:
        parts.append(f"dns={_join_values(identity.dns_names).decode('ascii')}")
    return " ".join(parts)
