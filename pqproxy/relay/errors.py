"""The answers the proxy writes itself: `HttpError` (a status, a log reason, a client
message), `error_response` (the JSON error body, OpenAI-style `type`), reason phrases, the
statuses after which a connection closes (`CLOSING_STATUSES`), and `classify_h11_error` for
what h11 refuses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from http import HTTPStatus

import h11

from .fields import Header, HeaderList, field_value

# -- errors ------------------------------------------------------------------------------------

# The `type` of the JSON error body, in the OpenAI-style vocabulary that inference clients
# already parse. A status not listed falls back to its HTTPStatus name in snake case.
ERROR_TYPES: dict[int, str] = {
    400: "bad_request",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    431: "request_header_fields_too_large",
    501: "not_implemented",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}

# RFC 9110 renamed these; Python 3.11's HTTPStatus still has the RFC 7231 phrases, and the
# phrase on the wire should not change with the interpreter version.
_REASON_OVERRIDES: dict[int, str] = {
    413: "Content Too Large",  # RFC 9110 §15.5.14
    414: "URI Too Long",  # RFC 9110 §15.5.15
    422: "Unprocessable Content",  # RFC 9110 §15.5.21
}

_DEFAULT_MESSAGES: dict[int, str] = {
    400: "The request is malformed.",
    408: "The request was not received in time.",
    413: "The request body is too large.",
    414: "The request target is too long.",
    431: "The request header fields are too large.",
    501: "The request uses a transfer coding the proxy does not implement.",
    502: "The upstream server could not be reached or sent an invalid response.",
    503: "The service is temporarily unavailable.",
    504: "The upstream server did not answer in time.",
    505: "Only HTTP/1.0 and HTTP/1.1 are supported.",
}

# After these the bytes that follow on the connection cannot be trusted to start a new
# request: the head was malformed (400), cut short (408), or its body is left unread (405,
# 413, 414, 431, 501: a body whose framing we refused cannot be skipped). Keeping the
# connection would let the remainder be parsed as a request (smuggling).
CLOSING_STATUSES = frozenset({400, 405, 408, 413, 414, 431, 501, 505})


class HttpError(Exception):
    """An HTTP status the proxy answers itself.

    `reason` is for the log line only (it may quote what the client sent); `message` is what the
    client reads in the JSON body, and is always text written here, never a library's string.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        message: str | None = None,
        headers: HeaderList | None = None,
    ) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
        self.message = message if message is not None else default_message(status)
        # Fields the status requires beside the error body (Allow on a 405).
        self.headers: HeaderList = list(headers or ())

    def response(
        self,
        *,
        request_id: str | None = None,
        close: bool | None = None,
        head_request: bool = False,
    ) -> tuple[h11.Response, bytes]:
        return error_response(
            self.status,
            self.message,
            request_id=request_id,
            close=close,
            head_request=head_request,
            headers=self.headers,
        )


def default_message(status: int) -> str:
    if status in _DEFAULT_MESSAGES:
        return _DEFAULT_MESSAGES[status]
    return f"{reason_phrase(status).decode('ascii') or 'Error'}."


def reason_phrase(status: int) -> bytes:
    """The reason phrase for `status` (h11 sends none unless told)."""
    if status in _REASON_OVERRIDES:
        return _REASON_OVERRIDES[status].encode("ascii")
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    try:
        return HTTPStatus(status).name.lower()
    except ValueError:
        return "error"


def error_response(
    status: int,
    message: str,
    *,
    request_id: str | None = None,
    close: bool | None = None,
    head_request: bool = False,
    headers: Iterable[Header] = (),
) -> tuple[h11.Response, bytes]:
    """A response the proxy writes itself, and its JSON body; `headers` are added to it.

    `close=None` closes for `CLOSING_STATUSES`; the driver passes `close=True` for a 5xx when the
    client's request body was not read to its end. `head_request=True` returns an empty body
    (RFC 9110 §9.3.2: a response to HEAD has none; h11 raises if one is sent) while keeping the
    Content-Length a GET would have had.
    """
    error: dict[str, object] = {"type": error_type(status), "message": message, "status": status}
    if request_id is not None:
        error["request_id"] = request_id
    # ensure_ascii: the body is plain ASCII whatever the message holds.
    body = json.dumps({"error": error}, separators=(",", ":")).encode("ascii")
    fields: HeaderList = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        *headers,
    ]
    if request_id is not None:
        fields.append((b"x-request-id", field_value(request_id)))
    if close if close is not None else status in CLOSING_STATUSES:
        fields.append((b"connection", b"close"))
    response = h11.Response(status_code=status, headers=fields, reason=reason_phrase(status))
    return response, b"" if head_request else body


def classify_h11_error(exc: h11.RemoteProtocolError) -> HttpError:
    """Map what h11 refused to the status we answer. Never raises.

    Classified by h11's `error_status_hint` only, never by its message text: 431 when an
    incomplete head outgrew `max_incomplete_event_size`; every other hint becomes 400. h11 hints
    501 for any transfer coding other than one chunked, but the driver's `RequestHeadReader`
    has already answered those (400 or 501, `check_request_codings`) or made them readable;
    a 501 hint that still gets here is refused as malformed.
    """
    hint = getattr(exc, "error_status_hint", 400)
    status = 431 if hint == 431 else 400
    return HttpError(status, f"h11 refused the request (hint {hint}): {_h11_summary(exc)}")


def _h11_summary(exc: BaseException) -> str:
    # h11's messages quote the offending bytes ("illegal header line: bytearray(b'...')"), and
    # those may be a bearer token. Keep h11's own words, before the first colon, for the log.
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else type(exc).__name__
    return text.split(":", 1)[0].strip()[:80]
