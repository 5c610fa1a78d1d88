"""Client-supplied text made safe for a log line.

Anything a client chose (a server name, an ALPN protocol, a request target, a reason that
quotes one) goes through ``printable`` before it is logged: no byte outside printable ASCII
reaches the line, so a client can neither start a forged log line with CR/LF nor hide text
with terminal escapes. Every layer may use it (it imports nothing of pqproxy).
"""

from __future__ import annotations

__all__ = ["printable"]


def _escape_table(spaces: bool) -> tuple[str, ...]:
    low = 0x20 if spaces else 0x21
    # The backslash stays as it is: escaping is then idempotent, so text that quotes an
    # already escaped value (an alert reason naming the server_name) can be escaped again by
    # the layer that logs it without turning "\x0d" into "\x5cx0d".
    return tuple(chr(b) if low <= b <= 0x7E else f"\\x{b:02x}" for b in range(256))


_ESCAPED = _escape_table(spaces=False)
_ESCAPED_KEEPING_SPACES = _escape_table(spaces=True)


def printable(value: str | bytes, *, spaces: bool = False) -> str:
    """``value`` with every byte outside printable ASCII written as ``\\xNN`` (a str is taken
    as its UTF-8 bytes). Spaces are escaped too unless ``spaces``: a value that stands in a
    ``key=value`` field must stay one word. ``printable(printable(v)) == printable(v)``."""
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    table = _ESCAPED_KEEPING_SPACES if spaces else _ESCAPED
    return "".join([table[b] for b in data])
