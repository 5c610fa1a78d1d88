"""A small OpenAI-shaped HTTP/1.1 server to put behind the proxy in demos and tests.

It stands in for a model server until the real HTTP relay lands: keep-alive, a JSON API, and
an SSE token stream at a fixed rate so streaming latency through the proxy can be seen.

    GET  /health               200 {"status": "ok"}
    GET  /v1/models            one model, "pqproxy-demo"
    POST /v1/chat/completions  a chat.completion, or with "stream": true an SSE stream of
                               ``tokens`` chunks ``token_interval`` seconds apart, then [DONE]
    anything else              404
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11

from .io.loop import ShutdownSignals

logger = logging.getLogger(__name__)

MODEL_ID = "pqproxy-demo"
# Request bodies above this are answered with 413 without being read.
MAX_BODY = 1 << 20
# h11 buffers an incomplete head up to this; beyond it the request is rejected (431).
MAX_HEAD = 16 * 1024
# A keep-alive connection with no new request for this long is closed.
KEEPALIVE_TIMEOUT = 30.0
# Bound on each read of a request in progress and on each write drain.
IO_TIMEOUT = 30.0
READ_SIZE = 65536
DEFAULT_TOKENS = 16
DEFAULT_TOKEN_INTERVAL = 0.02
# Upper bounds so a request cannot ask the demo to stream forever.
MAX_TOKENS = 100_000

_WORDS = ("post", "quantum", "hello", "from", "the", "pqproxy", "demo", "upstream")


@dataclass(frozen=True)
class DemoOptions:
    tokens: int = DEFAULT_TOKENS
    token_interval: float = DEFAULT_TOKEN_INTERVAL


class _Reject(Exception):
    """Ends a request with an error status, then the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _token_text(i: int) -> str:
    return ("" if i == 0 else " ") + _WORDS[i % len(_WORDS)]


async def serve_demo_upstream(
    host: str,
    port: int,
    *,
    tokens: int = DEFAULT_TOKENS,
    token_interval: float = DEFAULT_TOKEN_INTERVAL,
) -> asyncio.Server:
    """Start the demo server and return it (already serving)."""
    if not 0 <= tokens <= MAX_TOKENS:
        raise ValueError(f"tokens must be between 0 and {MAX_TOKENS}")
    if token_interval < 0:
        raise ValueError("token_interval must not be negative")
    options = DemoOptions(tokens=tokens, token_interval=token_interval)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_connection(reader, writer, options)

    return await asyncio.start_server(handler, host, port, reuse_address=True)


async def run_demo_upstream(
    host: str,
    port: int,
    *,
    tokens: int = DEFAULT_TOKENS,
    token_interval: float = DEFAULT_TOKEN_INTERVAL,
    on_listening: Callable[[str, int], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (the ``demo-upstream`` subcommand)."""
    with ShutdownSignals() as signals:
        server = await serve_demo_upstream(host, port, tokens=tokens, token_interval=token_interval)
        try:
            bound_port: int = server.sockets[0].getsockname()[1]
            if on_listening is not None:
                on_listening(host, bound_port)
            sig = await signals.wait()
            logger.info("received %s, stopping", sig.name)
        finally:
            await _close_server(server)


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    try:
        await asyncio.wait_for(server.wait_closed(), 5.0)
    except TimeoutError:
        logger.warning("demo upstream: connections still open at exit")


async def _serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, options: DemoOptions
) -> None:
    peername = writer.get_extra_info("peername")
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        while True:
            try:
                keep_going = await _serve_one(conn, reader, writer, options)
            except _Reject as rej:
                logger.info("demo upstream peer=%s: %d %s", peername, rej.status, rej.message)
                await _send_error(conn, writer, rej.status, rej.message)
                return
            if not keep_going:
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except (ConnectionError, TimeoutError) as exc:
        logger.debug("demo upstream peer=%s: %s", peername, exc or type(exc).__name__)
    except Exception as exc:
        logger.error("demo upstream peer=%s: %s: %s", peername, type(exc).__name__, exc)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), IO_TIMEOUT)
        except (ConnectionError, TimeoutError):
            pass


async def _next_event(
    conn: h11.Connection, reader: asyncio.StreamReader, timeout: float
) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            # h11's hint is already the right status (400, or 431 for an oversized head).
            raise _Reject(exc.error_status_hint, f"bad request: {exc}") from None
        if event is not h11.NEED_DATA:
            return event
        data = await asyncio.wait_for(reader.read(READ_SIZE), timeout)
        conn.receive_data(data)


async def _serve_one(
    conn: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    options: DemoOptions,
) -> bool:
    """Serve one request; False when the connection should end."""
    try:
        event = await _next_event(conn, reader, KEEPALIVE_TIMEOUT)
    except TimeoutError:
        return False
    if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
        return False
    if not isinstance(event, h11.Request):
        raise _Reject(400, f"unexpected {type(event).__name__}")

    method = event.method.decode("ascii", "replace")
    target = event.target.decode("ascii", "replace")
    path = target.split("?", 1)[0]
    length = _content_length(event.headers)
    if length is not None and length > MAX_BODY:
        raise _Reject(413, f"body of {length} bytes exceeds {MAX_BODY}")
    body = await _read_body(conn, reader)

    if method == "GET" and path == "/health":
        await _send_json(conn, writer, 200, {"status": "ok"})
    elif method == "GET" and path == "/v1/models":
        await _send_json(conn, writer, 200, _models())
    elif method == "POST" and path == "/v1/chat/completions":
        request = _parse_json(body)
        if request.get("stream") is True:
            await _stream_completion(conn, writer, request, options)
        else:
            await _send_json(conn, writer, 200, _completion(request, options))
    else:
        await _send_json(conn, writer, 404, {"error": {"message": f"no route {method} {path}"}})
    return True


def _content_length(headers: Any) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _read_body(conn: h11.Connection, reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, reader, IO_TIMEOUT)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY:
                raise _Reject(413, f"body exceeds {MAX_BODY} bytes")
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        else:
            raise _Reject(400, f"unexpected {type(event).__name__} in body")


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Reject(400, f"body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _Reject(400, "body is not a JSON object")
    return value


def _models() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "pqproxy"}],
    }


def _completion(request: dict[str, Any], options: DemoOptions) -> dict[str, Any]:
    text = "".join(_token_text(i) for i in range(options.tokens))
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(request.get("model") or MODEL_ID),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 0,
            "completion_tokens": options.tokens,
            "total_tokens": options.tokens,
        },
    }


async def _stream_completion(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    request: dict[str, Any],
    options: DemoOptions,
) -> None:
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = str(request.get("model") or MODEL_ID)
    headers = [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("transfer-encoding", "chunked"),
    ]
    await _send(conn, writer, h11.Response(status_code=200, headers=headers))
    for i in range(options.tokens):
        if i and options.token_interval:
            # The pacing is the point: it makes per-token latency through the proxy visible.
            await asyncio.sleep(options.token_interval)
        delta: dict[str, str] = {"content": _token_text(i)}
        if i == 0:
            delta["role"] = "assistant"
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "finish_reason": "stop" if i == options.tokens - 1 else None,
                }
            ],
        }
        await _send(conn, writer, h11.Data(data=_sse(chunk)))
    await _send(conn, writer, h11.Data(data=b"data: [DONE]\n\n"))
    await _send(conn, writer, h11.EndOfMessage())


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), IO_TIMEOUT)


async def _send_json(
    conn: h11.Connection, writer: asyncio.StreamWriter, status: int, payload: dict[str, Any]
) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    await _send(conn, writer, h11.Response(status_code=status, headers=headers))
    await _send(conn, writer, h11.Data(data=body))
    await _send(conn, writer, h11.EndOfMessage())


async def _send_error(
    conn: h11.Connection, writer: asyncio.StreamWriter, status: int, message: str
) -> None:
    if conn.our_state not in {h11.IDLE, h11.SEND_RESPONSE}:
        return
    body = json.dumps({"error": {"message": message}}).encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    try:
        await _send(conn, writer, h11.Response(status_code=status, headers=headers))
        await _send(conn, writer, h11.Data(data=body))
        await _send(conn, writer, h11.EndOfMessage())
    except h11.LocalProtocolError as exc:
        logger.debug("demo upstream: could not send %d: %s", status, exc)
